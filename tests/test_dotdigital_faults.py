"""Dotdigital answers that are not Dotdigital's (a proxy's ``{"message": "ok"}``, a 429 that
never ends, a removal job that never ends) and a run killed between an import being applied
and acknowledged: none of them may count as done, wait for ever, or turn our own unsubscribe
into the person's.

Whole runs go through the sandbox; single calls through ``httpx.MockTransport`` (no server),
with the waits on a fake clock."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pytest

from reverse_etl.consent.memory import ConsentMemory
from reverse_etl.destinations import http
from reverse_etl.destinations.dotdigital import readback
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.destinations.dotdigital.destination import DotdigitalBase
from reverse_etl.destinations.dotdigital.imports import Import, ImportQueue, Waits
from reverse_etl.destinations.dotdigital.membership import Membership
from reverse_etl.destinations.dotdigital.profiles import CONTACT_IMPORTS
from reverse_etl.errors import EXIT_OK, DestinationError
from reverse_etl.sandbox import DotdigitalSandbox
from reverse_etl.state import StateStore
from tests.helpers import at
from tests.sandboxes import Rig, email_of, fast_clients, profile_row, rig_fixture, sync_entry

# --------------------------------------------------------------------------- whole runs


@pytest.fixture
def dotdigital(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    fast_clients(monkeypatch)
    yield from rig_fixture(request, tmp_path, DotdigitalSandbox)


def _people(consent: str | None, consented_at: datetime, later: int) -> list[Any]:
    return [
        profile_row(
            n,
            email_consent=consent if n == 0 else "yes",
            last_order_at=consented_at if n == 0 else at(3600 + n),
            modified_at=at(later + n),
        )
        for n in range(3)
    ]


def test_our_unsubscribe_applied_before_a_crash_does_not_hold_a_newer_subscribe(
    dotdigital: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 9: the run is killed after Dotdigital applied our unsubscribe and before it was
    acknowledged. Next run the person's warehouse consent is "yes" again (newer in the
    warehouse): the opt-out read back is ours (recorded as an intent before the import), so
    the subscribe is sent, not held as ``kept_unsubscribed``."""
    rig = dotdigital()
    rig.configure(
        [
            sync_entry(
                "contacts",
                "dotdigital",
                {"email": "email", "first_name": "FIRSTNAME"},
                consent={"email": {"column": "email_consent", "consented_at": "last_order_at"}},
            )
        ]
    )
    rig.table(_people(None, at(3600), 0))  # person 0: no consent yet
    assert rig.run("contacts").exit_code == EXIT_OK

    rig.table(_people("no", at(40_000), 100))
    real = DotdigitalBase.complete

    def killed(self: DotdigitalBase, item: Any, tally: Any) -> None:
        for imp in item.imports:  # the imports are applied at Dotdigital ...
            self.imports.wait(imp)
        raise DestinationError("killed before the batch was acknowledged")  # ... not acked

    monkeypatch.setattr(DotdigitalBase, "complete", killed)
    crashed = rig.run("contacts")
    assert crashed.exit_code != EXIT_OK
    contact = rig.sandbox.contact(email_of(0))
    assert contact is not None
    assert contact["channelProperties"]["email"]["status"] == "unsubscribed"

    monkeypatch.setattr(DotdigitalBase, "complete", real)
    rig.table(_people("yes", at(60_000), 200))  # newer than the warehouse's "no"
    again = rig.run("contacts")
    assert again.exit_code == EXIT_OK, again.record.message
    assert again.by_reason.get("kept_unsubscribed", 0) == 0, again.by_reason
    contact = rig.sandbox.contact(email_of(0))
    assert contact is not None
    assert contact["channelProperties"]["email"]["status"] == "subscribed"


def test_an_opt_out_of_the_person_still_wins_over_an_older_subscribe(
    dotdigital: Callable[..., Rig],
) -> None:
    """The safe side of defect 9: an opt-out we did not send (no intent, no acknowledgement
    for that person) holds an older subscribe back."""
    rig = dotdigital()
    rig.configure(
        [
            sync_entry(
                "contacts",
                "dotdigital",
                {"email": "email", "first_name": "FIRSTNAME"},
                consent={"email": {"column": "email_consent", "consented_at": "last_order_at"}},
            )
        ]
    )
    rig.table(_people("yes", at(3600), 0))
    assert rig.run("contacts").exit_code == EXIT_OK
    rig.sandbox.act_as_person(email_of(0), "unsubscribe", at=at(50_000))
    rig.table(_people("yes", at(40_000), 100))
    held = rig.run("contacts")
    assert held.by_reason.get("kept_unsubscribed") == 1, held.by_reason
    contact = rig.sandbox.contact(email_of(0))
    assert contact is not None
    assert contact["channelProperties"]["email"]["status"] == "unsubscribed"


# --------------------------------------------------------------------------- single calls


def _client(
    handler: Callable[[httpx.Request], httpx.Response], attempts: int = 3
) -> DotdigitalClient:
    conn = DotdigitalConnection(
        type="dotdigital", username="apiuser-faults@x.test", password="pw", base_url="http://v.test"
    )
    retry = http.RetryPolicy(max_attempts=attempts, base_delay=0.0, max_delay=0.0)
    return DotdigitalClient(conn, retry=retry, transport=httpx.MockTransport(handler))


def _json(status: int, body: Any, **headers: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, content=orjson.dumps(body), headers=headers)


@pytest.fixture
def memory(tmp_path: Path) -> Iterator[ConsentMemory]:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}", root=tmp_path)
    yield ConsentMemory(store, "dotdigital:test")
    store.close()


@pytest.mark.parametrize(
    "body",
    [
        {"message": "ok"},
        [{"reason": "Unsubscribed"}],  # rows without suppressedContact and dateRemoved
        [{"suppressedContact": {"email": "a@x.test"}}],  # without dateRemoved
    ],
)
def test_an_opt_out_read_back_that_is_not_a_list_of_suppressions_is_a_failed_read(
    body: Any, memory: ConsentMemory
) -> None:
    """Defect 2: not "nobody opted out": the run stops before anything is sent."""
    client = _client(_json(200, body))
    with pytest.raises(DestinationError, match="read-back failed"):
        readback.read_back(client, memory)
    assert all(memory.cursor(stream) is None for stream in readback.STREAMS)
    client.close()


def test_an_opt_in_read_back_without_its_items_is_a_failed_read(memory: ConsentMemory) -> None:
    client = _client(_json(200, {"message": "ok"}))
    with pytest.raises(DestinationError, match="read-back failed"):
        readback.read_opt_ins(client, memory)
    assert memory.cursor(readback.OPT_INS) is None
    client.close()


def test_an_empty_read_back_is_a_read(memory: ConsentMemory) -> None:
    client = _client(_json(200, []))
    assert readback.read_back(client, memory) == 0
    client.close()


class _Clock:
    """A fake clock its sleeps move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _queue(client: DotdigitalClient, clock: _Clock) -> ImportQueue:
    waits = Waits(poll_first=0.01, poll_max=1.0, clock=clock, sleep=clock.sleep)
    return ImportQueue(client, CONTACT_IMPORTS, poll_interval=0.01, waits=waits)


def test_an_import_put_answered_without_an_import_id_names_the_call() -> None:
    """Defect 8: a 200 without ``importId`` is a DestinationError, not a KeyError."""
    client = _client(_json(200, {"message": "ok"}))
    with pytest.raises(DestinationError, match="without an importId") as info:
        _queue(client, _Clock()).submit(Import(b"{}", pa.array([1, 2])))
    assert "PUT /contacts/v3/import" in str(info.value)
    client.close()


def test_a_call_budget_429_on_the_import_put_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defect 4: a 429 without tooManyActiveImports is not retried for ever: each wait is
    logged, the attempts are counted, and an HTTP-date Retry-After is read as seconds."""
    puts: list[int] = []
    when = datetime.now(UTC) + timedelta(seconds=30)

    def budget(request: httpx.Request) -> httpx.Response:
        puts.append(1)
        if len(puts) > 50:  # the old loop: stop it here, the test has failed
            raise RuntimeError("still retrying the 429")
        return httpx.Response(
            429,
            content=b'{"message":"slow down"}',
            headers={"Retry-After": format_datetime(when, usegmt=True)},
        )

    client = _client(budget, attempts=4)
    client.api.retry.max_retry_after = 120.0
    clock = _Clock()
    with caplog.at_level(logging.INFO), pytest.raises(DestinationError, match="429"):
        _queue(client, clock).submit(Import(b"{}", pa.array([1])))
    assert len(puts) == 4
    assert len(clock.slept) == 3 and all(20 < s <= 31 for s in clock.slept), clock.slept
    waits = [r for r in caplog.records if "429 (the call budget)" in r.getMessage()]
    assert len(waits) == 3
    client.close()


def test_a_removal_job_that_stays_started_is_waited_for_until_the_import_timeout() -> None:
    """Defect 5: a removal job "Started" for ever ends at the connection's
    import_timeout_minutes, with no member reported removed."""
    polls: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, content=orjson.dumps({"id": "J1", "status": "Started"}))
        polls.append(request.url.path)
        if len(polls) > 500:
            raise RuntimeError("still polling")
        return httpx.Response(200, content=orjson.dumps({"id": "J1", "status": "Started"}))

    client = _client(api)
    clock = _Clock()
    waits = Waits(
        poll_first=0.5, poll_max=60.0, import_timeout=600.0, clock=clock, sleep=clock.sleep
    )
    members = pa.table({"__row": [1], "__id": ["a"], "key": ["a@x.test"], "dest_id": ["11"]})
    with pytest.raises(DestinationError, match="import_timeout_minutes") as info:
        Membership(client, "email", poll_interval=0.5, waits=waits).remove(7, members)
    assert "still running" in str(info.value)
    assert 600.0 <= clock.now < 700.0 and 0 < len(polls) < 100
    client.close()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v2/address-books", {"message": "ok"}),
        ("/v2/address-books", [{"name": "Members"}]),  # a book without its id
        ("/v2/data-fields", {"message": "ok"}),
        ("/v2/data-fields", [{"type": "String"}]),  # a field without its name
    ],
)
def test_lookups_answered_out_of_shape_name_the_call(path: str, body: Any) -> None:
    """These were "internal error" (AttributeError, KeyError, TypeError)."""
    client = _client(_json(200, body))
    with pytest.raises(DestinationError, match=f"Dotdigital GET {path}"):
        if path == "/v2/address-books":
            client.find_address_book("Members")
        else:
            client.data_fields()
    client.close()


@pytest.mark.parametrize("status", ["Exploded", None])
def test_an_import_status_the_api_does_not_document_is_an_error_at_once(
    status: str | None,
) -> None:
    """It was taken as "still running" and waited on for import_timeout_minutes (360)."""
    client = _client(_json(200, {"id": "imp-1", "status": status}))
    queue = _queue(client, _Clock())
    with pytest.raises(DestinationError, match="does not document"):
        queue.status(Import(b"{}", pa.array([1]), id="imp-1"))
    client.close()

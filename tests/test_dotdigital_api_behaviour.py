"""Dotdigital as the real API behaves: import slots shared with other integrations, the tiered
per-minute call limits, slow answers, hours-long imports, regions and the report's counts.
Whole syncs run against the sandbox at a high speedup; waits are checked on a fake clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pyarrow as pa
import pytest

from reverse_etl.config import load_project
from reverse_etl.destinations import jobs
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.destinations.dotdigital.imports import Import, ImportQueue, Waits
from reverse_etl.destinations.dotdigital.profiles import CONTACT_IMPORTS
from reverse_etl.destinations.http import RetryPolicy
from reverse_etl.errors import EXIT_OK, DestinationError
from reverse_etl.sandbox import DotdigitalSandbox, SandboxServer, SandboxSettings
from reverse_etl.sandbox.dotdigital import TIERS
from reverse_etl.state import StateStore
from tests.helpers import execute, write_project
from tests.sandbox.sandbox_helpers import FakeTime
from tests.sandboxes import Rig, assert_counts_add_up, fast_clients, rig_fixture, sync_entry
from tests.test_destination_dotdigital import MAPPING
from tests.test_dotdigital_scale import people

IMPORT = "/contacts/v3/import"


@pytest.fixture
def dotdigital(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    fast_clients(monkeypatch)
    yield from rig_fixture(request, tmp_path, DotdigitalSandbox)


def configure(rig: Rig, *, import_size: int = 5000, **options: Any) -> None:
    """One contacts sync of ``people``, its connection with ``options`` (poll_max_seconds ...)."""
    conn = rig.plugin.sandbox_connection(rig.sandbox.settings, rig.base_url) | options
    sync = sync_entry(
        "contacts",
        "dotdigital",
        dict(MAPPING),
        destination={"list": "Customers", "import_size": import_size},
        batch_size=10_000,
    )
    write_project(
        rig.root,
        {
            "connections": {"warehouse": {"type": "duckdb", "path": "warehouse.duckdb"}}
            | {"dotdigital": conn},
            "state": {"url": "sqlite:///state/state.db"},
            "error_dir": "errors",
            "syncs": [sync],
        },
    )
    rig.project = load_project(None, rig.root, env={})
    rig.store = rig.store or StateStore(rig.project.state.url, root=rig.root)


# --------------------------------------------------------------------------- shared slots


def test_slots_held_by_another_integration_for_three_minutes_are_waited_for(dotdigital):
    rig = dotdigital(speedup=60.0)  # three vendor minutes last three seconds
    people(rig, 20_000)
    configure(rig, poll_max_seconds=0.5)
    rig.sandbox.hold_import_slots(25, 180.0)
    result = rig.run("contacts")
    assert result.exit_code == EXIT_OK, result
    assert_counts_add_up(result)
    assert result.record.counts.created == 20_000
    assert len(rig.sandbox.contacts()) == 20_000
    refusals = rig.sandbox.counters["too_many_active_imports"]
    assert refusals >= 3  # it waited, backing off (0.02 s doubling to 0.5 s over ~3 s)
    assert refusals < 40


def test_slots_never_given_back_fail_the_run_after_the_bound_naming_the_holders(dotdigital):
    rig = dotdigital(speedup=60.0)
    people(rig, 100)
    configure(rig, poll_max_seconds=0.2, import_slot_wait_minutes=0.02)  # 1.2 s
    rig.sandbox.hold_import_slots(25, 3600.0)
    result = rig.run("contacts")
    assert result.exit_code != EXIT_OK
    message = str(result.record.message)
    assert "import slots stayed taken" in message and "other integrations" in message
    assert "import_slot_wait_minutes" in message
    assert rig.sandbox.contacts() == []


class _Answers:
    """A stand-in client: ``submit_once`` answers from a list, ``json`` a status."""

    def __init__(self, answers: list[httpx.Response], status: str = "NotFinished"):
        self.answers = answers
        self.status = status
        self.polls = 0
        self.api = SimpleNamespace(retry=RetryPolicy())

    def submit_once(self, method: str, path: str, body: bytes) -> httpx.Response:
        return self.answers.pop(0)

    def json(self, method: str, path: str) -> dict[str, Any]:
        self.polls += 1
        return {"importId": "x", "status": self.status}


def _too_many() -> httpx.Response:
    content = b'{"errorCode":"contacts:tooManyActiveImports","description":"..."}'
    return httpx.Response(429, content=content, headers={"Retry-After": "1"})


def test_slot_wait_backs_off_from_seconds_to_a_minute_and_gives_up_after_its_bound():
    t = FakeTime()
    accepted = httpx.Response(202, content=b'{"importId":"abc"}')
    client = _Answers([_too_many() for _ in range(9)] + [accepted])
    waits = Waits(poll_first=1.0, poll_max=60.0, slot_wait=1800.0, clock=t.clock, sleep=t.sleep)
    queue = ImportQueue(client, CONTACT_IMPORTS, poll_interval=1.0, waits=waits)  # type: ignore[arg-type]
    imp = Import(b"{}", pa.array([1]))
    queue.submit(imp)
    assert imp.id == "abc"
    assert t.slept == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    # never given back: the bound (here 5 minutes) ends the wait
    t2 = FakeTime()
    client2 = _Answers([_too_many() for _ in range(100)])
    waits2 = Waits(poll_first=1.0, poll_max=60.0, slot_wait=300.0, clock=t2.clock, sleep=t2.sleep)
    queue2 = ImportQueue(client2, CONTACT_IMPORTS, poll_interval=1.0, waits=waits2)  # type: ignore[arg-type]
    with pytest.raises(DestinationError, match="import slots stayed taken"):
        queue2.submit(Import(b"{}", pa.array([1])))
    assert t2.now == pytest.approx(300.0)
    assert len(t2.slept) < 15  # backed off: a poll a minute at most, not one a second


# --------------------------------------------------------------------------- polls


def test_an_import_poll_backs_off_to_a_minute_and_stops_at_its_deadline():
    t = FakeTime()
    client = _Answers([])
    waits = Waits(
        poll_first=1.0, poll_max=60.0, import_timeout=3600.0, clock=t.clock, sleep=t.sleep
    )
    queue = ImportQueue(client, CONTACT_IMPORTS, poll_interval=1.0, waits=waits)  # type: ignore[arg-type]
    imp = Import(b"{}", pa.array([1]), id="abc", attempts=1)
    queue._active.append(imp)
    with pytest.raises(jobs.JobTimeout):
        queue.wait(imp)
    assert t.slept[:8] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert t.now == pytest.approx(3600.0)
    assert client.polls < 70  # an hour of a job: about a poll a minute, not 3,600


# --------------------------------------------------------------------------- tiered limits


def test_tiered_per_minute_limits_are_paced_on_the_answers_without_a_429_loop(dotdigital):
    limits = {"low": 4, "medium": 10, "high": 20}
    rig = dotdigital(
        speedup=30.0,  # a minute lasts 2 s
        dotdigital_rate_scheme="tiered",
        dotdigital_tier_limits=tuple(limits.items()),
        job_seconds=2.0,
    )
    people(rig, 20_000)
    configure(rig, import_size=2000, poll_max_seconds=0.5)
    started = time.monotonic()
    result = rig.run("contacts")
    elapsed_minutes = (time.monotonic() - started) * 30.0 / 60.0
    assert result.exit_code == EXIT_OK, result
    assert_counts_add_up(result)
    assert len(rig.sandbox.contacts()) == 20_000
    assert rig.sandbox.counters["throttled"] <= 2  # at most a route's first call, never a loop
    puts = sum(1 for r in rig.sandbox.request_log if r.method == "PUT")
    assert puts == 10
    # the achieved share of the low tier's allowed rate (reported, not asserted: wall clock)
    low = sum(1 for r in rig.sandbox.request_log if r.status < 400 and _low(r.method, r.path))
    print(
        f"low tier: {low} calls in {elapsed_minutes:.2f} vendor minutes, "
        f"{low / (limits['low'] * elapsed_minutes):.0%} of the allowed rate"
    )


def _low(method: str, path: str) -> bool:
    return TIERS.get((method, path)) == "low"


# --------------------------------------------------------------------------- lost answers


class _OnceTimeout:
    """Faults: the first contacts import's answer is held back, nothing else is faulted."""

    def __init__(self) -> None:
        self.used = False

    def draw(self, kinds: Any) -> str | None:
        if not self.used and "failed_job" in kinds:
            self.used = True
            return "timeout"
        return None


class _ToSandbox(httpx.HTTPTransport):
    """Every host (r1-api, r2-api ...) to the sandbox; the Host header stays the region's."""

    def __init__(self, base_url: str):
        super().__init__()
        self.base = httpx.URL(base_url)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(
            scheme=self.base.scheme, host=self.base.host, port=self.base.port
        )
        return super().handle_request(request)


def _conn(settings: SandboxSettings, **extra: Any) -> DotdigitalConnection:
    return DotdigitalConnection(
        type="dotdigital", username=settings.username, password=settings.password, **extra
    )


def _body(n: int) -> bytes:
    rows = ",".join(
        f'{{"matchIdentifier":"email","identifiers":{{"email":"p{i}@example.com"}}}}'
        for i in range(n)
    )
    return f'{{"contacts":[{rows}]}}'.encode()


@pytest.mark.parametrize(("held", "timeout", "puts"), [(0.5, 5.0, 1), (1.6, 1.0, 2)])
def test_a_slow_answer_is_waited_for_and_a_lost_one_resubmitted_as_an_upsert(held, timeout, puts):
    settings = SandboxSettings(fault_timeout_seconds=held, speedup=100.0)
    sandbox = DotdigitalSandbox(settings)
    sandbox.faults = _OnceTimeout()  # type: ignore[assignment]
    with SandboxServer(sandbox) as server:
        client = DotdigitalClient(
            _conn(settings, base_url=server.base_url, call_timeout_seconds=timeout)
        )
        queue = ImportQueue(client, CONTACT_IMPORTS, poll_interval=0.02)
        imp = Import(_body(50), pa.array(list(range(50))))
        queue.submit(imp)
        queue.wait(imp)
        assert sandbox.wait_idle(10)

        def answered() -> int:  # a PUT is logged once answered: the held one last
            return sum(1 for r in sandbox.request_log if r.method == "PUT")

        # the held request lands too: polled for, not slept for (it lands ``held`` seconds
        # after it came, which a loaded machine stretches); the deadline is only a hang guard
        deadline = time.monotonic() + 60
        while answered() < puts and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sandbox.wait_idle(10)
        client.close()
    assert answered() == puts
    assert len(sandbox.contacts()) == 50  # resubmitted or not, each contact once
    assert sandbox.violations == []


# --------------------------------------------------------------------------- regions


def test_a_wrong_region_names_the_right_one_and_auto_looks_it_up_once():
    settings = SandboxSettings(dotdigital_region="r2")
    sandbox = DotdigitalSandbox(settings)
    with SandboxServer(sandbox) as server:
        transport = _ToSandbox(server.base_url)
        wrong = DotdigitalClient(_conn(settings, region="r1"), transport=transport)
        with pytest.raises(DestinationError) as refused:
            wrong.data_fields()
        wrong.close()
        assert "https://r2-api.dotdigital.com" in str(refused.value)
        assert "region: r2" in str(refused.value)
        assert settings.password not in str(refused.value)
        assert [v.kind for v in sandbox.violations] == ["region"]
        sandbox.reset_log()
        auto = DotdigitalClient(
            _conn(settings, region="auto"), transport=_ToSandbox(server.base_url)
        )
        assert auto.base_url == "https://r2-api.dotdigital.com"
        assert "FIRSTNAME" in auto.data_fields()
        auto.close()
    assert [(r.path, r.status) for r in sandbox.request_log] == [
        ("/v2/account-info", 200),
        ("/v2/data-fields", 200),
    ]
    assert sandbox.violations == []


# --------------------------------------------------------------------------- report counts


def test_a_globally_suppressed_contact_is_a_failed_row_with_its_reason(dotdigital):
    rig = dotdigital(dotdigital_report_suppressed=True)
    people(rig, 30)
    configure(rig)
    assert rig.run("contacts").exit_code == EXIT_OK
    rig.sandbox.act_as_person("customer00007@example.com", "complain")
    execute(
        rig.db,
        "UPDATE people SET first_name = first_name || '2', "
        "modified_at = modified_at + INTERVAL 1 DAY",
    )
    result = rig.run("contacts")
    counts = result.record.counts
    assert_counts_add_up(result)
    assert (counts.created, counts.updated, counts.failed) == (0, 29, 1)
    assert result.by_reason["globally_suppressed"] == 1

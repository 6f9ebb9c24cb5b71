"""Klaviyo answers that are not Klaviyo's (a proxy's HTML page, a redirect, a document missing
its data): none of them may count as done, and a consent read-back that fails stops the run.

Whole runs go through the sandbox (its handlers wrapped per test, as the fault lab's proxy
rewrote answers); single calls go through ``httpx.MockTransport``, no server at all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pytest
from pydantic import SecretStr
from starlette.responses import HTMLResponse, Response

from reverse_etl.consent.memory import ConsentMemory
from reverse_etl.destinations import jobs as shared_jobs
from reverse_etl.destinations.klaviyo import jobs, readback
from reverse_etl.destinations.klaviyo.client import KlaviyoClient
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.destinations.klaviyo.membership import Membership, members_path
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, DestinationError
from reverse_etl.sandbox import KlaviyoSandbox
from reverse_etl.state import StateStore
from tests.sandboxes import Rig, email_of, fast_clients, profile_rows, rig_fixture, sync_entry

HTML = "<html><body><h1>Service temporarily unavailable</h1></body></html>"


@pytest.fixture
def klaviyo(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    fast_clients(monkeypatch)
    yield from rig_fixture(request, tmp_path, KlaviyoSandbox)


def _sync(**extra: Any) -> dict[str, Any]:
    return sync_entry(
        "profiles", "klaviyo", {"email": "email", "first_name": "first_name"}, **extra
    )


def _email_consent(rig: Rig) -> dict[str, str]:
    return {
        s["email"]: s["consent"]
        for s in rig.sandbox.subscriptions()
        if (s["channel"], s["type"]) == ("email", "marketing")
    }


# --------------------------------------------------------------------------- whole runs


def test_a_200_html_page_for_an_unsubscribe_is_not_counted_and_is_sent_next_run(
    klaviyo: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 1: only Klaviyo's 202 acknowledges a bulk (un)subscribe. A proxy's 200 HTML page
    fails the run with the rows behind the watermark, so the next run sends them."""
    real = KlaviyoSandbox.unsubscribe
    calls: list[int] = []
    broken = [True]  # the sandbox binds its handlers when built: the proxy is switched off

    async def proxy_page(self: KlaviyoSandbox, call: Any) -> Response:
        if not broken[0]:
            return await real(self, call)
        calls.append(1)
        return HTMLResponse(HTML, status_code=200)  # nothing applied

    monkeypatch.setattr(KlaviyoSandbox, "unsubscribe", proxy_page)
    rig = klaviyo()
    rig.table(profile_rows(range(3)))  # email_consent: yes, no, NULL
    rig.configure([_sync(consent={"email": "email_consent"})])
    first = rig.run("profiles")
    assert calls, "the unsubscribe was never sent"
    assert first.exit_code == EXIT_FAILED
    assert "not acknowledged" in (first.record.message or "")
    assert rig.watermark("profiles") is None  # nothing of the batch counted as done
    assert email_of(1) not in _email_consent(rig)

    broken[0] = False
    second = rig.run("profiles")
    assert second.exit_code == EXIT_OK, second.record.message
    assert _email_consent(rig)[email_of(1)] == "UNSUBSCRIBED"


def test_failures_klaviyo_counts_but_does_not_list_fail_the_batch(
    klaviyo: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 6: failed_count 3 with an empty import-errors listing is not 3 rows landed."""
    real = KlaviyoSandbox.get_import_job

    async def three_failed(self: KlaviyoSandbox, call: Any) -> Response:
        response = await real(self, call)
        doc = orjson.loads(response.body)
        attrs = doc["data"]["attributes"]
        if attrs["status"] == "complete":
            attrs["failed_count"] = 3
            attrs["completed_count"] = attrs["total_count"] - 3
        return Response(orjson.dumps(doc), 200, media_type="application/vnd.api+json")

    monkeypatch.setattr(KlaviyoSandbox, "get_import_job", three_failed)
    rig = klaviyo()
    rig.table(profile_rows(range(5)))
    rig.configure([_sync()])
    result = rig.run("profiles")
    assert result.exit_code == EXIT_FAILED
    assert "reported 3 failures it did not list" in (result.record.message or "")
    assert rig.watermark("profiles") is None  # the rows are sent again next run


# --------------------------------------------------------------------------- single calls


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> KlaviyoClient:
    conn = KlaviyoConnection(
        type="klaviyo", api_key=SecretStr("pk_faults_test"), base_url="http://vendor.test"
    )
    client = KlaviyoClient(conn)
    api = client.api
    headers, base_url = api._http.headers, api._http.base_url
    api._http.close()
    api._http = httpx.Client(
        base_url=base_url, headers=headers, transport=httpx.MockTransport(handler)
    )
    api._sleep = lambda _s: None  # type: ignore[method-assign]
    return client


def _answer(status: int, body: Any = None, **headers: str) -> Callable[..., httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers={"content-type": "text/html"})
        return httpx.Response(
            status, content=b"" if body is None else orjson.dumps(body), headers=headers
        )

    return handler


@pytest.mark.parametrize(
    ("status", "body", "headers"),
    [(307, None, {"location": "http://elsewhere.test/x"}), (200, HTML, {})],
)
def test_a_list_removal_answered_other_than_204_removes_nobody(
    status: int, body: Any, headers: dict[str, str]
) -> None:
    """Defect 3: a redirect or a 200 HTML page is not "removed"."""
    client = _client(_answer(status, body, **headers))
    members = pa.table(
        {
            "__row": [1, 2],
            "__id": ["a", "b"],
            "key": ["a@x.test", "b@x.test"],
            "dest_id": ["P1", "P2"],
        }
    )
    # (a redirect may be refused by the HTTP layer already: either way, nobody is removed)
    with pytest.raises(DestinationError) as info:
        Membership(client, "email", "email").remove("L1", members)
    assert members_path("L1") in str(info.value)
    client.close()


def test_a_list_removal_answered_204_removes_the_members() -> None:
    client = _client(_answer(204))
    members = pa.table({"__row": [1], "__id": ["a"], "key": ["a@x.test"], "dest_id": ["P1"]})
    assert Membership(client, "email", "email").remove("L1", members).ids == ["a"]
    client.close()


@pytest.fixture
def memory(tmp_path: Path) -> Iterator[ConsentMemory]:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}", root=tmp_path)
    yield ConsentMemory(store, "klaviyo:test")
    store.close()


@pytest.mark.parametrize(
    "body",
    [
        {"links": {"next": None}},  # data deleted
        {"data": {"type": "profile"}},  # not a list
        {"data": [{"type": "profile", "id": "P1"}]},  # a profile without its attributes
        {"message": "ok"},
    ],
)
def test_a_suppression_read_back_without_its_data_is_a_failed_read(
    body: dict[str, Any], memory: ConsentMemory
) -> None:
    """Defect 2: not "nobody opted out": the run stops before anything is sent, and the
    cursor stays where it was."""
    client = _client(_answer(200, body))
    with pytest.raises(DestinationError, match="read-back failed"):
        readback.read_back(client, memory)
    assert memory.cursor(readback.STREAM) is None
    with pytest.raises(DestinationError, match="read-back failed"):
        readback.subscribed(client, ["a@x.test"])
    client.close()


def test_an_empty_suppression_read_back_is_a_read(memory: ConsentMemory) -> None:
    client = _client(_answer(200, {"data": [], "links": {"next": None}}))
    assert readback.read_back(client, memory) == 0
    client.close()


IMPORT = jobs.JobKind("/api/profile-bulk-import-jobs", "bulk_import_profiles", "x", "import job")


@pytest.mark.parametrize(
    "body", [{"data": {"type": "profile-bulk-import-job"}}, {"message": "ok"}, HTML]
)
def test_a_job_submission_without_its_id_names_the_call(body: Any) -> None:
    """Defect 8: a 2xx without data.id is a DestinationError naming the call, not a KeyError."""
    client = _client(_answer(202 if not isinstance(body, str) else 200, body))
    with pytest.raises(DestinationError, match="without the job's data.id") as info:
        jobs.submit(client, jobs.Job(IMPORT, b"{}", 3))
    assert "POST /api/profile-bulk-import-jobs" in str(info.value)
    assert "check base_url / proxy" in str(info.value)
    client.close()


def _polled(doc: Any) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, content=orjson.dumps({"data": {"id": "J1"}}))
        return httpx.Response(200, content=orjson.dumps(doc))

    return handler


def _wait(client: KlaviyoClient) -> dict[str, Any]:
    job = jobs.submit(client, jobs.Job(IMPORT, b"{}", 3))
    polls: list[float] = []
    clock = iter(float(n) for n in range(10_000))
    waiting = jobs.patience(
        0.01, 120, clock=lambda: next(clock), sleep=polls.append
    )  # a fake clock: a job still running would poll until "120 minutes" pass
    try:
        return jobs.wait(client, job, attempts=3, poll_interval=0.01, waiting=waiting)
    finally:
        assert len(polls) <= 1, f"waited on a job that cannot run: {len(polls)} polls"


def test_a_job_poll_without_attributes_names_the_call() -> None:
    """Defect 8: the poll's answer without data.attributes."""
    client = _client(_polled({"data": {"id": "J1"}}))
    with pytest.raises(DestinationError, match="no data.attributes"):
        _wait(client)
    client.close()


@pytest.mark.parametrize("status", ["failed", "error", None])
def test_a_job_status_outside_the_spec_is_an_error_at_once(status: Any) -> None:
    """Defect 7: "failed" is not in the spec's enum (queued, processing, complete,
    cancelled): an error naming it, not a wait until job_timeout_minutes."""
    attrs = {"status": status, "total_count": 3, "failed_count": 0}
    client = _client(_polled({"data": {"id": "J1", "attributes": attrs}}))
    with pytest.raises(DestinationError, match=repr(status)) as info:
        _wait(client)
    assert not isinstance(info.value, shared_jobs.JobTimeout)
    assert "not one of the spec's" in str(info.value)
    client.close()


def test_a_spec_status_still_polls_to_the_end() -> None:
    attrs = {"status": "complete", "total_count": 3, "failed_count": 0}
    client = _client(_polled({"data": {"id": "J1", "attributes": attrs}}))
    assert _wait(client)["data"]["attributes"]["status"] == "complete"
    client.close()


@pytest.mark.parametrize(
    "body",
    [
        {"links": {"next": None}},  # data deleted
        {"data": [{"type": "list", "attributes": {"name": "Members"}}]},  # an item without id
        {"data": {"id": "L1"}},  # not a list
    ],
)
def test_a_list_lookup_without_its_data_is_an_error_never_a_second_list(body: Any) -> None:
    """Read as "no such list", a lookup answered without its data made the run create a
    second "Members" list, fill it, and exit 0; later runs used the oldest list."""
    posts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posts.append(request.url.path)
            return httpx.Response(201, content=orjson.dumps({"data": {"id": "NEW"}}))
        return httpx.Response(200, content=orjson.dumps(body))

    client = _client(handler)
    with pytest.raises(DestinationError, match="Klaviyo GET /api/lists"):
        client.find_or_create_list("Members")
    client.close()
    assert posts == []

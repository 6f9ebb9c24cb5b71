"""Injected faults: each kind as a client meets it, at roughly the configured rate."""

from __future__ import annotations

import time

import httpx
import pytest

from reverse_etl.sandbox.faults import FaultInjector
from tests.sandbox.sandbox_helpers import import_body, poll, profile

LIST = {"data": {"type": "list", "attributes": {"name": "L"}}}


def test_injector_rate_and_determinism():
    a = FaultInjector(0.2, ("500", "503"), seed=7)
    b = FaultInjector(0.2, ("500", "503"), seed=7)
    draws = [a.draw({"500", "503", "reset"}) for _ in range(5000)]
    assert draws == [b.draw({"500", "503", "reset"}) for _ in range(5000)]
    hits = [d for d in draws if d]
    assert 850 <= len(hits) <= 1150
    assert set(hits) == {"500", "503"}
    assert FaultInjector(1.0, ("failed_job",), seed=1).draw({"500"}) is None


def test_server_errors_at_the_configured_rate(klaviyo_factory):
    sandbox, client = klaviyo_factory(
        enforce_limits=False, fault_rate=0.3, fault_kinds=("500", "503"), seed=3
    )
    statuses = [client.post("/api/lists", json=LIST).status_code for _ in range(200)]
    faults = sum(1 for s in statuses if s in (500, 503))
    assert 40 <= faults <= 80, faults
    assert statuses.count(201) == 200 - faults == len(sandbox.lists())
    assert sandbox.counters["fault_500"] + sandbox.counters["fault_503"] == faults
    assert sandbox.violations == []


def test_faults_spare_lookups(klaviyo_factory):
    sandbox, client = klaviyo_factory(fault_rate=1.0, fault_kinds=("500",))
    assert client.get("/api/profiles").status_code == 200
    assert client.get("/api/lists").status_code == 200
    assert client.post("/api/lists", json=LIST).status_code == 500
    assert sandbox.lists() == []  # profiles(), lists()... are never faulted either


def test_injected_429_carries_retry_after(dotdigital_factory):
    sandbox, client = dotdigital_factory(fault_rate=1.0, fault_kinds=("429",), fault_retry_after=2)
    r = client.post("/v2/data-fields", json={"name": "X", "type": "String"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    assert "X-RateLimit-Remaining" in r.headers
    assert len(sandbox.data_fields()) == 5


def test_connection_reset_is_a_transport_error(klaviyo_factory):
    sandbox, client = klaviyo_factory(fault_rate=1.0, fault_kinds=("reset",))
    with pytest.raises(httpx.TransportError):
        client.post("/api/lists", json=LIST)
    assert sandbox.lists() == []
    assert sandbox.counters["fault_reset"] == 1
    # the server keeps serving other connections
    assert client.get("/api/lists").status_code == 200


def test_timeout_then_applied(klaviyo_factory):
    # The answer is held 2 s against the client's 0.1 s: the "not applied yet" check below has
    # ~1.9 s to run after the timeout (held 0.4 s, a 0.3 s stall of this thread failed it).
    sandbox, client = klaviyo_factory(
        fault_rate=1.0, fault_kinds=("timeout",), fault_timeout_seconds=2.0
    )
    with pytest.raises(httpx.TimeoutException):
        client.post("/api/lists", json=LIST, timeout=0.1)
    assert sandbox.lists() == []
    deadline = time.monotonic() + 30  # only a hang guard: the loop ends when the list appears
    while not sandbox.lists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [x["name"] for x in sandbox.lists()] == ["L"]  # the client cannot know it went through


def test_failed_klaviyo_job_is_cancelled(klaviyo_factory):
    sandbox, client = klaviyo_factory(fault_rate=1.0, fault_kinds=("failed_job",))
    r = client.post(
        "/api/profile-bulk-import-jobs",
        json=import_body([profile("a@example.com"), profile("b@example.com")]),
    )
    assert r.status_code == 202
    job = r.json()["data"]["id"]
    done = poll(
        lambda: client.get(f"/api/profile-bulk-import-jobs/{job}"),
        lambda r: r.json()["data"]["attributes"]["status"] not in ("queued", "processing"),
    )
    attrs = done.json()["data"]["attributes"]
    assert (attrs["status"], attrs["completed_count"], attrs["failed_count"]) == ("cancelled", 0, 2)
    errors = client.get(f"/api/profile-bulk-import-jobs/{job}/import-errors").json()["data"]
    assert [e["attributes"]["source"]["pointer"] for e in errors] == [
        "/data/attributes/profiles/data/0",
        "/data/attributes/profiles/data/1",
    ]
    assert sandbox.profiles() == []


def test_failed_dotdigital_import(dotdigital_factory):
    sandbox, client = dotdigital_factory(fault_rate=1.0, fault_kinds=("failed_job",))
    r = client.put(
        "/contacts/v3/import",
        json={
            "contacts": [{"matchIdentifier": "email", "identifiers": {"email": "a@example.com"}}]
        },
    )
    assert r.status_code == 202
    done = poll(
        lambda: client.get(f"/contacts/v3/import/{r.json()['importId']}"),
        lambda r: r.json()["status"] != "NotFinished",
    )
    assert done.json()["status"] == "Failed"
    assert sandbox.contacts() == []

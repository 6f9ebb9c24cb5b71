"""The Dotdigital sandbox as the real API behaves in what the specs do not say: the tiered
per-minute call limits, import slots other integrations hold, the account's region and the
import report's count of globally suppressed contacts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from reverse_etl.sandbox import DotdigitalSandbox
from tests.sandbox.sandbox_helpers import poll

Factory = Callable[..., tuple[DotdigitalSandbox, httpx.Client]]
IMPORT = "/contacts/v3/import"


def body(*emails: str) -> dict[str, Any]:
    return {
        "contacts": [
            {
                "matchIdentifier": "email",
                "identifiers": {"email": e},
                "dataFields": {"FIRSTNAME": "A"},
            }
            for e in emails
        ]
    }


def finished(client: httpx.Client, import_id: str) -> dict[str, Any]:
    return poll(
        lambda: client.get(f"{IMPORT}/{import_id}"), lambda r: r.json()["status"] == "Finished"
    ).json()


def test_tiered_scheme_counts_each_tier_on_its_own_and_names_it(dotdigital_factory: Factory):
    sandbox, client = dotdigital_factory(
        dotdigital_rate_scheme="tiered",
        dotdigital_tier_limits=(("low", 2), ("high", 5)),
        speedup=0.01,  # a window lasts hours: nothing resets during the test
    )
    first = client.get("/v2/data-fields")  # low
    assert first.headers["X-RateLimit-Scope"] == "low"
    assert (first.headers["X-RateLimit-Limit"], first.headers["X-RateLimit-Remaining"]) == (
        "2",
        "1",
    )
    assert client.get("/v2/address-books").status_code == 200  # low, the last call
    refused = client.get("/v2/data-fields")
    assert refused.status_code == 429
    assert refused.json()["errorCode"] == "ERROR_RATE_LIMIT_EXCEEDED"
    assert int(refused.headers["Retry-After"]) >= 1
    # the high tier is untouched by the low tier's spent window
    high = client.get("/v2/account-info")
    assert high.status_code == 200
    assert (high.headers["X-RateLimit-Scope"], high.headers["X-RateLimit-Remaining"]) == (
        "high",
        "4",
    )
    # medium has no limit here: unlimited, no window headers
    made = client.post("/v2/data-fields", json={"name": "TIER", "type": "String"})
    assert made.status_code < 300
    assert "X-RateLimit-Scope" not in made.headers
    assert sandbox.counters["throttled"] == 1
    assert sandbox.violations == []


def test_hourly_scheme_is_unchanged(dotdigital: tuple[DotdigitalSandbox, httpx.Client]):
    _, client = dotdigital
    answer = client.get("/v2/data-fields")
    assert answer.headers["X-RateLimit-Limit"] == "2000"
    assert "X-RateLimit-Scope" not in answer.headers


def test_slots_held_by_another_integration_refuse_imports_until_given_back(
    dotdigital_factory: Factory,
):
    sandbox, client = dotdigital_factory(speedup=100.0)
    sandbox.hold_import_slots(25, 30.0)  # 30 vendor seconds: 0.3 s real
    refused = client.put(IMPORT, json=body("a@example.com"))
    assert refused.status_code == 429
    assert refused.json()["errorCode"] == "contacts:tooManyActiveImports"
    assert sandbox.active_imports("contacts-import") == 25
    # refused (429, honoured) until the other integration gives its slots back
    accepted = poll(
        lambda: client.put(IMPORT, json=body("a@example.com")), lambda r: r.status_code == 202
    )
    assert accepted.status_code == 202 and sandbox.active_imports("contacts-import") <= 1
    # insight imports have their own slots
    assert sandbox.active_imports("insight-import") == 0


def test_wrong_region_is_403_and_account_info_on_r1_names_the_right_endpoint(
    dotdigital_factory: Factory,
):
    sandbox, client = dotdigital_factory(dotdigital_region="r2")
    wrong = client.get("/v2/data-fields")  # the host 127.0.0.1 is the default endpoint, r1
    assert wrong.status_code == 403
    assert "Access is denied" in wrong.text
    assert [v.kind for v in sandbox.violations] == ["region"]
    info = client.get("/v2/account-info")
    assert info.status_code == 200
    endpoint = {p["name"]: p["value"] for p in info.json()["properties"]}["ApiEndpoint"]
    assert endpoint == "https://r2-api.dotdigital.com"
    right = client.get("/v2/data-fields", headers={"Host": "r2-api.dotdigital.com"})
    assert right.status_code == 200
    other = client.get("/v2/account-info", headers={"Host": "r3-api.dotdigital.com"})
    assert other.status_code == 403  # account info answers on r1 and the account's own region
    sandbox.violations.clear()


def test_a_globally_suppressed_contact_is_counted_and_left_as_it_was(
    dotdigital_factory: Factory,
):
    sandbox, client = dotdigital_factory(dotdigital_report_suppressed=True, speedup=100.0)
    first = finished(
        client, client.put(IMPORT, json=body("a@example.com", "b@example.com")).json()["importId"]
    )
    assert first["summary"]["newContacts"] == 2
    sandbox.act_as_person("b@example.com", "complain")
    again = body("a@example.com", "b@example.com")
    for row in again["contacts"]:
        row["dataFields"] = {"FIRSTNAME": "B"}
    report = finished(client, client.put(IMPORT, json=again).json()["importId"])
    assert report["summary"]["updatedContacts"] == 1
    assert report["summary"]["globallySuppressed"] == 1
    named = {
        r["identifiers"]["email"] for k in ("created", "updated", "failures") for r in report[k]
    }
    assert named == {"a@example.com"}
    b = sandbox.contact("b@example.com")
    assert b is not None and b["dataFields"]["FIRSTNAME"] == "A"  # not updated
    assert sandbox.violations == []

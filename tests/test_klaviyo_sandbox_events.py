"""The Klaviyo sandbox's bulk events refuse a string over 100 KB, as the operation's
description says ("A single string cannot exceed 100KB"): the orders destination is tested
against that rule, so the rule is tested here."""

from __future__ import annotations

import httpx

from reverse_etl.sandbox import KlaviyoSandbox, SandboxServer, SandboxSettings
from tests.sandbox.sandbox_helpers import klaviyo_headers


def _body(note: str) -> dict[str, object]:
    event = {
        "type": "event",
        "attributes": {
            "properties": {"OrderId": "o-1", "Note": note},
            "metric": {"data": {"type": "metric", "attributes": {"name": "Placed Order"}}},
            "unique_id": "o-1",
        },
    }
    entry = {
        "type": "event-bulk-create",
        "attributes": {
            "profile": {"data": {"type": "profile", "attributes": {"email": "a@example.com"}}},
            "events": {"data": [event]},
        },
    }
    return {
        "data": {
            "type": "event-bulk-create-job",
            "attributes": {"events-bulk-create": {"data": [entry]}},
        }
    }


def test_a_string_over_100kb_refuses_the_call():
    sandbox = KlaviyoSandbox(SandboxSettings(enforce_limits=False))
    with SandboxServer(sandbox) as server, httpx.Client(base_url=server.base_url) as client:
        headers = klaviyo_headers(sandbox)
        url = "/api/event-bulk-create-jobs"
        assert client.post(url, json=_body("x" * 100_000), headers=headers).status_code == 202
        refused = client.post(url, json=_body("é" * 50_001), headers=headers)  # 100,002 bytes
        assert refused.status_code == 400
        assert sandbox.wait_idle()
    [violation] = sandbox.violations
    assert violation.kind == "limit"
    assert violation.pointer == (
        "/data/attributes/events-bulk-create/data/0/attributes/events/data/0/attributes"
        "/properties/Note"
    )
    assert len(sandbox.events()) == 1


# --------------------------------------------------------------------------- repeated unique_id


def _call(*events: tuple[str, str, str]) -> dict[str, object]:
    """A bulk call of one entry per (email, metric, unique_id)."""
    entries = [
        {
            "type": "event-bulk-create",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
                "events": {
                    "data": [
                        {
                            "type": "event",
                            "attributes": {
                                "properties": {},
                                "metric": {
                                    "data": {"type": "metric", "attributes": {"name": metric}}
                                },
                                "unique_id": unique,
                            },
                        }
                    ]
                },
            },
        }
        for email, metric, unique in events
    ]
    return {
        "data": {
            "type": "event-bulk-create-job",
            "attributes": {"events-bulk-create": {"data": entries}},
        }
    }


URL = "/api/event-bulk-create-jobs"
ENTRY = "/data/attributes/events-bulk-create/data/{}/attributes/events/data/0/attributes/unique_id"


def test_by_default_a_resent_event_is_taken_and_dropped():
    sandbox = KlaviyoSandbox(SandboxSettings(enforce_limits=False))
    with SandboxServer(sandbox) as server, httpx.Client(base_url=server.base_url) as client:
        headers = klaviyo_headers(sandbox)
        body = _call(("a@example.com", "Placed Order", "o1"))
        assert client.post(URL, json=body, headers=headers).status_code == 202
        assert client.post(URL, json=body, headers=headers).status_code == 202
        assert sandbox.wait_idle()
    assert len(sandbox.events()) == 1 and sandbox.violations == []


def test_refuse_call_refuses_an_event_seen_before_naming_each_and_applies_nothing():
    sandbox = KlaviyoSandbox(
        SandboxSettings(enforce_limits=False, klaviyo_duplicate_events="refuse_call")
    )
    with SandboxServer(sandbox) as server, httpx.Client(base_url=server.base_url) as client:
        headers = klaviyo_headers(sandbox)
        first = _call(
            ("a@example.com", "Placed Order", "o1"), ("b@example.com", "Placed Order", "o2")
        )
        assert client.post(URL, json=first, headers=headers).status_code == 202
        again = _call(
            ("c@example.com", "Placed Order", "o3"),
            ("A@example.com", "Placed Order", "o1"),  # the same profile: emails ignore case
            ("b@example.com", "Fulfilled Order", "o2"),  # another metric: a new event
            ("b@example.com", "Placed Order", "o2"),
        )
        refused = client.post(URL, json=again, headers=headers)
        assert refused.status_code == 400
        pointers = [e["source"]["pointer"] for e in refused.json()["errors"]]
        assert pointers == [ENTRY.format(1), ENTRY.format(3)]
        assert "repeated" in refused.json()["errors"][0]["detail"]
        without = _call(
            ("c@example.com", "Placed Order", "o3"), ("b@example.com", "Fulfilled Order", "o2")
        )
        assert client.post(URL, json=without, headers=headers).status_code == 202
        assert sandbox.wait_idle()
    assert sorted((e["metric"], e["unique_id"]) for e in sandbox.events()) == [
        ("Fulfilled Order", "o2"),
        ("Placed Order", "o1"),
        ("Placed Order", "o2"),
        ("Placed Order", "o3"),
    ]
    assert sandbox.violations == []  # the client cannot know what the account holds
    assert sandbox.counters["duplicate_events"] == 2


def test_refuse_call_refuses_a_repeat_inside_the_call_as_a_violation():
    sandbox = KlaviyoSandbox(
        SandboxSettings(enforce_limits=False, klaviyo_duplicate_events="refuse_call")
    )
    with SandboxServer(sandbox) as server, httpx.Client(base_url=server.base_url) as client:
        body = _call(
            ("a@example.com", "Placed Order", "o1"), ("a@example.com", "Placed Order", "o1")
        )
        assert client.post(URL, json=body, headers=klaviyo_headers(sandbox)).status_code == 400
        assert sandbox.wait_idle()
    [violation] = sandbox.violations
    assert violation.pointer == ENTRY.format(1)
    assert sandbox.events() == []

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

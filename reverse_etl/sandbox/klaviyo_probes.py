"""Klaviyo reads served only so ``reverse-etl debug`` can probe a key's scopes: each is the
cheapest read of an object a sync writes, needing that object's ``:read`` scope (the spec's
``x-klaviyo-scopes``). ``GET /api/events`` (``get_events``, events:read) lists the account's
events; ``GET /api/profile-suppression-bulk-create-jobs`` (``get_bulk_suppress_profiles_jobs``,
subscriptions:read) lists none, as the sandbox runs no suppression jobs. Neither evaluates
``filter`` or ``sort`` (501, ``unsupported``)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from reverse_etl.sandbox.base import Call, paginate
from reverse_etl.sandbox.jsonapi import decode_cursor, page_links
from reverse_etl.sandbox.klaviyo_common import KlaviyoBase, bad, jsonapi, page_size, parse_time


class ProbeReadsAPI(KlaviyoBase):
    async def get_events(self, call: Call) -> Response:
        _unfiltered(call)
        with self.lock:
            events = list(self.state.events)
        page = paginate(events, decode_cursor(call.arg("page[cursor]")), page_size(call, 200))
        data = [_event_resource(e) for e in page.items]
        return jsonapi(
            {"data": data, "links": page_links(call.request, page.next_offset, page.prev_offset)}
        )

    async def get_suppress_jobs(self, call: Call) -> Response:
        _unfiltered(call)
        return jsonapi({"data": [], "links": page_links(call.request, None, None)})


def _unfiltered(call: Call) -> None:
    if call.arg("filter") or call.arg("sort"):
        raise bad(
            "The sandbox does not evaluate filter or sort here.", status=501, kind="unsupported"
        )


def _event_resource(event: dict[str, Any]) -> dict[str, Any]:
    moment = parse_time(str(event["time"]))
    return {
        "type": "event",
        "id": event["id"],
        "attributes": {
            "timestamp": int(moment.timestamp()),
            "event_properties": event.get("properties") or {},
            "datetime": moment.isoformat(),
            "uuid": event["id"],
        },
        "relationships": {
            "profile": {"data": {"type": "profile", "id": event["profile_id"]}},
            "metric": {"data": {"type": "metric", "id": event["metric_id"]}},
        },
    }

"""Klaviyo's bulk event creation, de-duplicated by unique_id; 1,000 events a call and no
string over 100 KB, as the operation's description says."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from starlette.responses import Response

from reverse_etl.sandbox.base import Call
from reverse_etl.sandbox.jobs import Job, iso, utcnow
from reverse_etl.sandbox.klaviyo_common import (
    MAX_EVENTS,
    KlaviyoBase,
    accepted,
    bad,
    over_limit,
    parse_time,
)
from reverse_etl.sandbox.klaviyo_state import ProfileError

MAX_STRING_BYTES = 100_000  # "A single string cannot exceed 100KB" (read strictly)


def _long_string(value: Any, pointer: str) -> str | None:
    """The JSON pointer of the first string over the limit in ``value``, if any."""
    if isinstance(value, str):
        return pointer if len(value.encode()) > MAX_STRING_BYTES else None
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _long_string(item, f"{pointer}/{key}")
        if found:
            return found
    return None


class EventsAPI(KlaviyoBase):
    """POST /api/event-bulk-create-jobs."""

    # --- events -----------------------------------------------------------------------------

    async def create_events(self, call: Call) -> Response:
        entries = call.body["data"]["attributes"]["events-bulk-create"]["data"]
        where = "/data/attributes/events-bulk-create/data"
        total = sum(len(e["attributes"]["events"]["data"]) for e in entries)
        if total > MAX_EVENTS:
            raise over_limit(f"{total} events; at most {MAX_EVENTS} per call.", where)
        now = utcnow()
        for i, entry in enumerate(entries):
            prof = entry["attributes"]["profile"]["data"]
            a = prof["attributes"]
            if prof.get("id") is None and all(
                a.get(k) is None for k in ("email", "phone_number", "external_id")
            ):
                raise bad(
                    "A profile needs id, email, phone_number or external_id.",
                    f"{where}/{i}/attributes/profile/data/attributes",
                )
            self._check_identity(i, a, prof.get("id"), where)
            long = _long_string(entry, f"{where}/{i}")
            if long:
                raise over_limit(f"A string is over {MAX_STRING_BYTES} bytes.", long)
            seen: set[tuple[str, str]] = set()
            for j, ev in enumerate(entry["attributes"]["events"]["data"]):
                ea = ev["attributes"]
                ptr = f"{where}/{i}/attributes/events/data/{j}/attributes"
                name = ea["metric"]["data"]["attributes"]["name"]
                if len(name) >= 128:
                    raise bad(
                        "A metric name must be shorter than 128 characters.",
                        f"{ptr}/metric/data/attributes/name",
                    )
                if ea.get("time") is not None:
                    at = parse_time(ea["time"])
                    if at.year < 1990 or at > now + timedelta(days=365):
                        raise bad(
                            "time must be after 1990 and at most a year ahead.", f"{ptr}/time"
                        )
                key = (name, ea.get("unique_id") or (ea.get("time") or "")[:19])
                if key[1] and key in seen:
                    raise bad(
                        f"unique_id {key[1]!r} is repeated for this profile and metric.",
                        f"{ptr}/unique_id",
                    )
                seen.add(key)
        self.jobs.submit(Job("event-bulk-create-job", total), self._event_work(entries))
        with self.lock:
            self.counters["events_received"] += total
        return accepted()

    def _event_work(self, entries: list[dict[str, Any]]) -> Iterator[None]:
        state = self.state
        received = iso(utcnow()) or ""
        for n, entry in enumerate(entries):
            prof = entry["attributes"]["profile"]["data"]
            attrs = {k: v for k, v in prof["attributes"].items() if k != "anonymous_id"}
            try:
                pid, _ = state.upsert(attrs, profile_id=prof.get("id"), meta=prof.get("meta"))
            except ProfileError as e:
                self.async_errors.append(
                    {"kind": "event", "code": e.code, "detail": e.detail, "attributes": attrs}
                )
                continue
            backfill = entry["attributes"].get("backfill")
            for ev in entry["attributes"]["events"]["data"]:
                ea = dict(ev["attributes"])
                if ea.get("backfill") is None and backfill is not None:
                    ea["backfill"] = backfill
                state.add_event(pid, ea["metric"]["data"]["attributes"]["name"], ea, received)
            if n % 50 == 49:
                yield
        yield

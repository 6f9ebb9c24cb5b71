"""Klaviyo's bulk event creation, de-duplicated by unique_id; 1,000 events a call and no
string over 100 KB, as the operation's description says.

A repeated ``unique_id`` (same profile and metric). Klaviyo keeps one event per profile, metric
and unique_id (the create-event schema: "only the first processed event will be recorded"; a
live probe confirms the tuple: https://github.com/elbwalker/walkerOS/pull/709). The bulk
entry's schema in the 2026-07-15 spec (``BaseEventCreateQueryBulkEntryResourceObject``) says
more: "If a unique_id is repeated for the same profile and metric, the request will fail and
no events will be processed". Whether "repeated" reaches past the call (events seen before)
and how the failure names the event are UNCONFIRMED, so ``klaviyo_duplicate_events`` picks:

* ``"drop"`` (default): a repeat inside one entry is a 400 violation; a resent event (seen
  before) is accepted and dropped when the job applies it.
* ``"refuse_call"``: the strict reading. A repeat anywhere in the call (entries whose profile
  identifiers overlap) is a 400 violation: the client could see it. An event seen before
  (accepted earlier by this endpoint, for a profile sharing an identifier) refuses the whole
  call with a 400 naming each such event's ``unique_id`` (one JSON:API error each), nothing
  applied; that is not the client's fault (it cannot know what the account holds), so it is
  counted (``counters["duplicate_events"]``), not a violation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from starlette.responses import Response

from reverse_etl.sandbox.base import Call
from reverse_etl.sandbox.jobs import Job, iso, utcnow
from reverse_etl.sandbox.jsonapi import error_document
from reverse_etl.sandbox.klaviyo_common import (
    MAX_EVENTS,
    KlaviyoBase,
    accepted,
    bad,
    jsonapi,
    over_limit,
    parse_time,
)
from reverse_etl.sandbox.klaviyo_state import IDENTIFIERS, ProfileError
from reverse_etl.sandbox.settings import SandboxSettings

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


EventKey = tuple[str, str, str]  # (a profile identity, metric, unique_id)


class EventsAPI(KlaviyoBase):
    """POST /api/event-bulk-create-jobs."""

    def __init__(self, settings: SandboxSettings | None = None):
        # every (identity, metric, unique_id) accepted so far ("refuse_call" only)
        self._event_seen: set[EventKey] = set()
        super().__init__(settings)
        if self.settings.klaviyo_duplicate_events not in ("drop", "refuse_call"):
            raise ValueError("klaviyo_duplicate_events must be 'drop' or 'refuse_call'")

    def _identities(self, profile: dict[str, Any]) -> set[str]:
        """Each way the entry's profile is known: its id and identifiers, and those of the
        stored profile they resolve to (Klaviyo matches the profile, not the identifier)."""
        a = profile["attributes"]
        keys = {f"{k}:{str(a[k]).lower()}" for k in IDENTIFIERS if a.get(k) is not None}
        with self.lock:
            pid = profile.get("id") or next(
                (
                    found
                    for k in IDENTIFIERS
                    if a.get(k) is not None and (found := self.state.find_by(k, str(a[k])))
                ),
                None,
            )
            stored = self.state.profiles.get(pid) if pid else None
        if pid:
            keys.add(f"id:{pid}")
        if stored:
            keys |= {f"{k}:{str(stored[k]).lower()}" for k in IDENTIFIERS if stored.get(k)}
        return keys

    def _refuse_repeats(self, entries: list[dict[str, Any]], where: str) -> Response | None:
        """``refuse_call``: a 400 violation for a repeat inside the call, a 400 naming every
        event seen before; None when the call may go on (its events are then remembered)."""
        in_call: set[EventKey] = set()
        events: list[tuple[set[EventKey], str, str]] = []  # (keys, unique_id, pointer)
        for i, entry in enumerate(entries):
            who = self._identities(entry["attributes"]["profile"]["data"])
            for j, ev in enumerate(entry["attributes"]["events"]["data"]):
                ea = ev["attributes"]
                unique = ea.get("unique_id") or (ea.get("time") or "")[:19]
                if not unique:
                    continue
                metric = ea["metric"]["data"]["attributes"]["name"]
                keys = {(w, metric, unique) for w in who}
                ptr = f"{where}/{i}/attributes/events/data/{j}/attributes/unique_id"
                if keys & in_call:
                    raise bad(f"unique_id {unique!r} is repeated for this profile and metric.", ptr)
                in_call |= keys
                events.append((keys, unique, ptr))
        with self.lock:  # checked and remembered at once: concurrent calls see each other
            again = [(u, ptr) for keys, u, ptr in events if keys & self._event_seen]
            if not again:
                self._event_seen |= in_call
                return None
            self.counters["duplicate_events"] += len(again)
        detail = "is repeated for this profile and metric: the request failed and no events were processed."
        errors = [
            error_document(400, f"unique_id {u!r} {detail}", pointer=ptr)["errors"][0]
            for u, ptr in again
        ]
        return jsonapi({"errors": errors}, 400)

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
        if self.settings.klaviyo_duplicate_events == "refuse_call":
            refused = self._refuse_repeats(entries, where)
            if refused is not None:
                return refused
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

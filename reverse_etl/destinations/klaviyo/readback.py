"""Read back what people did to their email consent inside Klaviyo, incrementally.

Klaviyo records an unsubscribe, a spam complaint or a suppression as a *suppression* on the
profile's email marketing consent (``subscriptions.email.marketing.suppression``: reason and
timestamp), and ``GET /api/profiles`` can filter and sort on its timestamp
(``greater-or-equal(subscriptions.email.marketing.suppression.timestamp,…)``, the 2026-07-15
spec's filter list; see the developers' guide to filtering,
https://developers.klaviyo.com/en/docs/filtering_). So each run asks only for the profiles
suppressed since the last read (100 a page, sorted by that timestamp), keeps the newest per
person in the state store (``consent.memory``) and moves the cursor to the newest timestamp
seen. A run when nothing happened in Klaviyo costs one call. ``greater-or-equal`` rather than
``greater-than``: a second suppression at the cursor's very timestamp is not missed; the one
already read is read again and ignored.

Re-subscribes inside Klaviyo have no such filter (``consent_timestamp`` cannot be filtered),
so they are not read back; only opt-outs, which is what "never re-subscribe" needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from reverse_etl.consent.memory import ConsentMemory, Seen
from reverse_etl.destinations.klaviyo.client import KlaviyoClient

STREAM = "email.suppressions"
_FIELD = "subscriptions.email.marketing.suppression.timestamp"
_EPOCH = "1970-01-01T00:00:00+00:00"
# an opt-out lifted by a subscribe: the suppression reasons Klaviyo's bulk subscribe removes
OPT_OUTS = frozenset({"UNSUBSCRIBE", "SPAM_COMPLAINT", "USER_SUPPRESSED"})


def read_back(client: KlaviyoClient, memory: ConsentMemory) -> int:
    """Read the suppressions made since the last read into ``memory``; return how many
    people's standing changed."""
    cursor = memory.cursor(STREAM) or _EPOCH
    seen: list[Seen] = []
    newest = cursor
    for profile in _suppressed_since(client, cursor):
        found = _latest(profile)
        if found is None:
            continue
        email, at, reason, stamp = found
        status = "unsubscribed" if reason in OPT_OUTS else "suppressed"
        seen.append(Seen(email, "email", status, at, reason))
        newest = max(newest, stamp, key=_when)
    return memory.remember(STREAM, seen, newest)


def _suppressed_since(client: KlaviyoClient, since: str) -> Iterator[dict[str, Any]]:
    path = "/api/profiles"
    params: dict[str, str] | None = {
        "filter": f"greater-or-equal({_FIELD},{since})",
        "sort": _FIELD,
        "additional-fields[profile]": "subscriptions",
        "fields[profile]": "email,subscriptions",
        "page[size]": "100",
    }
    while True:
        body = client.json("get_profiles", "GET", path, params=params)
        yield from body.get("data") or []
        nxt = (body.get("links") or {}).get("next")
        if not nxt:
            return
        path, params = nxt, None


def _latest(profile: dict[str, Any]) -> tuple[str, datetime, str, str] | None:
    """The profile's email, and its newest suppression: when, why, the timestamp as given."""
    attrs = profile.get("attributes") or {}
    email = attrs.get("email")
    marketing = (((attrs.get("subscriptions") or {}).get("email") or {}).get("marketing")) or {}
    best: tuple[str, datetime, str, str] | None = None
    for s in marketing.get("suppression") or []:
        stamp = s.get("timestamp")
        if not isinstance(email, str) or not isinstance(stamp, str):
            continue
        at = _when(stamp)
        if best is None or at > best[1]:
            best = (email.strip().lower(), at, str(s.get("reason") or ""), stamp)
    return best


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))

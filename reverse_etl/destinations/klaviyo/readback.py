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
so they are looked up instead, for the few unsubscribes a run sends with a consent time
(``subscribed``): ``any(email,[…])`` with the profiles' subscriptions, 100 a call. A SUBSCRIBED
consent whose ``custom_method_detail`` is ours (the ``custom_source`` our bulk subscribe sends,
"reverse-etl sync …", which Klaviyo stores as the consent's method detail) is not an opt-in
the person made there.

A read that is not Klaviyo's answer is a failed read, never "nobody opted out": every
``GET /api/profiles`` answer is a JSON:API document whose ``data`` is a list of profile
resources (``GetProfileResponseCollection`` in the 2026-07-15 spec,
``../shared/api-specs/klaviyo/profiles.json``), and each profile has ``attributes``, with
``subscriptions`` since we ask for them. An answer without its ``data`` list, or with items
lacking those, raises ``DestinationError``: the read-back runs before anything is sent, so
the run stops before any subscribe could override an opt-out it failed to read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa

from reverse_etl.consent.memory import ConsentMemory, Seen
from reverse_etl.destinations.klaviyo.client import KlaviyoClient, quote
from reverse_etl.errors import DestinationError

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


OURS = "reverse-etl sync "  # the custom_source of our subscribes (consent.py)
LOOKUP = 100  # emails per any(email,[...]) lookup: a page holds at most 100 profiles


def subscribed(client: KlaviyoClient, emails: Sequence[str]) -> pa.Table:
    """The profiles among ``emails`` whose email marketing consent is SUBSCRIBED by something
    other than us, with its ``consent_timestamp``: ``person`` (lower-cased), ``at``."""
    persons: list[str] = []
    times: list[datetime] = []
    for start in range(0, len(emails), LOOKUP):
        group = emails[start : start + LOOKUP]
        params = {
            "filter": f"any(email,[{','.join(quote(e) for e in group)}])",
            "additional-fields[profile]": "subscriptions",
            "fields[profile]": "email,subscriptions",
            "page[size]": str(LOOKUP),
        }
        body = client.json("get_profiles", "GET", "/api/profiles", params=params)
        for profile in profiles(body, "GET /api/profiles (opt-ins of unsubscribes to send)"):
            attrs = profile["attributes"]
            email = attrs.get("email")
            subs = ((attrs.get("subscriptions") or {}).get("email") or {}).get("marketing") or {}
            stamp = subs.get("consent_timestamp")
            detail = str(subs.get("custom_method_detail") or "")
            if (
                isinstance(email, str)
                and subs.get("consent") == "SUBSCRIBED"
                and isinstance(stamp, str)
                and not detail.startswith(OURS)
            ):
                persons.append(email.strip().lower())
                times.append(_when(stamp))
    return pa.table(
        {
            "person": pa.array(persons, pa.string()),
            "at": pa.array(times, pa.timestamp("us", "UTC")),
        }
    )


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
        yield from profiles(body, "GET /api/profiles (suppressions since the last read)")
        nxt = (body.get("links") or {}).get("next")
        if not nxt:
            return
        path, params = nxt, None


def profiles(body: Any, call: str) -> list[dict[str, Any]]:
    """The profiles of a ``GET /api/profiles`` answer asked with their subscriptions; an
    answer that is not one (module docstring) raises ``DestinationError`` naming ``call``."""

    def failed(what: str) -> DestinationError:
        return DestinationError(
            f"Klaviyo {call}: the answer {what} (check base_url / proxy); consent read-back "
            "failed, so nothing is sent: a subscribe could override an opt-out not read"
        )

    if not isinstance(body, dict):
        raise failed(f"is not a JSON:API document ({type(body).__name__})")
    data = body.get("data")
    if not isinstance(data, list):
        raise failed("has no data list" if data is None else "has a data that is not a list")
    for item in data:
        attrs = item.get("attributes") if isinstance(item, dict) else None
        if not isinstance(attrs, dict) or not isinstance(attrs.get("subscriptions"), dict):
            raise failed("has a profile without its attributes and subscriptions")
    return data


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

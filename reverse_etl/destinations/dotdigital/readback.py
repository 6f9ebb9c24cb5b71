"""Read back who opted out inside Dotdigital, and who opted in, incrementally.

Opt-outs: Dotdigital lists the contacts removed from mailing since a date, with when and why:
``GET /v2/contacts/unsubscribed-since/{date}`` and ``GET /v2/contacts/suppressed-since/{date}``
answer ``ApiContactSuppression`` rows (``suppressedContact``, ``dateRemoved``, ``reason``; the
v2 swagger), at most 1,000 a call paged with ``select``/``skip`` ("You may only select a
maximum of 1000 results in a single request",
https://developer.dotdigital.com/reference/getunsubscribedcontacts). Both are read, each with
its own cursor (the newest ``dateRemoved`` seen), because the docs do not say whether plain
unsubscribes are among the suppressions; a person listed by both is kept once (the newest
wins). A run when nothing happened in Dotdigital costs two calls. The BigCommerce integration
reads unsubscribes back the same way (``../shared/seeds/001_596cbdf24110c389.txt``).

Opt-ins (:func:`read_opt_ins`): Dotdigital has no list of subscribes, and a contact's email
status carries no time. What dates an opt-in is its consent record: a signup form keeps one
(ConsentInsight: text, ``dateTimeConsented``, URL, IP address, browser; "Record consent for
your contacts", https://support.dotdigital.com/en/articles/8199471), and so does an import
that sends ``consentRecords``. So the contacts modified since the last read
(``GET /contacts/v3?~modified=gte::T&include=channelProperties|consentRecords``, up to 5,000 a
page, v3 spec) that are ``subscribed`` are remembered as opted in at their newest
``dateTimeConsented``; a subscribed contact without a record has no date and is not (an
unsubscribe is then sent: honouring a "no" is never the harm). The list holds every contact a
sync wrote too, so it costs a call per 5,000 contacts modified since the last read; it is read
only by runs that have an unsubscribe with a consent time to weigh.

A read that is not Dotdigital's answer is a failed read, never "nobody opted out (or in)":
``unsubscribed-since`` and ``suppressed-since`` answer a JSON array of
``ApiContactSuppression`` (each with ``suppressedContact`` and ``dateRemoved``; the v2
swagger), ``GET /contacts/v3`` an object whose ``_items`` is a list of contacts (v3 spec). An
answer of another shape (``{"message": "ok"}`` from a proxy), or rows lacking those fields,
raises ``DestinationError``: the read-back runs before anything is sent, so the run stops
before a subscribe could override an opt-out it failed to read.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from reverse_etl.consent.memory import ConsentMemory, Seen
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.errors import DestinationError

STREAMS = {
    "email.unsubscribed": "/v2/contacts/unsubscribed-since/{date}",
    "email.suppressed": "/v2/contacts/suppressed-since/{date}",
}
PAGE = 1000
OPT_INS = "email.opted_in"  # the opt-in stream's cursor: the newest ``updated`` read
OPTED_IN_BY = "ConsentRecord"  # the read-back reason of an opt-in (v2 spells its reasons so)
CONTACTS_PAGE = 5000  # GET /contacts/v3's ``limit`` maximum (v3 spec)
_EPOCH = "1970-01-01T00:00:00Z"


def read_back(client: DotdigitalClient, memory: ConsentMemory) -> int:
    """Read the opt-outs made since the last read into ``memory``; return how many people's
    standing changed."""
    changed = 0
    for stream, template in STREAMS.items():
        since = memory.cursor(stream) or _EPOCH
        seen: list[Seen] = []
        newest = since
        for row in _since(client, template.format(date=quote(since, safe=""))):
            email = row["suppressedContact"].get("email")
            stamp = row["dateRemoved"]
            if not isinstance(email, str):  # a contact without an email address
                continue
            reason = str(row.get("reason") or "")
            status = "unsubscribed" if reason.lower() == "unsubscribed" else "suppressed"
            seen.append(Seen(email.strip().lower(), "email", status, _when(stamp), reason))
            newest = max(newest, stamp, key=_when)
        # a second before the newest: whether "since" is inclusive is not documented, and a
        # removal in the same second as the newest is not missed (those read again are ignored)
        cursor = since if newest == since else _iso(newest, back=timedelta(seconds=1))
        changed += memory.remember(stream, seen, cursor)
    return changed


def read_opt_ins(client: DotdigitalClient, memory: ConsentMemory) -> int:
    """Read the email opt-ins of contacts modified since the last read into ``memory``;
    return how many people's standing changed."""
    since = memory.cursor(OPT_INS) or _EPOCH
    newest = _when(since)
    seen: list[Seen] = []
    for contact in _modified_since(client, since):
        stamp = contact.get("updated")
        if isinstance(stamp, str):
            newest = max(newest, _when(stamp))
        opted_in = _opted_in(contact)
        if opted_in is not None:
            seen.append(opted_in)
    # ``gte``: the newest contact is read again next time, rather than one in its second missed
    cursor = _iso(newest.isoformat(), millis=True)
    return memory.remember(OPT_INS, seen, cursor)


def _opted_in(contact: dict[str, Any]) -> Seen | None:
    """The contact's email opt-in and its newest consent time, if it is subscribed and has one."""
    email = (contact.get("identifiers") or {}).get("email")
    channel = (contact.get("channelProperties") or {}).get("email") or {}
    if not isinstance(email, str) or channel.get("status") != "subscribed":
        return None
    times = [
        _when(r["dateTimeConsented"])
        for r in contact.get("consentRecords") or ()
        if isinstance(r, dict) and isinstance(r.get("dateTimeConsented"), str)
    ]
    if not times:
        return None
    return Seen(email.strip().lower(), "email", "subscribed", max(times), OPTED_IN_BY)


def _modified_since(client: DotdigitalClient, since: str) -> Iterator[dict[str, Any]]:
    params = {
        "~modified": f"gte::{since}",
        "include": "channelProperties|consentRecords",
        "limit": str(CONTACTS_PAGE),
    }
    while True:
        body = client.json("GET", "/contacts/v3", params=params)
        items = body.get("_items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
            raise _failed("GET /contacts/v3 (opt-ins)", body, "an object with an _items list")
        yield from items
        marker = ((body.get("_links") or {}).get("next") or {}).get("marker")
        if not isinstance(marker, str) or not marker:
            return
        params = {**params, "marker": marker}


def _since(client: DotdigitalClient, path: str) -> Iterator[dict[str, Any]]:
    skip = 0
    while True:
        rows = client.json("GET", path, params={"select": str(PAGE), "skip": str(skip)})
        if not isinstance(rows, list):
            raise _failed(f"GET {path}", rows, "a list of contact suppressions")
        for r in rows:
            if (
                not isinstance(r, dict)
                or not isinstance(r.get("suppressedContact"), dict)
                or not isinstance(r.get("dateRemoved"), str)
            ):
                raise _failed(
                    f"GET {path}", rows, "suppressions with suppressedContact and dateRemoved"
                )
        yield from rows
        if len(rows) < PAGE:
            return
        skip += PAGE


def _failed(call: str, body: Any, wanted: str) -> DestinationError:
    """A read-back answer that is not Dotdigital's (module docstring)."""
    got = type(body).__name__ if not isinstance(body, dict) else f"keys {sorted(body)[:5]}"
    return DestinationError(
        f"Dotdigital {call}: the answer is not {wanted} (got {got}; check base_url / proxy); "
        "consent read-back failed, so nothing is sent: a subscribe could override an opt-out "
        "not read"
    )


def _when(stamp: str) -> datetime:
    at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)  # Dotdigital's times are UTC


def _iso(stamp: str, back: timedelta = timedelta(0), *, millis: bool = False) -> str:
    """The cursor as the path takes it: ISO 8601 in UTC, to the second or finer
    (``millis``: to the millisecond, as v3's ``~modified`` pattern requires)."""
    at = (_when(stamp) - back).astimezone(UTC)
    if millis:
        return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
    return at.isoformat().replace("+00:00", "Z")

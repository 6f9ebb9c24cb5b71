"""Read back who opted out inside Dotdigital, incrementally.

Dotdigital lists the contacts removed from mailing since a date, with when and why:
``GET /v2/contacts/unsubscribed-since/{date}`` and ``GET /v2/contacts/suppressed-since/{date}``
answer ``ApiContactSuppression`` rows (``suppressedContact``, ``dateRemoved``, ``reason``; the
v2 swagger), at most 1,000 a call paged with ``select``/``skip`` ("You may only select a
maximum of 1000 results in a single request",
https://developer.dotdigital.com/reference/getunsubscribedcontacts). Both are read, each with
its own cursor (the newest ``dateRemoved`` seen), because the docs do not say whether plain
unsubscribes are among the suppressions; a person listed by both is kept once (the newest
wins). A run when nothing happened in Dotdigital costs two calls.

Subscribes made inside Dotdigital have no such list (v3 offers ``~modified`` only, without a
status time), so they are not read back; only opt-outs, which is what "never re-subscribe"
needs. The BigCommerce integration reads unsubscribes back the same way
(``../shared/seeds/001_596cbdf24110c389.txt``).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from reverse_etl.consent.memory import ConsentMemory, Seen
from reverse_etl.destinations.dotdigital.client import DotdigitalClient

STREAMS = {
    "email.unsubscribed": "/v2/contacts/unsubscribed-since/{date}",
    "email.suppressed": "/v2/contacts/suppressed-since/{date}",
}
PAGE = 1000
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
            email = (row.get("suppressedContact") or {}).get("email")
            stamp = row.get("dateRemoved")
            if not isinstance(email, str) or not isinstance(stamp, str):
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


def _since(client: DotdigitalClient, path: str) -> Iterator[dict[str, Any]]:
    skip = 0
    while True:
        rows = client.json("GET", path, params={"select": str(PAGE), "skip": str(skip)})
        if not isinstance(rows, list):
            return
        yield from (r for r in rows if isinstance(r, dict))
        if len(rows) < PAGE:
            return
        skip += PAGE


def _when(stamp: str) -> datetime:
    at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)  # Dotdigital's times are UTC


def _iso(stamp: str, back: timedelta = timedelta(0)) -> str:
    """The cursor as the path takes it: ISO 8601 in UTC, to the second or finer."""
    return (_when(stamp) - back).astimezone(UTC).isoformat().replace("+00:00", "Z")

"""Bulk calls that Klaviyo accepts with a bare 202 and no job to poll (subscribe, unsubscribe,
events): pack records into calls at the endpoint's limits and turn refusals into row errors.

Klaviyo checks such a call as a whole before accepting it: one bad record refuses the call,
with a JSON pointer naming the record (``/data/attributes/.../data/{i}/...``). That record
becomes a row error and the call is sent again without it, so one bad row never holds back
the others. A refusal that names no record (a parameter, the envelope, authentication) is not
a row's fault: it ends the run and the rows stay behind the watermark.

Events only (``Endpoint.repeats_held``): Klaviyo keeps one event per profile, metric and
``unique_id``, and its bulk spec says a repeated unique_id makes "the request ... fail and no
events will be processed". A refusal naming an event's ``unique_id`` as repeated (its pointer
ends in ``/unique_id`` and its message says repeated/duplicate/already) means Klaviyo holds
that event already: the event, not its row, is left out and the call sent again, and the row
counts as landed. The wording of Klaviyo's answer is UNCONFIRMED; any other refusal of a
unique_id stays a row error.

Acknowledgement: only the documented ``202 Accepted`` means Klaviyo took a call. Every one of
these endpoints answers 202 and nothing else on success (``bulk_subscribe_profiles``,
``bulk_unsubscribe_profiles``, ``bulk_create_events``: responses ``202``, ``4XX``, ``5XX`` in
the 2026-07-15 spec, ``../shared/api-specs/klaviyo/profiles.json`` and ``events.json``; the
API reference, https://developers.klaviyo.com/en/reference/bulk_subscribe_profiles and
https://developers.klaviyo.com/en/reference/bulk_unsubscribe_profiles). Any other answer (a
200 HTML page from a proxy, a redirect) is not Klaviyo's acknowledgement: the call is not
counted as done, the run stops (``DestinationError``) and its rows stay behind the watermark,
unrecorded, so the consent is sent again next run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from reverse_etl.destinations.base import Request
from reverse_etl.destinations.http import error_detail, unacknowledged
from reverse_etl.destinations.klaviyo.client import KlaviyoClient, refusals
from reverse_etl.destinations.rowjson import bodies
from reverse_etl.errors import DestinationError
from reverse_etl.transform.rowerrors import RowError


@dataclass(frozen=True)
class Endpoint:
    op: str  # rate-limit name
    path: str
    head: bytes  # the body up to the records' array
    tail: bytes  # the body after it
    max_records: int
    max_bytes: int
    what: str  # "subscribe", for messages
    # a refusal of a record's repeated unique_id means the API holds it already (events)
    repeats_held: bool = False


ACCEPTED = 202  # the only answer that acknowledges a bulk call (module docstring)
_REPEATED = re.compile(r"repeat|duplicate|already", re.IGNORECASE)


def held_already(endpoint: Endpoint, pointer: str, message: str) -> bool:
    """The refusal names a record the API holds already (an event resent)."""
    return (
        endpoint.repeats_held and pointer.endswith("/unique_id") and bool(_REPEATED.search(message))
    )


@dataclass
class Records:
    """JSON docs for one endpoint with the run row (and identifier) each belongs to.
    Several docs may share a row (an order's events)."""

    docs: pa.Array  # string
    rows: pa.Array  # int64, __row of each doc
    ids: pa.Array  # __id of each doc

    def __len__(self) -> int:
        return len(self.docs)


def calls(endpoint: Endpoint, records: Records) -> Iterator[tuple[int, int, bytes]]:
    """[start, end) runs of ``records`` packed to the endpoint's limits, with their body."""
    return bodies(
        records.docs, endpoint.head, endpoint.tail, endpoint.max_records, endpoint.max_bytes
    )


def requests(endpoint: Endpoint, records: Records, *, counted: bool) -> Iterator[Request]:
    """The calls a dry run shows. ``counted``: the calls carry the rows themselves (a row is
    counted in the call holding its first record); otherwise they follow up on rows another
    request already counted (consent after the profile import) and count none."""
    rows = records.rows.to_pylist()
    for start, end, body in calls(endpoint, records):
        firsts = sum(1 for i in range(start, end) if i == 0 or rows[i] != rows[i - 1])
        yield Request("POST", endpoint.path, body, firsts if counted else 0)


def send(client: KlaviyoClient, endpoint: Endpoint, records: Records) -> list[RowError]:
    """Send every record; return the row errors of those Klaviyo refused. A refused row's
    other records (an order's other events) are dropped from the calls after it too."""
    errors: list[RowError] = []
    refused: set[int] = set()
    held: set[int] = set()  # records the API holds already (events resent)
    rows = records.rows.to_pylist()
    ids = records.ids.to_pylist()
    for start, end, body in calls(endpoint, records):
        chunk = [i for i in range(start, end) if rows[i] not in refused]
        if len(chunk) < end - start:  # a row refused in an earlier call: its records go too
            body = _body(endpoint, [records.docs[i].as_py() for i in chunk])
        while chunk:
            response = client.call(endpoint.op, "POST", endpoint.path, body)
            if response.status_code == ACCEPTED:
                break
            if response.status_code < 400:  # not Klaviyo's acknowledgement: not done
                raise unacknowledged(
                    response,
                    f"Klaviyo {endpoint.what} call ({len(chunk)} records, POST {endpoint.path})",
                    "202 Accepted",
                    "nothing in it is counted as done, its rows stay behind the watermark and "
                    "are sent again next run",
                )
            named = [r for r in refusals(response) if r[0] is not None and r[0] < len(chunk)]
            if response.status_code != 400 or not named:
                raise DestinationError(
                    f"Klaviyo refused a {endpoint.what} call ({len(chunk)} records): "
                    f"{error_detail(response)}; its rows stay behind the watermark"
                )
            for index, pointer, _code, message in named:
                i = chunk[int(index or 0)]  # named: every index is set
                if held_already(endpoint, pointer, message):
                    held.add(i)
                elif rows[i] not in refused:
                    refused.add(rows[i])
                    value = records.docs[i].as_py()
                    errors.append(
                        RowError(rows[i], ids[i], pointer, value, "destination_rejected", message)
                    )
            chunk = [i for i in chunk if rows[i] not in refused and i not in held]
            body = _body(endpoint, [records.docs[i].as_py() for i in chunk])
    return errors


def _body(endpoint: Endpoint, docs: Sequence[str]) -> bytes:
    return endpoint.head + ",".join(docs).encode() + endpoint.tail

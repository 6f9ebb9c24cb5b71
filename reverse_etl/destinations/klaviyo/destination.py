"""Profiles into Klaviyo through bulk import jobs.

Each batch becomes jobs packed to Klaviyo's limits (10,000 profiles, 5 MB a job, 100 KB a
profile: a larger profile is a row error, not a failed job). Jobs of later batches are
submitted while earlier ones are polled, and results come back in batch order. Klaviyo's
import job does not say which profiles were new, so every completed profile counts as
``updated`` (upserted).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.config import KlaviyoConnection, Sync
from reverse_etl.destinations.base import Destination, LoadBatch, LoadResult, Request
from reverse_etl.destinations.http import error_detail
from reverse_etl.destinations.jobs import in_order, poll
from reverse_etl.destinations.klaviyo.client import (
    MAX_JOB_BYTES,
    MAX_PROFILE_BYTES,
    MAX_PROFILES_PER_JOB,
    KlaviyoClient,
)
from reverse_etl.destinations.rowjson import RowJson, nest, pack
from reverse_etl.errors import DestinationError
from reverse_etl.transform.rowerrors import RowError

IMPORT_PATH = "/api/profile-bulk-import-jobs"
_ENVELOPE = b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":['
_POINTER_INDEX = re.compile(r"/(\d+)(?:/|$)")

STANDARD_FIELDS = {
    "email": "email",
    "phone_number": "phone",
    "external_id": "string",
    "first_name": "string",
    "last_name": "string",
    "organization": "string",
    "title": "string",
    "locale": "string",
    "image": "string",
    "location.address1": "string",
    "location.address2": "string",
    "location.city": "string",
    "location.country": "string",
    "location.region": "string",
    "location.zip": "string",
    "location.timezone": "string",
    "location.ip": "string",
    "location.latitude": "number",
    "location.longitude": "number",
}
IDENTIFIER_FIELDS = ("email", "phone_number", "external_id")


@dataclass
class _Job:
    id: str
    rows: pa.Array  # __row of its profiles, in body order
    body: bytes  # kept to resubmit a job Klaviyo cancelled


@dataclass
class _InFlight:
    batch: LoadBatch
    jobs: list[_Job] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


class KlaviyoDestination(Destination):
    type = "klaviyo"
    standard_fields: ClassVar[dict[str, str]] = STANDARD_FIELDS
    max_in_flight = 4
    poll_interval = 0.2
    job_attempts = 3

    def __init__(self, conn: KlaviyoConnection, sync: Sync, *, speedup: float = 1.0):
        self.conn = conn
        self.sync = sync
        self.client = KlaviyoClient(conn, speedup=speedup)
        self.list_id: str | None = None
        fields = {t.field: t.field for t in sync.fields().values()}
        self._json = RowJson({"type": "profile", "attributes": nest(fields)}, drop_nulls=sync.null_values == "skip")

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        return name.startswith("properties.") and len(name) > len("properties.")

    @classmethod
    def custom_field_hint(cls) -> str:
        return "custom properties are written properties.<Name>"

    @classmethod
    def check_sync(cls, sync: Sync) -> list[str]:
        problems = super().check_sync(sync)
        target = sync.fields().get(sync.identifier)
        if target is not None and target.field not in IDENTIFIER_FIELDS:
            problems.append(
                f"identifier {sync.identifier!r} maps to {target.field!r}; a Klaviyo profile "
                f"identifier must be one of {', '.join(IDENTIFIER_FIELDS)}"
            )
        return problems

    # ------------------------------------------------------------------ payloads

    def _docs(self, table: pa.Table) -> tuple[pa.Table, pa.Array, list[RowError]]:
        """Profiles as JSON, minus those over Klaviyo's per-profile size (row errors)."""
        payload = table.drop_columns([c for c in table.column_names if c.startswith("consent.")])
        docs = self._json.build(payload)
        sizes = pc.binary_length(docs)
        too_big = pc.greater(sizes, MAX_PROFILE_BYTES)
        errors: list[RowError] = []
        if pc.any(too_big).as_py():
            big = table.filter(too_big)
            for row, ident, size in zip(
                big["__row"].to_pylist(), big["__id"].to_pylist(), pc.filter(sizes, too_big).to_pylist(), strict=True
            ):
                errors.append(
                    RowError(row, ident, "(profile)", f"{size} bytes", "value_too_large",
                             f"the profile is {size} bytes; Klaviyo accepts at most {MAX_PROFILE_BYTES}")
                )
            keep = pc.invert(too_big)
            table, docs = table.filter(keep), docs.filter(keep)
        return table, docs, errors

    def _bodies(self, docs: pa.Array) -> Iterator[tuple[int, int, bytes]]:
        tail = b"]}}}}"  # closes data, profiles, attributes, data, the document
        if self.list_id or self.sync.destination.list:
            list_id = self.list_id or f"<id of list {self.sync.destination.list!r}>"
            rel = orjson.dumps({"lists": {"data": [{"type": "list", "id": list_id}]}})
            tail = b"]}},\"relationships\":" + rel + b"}}"
        overhead = len(_ENVELOPE) + len(tail)
        for start, end in pack(docs, MAX_PROFILES_PER_JOB, MAX_JOB_BYTES, overhead):
            body = _ENVELOPE + ",".join(docs.slice(start, end - start).to_pylist()).encode() + tail
            yield start, end, body

    def requests(self, table: pa.Table) -> Iterator[Request]:
        _, docs, _ = self._docs(table)
        for start, end, body in self._bodies(docs):
            yield Request("POST", IMPORT_PATH, body, end - start)

    # ------------------------------------------------------------------ sending

    def prepare(self) -> None:
        if self.sync.destination.list:
            self.list_id = self.client.find_or_create_list(self.sync.destination.list)

    def load(self, batches: Iterator[LoadBatch]) -> Iterator[LoadResult]:
        return in_order(batches, self._submit, self._finish, self.max_in_flight)

    def _submit(self, batch: LoadBatch) -> _InFlight:
        table, docs, errors = self._docs(batch.table)
        item = _InFlight(batch, errors=errors)
        rows = table["__row"].combine_chunks() if table.num_rows else pa.array([], pa.int64())
        for start, end, body in self._bodies(docs):
            item.jobs.append(_Job(self._post_job(body, end - start), rows.slice(start, end - start), body))
        return item

    def _post_job(self, body: bytes, count: int) -> str:
        response = self.client.call("bulk_import_profiles", "POST", IMPORT_PATH, body)
        if response.status_code >= 400:
            raise DestinationError(
                f"Klaviyo refused a profile import job ({count} profiles): {error_detail(response)}"
            )
        return orjson.loads(response.content)["data"]["id"]

    def _finish(self, item: _InFlight) -> LoadResult:
        # profiles refused before sending (too large) count as sent and failed: sent = updated + failed
        result = LoadResult(token=item.batch.token, errors=list(item.errors), sent=len(item.errors), failed=len(item.errors))
        table = item.batch.table
        ids = dict(zip(table["__row"].to_pylist(), table["__id"].to_pylist(), strict=True))
        for job in item.jobs:
            attrs = self._wait(job)
            sent = attrs.get("total_count") or len(job.rows)
            failed = attrs.get("failed_count") or 0
            result.sent += sent
            result.updated += sent - failed
            if failed:
                result.errors.extend(self._import_errors(job.id, job.rows, ids))
                result.failed += failed
        return result

    def _wait(self, job: _Job) -> dict[str, Any]:
        """Poll a job to its end. A cancelled job failed as a whole (not its profiles' fault):
        it is submitted again, a few times, before the run gives up with its rows unsent."""
        for attempt in range(1, self.job_attempts + 1):
            body = poll(
                lambda: self.client.json("get_bulk_import_profiles_job", "GET", f"{IMPORT_PATH}/{job.id}"),
                lambda b: b["data"]["attributes"].get("status") in {"complete", "cancelled"},
                first=self.poll_interval,
            )
            attrs = body["data"]["attributes"]
            if attrs.get("status") == "complete":
                return attrs
            if attempt < self.job_attempts:
                job.id = self._post_job(job.body, len(job.rows))
        raise DestinationError(
            f"Klaviyo cancelled profile import job {job.id} {self.job_attempts} times; its rows "
            "stay behind the watermark and are sent again next run"
        )

    def _import_errors(self, job_id: str, rows: pa.Array, ids: dict[int, Any]) -> list[RowError]:
        out: list[RowError] = []
        path = f"{IMPORT_PATH}/{job_id}/import-errors"
        params: dict[str, str] | None = None
        row_list = rows.to_pylist()
        while True:
            body = self.client.json("get_errors_for_bulk_import_profiles_job", "GET", path, params=params)
            for err in body.get("data", []):
                a = err.get("attributes", {})
                pointer = (a.get("source") or {}).get("pointer") or ""
                m = _POINTER_INDEX.search(pointer)
                idx = int(m.group(1)) if m else None
                row = row_list[idx] if idx is not None and idx < len(row_list) else 0
                out.append(
                    RowError(row, ids.get(row), pointer or "(profile)", orjson.dumps(a.get("original_payload")).decode(),
                             "destination_rejected", f"Klaviyo: {a.get('title', '')}: {a.get('detail', '')}")
                )
            nxt = (body.get("links") or {}).get("next")
            if not nxt:
                return out
            path, params = nxt, None

    def close(self) -> None:
        self.client.close()
        self._json.close()

"""Products into Klaviyo's catalog as catalog items, through bulk create and update jobs
(100 items, 5 MB a job).

Create or update: before a batch is sent, the items it holds are looked up by id
(``GET /api/catalog-items?filter=any(ids,[...])``, 100 ids a call, 350 calls/s) and new
items go to create jobs, known ones to update jobs. The look-up costs one cheap call per 100
items, where "create everything and route conflicts to updates" would cost a second job
round (75 jobs/s, at most 500 in progress) for every item on each re-sync. Races are still
covered: a create that meets an existing item (another writer) is sent again as an update,
and an update whose item is gone as a create, once. A create job whose answer was lost is
not sent again while its items may still appear (``jobs.submit``): its items are looked up.

Klaviyo needs ``external_id``, ``title``, ``description`` and ``url`` to create an item: the
config check asks that they are mapped, and ``screen`` leaves out a row with one of them NULL
(``missing_required_field``) or with custom metadata over Klaviyo's 100 KB
(``value_too_large``), so they are rejected before anything is sent. ``load`` takes screened batches and runs the cheap
required-field check again as a safety net (a batch that was not screened: such rows count as
sent and failed). Item ids are Klaviyo's ``$custom:::$default:::<external_id>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.config import Sync
from reverse_etl.destinations.base import Request, Screened, Tally
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.destinations.klaviyo import jobs, sizes
from reverse_etl.destinations.klaviyo.client import (
    MAX_BODY_BYTES,
    MAX_CATALOG_ITEMS,
    quote,
    record_errors,
)
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.destinations.klaviyo.destination import KlaviyoBase, any_true, row_errors
from reverse_etl.destinations.rowjson import Expr, RowJson, bodies, nest
from reverse_etl.transform.rowerrors import RowError

STANDARD_FIELDS = {
    "external_id": "string",
    "title": "string",
    "description": "string",
    "url": "string",
    "price": "number",
    "image_full_url": "string",
    "image_thumbnail_url": "string",
    "published": "boolean",
}
REQUIRED = ("external_id", "title", "description", "url")
ID_PREFIX = "$custom:::$default:::"
ITEMS_PATH = "/api/catalog-items"
CREATE = jobs.JobKind(
    "/api/catalog-item-bulk-create-jobs",
    "bulk_create_catalog_items",
    "get_bulk_create_catalog_items_job",
    "catalog item create job",
)
UPDATE = jobs.JobKind(
    "/api/catalog-item-bulk-update-jobs",
    "bulk_update_catalog_items",
    "get_bulk_update_catalog_items_job",
    "catalog item update job",
)
_HEAD = {
    CREATE.path: b'{"data":{"type":"catalog-item-bulk-create-job","attributes":{"items":{"data":[',
    UPDATE.path: b'{"data":{"type":"catalog-item-bulk-update-job","attributes":{"items":{"data":[',
}
_TAIL = b"]}}}}"
MAX_METADATA_BYTES = 100_000  # custom_metadata "May not exceed 100kb" (read strictly)
CONFLICT_CODES = {"conflict", "duplicate", "duplicate_item"}
MAX_LOOKUP_IDS = 100  # ids a look-up asks for: one page of at most 100 items
MAX_LOOKUP_CHARS = 6_000  # keeps the filter well inside URL length limits
JOB_WINDOW = 100  # jobs in progress at once, of the 500 Klaviyo allows an account


@dataclass
class _Job:
    job: jobs.Job
    rows: list[int]  # batch positions of its items, in body order


@dataclass
class _Outcome:
    done: list[int]  # batch positions that landed
    retry: list[int]  # positions to send the other way (create <-> update)
    errors: list[RowError]


class KlaviyoCatalog(KlaviyoBase):
    capabilities = Capabilities(
        label="Klaviyo catalog items",
        standard_fields=STANDARD_FIELDS,
        custom_prefix="custom_metadata",
        identifier_fields=("external_id",),
        list_instead="lists hold profiles: use a profiles sync",
        batch_records=MAX_CATALOG_ITEMS,
        batch_bytes=MAX_BODY_BYTES,
    )

    def __init__(self, conn: KlaviyoConnection, sync: Sync, *, speedup: float | None = None):
        super().__init__(conn, sync, speedup=speedup)
        fields = {t.field: t.field for t in sync.fields().values()}
        self.columns = {t.field: column for column, t in sync.fields().items()}
        attrs = nest(fields)
        drop = sync.null_values == "skip"
        self._create = RowJson(
            {
                "type": "catalog-item",
                "attributes": {**attrs, "integration_type": "$custom", "catalog_type": "$default"},
            },
            drop_nulls=drop,
        )
        self._screen_metadata: RowJson | None = None  # screen's own: it runs on another thread
        update_attrs = {k: v for k, v in attrs.items() if k != "external_id"}
        self._update = RowJson(
            {
                "type": "catalog-item",
                "id": Expr(f"'{ID_PREFIX}' || t.external_id"),
                "attributes": update_attrs,
            },
            drop_nulls=drop,
        )

    @classmethod
    def check_sync(cls, sync: Sync) -> list[str]:
        problems = super().check_sync(sync)
        mapped = {t.field for t in sync.fields().values()}
        missing = [f for f in REQUIRED if f not in mapped]
        if missing:
            problems.append(
                f"mapping: Klaviyo needs {', '.join(REQUIRED)} to create a catalog item; map a "
                f"column to {', '.join(missing)}"
            )
        return problems

    # ------------------------------------------------------------------ payloads

    def screen(self, table: pa.Table) -> Screened:
        """Rows without a field Klaviyo requires, and items whose custom metadata passes
        Klaviyo's 100 KB, left out with their row errors."""
        kept, errors = self._complete(table)
        kept, too_big = self._metadata_within_limit(kept)
        errors = sorted(errors + too_big, key=lambda e: e.row_number)
        return Screened(kept, errors, rejected=table.num_rows - kept.num_rows)

    def _metadata_within_limit(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """Items whose ``custom_metadata`` JSON fits Klaviyo's "May not exceed 100kb" (the
        catalogs spec's CatalogItem). Only rows whose size bound passes that are built, with
        screen's own builder."""
        fields = [c for c in table.column_names if self.is_custom_field(c)]
        if not fields or table.num_rows == 0:
            return table, []
        suspects = sizes.row_bound(table, fields) > MAX_METADATA_BYTES
        if not suspects.any():
            return table, []
        if self._screen_metadata is None:
            template = nest({f: f for f in fields})[str(self.capabilities.custom_prefix)]
            self._screen_metadata = RowJson(template, drop_nulls=self._create.drop_nulls)
        candidates = table.filter(pa.array(suspects))
        lengths = pc.binary_length(self._screen_metadata.build(candidates))
        too_big = pc.greater(lengths, MAX_METADATA_BYTES)
        if not any_true(too_big):
            return table, []
        errors = row_errors(
            candidates,
            too_big,
            "(custom_metadata)",
            "value_too_large",
            f"the item's custom_metadata is larger than the {MAX_METADATA_BYTES} bytes Klaviyo "
            "takes; map fewer or shorter columns to custom_metadata.*",
            value="external_id",
        )
        gone = pa.array([e.row_number for e in errors], pa.int64())
        return table.filter(pc.invert(pc.is_in(table["__row"], value_set=gone))), errors

    def _complete(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """Rows with every field Klaviyo requires, and a row error per missing value."""
        errors: list[RowError] = []
        ok = pa.array(np.ones(table.num_rows, bool))
        for f in REQUIRED:
            if f not in table.column_names:
                continue
            missing = pc.is_null(table[f])
            if any_true(missing):
                errors += row_errors(
                    table,
                    missing,
                    self.columns.get(f, f),
                    "missing_required_field",
                    f"a catalog item needs a {f}; the row has none",
                )
                ok = pc.and_(ok, pc.invert(missing))
        return (table if not errors else table.filter(ok)), errors

    def _jobs(self, kind: jobs.JobKind, table: pa.Table, positions: list[int]) -> list[_Job]:
        """Jobs for the rows at ``positions`` of ``table``, packed to Klaviyo's limits."""
        if not positions:
            return []
        subset = table.take(pa.array(positions, pa.int64()))
        builder = self._create if kind is CREATE else self._update
        docs = builder.build(subset)
        head = _HEAD[kind.path]
        externals = subset["external_id"].to_pylist()
        out = []
        for start, end, body in bodies(docs, head, _TAIL, MAX_CATALOG_ITEMS, MAX_BODY_BYTES):
            job = jobs.Job(kind, body, end - start)
            if kind is CREATE:
                job.landed_check = self._all_exist(externals[start:end])
            out.append(_Job(job, positions[start:end]))
        return out

    def _all_exist(self, external_ids: list[str]) -> Callable[[], bool]:
        """Whether a create job's items all exist: how a create job whose answer was lost is
        known to have run (``jobs.submit``), so it is not submitted twice."""
        wanted = set(external_ids)
        return lambda: self._existing(external_ids) >= wanted

    def requests(self, table: pa.Table) -> Iterator[Request]:
        """A dry run cannot look up what exists, so every item is shown in a create job."""
        table, _ = self._complete(table)
        for job in self._jobs(CREATE, table, list(range(table.num_rows))):
            yield Request("POST", CREATE.path, job.job.body, job.job.count)

    # ------------------------------------------------------------------ sending

    def _existing(self, external_ids: list[str]) -> set[str]:
        """The external ids among ``external_ids`` that Klaviyo's catalog already holds."""
        found: set[str] = set()
        chunk: list[str] = []
        size = 0
        for ext in [*external_ids, None]:
            item = None if ext is None else quote(ID_PREFIX + ext)
            full = (
                item is None or len(chunk) >= MAX_LOOKUP_IDS or size + len(item) > MAX_LOOKUP_CHARS
            )
            if chunk and full:
                found |= self._lookup(chunk)
                chunk, size = [], 0
            if item is not None:
                chunk.append(item)
                size += len(item) + 1
        return found

    def _lookup(self, quoted_ids: list[str]) -> set[str]:
        params: dict[str, str] | None = {
            "filter": f"any(ids,[{','.join(quoted_ids)}])",
            "fields[catalog-item]": "external_id",
            "page[size]": str(MAX_LOOKUP_IDS),
        }
        path = ITEMS_PATH
        found: set[str] = set()
        while True:
            body = self.client.json("get_catalog_items", "GET", path, params=params)
            for item in body.get("data", []):
                found.add(str(item["id"]).removeprefix(ID_PREFIX))
            nxt = (body.get("links") or {}).get("next")
            if not nxt:
                return found
            path, params = nxt, None

    def split(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        return self._complete(table)

    def submit(self, table: pa.Table) -> pa.Table:
        """Nothing is sent ahead: a batch's look-up and its jobs (up to ``JOB_WINDOW`` at once)
        run in ``complete``, one batch at a time, so the jobs in progress stay far below
        Klaviyo's 500 whatever the batch size."""
        return table

    def complete(self, table: pa.Table, tally: Tally) -> None:
        externals = table["external_id"].to_pylist()
        known = self._existing(externals)
        updates = [i for i, ext in enumerate(externals) if ext in known]
        creates = [i for i, ext in enumerate(externals) if ext not in known]
        for rerouted in (False, True):
            created = self._run(CREATE, table, creates, rerouted)
            updated = self._run(UPDATE, table, updates, rerouted)
            tally.landed(len(created.done), created=len(created.done))
            tally.landed(len(updated.done))
            tally.refused(created.errors + updated.errors)
            creates, updates = updated.retry, created.retry
            if not creates and not updates:
                break

    def _run(
        self, kind: jobs.JobKind, table: pa.Table, positions: list[int], last: bool
    ) -> _Outcome:
        """Send ``positions`` through ``kind`` jobs; items that met the other case (exists /
        does not exist) come back in ``retry`` unless this is the ``last`` round."""
        done: list[int] = []
        retry: list[int] = []
        errors: list[RowError] = []
        rows = table["__row"].to_pylist()
        ids = table["__id"].to_pylist()
        pending = self._jobs(kind, table, positions)
        for start in range(0, len(pending), JOB_WINDOW):
            window = pending[start : start + JOB_WINDOW]
            for job in window:
                jobs.submit(self.client, job.job)
            for job in window:
                body = jobs.wait(
                    self.client,
                    job.job,
                    attempts=self.job_attempts,
                    poll_interval=self.poll_interval,
                )
                refused = self._refused(body["data"]["attributes"])
                for index, (pointer, code, message) in refused.items():
                    position = job.rows[index]
                    other_way = code in CONFLICT_CODES if kind is CREATE else code == "not_found"
                    if other_way and not last:
                        retry.append(position)
                    else:
                        row, ident = rows[position], ids[position]
                        errors.append(
                            RowError(row, ident, pointer, ident, "destination_rejected", message)
                        )
                done += [p for i, p in enumerate(job.rows) if i not in refused]
        return _Outcome(done, retry, errors)

    @staticmethod
    def _refused(attrs: dict[str, Any]) -> dict[int, tuple[str, str, str]]:
        """Item index -> (pointer, code, message) for the items a finished job refused."""
        out: dict[int, tuple[str, str, str]] = {}
        for index, pointer, code, message in record_errors(attrs.get("errors") or []):
            if index is not None:
                out.setdefault(index, (pointer, code, message))
        return out

    def close(self) -> None:
        super().close()
        self._create.close()
        self._update.close()
        if self._screen_metadata is not None:
            self._screen_metadata.close()

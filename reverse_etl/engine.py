"""One sync run: plan → extract → transform → load → commit.

The watermark moves after each batch the destination acknowledged, in order, so a run that
stops half way resumes from the last acknowledged row; a dry run moves nothing. Every
rejected or failed row goes to the run's error file with its reason.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from reverse_etl import storage
from reverse_etl.config import Project, Sync
from reverse_etl.destinations.base import Destination, LoadBatch, LoadResult
from reverse_etl.destinations.registry import destination_for
from reverse_etl.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ROW_ERRORS,
    ReverseEtlError,
    SchemaMismatchError,
)
from reverse_etl.extract import batch_watermark, later, plan_read
from reverse_etl.prefetch import prefetch
from reverse_etl.secrets import scrub
from reverse_etl.sources import Source, SourceError, open_source
from reverse_etl.state import RunRecord, StateStore, Watermark, now
from reverse_etl.transform.rowerrors import ErrorFileWriter, RowError
from reverse_etl.transform.transformer import (
    FieldSpec,
    StreamTransformer,
    TransformSpec,
    schema_problems,
)


@dataclass
class RunOptions:
    full_refresh: bool = False
    dry_run: bool = False
    dry_run_file: str | None = None


@dataclass
class RunResult:
    record: RunRecord
    by_reason: Counter[str] = field(default_factory=Counter)
    dry_run_file: str | None = None

    @property
    def exit_code(self) -> int:
        if self.record.status == "failed":
            return EXIT_FAILED
        if self.record.counts.rejected or self.record.counts.failed:
            return EXIT_ROW_ERRORS
        return EXIT_OK


DestinationFactory = Callable[[Project, Sync], Destination]


def make_destination(project: Project, sync: Sync) -> Destination:
    conn = project.connections[sync.destination.connection]
    return destination_for(conn.type, sync.object)(conn, sync)  # type: ignore[call-arg]


def transform_spec(sync: Sync, destination_type: type[Destination]) -> TransformSpec:
    fields = []
    for column, target in sync.fields().items():
        kind = target.type or destination_type.standard_fields.get(target.field)
        fields.append(FieldSpec(column, target.field, kind))
    for channel, consent in sync.consent.columns().items():
        fields.append(FieldSpec(consent.column, f"consent.{channel}", "consent"))
        if consent.consented_at:
            fields.append(
                FieldSpec(consent.consented_at, f"consent.{channel}.consented_at", "datetime")
            )
    return TransformSpec(
        sync=sync.name,
        identifier=sync.identifier,
        cursor=sync.cursor,
        fields=tuple(fields),
        default_phone_region=sync.default_phone_region,
        phone_region_column=sync.phone_region_column,
        strict_phones=sync.phone_validation == "strict",
        naive_timezone=sync.naive_timezone,
        max_future_skew=timedelta(minutes=sync.max_future_skew_minutes),
    )


def run_sync(
    project: Project,
    sync_name: str,
    store: StateStore,
    options: RunOptions | None = None,
    *,
    destination_factory: DestinationFactory = make_destination,
    source_factory: Callable[[Project, Sync], Source] | None = None,
) -> RunResult:
    options = options or RunOptions()
    sync = project.sync(sync_name)
    run_id = store.new_run_id()
    record = RunRecord(
        run_id=run_id,
        sync=sync.name,
        started_at=now(),
        status="running",
        full_refresh=options.full_refresh,
    )
    result = RunResult(record)
    with store.lock(sync.name, run_id):
        store.start_run(record)
        error_target = storage.join(storage.join(project.error_dir, sync.name), f"{run_id}.csv")
        if not storage.is_s3(error_target):
            error_target = str(project.path(error_target))
        try:
            with storage.open_text_for_write(error_target) as fh:
                errors = ErrorFileWriter(fh, sync.name, run_id)
                try:
                    _run(
                        project,
                        sync,
                        store,
                        options,
                        record,
                        errors,
                        result,
                        destination_factory,
                        source_factory,
                    )
                finally:
                    result.by_reason = errors.by_reason
            record.error_file = error_target
        except (ReverseEtlError, SourceError) as exc:
            record.status = "failed"
            record.message = scrub(str(exc))
            record.error_file = (
                error_target if Path(error_target).exists() or storage.is_s3(error_target) else None
            )
        except BaseException as exc:  # a bug, Ctrl-C, SIGTERM: recorded as failed, never 'success'
            record.status = "failed"
            record.error_file = error_target
            record.message = scrub(
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            )
            raise
        finally:
            record.ended_at = now()
            if record.status == "running":
                record.status = (
                    "dry_run"
                    if options.dry_run
                    else (
                        "partial" if record.counts.rejected or record.counts.failed else "success"
                    )
                )
            store.save_run(record)
    return result


def _run(
    project: Project,
    sync: Sync,
    store: StateStore,
    options: RunOptions,
    record: RunRecord,
    errors: ErrorFileWriter,
    result: RunResult,
    destination_factory: DestinationFactory,
    source_factory: Callable[[Project, Sync], Source] | None,
) -> None:
    conn = project.connections[sync.destination.connection]
    dest_type = destination_for(conn.type, sync.object)
    spec = transform_spec(sync, dest_type)
    view_sql = project.source_sql(sync)
    source = (source_factory or _default_source)(project, sync)
    with source:
        schema = source.schema(view_sql)
        problems = schema_problems(spec, schema)
        if problems:
            raise SchemaMismatchError(
                f"sync {sync.name!r}: the view no longer fits the mapping, nothing was sent:\n  - "
                + "\n  - ".join(problems)
            )
        watermark = None if options.full_refresh else store.watermark(sync.name)
        if options.full_refresh and not options.dry_run:
            store.reset_watermark(sync.name)  # rebuilt from this run's acknowledged batches
        plan = plan_read(
            source,
            view_sql,
            cursor=sync.cursor,
            identifier=sync.identifier,
            email_identifier=spec.identifier_field().kind == "email",
            watermark=watermark,
            lookback=timedelta(minutes=sync.lookback_minutes),
        )
        destination = destination_factory(project, sync)
        counts = record.counts
        pending: deque[LoadBatch] = deque()  # handed to the destination, not yet acknowledged

        transformer = StreamTransformer(spec, plan.superseded)

        def batches() -> Iterator[LoadBatch]:
            for batch in source.stream(plan.query.sql, plan.query.params, sync.batch_size):
                out = transformer.transform(batch)
                counts.read += batch.num_rows
                counts.rejected += out.rejected
                errors.write(out.errors)
                loaded = LoadBatch(out.good, batch_watermark(batch, sync.cursor, sync.identifier))
                if not options.dry_run:  # a dry run acknowledges nothing: keep nothing
                    pending.append(loaded)
                yield loaded

        stream = prefetch(batches())
        try:
            if options.dry_run:
                result.dry_run_file = _dry_run(project, sync, record, options, destination, stream)
                return
            destination.prepare()
            for loaded in destination.load(stream):
                pending.popleft()
                _commit(store, sync, record, errors, loaded)
                store.heartbeat(sync.name, record.run_id)
        except BaseException:
            stream.close()
            errors.write(_unsent(pending))
            raise
        finally:
            stream.close()  # stop the read-ahead thread before its transformer and source close
            destination.close()
            transformer.close()


def _commit(
    store: StateStore, sync: Sync, record: RunRecord, errors: ErrorFileWriter, loaded: LoadResult
) -> None:
    c = record.counts
    c.sent += loaded.sent
    c.created += loaded.created
    c.updated += loaded.updated
    c.failed += loaded.failed
    errors.write(loaded.errors)
    mark: Watermark | None = loaded.token
    if mark is not None and later(mark, store.watermark(sync.name)):
        store.set_watermark(sync.name, mark)


def _unsent(pending: deque[LoadBatch]) -> Iterator[RowError]:
    """Rows the run had read and checked but the destination never acknowledged: they stay
    behind the watermark, and the error file says so rather than leaving them unnamed."""
    for batch in pending:
        rows, ids = batch.table["__row"].to_pylist(), batch.table["__id"].to_pylist()
        for row, ident in zip(rows, ids, strict=True):
            yield RowError(
                row, ident, "(row)", None, "not_sent", "not acknowledged before the run stopped"
            )


def _dry_run(
    project: Project,
    sync: Sync,
    record: RunRecord,
    options: RunOptions,
    destination: Destination,
    batches: Iterator[LoadBatch],
) -> str:
    """Write every request the run would send, one JSON line each; send and commit nothing."""
    target = options.dry_run_file or f".reverse_etl/dry-run/{sync.name}/{record.run_id}.jsonl"
    target = str(project.path(target))
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as fh:
        for batch in batches:
            for req in destination.requests(batch.table):
                line: dict[str, Any] = {
                    "method": req.method,
                    "path": req.path,
                    "rows": req.rows,
                    "body": orjson.Fragment(req.body),
                }
                fh.write(orjson.dumps(line) + b"\n")
                record.counts.sent += req.rows
    return target


def _default_source(project: Project, sync: Sync) -> Source:
    return open_source(project.connections[sync.source.connection], project)  # type: ignore[arg-type]


# Objects in the order a run of several syncs takes them: an order is refused while its
# contact does not exist, so profiles go first.
_OBJECT_ORDER = {"profiles": 0, "catalog": 1, "orders": 2}


def in_run_order(project: Project, names: list[str]) -> list[str]:
    """``names`` with profile syncs before catalog and order syncs, otherwise as listed."""
    return sorted(names, key=lambda n: _OBJECT_ORDER.get(project.sync(n).object, 1))


def due_syncs(project: Project, store: StateStore, moment: datetime | None = None) -> list[str]:
    """Enabled syncs whose schedule says they should run now, contacts before orders."""
    return in_run_order(
        project,
        [
            s.name
            for s in project.syncs
            if s.enabled
            and s.schedule is not None
            and s.schedule.is_due(store.last_started(s.name), moment)
        ],
    )

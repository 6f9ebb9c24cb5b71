"""One sync run: plan → extract → transform → load → commit.

The watermark moves after each batch the destination acknowledged, in order, so a run that
stops half way resumes from the last acknowledged row; a dry run moves nothing. Every
rejected or failed row goes to the run's error file with its reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy.exc import DBAPIError

from reverse_etl import controls
from reverse_etl.columns import resolve_sync_columns
from reverse_etl.config import Project, Sync
from reverse_etl.consent import export
from reverse_etl.consent.memory import ConsentMemory
from reverse_etl.consent.newest import NewestWins
from reverse_etl.destinations import budget, registry
from reverse_etl.destinations.base import Destination, LoadBatch, LoadResult
from reverse_etl.destinations.registry import destination_for
from reverse_etl.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ROW_ERRORS,
    DestinationError,
    LockLostError,
    MassRemovalError,
    NotDueError,
    ReverseEtlError,
    SchemaMismatchError,
)
from reverse_etl.extract import ReadPlan, later, plan_read
from reverse_etl.interrupt import Interrupt
from reverse_etl.pipeline import Earned, preflight, transformed_batches
from reverse_etl.plan import Plan
from reverse_etl.problems import ProblemTracker, Verdict, judge, thresholds_for
from reverse_etl.progress import Progress, RunProgress, current_run, tracking
from reverse_etl.retry_queue import RetryQueue
from reverse_etl.secrets import scrub
from reverse_etl.snapshot import (
    Snapshot,
    SnapshotStore,
    WarehouseSnapshot,
    definition,
    snapshot_path,
)
from reverse_etl.snapshot.store import as_text
from reverse_etl.sources import Source, open_source
from reverse_etl.state import (
    LockHandle,
    RunRecord,
    StateError,
    StateStore,
    Watermark,
    failure_message,
    now,
)
from reverse_etl.transform.rowerrors import NOTES, ErrorFileWriter, RowError
from reverse_etl.transform.transformer import FieldSpec, TransformSpec
from reverse_etl.util import memory, storage
from reverse_etl.util.prefetch import prefetch

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    full_refresh: bool = False
    resend: bool = False  # send every row read, also those the snapshot says are unchanged
    allow_mass_removal: bool = False  # let a mirror run past its max_removal_share, once
    plan_samples: int = 0  # a dry run's plan: changes shown per kind (reverse-etl plan)
    dry_run: bool = False
    dry_run_file: str | None = None
    interrupt: Interrupt | None = None  # set by a signal: stop reading, commit what is in flight
    # refuse (exit 3) when the sync's definition changed since its last accepted run; off, a
    # run accepts the change and stores the new fingerprint (controls.py)
    guard_definition: bool = False
    # a scheduled run (scheduler, run --due): once it holds the lock, the sync must still be
    # due, or NotDueError: two schedulers that both found it due run it once, not twice
    only_if_due: bool = False


@dataclass
class RunResult:
    record: RunRecord
    by_reason: Counter[str] = field(default_factory=Counter)
    dry_run_file: str | None = None
    plan: Plan | None = None  # a dry run's adds, updates, removals and samples
    verdict: Verdict | None = None  # a finished run's problems against its fail_on
    signal_exit: int | None = None  # 130 or 143: the signal that stopped the run
    accepted_changes: list[str] = field(default_factory=list)  # definition changes it took

    @property
    def exit_code(self) -> int:
        """The run's exit code (the table is in ``reverse_etl/problems.py``)."""
        if self.record.status == "interrupted":
            return self.signal_exit or EXIT_FAILED
        if self.record.status == "failed":
            return EXIT_FAILED
        if self.verdict is not None:
            return EXIT_ROW_ERRORS if self.verdict.crossed else EXIT_OK
        if self.record.counts.failed or has_problems(self.by_reason):
            return EXIT_ROW_ERRORS
        return EXIT_OK


def has_problems(by_reason: Counter[str]) -> bool:
    """Whether a run's error file holds an error: every rejected row has its reason, and rows
    set aside by a note alone (``NOTES``: kept consent, ...) are no error."""
    return any(reason not in NOTES for reason in by_reason)


DestinationFactory = Callable[[Project, Sync], Destination]


def make_destination(project: Project, sync: Sync) -> Destination:
    conn = project.connections[sync.destination.connection]
    return destination_for(conn.type, sync.object)(conn, sync)  # type: ignore[arg-type]


def open_snapshot(
    project: Project,
    sync: Sync,
    spec: TransformSpec,
    dest_type: str,
    source: Source,
    view: pa.Schema,
) -> SnapshotStore:
    """The sync's synced-state snapshot (``reverse_etl/snapshot/``): in the warehouse the sync
    reads when ``snapshot.connection`` names it (``source`` reads the view of schema
    ``view``), else a DuckDB file in the project's snapshot folder."""
    salt = definition(sync, dest_type)
    name = project.snapshot_connection(sync)
    if name is not None:
        return WarehouseSnapshot.open(
            project.connections[name],  # type: ignore[arg-type]
            source,
            spec,
            salt,
            view,
            sync=sync.name,
            schema=project.snapshot.schema_,
        )
    path = snapshot_path(project.root, project.snapshot.path, sync.name)
    return Snapshot(path, spec, salt)


def match_field(sync: Sync, destination: Destination) -> str:
    """The destination field whose value finds a record again (for removals)."""
    declared = destination.capabilities.match_field
    if declared:
        return declared
    target = sync.fields().get(sync.identifier)
    return target.field if target is not None else ""


def transform_spec(sync: Sync, destination_type: type[Destination]) -> TransformSpec:
    fields = []
    for column, target in sync.fields().items():
        kind = target.type or destination_type.capabilities.standard_fields.get(target.field)
        fields.append(FieldSpec(column, target.field, kind))
    for channel, consent in sync.consent.columns().items():
        fields.append(FieldSpec(consent.column, f"consent.{channel}", "consent"))
        if consent.consented_at:
            fields.append(
                FieldSpec(consent.consented_at, f"consent.{channel}.consented_at", "datetime")
            )
        # evidence read per row is checked like any column (blank is empty); fixed evidence
        # reads no column: the destination writes it as it is
        for key, column in (consent.evidence.columns() if consent.evidence else {}).items():
            fields.append(FieldSpec(column, f"consent.{channel}.evidence.{key}", "string"))
    untouched = frozenset(
        f"consent.{channel}"
        for channel, consent in sync.consent.columns().items()
        if consent.no_means == "not_subscribed"
    )
    return TransformSpec(
        sync=sync.name,
        identifier=sync.identifier,
        cursor=sync.cursor_column,
        fields=tuple(fields),
        no_change_on_no=untouched,
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
    progress: Progress | None = None,
) -> RunResult:
    """``progress``: where the run reports rows and phases (default: ``progress.default()``)."""
    options = options or RunOptions()
    sync = project.sync(sync_name)
    memory.configure(project.memory_limit)  # the process's budget, shared out (util/memory.py)
    run_id = store.new_run_id()
    record = RunRecord(
        run_id=run_id,
        sync=sync.name,
        started_at=now(),
        status="running",
        full_refresh=options.full_refresh,
    )
    result = RunResult(record)
    # problems an earlier run reported are known, the rest new (a dry run keeps nothing)
    problems = ProblemTracker(store, sync.name, run_id, record=not options.dry_run)
    factories = (destination_factory, source_factory)
    try:
        _locked_run(project, sync, store, options, record, result, problems, factories, progress)
    except DBAPIError as exc:  # the store failed after it opened: locked, full, gone
        raise StateError(failure_message(store.engine.url, exc)) from exc
    return result


def _locked_run(
    project: Project,
    sync: Sync,
    store: StateStore,
    options: RunOptions,
    record: RunRecord,
    result: RunResult,
    problems: ProblemTracker,
    factories: tuple[DestinationFactory, Callable[[Project, Sync], Source] | None],
    progress: Progress | None,
) -> None:
    destination_factory, source_factory = factories
    run_id = record.run_id
    # a run that never starts (its lock held elsewhere, or no longer due) is no run in the
    # progress log either: it was reported "started ... ended failed" at every scheduler check
    with store.lock(sync.name, run_id) as lock:
        if options.only_if_due and sync.name not in due_syncs(project, store):
            raise NotDueError(
                f"sync {sync.name!r} is no longer due: another run took its due time while "
                "this one waited (two schedulers, or run --due beside a scheduler)"
            )
        # clients built in the run share each account's rate budget through the store
        with tracking(record, progress), budget.shared_through(store):
            store.start_run(record)
            error_target = storage.join(storage.join(project.error_dir, sync.name), f"{run_id}.csv")
            if not storage.is_s3(error_target):
                error_target = str(project.path(error_target))
            try:
                with (
                    storage.open_text_for_write(error_target) as fh,
                    ErrorFileWriter(
                        fh, sync.name, run_id, registry.reasons(), problems.first_seen
                    ) as errors,
                ):
                    try:
                        _run(
                            project,
                            sync,
                            store,
                            lock,
                            options,
                            record,
                            errors,
                            result,
                            destination_factory,
                            source_factory,
                        )
                        if not _stopping(options, lock):  # it read everything: forget the fixed
                            problems.settle()
                    finally:
                        result.by_reason = errors.by_reason
                record.error_file = error_target
            except ReverseEtlError as exc:
                record.status = "failed"
                record.message = scrub(str(exc))
                record.error_file = (
                    error_target
                    if Path(error_target).exists() or storage.is_s3(error_target)
                    else None
                )
            except DBAPIError as exc:  # the store failed mid-run: the record says so if it can
                record.status = "failed"
                record.error_file = error_target
                record.message = failure_message(store.engine.url, exc)
                raise
            except BaseException as exc:  # a bug, or a signal's grace ran out: never 'success'
                signal_name = options.interrupt.name if options.interrupt else ""
                record.status = "interrupted" if signal_name else "failed"
                record.error_file = error_target
                record.message = scrub(
                    f"{signal_name}: stopped before the batches in flight were acknowledged"
                    if signal_name
                    else (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                )
                raise
            finally:
                record.ended_at = now()
                if record.status == "running":
                    record.status = _final_status(record, options, result)
                _judge(project, sync, record, options, result, problems)
                if result.plan is not None:
                    c, plan = record.counts, result.plan
                    plan.read, plan.unchanged, plan.rejected = c.read, c.unchanged, c.rejected
                    plan.by_reason = result.by_reason
                # a plan that failed is kept as a plan: a "failed" record blocked the sync's
                # dependents, moved its schedule and started its retry backoff (the exit code still
                # says it failed: ``result.record`` is unchanged)
                failed_plan = options.dry_run and record.status != "dry_run"
                _save_run(
                    store,
                    dataclasses.replace(
                        record, status="dry_run", message=f"plan {record.status}: {record.message}"
                    )
                    if failed_plan
                    else record,
                )


def _save_run(store: StateStore, record: RunRecord) -> None:
    """Keep the run's record; a store that fails now (the error, if any, that ended the run
    is already on its way) is logged, never raised over that error. The record then says
    ``running`` until the next run takes the lock over."""
    try:
        store.save_run(record)
    except DBAPIError as exc:
        log.error(
            "run %s of %r ended %s, but its record could not be saved: %s",
            record.run_id,
            record.sync,
            record.status,
            failure_message(store.engine.url, exc),
        )


def fit_view(
    project: Project, sync: Sync, source: Source, view_sql: str
) -> tuple[Sync, TransformSpec, pa.Schema]:
    """The view's schema (read without its rows), ``sync`` with its columns spelled as the
    view spells them, and the transform spec that follows: what run, check and validate
    start from."""
    schema = source.schema(view_sql)
    sync = resolve_sync_columns(sync, schema.names, source.dialect)
    conn = project.connections[sync.destination.connection]
    return sync, transform_spec(sync, destination_for(conn.type, sync.object)), schema


def read_plan(
    source: Source,
    view_sql: str,
    sync: Sync,
    spec: TransformSpec,
    *,
    watermark: Watermark | None = None,
    annotate: Callable[[str], str] | None = None,
    retry: Sequence[str] = (),
) -> ReadPlan:
    """The one read of ``sync``'s view (``extract.plan_read``) from the sync's own columns,
    past ``watermark`` (and its lookback window), plus the ``retry`` identifiers; the whole
    view without one."""
    return plan_read(
        source,
        view_sql,
        cursor=sync.cursor_column,
        identifier=sync.identifier,
        email_identifier=spec.identifier_field().kind == "email",
        watermark=watermark,
        lookback=timedelta(minutes=sync.lookback_minutes),
        annotate=annotate,
        retry=retry,
    )


def view_problems(project: Project, sync: Sync, source: Source) -> list[str]:
    """What a run of ``sync`` would refuse before reading a row (``reverse-etl check``): the
    SQL file, the view's columns and types against the mapping, the cursor's type."""
    try:
        sync, spec, schema = fit_view(project, sync, source, project.source_sql(sync))
    except ReverseEtlError as exc:
        return [scrub(str(exc))]
    return preflight(sync.name, spec, schema)


def consent_warnings(project: Project, sync: Sync, source: Source) -> list[str]:
    """Consent columns holding an ambiguous "no" (no, false, 0, ...) with no ``no_means``
    saying whether it is an opt-out or a box never ticked (``reverse-etl check``)."""
    from reverse_etl.transform.consent import AMBIGUOUS_NO

    unsure = {ch: c for ch, c in sync.consent.columns().items() if c.no_means is None}
    if not unsure:
        return []
    d = source.dialect
    view = d.embed_sql(project.source_sql(sync))
    words = ", ".join(f"'{w}'" for w in sorted(AMBIGUOUS_NO))
    out = []
    for channel, consent in unsure.items():
        value = f"lower(trim(CAST(v.{d.quote(consent.column)} AS {d.string_type})))"
        sql = f"SELECT DISTINCT {value} AS w FROM ({view}) AS v WHERE {value} IN ({words})"
        try:
            found = sorted(
                str(w) for b in source.stream(sql, {}, 100) for w in b.column(0).to_pylist()
            )
        except ReverseEtlError as exc:
            out.append(f"consent.{channel}: could not look for ambiguous words: {scrub(str(exc))}")
            continue
        if found:
            out.append(
                f"consent.{channel}: column {consent.column!r} holds {', '.join(found)}, which "
                "may mean an opt-out or a box never ticked; say which with consent."
                f"{channel}.no_means: unsubscribed (sends an unsubscribe, the default) or "
                "not_subscribed (leaves the destination's consent as it is)"
            )
    return out


def _final_status(record: RunRecord, options: RunOptions, result: RunResult) -> str:
    if options.interrupt is not None and options.interrupt.requested:
        record.message = (
            f"{options.interrupt.name}: stopped reading; the batches in flight were "
            "acknowledged and committed, the next run goes on from there"
        )
        return "interrupted"
    if options.dry_run:
        return "dry_run"
    c = record.counts
    return "partial" if c.failed or has_problems(result.by_reason) else "success"


def _judge(
    project: Project,
    sync: Sync,
    record: RunRecord,
    options: RunOptions,
    result: RunResult,
    problems: ProblemTracker,
) -> None:
    """Count the run's known and new problems and, for a finished run, judge them against
    the sync's fail_on (the exit code), saying so in the run's message."""
    c = record.counts
    c.known_problems, c.new_problems = problems.known, problems.new
    if record.status == "interrupted" and options.interrupt is not None:
        result.signal_exit = options.interrupt.exit_code
    if record.status in {"failed", "interrupted"}:
        return
    rows = max(problems.rows, c.failed)  # a failed row always has its error: a safety net
    result.verdict = judge(
        thresholds_for(project, sync),
        read=c.read,
        rows=rows,
        known=c.known_problems,
        new=c.new_problems,
    )
    if result.verdict.summary:
        record.message = "; ".join(m for m in (record.message, result.verdict.summary) if m)


def _run(
    project: Project,
    sync: Sync,
    store: StateStore,
    lock: LockHandle,
    options: RunOptions,
    record: RunRecord,
    errors: ErrorFileWriter,
    result: RunResult,
    destination_factory: DestinationFactory,
    source_factory: Callable[[Project, Sync], Source] | None,
) -> None:
    conn = project.connections[sync.destination.connection]
    view_sql = project.source_sql(sync)
    source = (source_factory or _default_source)(project, sync)
    with source:
        sync, spec, schema = fit_view(project, sync, source, view_sql)
        stored = store.watermark(sync.name)
        # a full refresh reads from the start, but the stored watermark stays until the first
        # batch is acknowledged: a refresh that fails at once (a wrong API key) loses nothing
        # a mirror sync reads the whole view every run: who left is who was not read
        mirror = sync.mode == "mirror"
        watermark = None if options.full_refresh or mirror else stored
        problems = preflight(sync.name, spec, schema, watermark)
        if problems:
            raise SchemaMismatchError(
                f"sync {sync.name!r}: the view no longer fits the mapping, nothing was sent:\n  - "
                + "\n  - ".join(problems)
            )
        # a changed definition: refused (a guarded run), or accepted (controls.py). Rows behind
        # the watermark are at the destination as the old definition made them (in another
        # list, without a new field), so accepting a change re-reads the whole view and the
        # snapshot sends the rows the change makes different. The watermark is reset before
        # the change is stored as accepted: a run that dies half-way reads on from the start
        # next time, never from the old watermark (a renamed list stayed empty). A plan shows
        # what accepting would send.
        written = project.sync(sync.name)  # as status sees it; ``sync`` is fitted to the view
        changes = controls.unaccepted_changes(project, written, store, fitted=sync)
        if changes and watermark is not None and not options.guard_definition:
            log.info("sync %r: %s; the whole view is read once", sync.name, "; ".join(changes))
            if not options.dry_run:
                store.reset_watermark(sync.name)
                stored = None
            watermark = None
        if not options.dry_run:
            # the sync as written is what is kept: the fitted one holds the view's spelling of
            # its columns (upper case on Snowflake), so status called every Snowflake sync
            # changed
            result.accepted_changes = controls.guard_definition(
                project,
                written,
                store,
                record.run_id,
                refuse=options.guard_definition,
                fitted=sync,
            )
        snapshot = open_snapshot(project, sync, spec, conn.type, source, schema)
        try:
            if mirror:
                snapshot.begin_mirror()
            snapshot.keep_old = options.dry_run and options.plan_samples > 0
            # rows refused for a missing parent are read again, behind the watermark
            queue = RetryQueue(store, sync.name, record.run_id)
            retry = queue.load()  # a read without a watermark takes them anyway
            # a warehouse snapshot is joined by the read itself: the diff runs where the data is
            plan = read_plan(
                source,
                view_sql,
                sync,
                spec,
                watermark=watermark,
                annotate=snapshot.in_read(resend=options.resend),
                retry=retry,
            )
            destination = destination_factory(project, sync)
        except BaseException:
            snapshot.close()
            raise
        try:
            newest = _newest_wins(store, sync, destination, conn.type, options)
            if newest is not None and sync.optouts_table and not options.dry_run:
                rows = export.as_table(newest.memory.statements(), sync.destination.connection)
                export.write(source, sync.optouts_table, rows)
        except BaseException:
            destination.close()
            snapshot.close()
            raise
        key = match_field(sync, destination)
        pending: deque[LoadBatch] = deque()  # handed to the destination, not yet acknowledged
        tracker = current_run()  # set by run_sync; captured here for the read-ahead thread

        def batches() -> Iterator[LoadBatch]:
            for loaded in transformed_batches(
                source,
                plan.query,
                spec,
                destination,
                batch_size=sync.batch_size,
                errors=errors,
                counts=record.counts,
                stop=lambda: _stopping(options, lock),
                snapshot=snapshot,
                resend=options.resend,
                newest=newest,
            ):
                earned: Earned = loaded.token
                loaded = LoadBatch(loaded.table, _Token(earned.mark, earned.prints))
                if not options.dry_run:  # a dry run acknowledges nothing: keep nothing
                    _reserve(snapshot, earned.prints, loaded.table, key)
                    pending.append(loaded)
                if tracker is not None:
                    tracker.read_batch()
                yield loaded

        _phase(tracker, "reading")
        # the read-ahead holds at most its share of the budget in batches (at least one)
        stream = prefetch(batches(), max_bytes=memory.current().read_ahead, size=_held_bytes)
        group: CommitGroup | None = None  # acknowledged batches not yet committed
        try:
            if options.dry_run:
                result.plan = Plan(sync.name, samples=options.plan_samples)
                result.dry_run_file = _dry_run(
                    project, sync, record, options, destination, stream, snapshot, result.plan
                )
                return
            destination.prepare()
            replace = options.full_refresh and stored is not None
            group = CommitGroup.for_snapshot(snapshot)
            stop = lambda: _stopping(options, lock)  # noqa: E731
            for loaded in destination.load(_handed(stream, tracker, stop)):
                if not pending or loaded.token is not pending[0].token:
                    raise DestinationError(
                        f"the {conn.type} destination acknowledged a batch other than the oldest "
                        "one in flight; nothing after the last in-order batch was committed"
                    )
                if lock.lost or not store.heartbeat(sync.name, record.run_id):
                    raise LockLostError(
                        f"sync {sync.name!r}: run {record.run_id} lost its lock (another run took "
                        "it over as stale, or it was unlocked); it stopped without committing "
                        "more, and the rows it sent past its watermark are sent again next run"
                    )
                sent = pending.popleft()
                _commit(
                    store,
                    sync,
                    record,
                    errors,
                    loaded,
                    replace=replace,
                    snapshot=snapshot,
                    sent=sent.table,
                    key=key,
                    newest=newest,
                    queue=queue,
                    group=group,
                )
                if tracker is not None:
                    tracker.acknowledged()
                replace = False
                del sent, loaded  # the batch's memory goes back before the next is taken
                memory.release()
            group.flush(store, sync.name, snapshot)
            if pending:  # read ahead, never handed (stopped): named, and read again next run
                stream.close()  # the read-ahead thread ends before the batches are listed
                errors.write(_unsent(pending))
                pending.clear()
            if not _stopping(options, lock):  # queued rows not met left the view
                queue.finish()
            if mirror and snapshot.read_complete and not _stopping(options, lock):
                _phase(tracker, "removing members who left the view")
                _remove_departed(sync, store, lock, options, record, errors, destination, snapshot)
        except LockLostError:
            stream.close()  # another run may hold the sync now: nothing more is written
            errors.write(_unsent(pending))
            raise
        except BaseException:
            stream.close()
            _flush_acknowledged(group, store, sync.name, snapshot)
            errors.write(_unsent(pending))
            raise
        finally:
            stream.close()  # stop the read-ahead thread before its source closes
            destination.close()
            snapshot.close()


def _held_bytes(batch: LoadBatch) -> int:
    """What a batch read ahead holds: its rows and, with a snapshot, their fingerprints."""
    prints = batch.token.prints
    return int(batch.table.nbytes) + (int(prints.nbytes) if prints is not None else 0)


def _phase(tracker: RunProgress | None, text: str) -> None:
    if tracker is not None:
        tracker.set_phase(text)


def _handed(
    stream: Iterator[LoadBatch], tracker: RunProgress | None, stop: Callable[[], bool]
) -> Iterator[LoadBatch]:
    """``stream`` as the destination takes it, in the run's thread: the phase says whether
    batches are still being read or only those in flight are left. Once ``stop`` (a signal,
    a lost lock), no more are handed: the batches read ahead stay unsent behind the
    watermark, where they went on being sent after SIGTERM, using up the grace period."""
    for batch in stream:
        if stop():
            return
        _phase(tracker, "sending")
        yield batch
    _phase(tracker, "read done; sending the last batches")


def _newest_wins(
    store: StateStore, sync: Sync, destination: Destination, kind: str, options: RunOptions
) -> NewestWins | None:
    """What the destination says about its people's consent, read back since the last run
    (not by a dry run, which uses what earlier runs read): subscribes older than an opt-out
    there are held back. None when the sync sends no consent or the destination reads none."""
    columns = {channel: c.column for channel, c in sync.consent.columns().items()}
    account = destination.consent_account() if columns else None
    if account is None:
        return None
    memory = ConsentMemory(store, account)
    if options.dry_run:  # a dry run asks the destination nothing
        return NewestWins(memory, kind.capitalize(), columns)
    destination.read_back(memory)
    return NewestWins(memory, kind.capitalize(), columns, destination.consent_standing)


def _commit(
    store: StateStore,
    sync: Sync,
    record: RunRecord,
    errors: ErrorFileWriter,
    loaded: LoadResult,
    *,
    replace: bool = False,
    snapshot: SnapshotStore | None = None,
    sent: pa.Table | None = None,
    key: str = "",
    newest: NewestWins | None = None,
    queue: RetryQueue | None = None,
    group: CommitGroup,
) -> None:
    """Count the batch, remember what it sent in the snapshot, then move the watermark past
    it (in that order: see ``snapshot/local.py``). ``replace``: the first acknowledged batch
    of a full refresh, which takes the place of the old watermark (even behind it). ``key``:
    the field the destination finds a record by (``match_field``), kept with each row.
    ``group``: the snapshot and watermark parts wait for the group's other batches."""
    c = record.counts
    c.sent += loaded.sent
    c.created += loaded.created
    c.updated += loaded.updated
    c.failed += loaded.failed
    # rows refused for a missing parent are queued for the next runs (retry_queue.py)
    errors.write(loaded.errors if queue is None else queue.settle(sent, loaded.errors))
    token: _Token = loaded.token
    prints, acked = None, None
    if sent is not None and sent.num_rows:
        # the rows the destination took (it refused those with an error)
        refused = pa.array(sorted({e.row_number for e in loaded.errors}), pa.int64())
        landed = pc.invert(pc.is_in(sent["__row"], refused))
        if snapshot is not None and token.prints is not None:
            # a row sent without the part the screen took off (consent without an address) is
            # held as it is: its error was reported, and sending it again cannot fix it until
            # it changes
            prints, acked = token.prints, _sent_keys(sent, key).filter(landed)
        if newest is not None:
            newest.acknowledged(sent.filter(landed))
    group.add(prints, acked, token.mark, replace=replace)
    if group.full():
        group.flush(store, sync.name, snapshot)


@dataclass
class CommitGroup:
    """Acknowledged batches whose snapshot records and watermark are written together.

    Recording a batch of rows the snapshot already holds deletes their old records, a scan
    of every member: 0.8 s a batch with 10M members, half of a 1 %-changed run's time, and
    500 such scans for a full re-send. With a snapshot that large (``GROUP_FROM`` members)
    the acknowledged batches are recorded ``rows`` rows at a time, then the watermark moves
    past the last of them; a crash in between sends those batches again (upserts), never
    skips one. Below it (``rows`` 0) each batch is written as it is acknowledged."""

    rows: int = 0
    prints: list[pa.Table] = field(default_factory=list)
    acked: list[pa.Table] = field(default_factory=list)
    mark: Watermark | None = None
    replace: bool = False
    batches: int = 0
    held: int = 0

    GROUP_FROM: ClassVar[int] = 1_000_000
    GROUP_ROWS: ClassVar[int] = 200_000

    @classmethod
    def for_snapshot(cls, snapshot: SnapshotStore | None) -> CommitGroup:
        if isinstance(snapshot, Snapshot) and snapshot.held() >= cls.GROUP_FROM:
            return cls(rows=cls.GROUP_ROWS)
        return cls()

    def add(
        self,
        prints: pa.Table | None,
        acked: pa.Table | None,
        mark: Watermark | None,
        *,
        replace: bool,
    ) -> None:
        if prints is not None and acked is not None and acked.num_rows:
            self.prints.append(prints)
            self.acked.append(acked)
            self.held += acked.num_rows
        self.replace = self.replace or replace
        self.mark = mark if mark is not None else self.mark
        self.batches += 1

    def full(self) -> bool:
        return self.held >= self.rows

    def flush(self, store: StateStore, sync: str, snapshot: SnapshotStore | None) -> None:
        """Record the group's rows in one snapshot transaction, then move the watermark. Each
        part is let go once written: a second call after a failure never records a row
        twice."""
        if not self.batches:
            return
        if snapshot is not None and self.acked:
            snapshot.record(_concat(self.prints), _concat(self.acked))
        self.prints, self.acked, self.held = [], [], 0
        mark = self.mark
        if self.replace:
            if mark is None:
                store.reset_watermark(sync)
            else:
                store.set_watermark(sync, mark)
        elif mark is not None and later(mark, store.watermark(sync)):
            store.set_watermark(sync, mark)
        self.mark, self.replace, self.batches = None, False, 0


def _concat(tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def _flush_acknowledged(
    group: CommitGroup | None, store: StateStore, sync: str, snapshot: SnapshotStore
) -> None:
    """On the way out of a failed run, the batches the destination did acknowledge are still
    recorded and committed; if that fails too, they are sent again next run."""
    if group is None:
        return
    try:
        group.flush(store, sync, snapshot)
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        log.warning("could not commit the last acknowledged batches; they are sent again next run")


@dataclass(eq=False)
class _Token:
    """What the engine hands the destination with a batch and must get back with its result:
    compared by identity, so a result is matched to its own batch, never to an equal one."""

    mark: Watermark | None
    prints: pa.Table | None = None  # fingerprints of the rows sent, for the snapshot


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
    snapshot: SnapshotStore,
    plan: Plan,
) -> str:
    """Write every request the run would send, one JSON line each; send and commit nothing.
    A mirror sync's removals are counted (``removed``: would remove) and shown too."""
    target = options.dry_run_file or f".reverse_etl/dry-run/{sync.name}/{record.run_id}.jsonl"
    target = str(project.path(target))
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as fh:
        for batch in batches:
            if batch.table.num_rows:
                plan.take(batch.token.prints, batch.table["__row"])
                plan.take_consent(batch.table)
            for req in destination.requests(batch.table):
                line: dict[str, Any] = {
                    "method": req.method,
                    "path": req.path,
                    "rows": req.rows,
                    "body": orjson.Fragment(req.body),
                }
                fh.write(orjson.dumps(line) + b"\n")
                record.counts.sent += req.rows
        if sync.mode == "mirror" and snapshot.read_complete:
            record.counts.removed = snapshot.departed_count()
            gone = snapshot.departed(REMOVAL_CHUNK)
            plan.take_removals(record.counts.removed, gone)
            for req in destination.removal_requests(gone):
                line = {"method": req.method, "path": req.path, "rows": req.rows}
                line["body"] = orjson.Fragment(req.body) if req.body else None
                fh.write(orjson.dumps(line) + b"\n")
    return target


REMOVAL_CHUNK = 10_000  # members handed to Destination.remove at once


def _reserve(snapshot: SnapshotStore, prints: pa.Table | None, table: pa.Table, key: str) -> None:
    """Note the batch's new identifiers in the snapshot before the destination gets them
    (``SnapshotStore.reserve``)."""
    if prints is None or table.num_rows == 0 or prints.num_rows == 0:
        return
    sent = _sent_keys(table, key)
    ours = prints.select(["__row", "id", "payload", "consent"])
    ours = ours.set_column(0, "__row", pc.cast(ours["__row"], pa.int64()))
    joined = ours.join(sent, "__row", join_type="inner")
    snapshot.reserve(joined.select(["id", "key", "payload", "consent"]))


def _sent_keys(table: pa.Table, key: str) -> pa.Table:
    """``__row`` and, as text, the value of field ``key`` the destination finds each row by
    (what the snapshot keeps to find a member again)."""
    keys = table[key] if key in table.column_names else pa.nulls(table.num_rows, pa.string())
    return pa.table({"__row": pc.cast(table["__row"], pa.int64()), "key": as_text(keys)})


def _stopping(options: RunOptions, lock: LockHandle) -> bool:
    return lock.lost or (options.interrupt is not None and options.interrupt.requested)


def removal_guard(sync: Sync, departed: int, members: int, read: int) -> str | None:
    """Why a mirror run must not remove ``departed`` of ``members``, or None. An empty or
    broken view must never empty a live marketing list."""
    if departed == 0:
        return None
    if read == 0:
        return (
            f"the view returned no rows, so all {departed} members of the list would be "
            "removed; check the view (an empty or failing source never empties a list)"
        )
    share = departed / members if members else 1.0
    if share > sync.max_removal_share:
        return (
            f"{departed} of the list's {members} members ({share:.0%}) left the view, more "
            f"than max_removal_share ({sync.max_removal_share:.0%})"
        )
    return None


def _remove_departed(
    sync: Sync,
    store: StateStore,
    lock: LockHandle,
    options: RunOptions,
    record: RunRecord,
    errors: ErrorFileWriter,
    destination: Destination,
    snapshot: SnapshotStore,
) -> None:
    """Take the members who left the view out of the list, a chunk at a time. A removal is
    acknowledged before it leaves the snapshot: a crash between the two repeats it, which
    removes nothing twice. Stops before removing anything when the guard says so."""
    departed = snapshot.departed_count()
    why = removal_guard(sync, departed, snapshot.count(), record.counts.read)
    if why and not options.allow_mass_removal:
        raise MassRemovalError(
            f"sync {sync.name!r}: nothing was removed: {why}. If that is right, run it once "
            f"with `reverse-etl run {sync.name} --allow-mass-removal`"
        )
    while not _stopping(options, lock):
        chunk = snapshot.departed(REMOVAL_CHUNK)
        if chunk.num_rows == 0:
            return
        if not store.heartbeat(sync.name, record.run_id):
            raise LockLostError(
                f"sync {sync.name!r}: run {record.run_id} lost its lock during removals; the "
                "members not yet removed are removed by the next run"
            )
        snapshot.unsettle(chunk["__id"].to_pylist())
        done = destination.remove(chunk)
        asked = set(chunk["__id"].to_pylist())
        removed = [i for i in {str(i) for i in done.ids} if i in asked]
        snapshot.forget(removed)
        record.counts.removed += len(removed)
        errors.write(done.errors)
        if len(removed) < chunk.num_rows:  # the rest were refused: tried again next run
            left = chunk.num_rows - len(done.ids)
            record.message = f"{left} members could not be removed; they are tried again next run"
            return


def _default_source(project: Project, sync: Sync) -> Source:
    # a DuckDB warehouse that holds the sync's snapshot or its opt-outs table is written to
    # as well as read
    writable = project.snapshot_connection(sync) is not None or sync.optouts_table is not None
    conn = project.connections[sync.source.connection]
    return open_source(conn, project, writable=writable)  # type: ignore[arg-type]


# Objects in the order a run of several syncs takes them: an order is refused while its
# contact does not exist, so profiles go first.
_OBJECT_ORDER = {"profiles": 0, "catalog": 1, "orders": 2}


def in_run_order(project: Project, names: list[str]) -> list[str]:
    """``names`` with profile syncs before catalog and order syncs, otherwise as listed."""
    return sorted(names, key=lambda n: _OBJECT_ORDER.get(project.sync(n).object, 1))


def due_syncs(project: Project, store: StateStore, moment: datetime | None = None) -> list[str]:
    """Enabled syncs (the state store's enable/disable over the file's) whose schedule says
    they should run now, contacts before orders; a failed run is due again after a backoff."""
    enabled = controls.enabled_states(project, store)
    moment = moment or now()

    def due(s: Sync) -> bool:
        if not enabled[s.name].enabled or s.schedule is None:
            return False
        failures, failed_at = controls.failure_streak(store, s.name)
        last = store.last_started(s.name, before=moment)  # runs "in the future": clock set back
        return s.schedule.is_due(last, moment, failures=failures, failed_at=failed_at)

    return in_run_order(project, [s.name for s in project.syncs if due(s)])

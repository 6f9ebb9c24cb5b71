"""What the read-only commands show (status, runs, errors, ls, check) and how ``unlock`` decides,
as plain data: the command line prints it as tables or as JSON with stable keys.

Nothing here calls a destination's API, so none of it needs a destination's secret.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from reverse_etl import controls, state
from reverse_etl.config import Project, Sync
from reverse_etl.controls import EnabledState
from reverse_etl.errors import LockHeldError, ReverseEtlError
from reverse_etl.schedule import blocked_by
from reverse_etl.state import LockInfo, RunRecord, StateStore
from reverse_etl.util import storage

# runs that ended without sending everything: their message says why
UNHAPPY = ("failed", "partial", "interrupted", "abandoned")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def duration(record: RunRecord) -> float | None:
    """Seconds the run took, or None while it is still running."""
    if record.ended_at is None:
        return None
    return round((record.ended_at - record.started_at).total_seconds(), 3)


def run_dict(record: RunRecord) -> dict[str, Any]:
    """One run as JSON: the same keys for every run, times in ISO 8601 UTC."""
    return {
        "run_id": record.run_id,
        "sync": record.sync,
        "status": record.status,
        "started_at": _iso(record.started_at),
        "ended_at": _iso(record.ended_at),
        "duration_seconds": duration(record),
        "full_refresh": record.full_refresh,
        "counts": {
            name: getattr(record.counts, name) for name in record.counts.__dataclass_fields__
        },
        "message": record.message,
        "error_file": record.error_file,
    }


def find_run(store: StateStore, run_id: str) -> RunRecord:
    """The run with this id, or a ReverseEtlError saying where to find ids."""
    with store.engine.connect() as con:
        row = con.execute(sa.select(state.runs).where(state.runs.c.run_id == run_id)).first()
    if row is None:
        raise ReverseEtlError(
            f"no run {run_id!r} in the state store ({store.url.split('://', 1)[0]}); "
            "`reverse-etl runs SYNC` lists a sync's runs with their ids"
        )
    return state._run_record(row)


# --------------------------------------------------------------------------- errors


@dataclass
class ErrorSummary:
    """A run's error file counted by reason (most frequent first), with each reason's fix."""

    run: RunRecord
    error_file: str | None
    problems: int = 0  # lines of the file: a row may have several
    by_reason: list[tuple[str, int, str]] = field(default_factory=list)  # reason, count, fix

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run.run_id,
            "sync": self.run.sync,
            "status": self.run.status,
            "message": self.run.message,
            "error_file": self.error_file,
            "problems": self.problems,
            "by_reason": [
                {"reason": r, "count": n, "how_to_fix": fix} for r, n, fix in self.by_reason
            ],
        }


def summarize_errors(store: StateStore, run_id: str) -> ErrorSummary:
    """Count the run's error file by reason, streamed in Arrow batches (memory stays flat
    however many rows failed); an s3:// file is downloaded to a temporary file first."""
    return summary_of(find_run(store, run_id))


def summary_of(run: RunRecord) -> ErrorSummary:
    """``summarize_errors`` of a run record already read."""
    summary = ErrorSummary(run, run.error_file)
    if not run.error_file:
        return summary
    try:
        local = storage.local_copy_path(run.error_file)
    except FileNotFoundError:
        raise ReverseEtlError(
            f"run {run.run_id}: its error file {run.error_file} is gone (moved or deleted)"
        ) from None
    try:
        counts, fixes = _count_reasons(local)
    finally:
        if storage.is_s3(run.error_file):
            os.unlink(local)
    summary.problems = sum(counts.values())
    summary.by_reason = [(r, n, fixes.get(r, "")) for r, n in counts.most_common()]
    return summary


def _count_reasons(path: str) -> tuple[Counter[str], dict[str, str]]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    columns = ("reason", "how_to_fix")
    counts: Counter[str] = Counter()
    fixes: dict[str, str] = {}
    try:
        reader = pacsv.open_csv(
            path,
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(columns),
                # an error file written before how_to_fix existed, or trimmed by hand, still
                # counts by reason; a file without a reason column is refused below
                include_missing_columns=True,
                column_types=dict.fromkeys(columns, pa.string()),
                strings_can_be_null=False,
            ),
        )
        for batch in reader:
            if batch.num_rows and batch.column("reason").null_count == batch.num_rows:
                raise ReverseEtlError(f"{path}: not an error file of reverse-etl: no reason column")
            batch = batch.set_column(1, "how_to_fix", pc.fill_null(batch.column(1), ""))
            grouped = pa.Table.from_batches([batch]).group_by("reason")
            for row in grouped.aggregate([("reason", "count"), ("how_to_fix", "min")]).to_pylist():
                counts[row["reason"]] += row["reason_count"]
                fixes.setdefault(row["reason"], row["how_to_fix_min"])
    except StopIteration:  # an empty file has no header either
        return counts, fixes
    except pa.ArrowException as exc:
        if "Empty CSV" in str(exc):
            return counts, fixes
        raise ReverseEtlError(f"{path}: not an error file of reverse-etl: {exc}") from None
    return counts, fixes


# --------------------------------------------------------------------------- syncs, status


def sync_dicts(
    project: Project, enabled: Mapping[str, EnabledState] | None = None
) -> list[dict[str, Any]]:
    """Each sync of the project file (``reverse-etl ls``), in file order. ``enabled``: the
    effective enabled states (``controls.enabled_states``); without it, the file's."""
    enabled = enabled or {}
    out = []
    for s in project.syncs:
        said = enabled.get(s.name, EnabledState(s.enabled, "file"))
        conn = project.connections[s.destination.connection]
        out.append(
            {
                "name": s.name,
                "object": s.object,
                "mode": s.mode,
                "source": {
                    "connection": s.source.connection,
                    "sql": s.source.sql,
                    "table": s.source.table,
                },
                "destination": {
                    "connection": s.destination.connection,
                    "type": conn.type,
                    "list": s.destination.list,
                },
                "schedule": s.schedule.text if s.schedule else None,
                "enabled": said.enabled,
                "enabled_from": said.source,  # file | state (reverse-etl enable/disable)
            }
        )
    return out


def lock_dict(info: LockInfo | None, stale_after: timedelta) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "run_id": info.run_id,
        "owner": info.owner,
        "acquired_at": _iso(info.acquired_at),
        "heartbeat_at": _iso(info.heartbeat_at),
        "stale": is_stale(info, stale_after),
    }


def status_dicts(
    project: Project, store: StateStore, names: list[str], limit: int
) -> list[dict[str, Any]]:
    """Per sync: watermark, schedule, enabled (and from where), unaccepted definition changes,
    why runs skip it (``blocked``: a dependency failed or is disabled; None: free), who holds
    its lock, its last ``limit`` runs."""
    enabled = controls.enabled_states(project, store)
    changed = controls.pending_changes(project, store, names)
    out = []
    for name in names:
        mark = store.watermark(name)
        sched = project.sync(name).schedule
        out.append(
            {
                "sync": name,
                "watermark": None
                if mark is None
                else {"cursor": _plain(mark.cursor), "id": _plain(mark.id)},
                "schedule": sched.text if sched else None,
                "enabled": enabled[name].enabled,
                "enabled_from": enabled[name].source,
                "definition_changed": changed.get(name),  # None: as last accepted
                "blocked": blocked_by(project, store, name),
                "lock": lock_dict(store.lock_info(name), store.stale_after),
                "runs": [run_dict(r) for r in store.last_runs(name, limit)],
            }
        )
    return out


def _plain(value: Any) -> Any:
    """A watermark value as JSON holds it: numbers and text as they are, times in ISO 8601,
    others (decimals) as text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return value.isoformat() if isinstance(value, date) else str(value)


# --------------------------------------------------------------------------- check


def sql_file_problems(project: Project) -> dict[str, str]:
    """Sync name -> why its ``source.sql`` file cannot be read (missing, a folder, empty)."""
    found = {s.name: sql_file_problem(project, s) for s in project.syncs}
    return {name: problem for name, problem in found.items() if problem is not None}


def sql_file_problem(project: Project, sync: Sync) -> str | None:
    """Why ``sync``'s ``source.sql`` file cannot be read, or None (also for a table source)."""
    if sync.source.sql is None:
        return None
    path = project.path(sync.source.sql)
    if not path.exists():
        return f"source.sql: {path} does not exist; create it or fix the path"
    if not path.is_file():
        return f"source.sql: {path} is not a file"
    if not path.read_text(errors="replace").strip():
        return f"source.sql: {path} is empty; write one SELECT"
    return None


def missing_env_warnings(project: Project) -> list[str]:
    """The destination secrets the environment lacks: ``run`` would stop on them."""
    return [
        f"{path}: environment variable {name!r} is not set; `run` and `optouts` need it"
        for conn in project.connections
        for path, name in project.missing_env(conn)
    ]


# --------------------------------------------------------------------------- unlock


def is_stale(info: LockInfo, stale_after: timedelta) -> bool:
    """The holder stopped heartbeating for longer than the store's stale_after: it is gone
    (a live run beats every few seconds to a minute, whatever it waits for)."""
    return state.now() - info.heartbeat_at > stale_after


def holder_text(info: LockInfo) -> str:
    age = (state.now() - info.heartbeat_at).total_seconds()
    return (
        f"run {info.run_id} on {info.owner}, since {info.acquired_at:%Y-%m-%d %H:%M:%S} UTC, "
        f"last heartbeat {info.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC ({age:.0f} s ago)"
    )


def unlock(store: StateStore, sync: str, *, force: bool = False) -> str:
    """Release the sync's lock if its holder is gone (stale heartbeat), or whoever holds it
    with ``force``; say what was done. A live holder is refused (LockHeldError): releasing
    its lock would let a second run of the sync start beside it."""
    info = store.lock_info(sync)
    if info is None:
        return f"{sync}: was not locked"
    if force:
        store.unlock(sync)
        _abandon(store, info, "its lock was released by `reverse-etl unlock --force`")
        return f"{sync}: lock released (forced; it was held by {holder_text(info)})"
    if not is_stale(info, store.stale_after):
        stale_at = info.heartbeat_at + store.stale_after
        if exited(info):
            wait = info.heartbeat_at + 2 * store.heartbeat_every  # two beats missed
            if state.now() > wait:
                return _release_gone(
                    store,
                    sync,
                    info,
                    f"its process ({info.owner}) is no longer running on this host and missed "
                    f"its heartbeats since {info.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC (killed); "
                    "`reverse-etl unlock` released its lock",
                )
            # killed a moment ago: its last beat is still recent
            raise LockHeldError(
                f"sync {sync!r} is held by {holder_text(info)}, a process no longer running on "
                f"this host; its heartbeat is too recent to be sure it is the same process: run "
                f"`reverse-etl unlock {sync}` again after {wait:%Y-%m-%d %H:%M:%S} UTC, or "
                f"`reverse-etl unlock {sync} --force`"
            )
        every = int(store.heartbeat_every.total_seconds())
        overdue = state.now() - info.heartbeat_at > 2 * store.heartbeat_every
        if overdue and not state.on_this_host(info.owner):  # alive here: not exited above
            said = (
                f"sync {sync!r} is held by {holder_text(info)}. It has missed its heartbeats "
                f"(one every {every} s), so its process may be gone, but it ran where this "
                f"host cannot check"
            )
        else:
            said = (
                f"sync {sync!r} is held by a live run: {holder_text(info)}. Its heartbeat is "
                f"recent, so it is taken to be running; the lock is released when it ends"
            )
        raise LockHeldError(
            f"{said}. If you know that process is gone, its lock goes stale at "
            f"{stale_at:%Y-%m-%d %H:%M:%S} UTC (no heartbeat for {store.stale_after}), or run "
            f"`reverse-etl unlock {sync} --force`"
        )
    return _release_gone(
        store,
        sync,
        info,
        f"the process stopped heartbeating at {info.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC "
        "(killed or lost); `reverse-etl unlock` released its lock",
    )


def _release_gone(store: StateStore, sync: str, info: LockInfo, why: str) -> str:
    if not store.release(sync, info.run_id):  # taken over or released meanwhile: look again
        return unlock(store, sync, force=False)
    _abandon(store, info, why)
    return f"{sync}: lock released (stale: held by {holder_text(info)})"


def exited(info: LockInfo) -> bool:
    """The lock's holder ran on this host and its process is gone (``state.holder_exited``);
    ``unlock`` also waits for two missed heartbeats, as a run taking the lock over does."""
    return state.holder_exited(info.owner)


def _abandon(store: StateStore, info: LockInfo, why: str) -> None:
    """Mark the released lock's run ``abandoned`` if its record still says ``running``, as a
    run taking over a stale lock does: the history must not show it running forever. A
    holder that is alive after all records its own end over this when it stops."""
    with store.engine.begin() as con:
        state.abandon(con, state.runs.c.run_id == info.run_id, ended_at=info.heartbeat_at, why=why)

"""What each page shows, as plain data built from what the CLI computes: ``inspect`` (runs,
status, error summaries, locks), ``controls`` (enabled, definition changes, failure streaks),
``retry_queue`` and ``schedule``.

The syncs list is read in a fixed number of queries whatever the number of syncs (enabled
states, the recent runs of every sync through one window query, every lock, the retry queue
counts), so a project of hundreds of syncs with a long history lists as fast as a small one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import yaml

from reverse_etl import controls, inspect, retry_queue, state
from reverse_etl.config import Project
from reverse_etl.config.loading import load_yaml
from reverse_etl.config.models import read_text_file
from reverse_etl.errors import ReverseEtlError
from reverse_etl.schedule import Schedule, block_reason, blocked_by
from reverse_etl.state import LockInfo, RunRecord, StateStore
from reverse_etl.ui import chart, errorfile

HISTORY = 50  # runs on a sync's page (and in its chart)
SAMPLE_ROWS = 5  # error-file rows shown per reason on a run's page
STATUSES = ("running", "success", "partial", "failed", "never run", "disabled")
_FAILED = ("failed", "abandoned", "interrupted")


# --------------------------------------------------------------------------- the syncs list


def recent_runs(
    store: StateStore, names: Sequence[str], per_sync: int
) -> dict[str, list[RunRecord]]:
    """Each sync's last ``per_sync`` runs, dry runs aside, newest first: one query."""
    runs = state.runs
    rank = (
        sa.func.row_number()
        .over(partition_by=runs.c.sync, order_by=(runs.c.started_at.desc(), runs.c.run_id.desc()))
        .label("rank")
    )
    ranked = (
        sa.select(runs, rank)
        .where(runs.c.status != "dry_run", runs.c.sync.in_(list(names)))
        .subquery()
    )
    query = (
        sa.select(ranked).where(ranked.c.rank <= per_sync).order_by(ranked.c.sync, ranked.c.rank)
    )
    out: dict[str, list[RunRecord]] = {name: [] for name in names}
    with store.engine.connect() as con:
        for row in con.execute(query):
            out[row.sync].append(state._run_record(row))
    return out


def all_locks(store: StateStore) -> dict[str, LockInfo]:
    """Every held lock by sync: one query."""
    with store.engine.connect() as con:
        rows = con.execute(sa.select(state.locks)).all()
    return {
        r.sync: LockInfo(
            r.sync, r.run_id, r.owner, state._utc(r.acquired_at), state._utc(r.heartbeat_at)
        )
        for r in rows
    }


def next_due(
    schedule: Schedule | None,
    last_started: datetime | None,
    failures: int,
    failed_at: datetime | None,
) -> datetime | None:
    """When ``run --due`` next takes the sync (``Schedule.is_due``'s rule as a time): its next
    slot, or sooner after a failure's backoff; now if it never ran. None: no schedule."""
    if schedule is None:
        return None
    due = schedule.next_due(last_started, failures=failures, failed_at=failed_at)
    return state.now() if due is None else due


def category(last: RunRecord | None, locked: bool) -> str:
    """The word the status filter and colours use for a sync's latest run."""
    if locked or (last is not None and last.status == "running"):
        return "running"
    if last is None:
        return "never run"
    if last.status in _FAILED:
        return "failed"
    return "partial" if last.status == "partial" else "success"


def syncs_page(
    project: Project, store: StateStore, *, destination: str = "", status: str = ""
) -> dict[str, Any]:
    enabled = controls.enabled_states(project, store)
    listed = inspect.sync_dicts(project, enabled)
    names = [s["name"] for s in listed]
    recent = recent_runs(store, names, controls._STREAK_LOOKBACK)
    locks = all_locks(store)
    queued = retry_queue.counts(store, names)
    moment = state.now()
    rows = []
    for entry, sync in zip(listed, project.syncs, strict=True):
        records = recent[sync.name]
        last = records[0] if records else None
        failures, failed_at = controls.streak_of(records)
        started = last.started_at if last else None
        due_at = next_due(sync.schedule, started, failures, failed_at)
        held = locks.get(sync.name)
        latest = {dep: recent[dep][0] if recent[dep] else None for dep in sync.depends_on}
        rows.append(
            {
                **entry,
                "last": inspect.run_dict(last) if last else None,
                "category": category(last, held is not None),
                "lock": inspect.lock_dict(held, store.stale_after),
                "retry_queue": queued.get(sync.name, 0),
                "next_due": due_at,
                # runs skip it whatever its schedule says: shown instead of "now"
                "blocked": block_reason(project, sync.name, enabled, latest),
                "due": bool(
                    entry["enabled"]
                    and sync.schedule is not None
                    and sync.schedule.is_due(
                        started, moment, failures=failures, failed_at=failed_at
                    )
                ),
            }
        )
    shown = [
        r
        for r in rows
        if (not destination or r["destination"]["connection"] == destination)
        and (not status or (status == "disabled" and not r["enabled"]) or r["category"] == status)
    ]
    return {
        "syncs": shown,
        "total": len(rows),
        "destinations": sorted({r["destination"]["connection"] for r in rows}),
        "statuses": STATUSES,
        "destination": destination,
        "status": status,
        "running": any(r["category"] == "running" for r in rows),
    }


# --------------------------------------------------------------------------- one sync


def sync_page(project: Project, store: StateStore, name: str) -> dict[str, Any]:
    """Raises ConfigError (a ReverseEtlError) for an unknown sync."""
    sync = project.sync(name)
    enabled = controls.enabled_states(project, store)
    (listed,) = [s for s in inspect.sync_dicts(project, enabled) if s["name"] == name]
    (status,) = inspect.status_dicts(project, store, [name], HISTORY)
    # the latest run and the failure streak as the list reads them (plans aside): one query
    records = recent_runs(store, [name], controls._STREAK_LOOKBACK)[name]
    last = records[0] if records else None
    failures, failed_at = controls.streak_of(records)
    due_at = next_due(sync.schedule, last.started_at if last else None, failures, failed_at)
    return {
        "sync": listed,
        "status": status,
        "category": category(last, status["lock"] is not None),
        "next_due": due_at,
        "blocked": blocked_by(project, store, name),
        "failures": failures,
        "retry_queue": retry_queue.counts(store, [name])[name],
        "open_problems": store.open_problems(name),
        "definition": definition(project, name),
        "chart": chart.runs_chart(status["runs"]),
    }


def definition(project: Project, name: str) -> dict[str, Any]:
    """The sync as the user wrote it: its entry in the project file (templates unrendered),
    its SQL file, its mapping, consent and destination options."""
    sync = project.sync(name)
    sql = sql_problem = None
    if sync.source.sql is not None:
        sql_problem = inspect.sql_file_problem(project, sync)
        if sql_problem is None:
            sql = project.path(sync.source.sql).read_text(errors="replace")
    mapping = []
    for column, target in sync.mapping.items():
        field, kind = controls._field(target)
        mapping.append({"column": column, "field": field, "type": kind or ""})
    consent = [
        {
            "channel": channel,
            "settings": ", ".join(
                f"{k}: {v}" for k, v in spec.model_dump(mode="json").items() if v is not None
            ),
        }
        for channel, spec in sync.consent.columns().items()
    ]
    return {
        "as_written": _as_written(project, name),
        "file": str(project.file),
        "sql_path": sync.source.sql,
        "table": sync.source.table,
        "sql": sql,
        "sql_problem": sql_problem,
        "identifier": sync.identifier,
        "cursor": sync.cursor,
        "mapping": mapping,
        "consent": consent,
        "options": {k: str(v) for k, v in sync.destination.options().items()},
    }


def _as_written(project: Project, name: str) -> str | None:
    try:  # the loader's own reading: UTF-8 whatever the locale, a repeated key refused
        raw = load_yaml(read_text_file(project.file))
    except (OSError, ValueError, yaml.YAMLError):  # NotUtf8Error is a ValueError
        return None
    for entry in (raw or {}).get("syncs") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return yaml.safe_dump(entry, sort_keys=False, allow_unicode=True).strip()
    return None


# --------------------------------------------------------------------------- one run


def run_page(store: StateStore, run_id: str) -> dict[str, Any]:
    """Raises ReverseEtlError for an unknown run. A missing or unreadable error file is said
    on the page, not raised: the run's counts and message still matter."""
    record = inspect.find_run(store, run_id)
    summary: dict[str, Any] | None = None
    samples: dict[str, list[dict[str, str]]] = {}
    problem = None
    try:
        found = inspect.summary_of(record)
        summary = found.as_dict()
        if found.error_file and found.by_reason:
            samples = errorfile.first_rows(
                found.error_file, [r for r, _, _ in found.by_reason], SAMPLE_ROWS
            )
    except (ReverseEtlError, OSError, ValueError, KeyError) as exc:  # Arrow's errors: not a CSV
        problem = f"cannot read the error file: {exc}"
    return {
        "run": inspect.run_dict(record),
        "summary": summary,
        "samples": samples,
        "problem": problem,
        "per_reason": SAMPLE_ROWS,
    }

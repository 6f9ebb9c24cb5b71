"""Controls for unattended runs: enable/disable kept in the state store, and the lock on a
sync's definition.

**Enable/disable.** ``reverse-etl disable SYNC`` pauses a sync without editing the project file
(Distil's "Enable/Disable Campaign": pause "without deleting it"; /work/shared/seeds
000_b6a873bb03aa8686.txt); the store's setting overrides the file's ``enabled:`` until
``reverse-etl enable SYNC --reset`` hands the decision back to the file. A disabled sync is
skipped by ``run --due``, the scheduler and ``run`` with or without names: naming a sync is not
proof that a person is watching (the Airflow recipe in deploy/ and cron lines name syncs).
``run SYNC --even-if-disabled`` is the "Sync Now"/"Run" button, which runs a sync whatever its
schedule (https://www.hightouch.com/docs/syncs/schedule-sync-ui: a manual sync "only runs when
you tell it to run"). Whether Hightouch's Run button works on a *disabled* sync is UNCONFIRMED,
so the safer reading was chosen: a flag, not the name alone.

**Definition lock.** Distil locks a Segment while its Destination auto-syncs, "because if the
Segment rules change, this may trigger multiple updates ... which in turn could cause issues
with your campaigns" (same seed). Here each sync's definition (SQL text, mapping, identifier,
cursor, mode, consent, destination: connection, object, list, options; never a connection's
secrets) is fingerprinted as a small JSON of part -> digest, stored with the run that accepted
it. A guarded run (every ``reverse-etl run`` and scheduler run) whose definition no longer
matches refuses (exit 3), naming what changed, until a run by hand with ``--accept-changes`` or
``--full-refresh`` stores the new fingerprint. A sync's first run stores it. Manual runs are
guarded too (the safer choice): ``reverse-etl run`` is what cron lines call, so "run by hand"
cannot be told from "run unattended" except by the flag.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from reverse_etl.config import Project
from reverse_etl.config.models import FieldMapping, Sync
from reverse_etl.errors import ReverseEtlError
from reverse_etl.state import RunRecord, StateStore, _utc, now, sync_controls


class DefinitionChangedError(ReverseEtlError):
    """A guarded run found the sync's definition changed since its last accepted run."""


# --------------------------------------------------------------------------- enable/disable


@dataclass(frozen=True)
class EnabledState:
    """Whether a sync runs unattended, and who decided: the project file or the state store."""

    enabled: bool
    source: str  # "file" | "state"
    at: datetime | None = None
    by: str | None = None

    def describe(self) -> str:
        word = "enabled" if self.enabled else "disabled"
        if self.source == "file":
            return f"{word} (project file)"
        when = f" at {self.at:%Y-%m-%d %H:%M:%S} UTC" if self.at else ""
        who = f" by {self.by}" if self.by else ""
        verb = "enable" if self.enabled else "disable"
        return f"{word} (state store: `reverse-etl {verb}`{who}{when})"


def enabled_states(project: Project, store: StateStore) -> dict[str, EnabledState]:
    """Every sync of the project's effective enabled state, in file order (one query)."""
    with store.engine.connect() as con:
        rows = {
            r.sync: r
            for r in con.execute(
                sa.select(
                    sync_controls.c.sync,
                    sync_controls.c.enabled,
                    sync_controls.c.enabled_at,
                    sync_controls.c.enabled_by,
                ).where(sync_controls.c.enabled.is_not(None))
            )
        }
    out = {}
    for s in project.syncs:
        row = rows.get(s.name)
        out[s.name] = (
            EnabledState(s.enabled, "file")
            if row is None
            else EnabledState(bool(row.enabled), "state", _utc(row.enabled_at), row.enabled_by)
        )
    return out


def enabled_names(project: Project, store: StateStore) -> list[str]:
    """The syncs that are enabled, file order."""
    return [name for name, st in enabled_states(project, store).items() if st.enabled]


def set_enabled(store: StateStore, sync: str, enabled: bool | None) -> None:
    """Store the override (None: forget it, so the project file decides again)."""
    _upsert(
        store,
        sync,
        {
            "enabled": enabled,
            "enabled_at": None if enabled is None else now(),
            "enabled_by": None if enabled is None else _who(),
        },
    )


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:200]


def _upsert(store: StateStore, sync: str, values: dict[str, Any]) -> None:
    """Update the sync's row, or insert it; a row inserted meanwhile by another process is
    updated instead."""
    for _attempt in range(2):
        with store.engine.begin() as con:
            done = con.execute(
                sa.update(sync_controls).where(sync_controls.c.sync == sync).values(**values)
            ).rowcount
            if done:
                return
        try:
            with store.engine.begin() as con:
                con.execute(sa.insert(sync_controls).values(sync=sync, **values))
            return
        except IntegrityError:
            continue
    raise ReverseEtlError(f"sync {sync!r}: could not save its controls in the state store")


# --------------------------------------------------------------------------- fingerprints


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _field(target: str | FieldMapping) -> tuple[str, str | None]:
    return (target, None) if isinstance(target, str) else (target.field, target.type)


def fingerprint(project: Project, sync: Sync) -> dict[str, str]:
    """The sync's definition as part -> digest. Parts are fine-grained (one per mapped field,
    consent channel and destination option) so a change can be named. SQL whitespace is
    collapsed: re-indenting a query is no change. Connection secrets are not part of it."""
    if sync.source.sql is not None:
        source: Any = {"sql": " ".join(project.source_sql(sync).split())}
    else:
        source = {"table": sync.source.table}
    parts: dict[str, Any] = {"source": source, **_plain_parts(sync)}
    for column, target in sync.mapping.items():
        name, kind = _field(target)
        parts[f"mapping:{name}"] = {"column": column, "type": kind}
    for channel, spec in sync.consent.columns().items():
        parts[f"consent:{channel}"] = spec.model_dump(mode="json")
    for key, value in sync.destination.options().items():
        parts[f"destination.option:{key}"] = value
    return {key: _digest(value) for key, value in parts.items()}


def stored_fingerprint(store: StateStore, sync: str) -> dict[str, str] | None:
    with store.engine.connect() as con:
        text = con.execute(
            sa.select(sync_controls.c.fingerprint).where(sync_controls.c.sync == sync)
        ).scalar()
    return None if text is None else dict(json.loads(text))


def store_fingerprint(store: StateStore, sync: str, parts: dict[str, str], run_id: str) -> None:
    _upsert(
        store,
        sync,
        {
            "fingerprint": json.dumps(parts, sort_keys=True),
            "fingerprint_at": now(),
            "fingerprint_run": run_id,
        },
    )


def describe_changes(sync: Sync, old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What changed between two fingerprints, in words: ``mapping: added properties.Tier``,
    ``sql/profiles.sql changed``. Empty when they match."""
    keys = sorted(set(old) | set(new))
    changed = [k for k in keys if old.get(k) != new.get(k)]
    out: list[str] = []

    def verb(key: str) -> str:
        return "added" if key not in old else "removed" if key not in new else "changed"

    for prefix, what in (("mapping:", "mapping"), ("consent:", "consent")):
        mine = [k for k in changed if k.startswith(prefix)]
        if mine:
            out.append(f"{what}: " + ", ".join(f"{verb(k)} {k[len(prefix) :]}" for k in mine))
    for key in changed:
        if key.startswith(("mapping:", "consent:")):
            continue
        if key == "source":
            label = (
                f"{sync.source.sql} changed"
                if sync.source.sql is not None
                else f"source table changed (now {sync.source.table})"
            )
        elif key.startswith("destination.option:"):
            label = f"destination option {key.split(':', 1)[1]} {verb(key)}"
        else:
            label = f"{key} {verb(key)}"
            if key in new and key in old:
                label += f" (now {_current(sync, key)!r})"
        out.append(label)
    return out


def _plain_parts(sync: Sync) -> dict[str, Any]:
    """The definition's parts that are one setting each (named with their value on change)."""
    return {
        "source.connection": sync.source.connection,
        "identifier": sync.identifier,
        "cursor": sync.cursor,
        "mode": sync.mode,
        "destination.connection": sync.destination.connection,
        "destination.object": sync.object,
        "destination.list": sync.destination.list,
    }


def _current(sync: Sync, key: str) -> Any:
    return _plain_parts(sync).get(key)


def unaccepted_changes(
    project: Project, sync: Sync, store: StateStore, *, fitted: Sync | None = None
) -> list[str]:
    """The changes in words of ``sync`` (as written) since its last accepted run; [] if none
    or never run. ``fitted``: the sync as fitted to its view (the view's spelling of its
    columns, upper case on Snowflake), which earlier runs fingerprinted: a stored
    fingerprint that matches it is no change, so a store written by them refuses no run."""
    old = stored_fingerprint(store, sync.name)
    if old is None:
        return []
    if fitted is not None and old == fingerprint(project, fitted):
        return []
    return describe_changes(sync, old, fingerprint(project, sync))


def guard_definition(
    project: Project,
    sync: Sync,
    store: StateStore,
    run_id: str,
    *,
    refuse: bool,
    fitted: Sync | None = None,
) -> list[str]:
    """Compare the sync's definition (as written) with the fingerprint of its last accepted
    run (``unaccepted_changes``). Unchanged or first run: store it, return []. Changed: with
    ``refuse``, raise DefinitionChangedError naming the changes (nothing stored); otherwise
    store the new fingerprint (accepted) and return the changes."""
    parts = fingerprint(project, sync)
    old = stored_fingerprint(store, sync.name)
    changes = unaccepted_changes(project, sync, store, fitted=fitted)
    if changes and refuse:
        raise DefinitionChangedError(
            f"sync {sync.name!r}: its definition changed since its last accepted run: "
            + "; ".join(changes)
            + f". Nothing was sent. Check what it would send (`reverse-etl plan {sync.name}`), "
            f"then run it by hand with `reverse-etl run {sync.name} --accept-changes` (or "
            "--full-refresh); later runs go ahead after that"
        )
    if old != parts:
        store_fingerprint(store, sync.name, parts, run_id)
    return changes


def pending_changes(project: Project, store: StateStore, names: Iterable[str]) -> dict[str, str]:
    """Sync -> its unaccepted definition changes in words (syncs without any are left out),
    for ``status``. A sync whose definition cannot be read (a missing SQL file) is left out:
    ``check`` reports that."""
    out = {}
    for name in names:
        try:
            changes = unaccepted_changes(project, project.sync(name), store)
        except ReverseEtlError:
            continue
        if changes:
            out[name] = "; ".join(changes)
    return out


# --------------------------------------------------------------------------- failed runs


def failure_streak(store: StateStore, sync: str) -> tuple[int, datetime | None]:
    """Failed, abandoned or interrupted runs in a row (``schedule.RETRY_STATUSES``) up to the
    sync's latest (dry runs aside), and when the latest of them ended
    (``schedule.Schedule.is_due`` retries after a backoff from then)."""
    return streak_of(store.last_runs(sync, limit=_STREAK_LOOKBACK))


def streak_of(records: Iterable[RunRecord]) -> tuple[int, datetime | None]:
    """``failure_streak`` over runs already read, newest first (the run page reads them for
    every sync at once)."""
    from reverse_etl.schedule import RETRY_STATUSES

    streak = 0
    ended: datetime | None = None
    for record in records:
        if record.status == "dry_run":
            continue
        if record.status not in RETRY_STATUSES:
            break
        if streak == 0:
            ended = record.ended_at or record.started_at
        streak += 1
    return streak, ended


_STREAK_LOOKBACK = 20  # runs read; the backoff stops doubling long before

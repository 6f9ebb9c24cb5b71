"""The state store: watermarks, run history, per-sync locks and open row problems, on
SQLAlchemy.

A SQLite file under the project by default; a PostgreSQL URL lets a team share one store.
The lock is a row with a unique key, so it works the same on both without advisory-lock
features. The holder heartbeats it from a background thread; a lock whose owner stopped
heartbeating for ``stale_after`` is taken over with a compare-and-swap on (run_id, heartbeat),
so two runs can never both take over one stale lock, and the dead run is marked ``abandoned``.

Schema versions
---------------
``retl_schema_version`` holds one row per migration applied to the store (version, description,
when, by which reverse-etl); the store's version is the highest. Opening a store applies the
``MIGRATIONS`` it lacks, in order, each in its own transaction together with its version row, so
a migration that fails leaves the store at the version before it (DDL is transactional on SQLite
and PostgreSQL). Two processes opening one store at once serialize on a lock (SQLite:
``BEGIN IMMEDIATE``; PostgreSQL: a transaction-scoped advisory lock) and re-read the version
under it, so each migration is applied once; a store already at the latest version is checked
with two reads and no lock. A store with no version table is fresh or was written by a release
before versioning: migration 1 creates today's tables only where missing, so such a store keeps
its rows and is stamped version 1. A store newer than this code refuses to open (``StateError``).
Tables dropped by hand (to reset a store) are created again on the next open, as they always were.

How to add a migration:

1. Change the live tables below (``watermarks``, ``runs``, ...): they describe the newest schema
   and are what the queries use.
2. Write ``_vN_what(con: sa.Connection) -> None`` turning a store at version N-1 into version N.
   Describe what it creates in a frozen form, not with the live tables (they keep changing
   after it is released): portable DDL text, e.g.
   ``con.execute(sa.text("ALTER TABLE retl_runs ADD COLUMN unchanged BIGINT NOT NULL DEFAULT 0"))``,
   or a table declared inside the function on its own ``sa.MetaData()``. Give a new NOT NULL
   column a server default: a process that opened the store before the upgrade (a scheduler
   still running the previous release) and releases from before versioning keep inserting
   rows without it. No side effects outside ``con``: a failed attempt is rolled back.
3. Append ``Migration(N, "one line: what it changes", _vN_what)`` to ``MIGRATIONS``; versions
   run 1, 2, 3, ... with no gaps.
4. Never edit, reorder or remove a released migration: stores out there recorded it as applied
   and never run it again. Fix forward with a new one.

tests/test_state_migrations.py checks that replaying every migration on an empty store gives
exactly the live tables, so a change made in one place and not the other fails there.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, overload

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from reverse_etl import __version__
from reverse_etl.errors import LockHeldError, ReverseEtlError
from reverse_etl.extras import check_state_url
from reverse_etl.secrets import scrub
from reverse_etl.util.storage import path_problem

log = logging.getLogger(__name__)

metadata = sa.MetaData()

watermarks = sa.Table(
    "retl_watermarks",
    metadata,
    sa.Column("sync", sa.String(200), primary_key=True),
    sa.Column("cursor_value", sa.Text, nullable=False),  # JSON: {"t": type, "v": value}
    sa.Column("id_value", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

runs = sa.Table(
    "retl_runs",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("sync", sa.String(200), nullable=False, index=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    # running|success|partial|failed|dry_run|interrupted|abandoned (free text: never checked here)
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("full_refresh", sa.Boolean, nullable=False, default=False),
    sa.Column("read", sa.BigInteger, nullable=False, default=0),
    sa.Column("sent", sa.BigInteger, nullable=False, default=0),
    sa.Column("created", sa.BigInteger, nullable=False, default=0),
    sa.Column("updated", sa.BigInteger, nullable=False, default=0),
    sa.Column("rejected", sa.BigInteger, nullable=False, default=0),
    sa.Column("failed", sa.BigInteger, nullable=False, default=0),
    sa.Column("unchanged", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("removed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("consent_held", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("known_problems", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("new_problems", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("error_file", sa.Text),
    sa.Column("message", sa.Text),
)

# what a destination said about a person's consent, read back (reverse_etl/consent/memory.py):
# the latest opt-out or opt-in seen per destination account, person and channel
consent_seen = sa.Table(
    "retl_consent_seen",
    metadata,
    sa.Column("destination", sa.String(200), primary_key=True),
    sa.Column("person", sa.String(320), primary_key=True),
    sa.Column("channel", sa.String(20), primary_key=True),
    sa.Column("status", sa.String(40), nullable=False),  # subscribed|unsubscribed|suppressed
    sa.Column("reason", sa.String(60)),  # the vendor's word: UNSUBSCRIBE, HardBounced, ...
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
    # when we last sent this person an opt-out there: an opt-out read back soon after is ours
    sa.Column("ours_at", sa.DateTime(timezone=True)),
    sqlite_with_rowid=False,
)

# how far each read-back stream of a destination account has read (its own cursor)
consent_cursors = sa.Table(
    "retl_consent_cursors",
    metadata,
    sa.Column("destination", sa.String(200), primary_key=True),
    sa.Column("stream", sa.String(60), primary_key=True),
    sa.Column("cursor", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# rate-limit buckets shared by the syncs calling one destination account, across processes and
# hosts (reverse_etl/destinations/budget.py): one row per account, operation and bucket
rate_budget = sa.Table(
    "retl_rate_budget",
    metadata,
    sa.Column("account", sa.String(200), primary_key=True),  # consent.memory.account_key form
    sa.Column("operation", sa.String(100), primary_key=True),
    sa.Column("bucket", sa.String(20), primary_key=True),  # burst | steady
    sa.Column("tokens", sa.Double, nullable=False),
    sa.Column("stamp", sa.Double, nullable=False),  # epoch seconds on the database's clock
)

# each sync's open row problems (reverse_etl/problems.py): those the latest complete run saw,
# with the run that first reported each; a problem not seen again is dropped
problems = sa.Table(
    "retl_problems",
    metadata,
    sa.Column("sync", sa.String(200), primary_key=True),
    sa.Column("problem", sa.String(64), primary_key=True),  # sha256 of row identity, reason, column
    sa.Column("reason", sa.String(100), nullable=False),
    sa.Column("column_name", sa.String(300), nullable=False),
    sa.Column("first_seen_run", sa.String(64), nullable=False),
    sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_run", sa.String(64), nullable=False),
    sqlite_with_rowid=False,  # migration 8: clustered by its key (see _v8_sqlite_without_rowid)
)

# rows a destination refused because their parent (a Dotdigital order's contact) did not exist
# yet: re-read by identifier and sent again by later runs, up to a bound (retry_queue.py)
retry_queue = sa.Table(
    "retl_retry_queue",
    metadata,
    sa.Column("sync", sa.String(200), primary_key=True),
    sa.Column("identifier", sa.String(500), primary_key=True),  # the row's identifier, as text
    sa.Column("reason", sa.String(100), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),  # sends refused so far
    sa.Column("first_queued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_run", sa.String(64), nullable=False),
    sqlite_with_rowid=False,
)

# (migration 7) each sync's controls for unattended runs (reverse_etl/controls.py): an
# enable/disable set by `reverse-etl enable|disable` that overrides the project file's
# `enabled:`, and the fingerprint of the definition its last accepted run sent with
sync_controls = sa.Table(
    "retl_sync_controls",
    metadata,
    sa.Column("sync", sa.String(200), primary_key=True),
    sa.Column("enabled", sa.Boolean),  # None: the project file decides
    sa.Column("enabled_at", sa.DateTime(timezone=True)),
    sa.Column("enabled_by", sa.String(200)),  # user@host
    sa.Column("fingerprint", sa.Text),  # JSON: {part: digest}
    sa.Column("fingerprint_at", sa.DateTime(timezone=True)),
    sa.Column("fingerprint_run", sa.String(64)),
)

locks = sa.Table(
    "retl_locks",
    metadata,
    sa.Column("sync", sa.String(200), primary_key=True),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
)

schema_versions = sa.Table(
    "retl_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("applied_by", sa.String(200), nullable=False),  # reverse-etl version, host:pid
)


class StateError(ReverseEtlError):
    """The state store cannot be used as it is: written by a newer reverse-etl, or a schema
    migration failed (the store then stays at the version before it)."""


@dataclass(frozen=True)
class Migration:
    """One step of the state store's schema: ``apply`` turns a store at ``version - 1`` into
    ``version``, inside the transaction that also records it."""

    version: int
    description: str
    apply: Callable[[sa.Connection], None]


@dataclass(frozen=True)
class Watermark:
    """Compound cursor: the last acknowledged (cursor value, identifier) pair. ``column`` is
    the cursor column it was read from, so a sync whose cursor changed is told so instead of
    comparing one column's value with another's (not part of equality)."""

    cursor: Any
    id: Any
    column: str | None = field(default=None, compare=False)


@dataclass
class RunCounts:
    """A run's rows: every row read is sent, unchanged (the destination holds it as it is)
    or rejected before sending; every row sent is created, updated or failed. ``removed``
    counts the members a mirror sync took out of its list (rows no longer in the view)."""

    read: int = 0
    sent: int = 0
    created: int = 0
    updated: int = 0
    rejected: int = 0
    failed: int = 0
    unchanged: int = 0
    removed: int = 0
    consent_held: int = 0  # rows whose consent was not sent: the destination knows newer
    known_problems: int = 0  # error-file problems an earlier run already reported
    new_problems: int = 0  # error-file problems reported for the first time

    def add(self, other: RunCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class RunRecord:
    run_id: str
    sync: str
    started_at: datetime
    status: str
    ended_at: datetime | None = None
    full_refresh: bool = False
    counts: RunCounts = field(default_factory=RunCounts)
    error_file: str | None = None
    message: str | None = None


def now() -> datetime:
    return datetime.now(UTC)


@overload
def _utc(value: datetime) -> datetime: ...
@overload
def _utc(value: None) -> None: ...
def _utc(value: datetime | None) -> datetime | None:
    """In UTC, so messages that say "UTC" are: SQLite hands back naive datetimes for
    timezone=True columns (stored as UTC), PostgreSQL hands them back in the session's zone."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def encode_value(value: Any, *, column: str | None = None) -> str:
    """Typed JSON for a cursor or id value, so it binds back as the same SQL type (with the
    column it came from, for a cursor)."""
    extra = {"col": column} if column else {}
    if isinstance(value, datetime):
        return json.dumps({"t": "datetime", "v": value.isoformat(), **extra})
    if isinstance(value, date):
        return json.dumps({"t": "date", "v": value.isoformat(), **extra})
    if isinstance(value, Decimal):
        return json.dumps({"t": "decimal", "v": str(value), **extra})
    if value is None or isinstance(value, bool | int | float | str):
        return json.dumps({"t": "plain", "v": value, **extra})
    raise TypeError(f"cannot store a cursor of type {type(value).__name__}")


def decode_value(text: str) -> Any:
    data = json.loads(text)
    kind, value = data["t"], data["v"]
    if kind == "datetime":
        return datetime.fromisoformat(value)
    if kind == "date":
        return date.fromisoformat(value)
    if kind == "decimal":
        return Decimal(value)
    return value


@dataclass(frozen=True)
class LockInfo:
    """Who holds a sync's lock, as its row says (times in UTC): ``StateStore.lock_info``."""

    sync: str
    run_id: str
    owner: str  # host:pid
    acquired_at: datetime
    heartbeat_at: datetime


class LockHandle:
    """What ``StateStore.lock()`` yields: the run holding the lock and whether it still does.

    ``lost`` turns true when a heartbeat finds the row no longer ours (another run took the lock
    over as stale, or someone ran ``reverse-etl unlock``); the run should stop committing then.
    """

    def __init__(self, sync: str, run_id: str) -> None:
        self.sync = sync
        self.run_id = run_id
        self._lost = threading.Event()  # set from the heartbeat thread, read from the run's

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def __repr__(self) -> str:
        return f"LockHandle(sync={self.sync!r}, run_id={self.run_id!r}, lost={self.lost})"


class StateStore:
    def __init__(
        self,
        url: str,
        *,
        root: Path | None = None,
        stale_after: timedelta = timedelta(hours=2),
        heartbeat_every: timedelta | None = None,
    ) -> None:
        if heartbeat_every is None:  # several beats per stale period, so one missed beat is fine
            heartbeat_every = min(max(stale_after / 6, _MIN_HEARTBEAT), _MAX_HEARTBEAT)
        if heartbeat_every <= timedelta(0):
            raise ValueError(f"heartbeat_every must be positive, not {heartbeat_every}")
        # every way the URL or the place it names is wrong is a StateError saying what to fix,
        # naming the URL as the user wrote it, its password hidden
        shown = _shown_url(url)
        parsed = _parse_state_url(url, shown)
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = Path(url.removeprefix("sqlite:///"))
            path = (root or Path.cwd()) / rel
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateError(
                    f"state store {shown} cannot be opened: {path_problem(path, exc)}"
                ) from exc
            url = f"sqlite:///{path}"
        self.url = url
        check_state_url(url)  # postgresql+psycopg without the postgres extra: say which to install
        try:
            self.engine = sa.create_engine(url, future=True)
        except (sa.exc.ArgumentError, ImportError) as exc:  # e.g. postgresql+pg8000, not installed
            raise StateError(
                f"state store {shown}: driver {parsed.drivername!r} cannot be used ("
                f"{_driver_said(exc, parsed)}); write sqlite:///PATH or postgresql+psycopg://... "
                "(pip install 'reverse-etl[postgres]')"
            ) from exc
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            _prepare_schema(self.engine)
        except sa.exc.DBAPIError as exc:  # cannot connect, or cannot create or read the tables
            self.engine.dispose()
            raise StateError(
                f"state store {shown} cannot be opened: {_open_problem(self.engine.url, exc)}"
            ) from exc
        except BaseException:
            self.engine.dispose()
            raise
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    # ---------------------------------------------------------------- watermarks

    def watermark(self, sync: str) -> Watermark | None:
        with self.engine.connect() as con:
            row = con.execute(sa.select(watermarks).where(watermarks.c.sync == sync)).first()
        if row is None:
            return None
        column = json.loads(row.cursor_value).get("col")
        return Watermark(decode_value(row.cursor_value), decode_value(row.id_value), column)

    def set_watermark(self, sync: str, mark: Watermark) -> None:
        values = {
            "cursor_value": encode_value(mark.cursor, column=mark.column),
            "id_value": encode_value(mark.id),
            "updated_at": now(),
        }
        with self.engine.begin() as con:
            done = con.execute(
                sa.update(watermarks).where(watermarks.c.sync == sync).values(**values)
            ).rowcount
            if not done:
                con.execute(sa.insert(watermarks).values(sync=sync, **values))

    def reset_watermark(self, sync: str) -> None:
        with self.engine.begin() as con:
            con.execute(sa.delete(watermarks).where(watermarks.c.sync == sync))

    # ---------------------------------------------------------------- row problems

    def see_problems(
        self,
        sync: str,
        run_id: str,
        found: Mapping[str, tuple[str, str]],
        *,
        record: bool = True,
    ) -> dict[str, str]:
        """The run that first reported each problem key of ``found`` (key -> (reason, column));
        ``run_id`` for one never reported before. With ``record``, the keys are kept as seen by
        ``run_id``: one transaction, one statement per chunk of keys (inserts executemany)."""
        keys = list(found)
        first: dict[str, str] = {}
        with self.engine.begin() as con:
            for start in range(0, len(keys), _PROBLEM_CHUNK):
                chunk = keys[start : start + _PROBLEM_CHUNK]
                where = sa.and_(problems.c.sync == sync, problems.c.problem.in_(chunk))
                rows = con.execute(
                    sa.select(problems.c.problem, problems.c.first_seen_run).where(where)
                ).all()
                first.update((r.problem, r.first_seen_run) for r in rows)
                if record and rows:
                    con.execute(sa.update(problems).where(where).values(last_seen_run=run_id))
            fresh = [k for k in keys if k not in first]
            if record and fresh:
                at = now()
                con.execute(
                    sa.insert(problems),
                    [
                        {
                            "sync": sync,
                            "problem": k,
                            "reason": found[k][0][:100],
                            "column_name": found[k][1][:300],
                            "first_seen_run": run_id,
                            "first_seen_at": at,
                            "last_seen_run": run_id,
                        }
                        for k in fresh
                    ],
                )
        return {k: first.get(k, run_id) for k in keys}

    def settle_problems(self, sync: str, run_id: str) -> int:
        """Drop the sync's problems that run ``run_id`` (one that read everything) did not see
        again; return how many."""
        with self.engine.begin() as con:
            return con.execute(
                sa.delete(problems).where(
                    problems.c.sync == sync, problems.c.last_seen_run != run_id
                )
            ).rowcount

    def open_problems(self, sync: str) -> dict[str, int]:
        """The sync's open problems by reason (what the latest complete run reported)."""
        with self.engine.connect() as con:
            rows = con.execute(
                sa.select(problems.c.reason, sa.func.count())
                .where(problems.c.sync == sync)
                .group_by(problems.c.reason)
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    # ---------------------------------------------------------------- locks

    @contextmanager
    def lock(self, sync: str, run_id: str) -> Iterator[LockHandle]:
        """Hold the sync's lock for the block; refuse if another live run holds it.

        A daemon thread heartbeats every ``heartbeat_every`` while the block runs, so a long
        job poll or rate-limit wait never makes a live run look stale. On exit the thread is
        stopped and joined, then only this run's lock is released: if another run took it
        over meanwhile, its lock stays.
        """
        self._acquire(sync, run_id)
        handle = LockHandle(sync, run_id)
        stop = threading.Event()
        beater = threading.Thread(
            target=self._beat, args=(handle, stop), name=f"retl-heartbeat-{sync}", daemon=True
        )
        try:
            beater.start()
            yield handle
        finally:
            stop.set()
            if beater.ident is not None:  # started
                beater.join()
            try:
                self.release(sync, run_id)
            except DBAPIError as exc:  # never raised over the error that may be ending the run
                log.error(
                    "sync %r, run %s: its lock could not be released (%s); the next run takes "
                    "it over once this process has exited (on this host) or its heartbeat is "
                    "%s old, or run `reverse-etl unlock %s`",
                    sync,
                    run_id,
                    failure_message(self.engine.url, exc),
                    self.stale_after,
                    sync,
                )

    def heartbeat(self, sync: str, run_id: str) -> bool:
        """Refresh this run's lock; False if the lock is no longer this run's."""
        with self.engine.begin() as con:
            done = con.execute(
                sa.update(locks)
                .where(locks.c.sync == sync, locks.c.run_id == run_id)
                .values(heartbeat_at=now())
            ).rowcount
        return done == 1

    def release(self, sync: str, run_id: str) -> bool:
        """Delete the sync's lock only if ``run_id`` holds it; True if it did."""
        with self.engine.begin() as con:
            done = con.execute(
                sa.delete(locks).where(locks.c.sync == sync, locks.c.run_id == run_id)
            ).rowcount
        return bool(done)

    def unlock(self, sync: str, run_id: str | None = None) -> bool:
        """Release the sync's lock whoever holds it (for a dead process), or only ``run_id``'s."""
        if run_id is not None:
            return self.release(sync, run_id)
        with self.engine.begin() as con:
            return bool(con.execute(sa.delete(locks).where(locks.c.sync == sync)).rowcount)

    def lock_info(self, sync: str) -> LockInfo | None:
        """Who holds the sync's lock, or None when it is free."""
        with self.engine.connect() as con:
            row = con.execute(sa.select(locks).where(locks.c.sync == sync)).first()
        if row is None:
            return None
        return LockInfo(
            row.sync, row.run_id, row.owner, _utc(row.acquired_at), _utc(row.heartbeat_at)
        )

    def _beat(self, handle: LockHandle, stop: threading.Event) -> None:
        """The heartbeat thread: a failed beat is logged and retried next tick, never raised
        (the run must not die of a state-store blip); a lost lock is flagged and ends it."""
        interval = self.heartbeat_every.total_seconds()
        while not stop.wait(interval):
            try:
                held = self.heartbeat(handle.sync, handle.run_id)
            except Exception as exc:
                log.warning(
                    "sync %r, run %s: lock heartbeat failed, retrying in %ss: %s",
                    handle.sync,
                    handle.run_id,
                    interval,
                    scrub(f"{type(exc).__name__}: {exc}"),
                )
                continue
            if not held:
                handle._lost.set()
                log.warning(
                    "sync %r, run %s: lost its lock (another run took it over as stale, or it "
                    "was unlocked); this run no longer holds the sync",
                    handle.sync,
                    handle.run_id,
                )
                return

    def _acquire(self, sync: str, run_id: str) -> None:
        """Insert the lock row, or take over a stale one; raise LockHeldError if a live run
        holds it. A few attempts, because the lock can change hands between our steps."""
        held: Any = None
        for _attempt in range(3):
            row = {
                "sync": sync,
                "run_id": run_id,
                "owner": self.owner,
                "acquired_at": now(),
                "heartbeat_at": now(),
            }
            try:
                with self.engine.begin() as con:
                    con.execute(sa.insert(locks).values(**row))
                    _abandon_orphans(con, sync, run_id)
                return
            except IntegrityError:
                pass
            with self.engine.connect() as con:
                held = con.execute(sa.select(locks).where(locks.c.sync == sync)).first()
            if held is None:  # released between our insert and this read: insert again
                continue
            if now() - _utc(held.heartbeat_at) <= self.stale_after and not self._killed(held):
                break
            if self._take_over(sync, held, row):
                return
            # another run took this stale lock first (or its holder beat again): look again,
            # which finds that run's fresh lock and refuses
        raise _held_error(sync, held, self.heartbeat_every, self.stale_after)

    def _killed(self, held: Any) -> bool:
        """The holder ran on this host, its process is gone, and it missed two heartbeats: a
        run killed with SIGKILL (a restarted scheduler, a pod's process restarted in place).
        Its lock is taken over at once rather than after ``stale_after`` (two hours by
        default), which kept a restarted scheduler from running the sync for that long; the
        same rule as ``reverse-etl unlock`` (``inspect.unlock``)."""
        return holder_exited(held.owner) and now() - _utc(held.heartbeat_at) > (
            2 * self.heartbeat_every
        )

    def _take_over(self, sync: str, held: Any, row: dict[str, Any]) -> bool:
        """Compare-and-swap a stale lock to this run: it changes the row only if it still holds
        the run and heartbeat we read, so of two racing takers exactly one wins. The winner
        marks the dead run ``abandoned`` in the same transaction."""
        with self.engine.begin() as con:
            taken = (
                con.execute(
                    sa.update(locks)
                    .where(
                        locks.c.sync == sync,
                        locks.c.run_id == held.run_id,
                        locks.c.heartbeat_at == held.heartbeat_at,  # the value as read, unconverted
                    )
                    .values(**row)
                ).rowcount
                == 1
            )
            if taken:
                beat = _utc(held.heartbeat_at)
                abandon(
                    con,
                    runs.c.run_id == held.run_id,
                    ended_at=beat,
                    why=f"the process stopped heartbeating at {beat:%Y-%m-%d %H:%M:%S} UTC "
                    "(killed or lost); a later run took over its lock",
                )
        return taken

    # ---------------------------------------------------------------- runs

    def new_run_id(self) -> str:
        return f"{now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"

    def start_run(self, record: RunRecord) -> None:
        with self.engine.begin() as con:
            con.execute(sa.insert(runs).values(**_run_values(record)))

    def save_run(self, record: RunRecord) -> None:
        with self.engine.begin() as con:
            con.execute(
                sa.update(runs).where(runs.c.run_id == record.run_id).values(**_run_values(record))
            )

    def last_runs(self, sync: str | None = None, limit: int = 5) -> list[RunRecord]:
        query = sa.select(runs).order_by(runs.c.started_at.desc()).limit(limit)
        if sync:
            query = query.where(runs.c.sync == sync)
        with self.engine.connect() as con:
            return [_run_record(r) for r in con.execute(query)]

    def last_started(self, sync: str, before: datetime | None = None) -> datetime | None:
        """When the sync's latest run (plans aside) started; with ``before``, the latest that
        started by then: after the clock is set back, runs that started "in the future" would
        otherwise hold its schedule until the clock caught up with them."""
        query = sa.select(sa.func.max(runs.c.started_at)).where(
            runs.c.sync == sync, runs.c.status != "dry_run"
        )
        if before is not None:
            query = query.where(runs.c.started_at <= before)
        with self.engine.connect() as con:
            value = con.execute(query).scalar()
        return _utc(value)

    def schema_version(self) -> int:
        """The store's schema version: the highest migration applied to it."""
        with self.engine.connect() as con:
            return _read_version(con)

    def close(self) -> None:
        self.engine.dispose()


def _abandon_orphans(con: sa.Connection, sync: str, run_id: str) -> None:
    """The sync was not locked, so no other run of it (than ``run_id``, taking the lock) is
    running: a record still ``running`` is one
    whose process ended without saving it (the store failed at its end, after the lock was
    released). It said ``running`` forever, with its counts lost, and never started the retry
    backoff; it is ``abandoned`` now, as a run whose stale lock is taken over."""
    abandon(
        con,
        runs.c.sync == sync,
        runs.c.run_id != run_id,
        ended_at=now(),
        why="its process ended without saving this record (the state store failed); the rows "
        "it sent past the watermark are sent again",
    )


def abandon(con: sa.Connection, *where: Any, ended_at: datetime, why: str) -> None:
    """Mark the runs ``where`` picks ``abandoned`` if their record still says ``running`` (a
    run that ended on its own keeps its status): the history must not show one running
    forever."""
    con.execute(
        sa.update(runs)
        .where(runs.c.status == "running", *where)
        .values(status="abandoned", ended_at=ended_at, message=f"abandoned: {why}")
    )


def on_this_host(owner: str) -> bool:
    """The lock's holder (``owner`` is host:pid) ran on this host."""
    return owner.rpartition(":")[0] == socket.gethostname()


def holder_exited(owner: str) -> bool:
    """The lock's holder ran on this host (``owner`` is host:pid) and no process has its pid
    now: a run killed with SIGKILL. Not proof on its own: another machine (a container) may
    share the host name, so callers also wait for two missed heartbeats, which a live holder
    anywhere would have sent."""
    pid = owner.rpartition(":")[2]
    if not on_this_host(owner) or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def _held_error(
    sync: str, held: Any, heartbeat_every: timedelta, stale_after: timedelta
) -> LockHeldError:
    if held is None:  # the lock kept changing hands under us
        return LockHeldError(
            f"sync {sync!r} is being locked and released by other runs right now; try again"
        )
    beat = _utc(held.heartbeat_at)
    silent = now() - beat
    running = (
        f"sync {sync!r} is already running (run {held.run_id} on {held.owner}, started "
        f"{_utc(held.acquired_at):%Y-%m-%d %H:%M:%S} UTC, last heartbeat {int(silent.total_seconds())} s ago)"
    )
    if silent <= 2 * heartbeat_every or on_this_host(held.owner):  # alive here (dead: taken)
        return LockHeldError(
            f"{running}; wait for it to finish, or, if that process is gone, run "
            f"`reverse-etl unlock {sync}`"
        )
    # a live holder beats every heartbeat_every whatever it waits for: one on another host
    # (a pod restarted while its state store was away) may be gone, and this host cannot tell
    taken_over = beat + stale_after
    return LockHeldError(
        f"{running}: it has missed its heartbeats (one every {int(heartbeat_every.total_seconds())} s), so "
        f"its process may be gone; its lock is taken over at {taken_over:%Y-%m-%d %H:%M:%S} "
        f"UTC, or, if you know it is gone, run `reverse-etl unlock {sync} --force`",
        overdue=True,
    )


_PROBLEM_CHUNK = 500  # problem keys per statement: well under any database's bound parameters
_MIN_HEARTBEAT = timedelta(seconds=1)
_MAX_HEARTBEAT = timedelta(seconds=60)
_SCHEMA_ATTEMPTS = 6
# What opening a store that another process is creating or migrating can still see despite the
# migration lock: the fresh SQLite file locked while the other run created it or switched it to
# WAL (or a migration outlasting busy_timeout), and, from a release before versioning creating
# the tables without the lock, a table or its row type appearing in between (SQLite,
# PostgreSQL's DuplicateTable and pg_type UniqueViolation) or a version row recorded twice.
_SCHEMA_RACE = (
    "already exists",
    "duplicate key",
    "pg_type",
    "unique constraint failed",
    "is locked",
    "deadlock detected",
)
# pg_advisory_xact_lock key held by whoever migrates a PostgreSQL store: b"retl-sch" as a bigint
_PG_MIGRATION_LOCK = 0x7265_746C_2D73_6368
# the databases the state store runs on (sa.URL.get_backend_name())
_STATE_BACKENDS = frozenset({"sqlite", "postgresql"})


def _v1_tables(con: sa.Connection) -> None:
    """The tables of the releases before schema versioning, frozen as they were. Created only
    where missing, so a store those releases wrote keeps its tables and rows."""
    v1 = sa.MetaData()
    sa.Table(
        "retl_watermarks",
        v1,
        sa.Column("sync", sa.String(200), primary_key=True),
        sa.Column("cursor_value", sa.Text, nullable=False),
        sa.Column("id_value", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    sa.Table(
        "retl_runs",
        v1,
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("sync", sa.String(200), nullable=False, index=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("full_refresh", sa.Boolean, nullable=False),
        sa.Column("read", sa.BigInteger, nullable=False),
        sa.Column("sent", sa.BigInteger, nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("updated", sa.BigInteger, nullable=False),
        sa.Column("rejected", sa.BigInteger, nullable=False),
        sa.Column("failed", sa.BigInteger, nullable=False),
        sa.Column("error_file", sa.Text),
        sa.Column("message", sa.Text),
    )
    sa.Table(
        "retl_locks",
        v1,
        sa.Column("sync", sa.String(200), primary_key=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )
    if sa.inspect(con).has_table("retl_runs"):
        log.info(
            "%s: a state store from before schema versioning, stamped as version 1", _where(con)
        )
    v1.create_all(con)  # checkfirst


def _v2_unchanged_removed(con: sa.Connection) -> None:
    """Runs count the rows found unchanged against the synced-state snapshot, and the
    members a mirror sync removed."""
    for column in ("unchanged", "removed"):
        con.execute(sa.text(f"ALTER TABLE retl_runs ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0"))


def _v3_consent_read_back(con: sa.Connection) -> None:
    """Consent read back from destinations (the latest opt-out or opt-in per account, person
    and channel, and each read-back stream's cursor); runs count the consent held back."""
    v3 = sa.MetaData()
    sa.Table(
        "retl_consent_seen",
        v3,
        sa.Column("destination", sa.String(200), primary_key=True),
        sa.Column("person", sa.String(320), primary_key=True),
        sa.Column("channel", sa.String(20), primary_key=True),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("reason", sa.String(60)),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ours_at", sa.DateTime(timezone=True)),
    )
    sa.Table(
        "retl_consent_cursors",
        v3,
        sa.Column("destination", sa.String(200), primary_key=True),
        sa.Column("stream", sa.String(60), primary_key=True),
        sa.Column("cursor", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    v3.create_all(con)
    con.execute(sa.text("ALTER TABLE retl_runs ADD COLUMN consent_held BIGINT NOT NULL DEFAULT 0"))


def _v4_rate_budget(con: sa.Connection) -> None:
    """Rate-limit buckets shared by the syncs calling one destination account."""
    v4 = sa.MetaData()
    sa.Table(
        "retl_rate_budget",
        v4,
        sa.Column("account", sa.String(200), primary_key=True),
        sa.Column("operation", sa.String(100), primary_key=True),
        sa.Column("bucket", sa.String(20), primary_key=True),
        sa.Column("tokens", sa.Double, nullable=False),
        sa.Column("stamp", sa.Double, nullable=False),
    )
    v4.create_all(con)


def _v5_problems(con: sa.Connection) -> None:
    """Each sync's open row problems, to tell known ones from new; runs count both."""
    v5 = sa.MetaData()
    sa.Table(
        "retl_problems",
        v5,
        sa.Column("sync", sa.String(200), primary_key=True),
        sa.Column("problem", sa.String(64), primary_key=True),
        sa.Column("reason", sa.String(100), nullable=False),
        sa.Column("column_name", sa.String(300), nullable=False),
        sa.Column("first_seen_run", sa.String(64), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_run", sa.String(64), nullable=False),
    )
    v5.create_all(con)
    for column in ("known_problems", "new_problems"):
        con.execute(sa.text(f"ALTER TABLE retl_runs ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0"))


def _v6_retry_queue(con: sa.Connection) -> None:
    """Rows refused for a missing parent, retried by later runs (retry_queue.py)."""
    v6 = sa.MetaData()
    sa.Table(
        "retl_retry_queue",
        v6,
        sa.Column("sync", sa.String(200), primary_key=True),
        sa.Column("identifier", sa.String(500), primary_key=True),
        sa.Column("reason", sa.String(100), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("first_queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_run", sa.String(64), nullable=False),
    )
    v6.create_all(con)


# ---- migration 7 (controls helper, issue 17): keep to this block; migration 6 is above it
def _v7_sync_controls(con: sa.Connection) -> None:
    """Per-sync enable/disable overrides and definition fingerprints (controls.py)."""
    v7 = sa.MetaData()
    sa.Table(
        "retl_sync_controls",
        v7,
        sa.Column("sync", sa.String(200), primary_key=True),
        sa.Column("enabled", sa.Boolean),
        sa.Column("enabled_at", sa.DateTime(timezone=True)),
        sa.Column("enabled_by", sa.String(200)),
        sa.Column("fingerprint", sa.Text),
        sa.Column("fingerprint_at", sa.DateTime(timezone=True)),
        sa.Column("fingerprint_run", sa.String(64)),
    )
    v7.create_all(con)


# ---- migration 8 (issue 18)
WITHOUT_ROWID = ("retl_problems", "retl_consent_seen", "retl_retry_queue")


def _v8_sqlite_without_rowid(con: sa.Connection) -> None:
    """On SQLite, the tables keyed by long text that grow with a view (problems, consent read
    back, the retry queue) are rebuilt WITHOUT ROWID, clustered by their primary key. A rowid
    table keeps a second B-tree for a text key, so every lookup, update and delete by key
    walks two; settling 131,000 of 172,000 problems after a 10M-row run took 0.87 s and
    marking 41,000 seen 0.46 s, against 0.13 s and 0.09 s clustered
    (https://www.sqlite.org/withoutrowid.html: for "non-integer or composite PRIMARY KEYs",
    about half the space and twice the speed). Other databases: nothing to do."""
    if con.dialect.name != "sqlite":
        return
    for table in WITHOUT_ROWID:
        ddl = con.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).scalar()
        if ddl is None or re.search(r"WITHOUT\s+ROWID\s*$", ddl, re.IGNORECASE):
            continue  # dropped by hand (created again on open), or already clustered
        new = f"{table}_v8"
        con.exec_driver_sql(
            re.sub(rf'^CREATE TABLE\s+"?{table}"?', f"CREATE TABLE {new}", ddl) + " WITHOUT ROWID"
        )
        con.exec_driver_sql(f"INSERT INTO {new} SELECT * FROM {table}")
        con.exec_driver_sql(f"DROP TABLE {table}")
        con.exec_driver_sql(f"ALTER TABLE {new} RENAME TO {table}")


# The schema's history, oldest first. Append only: see "How to add a migration" above.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "watermarks, run history and locks (the tables before versioning)", _v1_tables),
    Migration(2, "runs count unchanged and removed rows", _v2_unchanged_removed),
    Migration(
        3,
        "consent read back from destinations; runs count consent held back",
        _v3_consent_read_back,
    ),
    Migration(
        4, "rate-limit budgets shared by the syncs of one destination account", _v4_rate_budget
    ),
    Migration(5, "open row problems per sync; runs count known and new problems", _v5_problems),
    Migration(6, "rows refused for a missing parent, retried by later runs", _v6_retry_queue),
    Migration(
        7, "per-sync enable/disable overrides and definition fingerprints", _v7_sync_controls
    ),
    Migration(
        8,
        "SQLite: problems, consent read back and the retry queue clustered by their keys",
        _v8_sqlite_without_rowid,
    ),
)


def latest_schema_version() -> int:
    """The schema version this reverse-etl writes."""
    return MIGRATIONS[-1].version


def migrate(engine: sa.Engine, migrations: Sequence[Migration] | None = None) -> int:
    """Apply the migrations the store lacks, each in its own transaction under the migration
    lock; return the store's version. Refuses a store newer than the last migration."""
    with _migration_engine(engine) as locked:
        return _migrate(locked, MIGRATIONS if migrations is None else migrations)


def _prepare_schema(engine: sa.Engine) -> None:
    """Bring the store to the latest version on open, safe when several processes open one
    store at once (even one that does not exist yet): the migration lock serializes them, and
    what can still race (see ``_SCHEMA_RACE``) is retried, finding the work done."""
    migrations = MIGRATIONS
    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            if _schema_is_current(engine, migrations[-1].version):
                return
            with _migration_engine(engine) as locked:
                _migrate(locked, migrations)
                with _migration_transaction(locked) as con:  # tables dropped by hand
                    metadata.create_all(con)
            return
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            if attempt == _SCHEMA_ATTEMPTS - 1 or not _is_race(exc):
                raise
            time.sleep(0.05 * 2**attempt * (1 + random.random()))


def _schema_is_current(engine: sa.Engine, latest: int) -> bool:
    """The fast path, without the lock: every table there and the version the latest."""
    with engine.connect() as con:
        tables = set(sa.inspect(con).get_table_names())
        if schema_versions.name not in tables:
            return False
        current = _read_version(con)
        _refuse_newer(con, current, latest)
    return current == latest and set(metadata.tables) <= tables


def _migrate(engine: sa.Engine, migrations: Sequence[Migration]) -> int:
    _check_sequence(migrations)
    latest = migrations[-1].version
    while True:
        with _migration_transaction(engine) as con:
            schema_versions.create(con, checkfirst=True)
            current = _read_version(con)  # under the lock: another process may just have moved it
            _refuse_newer(con, current, latest)
            if current == latest:
                return current
            step = migrations[current]  # versions run 1..latest, so this is version current + 1
            log.info("%s: schema migration %d: %s", _where(con), step.version, step.description)
            try:
                step.apply(con)
            except Exception as exc:
                if isinstance(exc, DBAPIError) and _is_race(exc):
                    raise
                raise StateError(
                    f"{_where(con)}: schema migration {step.version} ({step.description}) "
                    f"failed, so the store stays at schema {current}: "
                    f"{scrub(f'{type(exc).__name__}: {exc}')}"
                ) from exc
            con.execute(
                sa.insert(schema_versions).values(
                    version=step.version,
                    description=step.description,
                    applied_at=now(),
                    applied_by=f"reverse-etl {__version__} on {socket.gethostname()}:{os.getpid()}",
                )
            )


def _check_sequence(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(
            f"schema migrations must be numbered 1, 2, 3, ... in order, not {versions}"
        )


def _read_version(con: sa.Connection) -> int:
    return int(con.execute(sa.select(sa.func.max(schema_versions.c.version))).scalar() or 0)


def _refuse_newer(con: sa.Connection, current: int, latest: int) -> None:
    if current > latest:
        raise StateError(
            f"{_where(con)}: this state store was written by a newer reverse-etl (schema "
            f"{current}); upgrade reverse-etl (this one, {__version__}, knows schema {latest} at "
            f"most)"
        )


def _shown_url(url: str) -> str:
    """``url`` as an error message may show it: its password hidden, even when it does not
    parse, and registered secrets scrubbed."""
    try:
        text = sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:  # no telling user from password: hide all before the last @
        text = re.sub(r"^([\w+.-]*:?//)?.*@", r"\1***@", url, flags=re.DOTALL)
    text = re.sub(r"(password=)[^&#]*", r"\1***", text, flags=re.IGNORECASE)  # ?password=...
    return scrub(text)


def _parse_state_url(url: str, shown: str) -> sa.URL:
    """The state store URL parsed, refused (StateError) unless it is SQLite or PostgreSQL."""
    example = "sqlite:///.reverse_etl/state.db or postgresql+psycopg://USER:PASSWORD@HOST/DB"
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise StateError(
            f"state store URL {shown!r} is not a database URL; write e.g. {example}"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgres":  # what Heroku and libpq write; SQLAlchemy knows no such name
        raise StateError(
            f"state store URL {shown}: write postgresql+psycopg://... (not postgres://; pip "
            "install 'reverse-etl[postgres]')"
        )
    if backend not in _STATE_BACKENDS:
        raise StateError(
            f"state store URL {shown}: only sqlite and postgresql are supported; write e.g. "
            f"{example}"
        )
    return parsed


def _driver_said(exc: BaseException, url: sa.URL) -> str:
    """What a driver or SQLAlchemy said, on one line, without the URL's password."""
    if isinstance(exc, ImportError):
        text = f"{exc.name or 'its module'} is not installed"
    else:
        orig = getattr(exc, "orig", None)
        text = str(orig if orig is not None else exc)
        text = text.split("\n(Background on this error", 1)[0]  # SQLAlchemy's link
    text = " ".join(text.split())
    for password in (url.password, url.query.get("password")):
        if isinstance(password, str) and password:
            text = text.replace(password, "***")
    return scrub(text)


def _open_problem(url: sa.URL, exc: sa.exc.DBAPIError) -> str:
    """Why a store could not be opened: for a SQLite file, what is wrong with its path when
    something visibly is (a file where a folder should be, ...); else the driver's words."""
    said = _driver_said(exc, url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(str(url.database))
        return path_problem(path) or f"{path}: {said}"
    return said


# what the driver says (lower-cased) -> what to do about it, for a store that fails mid-run
_FAILURE_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("database is locked", "database table is locked"),
        "another process held the file locked longer than the 10 s this run waits (a backup, a "
        "sqlite3 shell, a second tool); let it finish, then run again",
    ),
    (("disk is full", "no space left"), "free space on the disk that holds it, then run again"),
    (
        ("readonly", "read-only"),
        "the file or its folder cannot be written (permissions, a read-only mount); make both "
        "writable for this user",
    ),
    (
        ("malformed", "not a database", "file is encrypted"),
        "the file is damaged: restore it from a backup, or move it aside (a new store is made; "
        "the snapshot keeps unchanged rows from being sent again)",
    ),
    (
        ("connection", "server closed", "terminating", "could not connect", "timeout"),
        "the database stopped answering; check it is running and reachable, then run again",
    ),
)


def failure_message(url: sa.URL, exc: sa.exc.DBAPIError) -> str:
    """A store that opened and then failed (locked, disk full, read-only, damaged, its server
    gone): the store, the driver's words (never the SQL or its parameters, which
    SQLAlchemy's text carries) and what to do. These were "internal error, please report
    it", with the raw statement."""
    said = _driver_said(exc, url)
    text = said.lower()
    hint = next((h for markers, h in _FAILURE_HINTS if any(m in text for m in markers)), None)
    shown = f"state store {url.render_as_string(hide_password=True)}"
    return scrub(f"{shown} failed: {said}" + (f"; {hint}" if hint else ""))


def _where(con: sa.Connection) -> str:
    return f"state store {con.engine.url.render_as_string(hide_password=True)}"


def _is_race(exc: DBAPIError) -> bool:
    text = str(exc.orig if exc.orig is not None else exc).lower()
    return any(marker in text for marker in _SCHEMA_RACE)


@contextmanager
def _migration_engine(engine: sa.Engine) -> Iterator[sa.Engine]:
    """The engine to migrate with. A SQLite file gets one of its own whose transactions start
    with ``BEGIN IMMEDIATE`` (the write lock, taken before the version is read; and DDL inside
    the transaction, which pysqlite's own handling would commit early); the store's engine keeps
    pysqlite's default for everything else. Others (PostgreSQL, an in-memory SQLite that
    another engine could not see) migrate with the store's engine."""
    url = engine.url
    in_memory = url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    if url.get_backend_name() != "sqlite" or in_memory:
        yield engine
        return
    locked = sa.create_engine(url, poolclass=sa.pool.NullPool)
    sa.event.listen(locked, "connect", _sqlite_manual_transactions)
    sa.event.listen(locked, "begin", _begin_immediate)
    try:
        yield locked
    finally:
        locked.dispose()


@contextmanager
def _migration_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction holding the migration lock until it ends: ``BEGIN IMMEDIATE`` on SQLite
    (see ``_migration_engine``), a transaction-scoped advisory lock on PostgreSQL. On other
    databases nothing serializes migrators but the version row's primary key."""
    with engine.begin() as con:
        if con.dialect.name == "postgresql":
            con.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        yield con


def _sqlite_manual_transactions(dbapi_con: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_con, record)
    dbapi_con.isolation_level = None  # pysqlite leaves BEGIN and COMMIT to us (_begin_immediate)


def _begin_immediate(con: sa.Connection) -> None:
    con.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_con: Any, _record: Any) -> None:
    cur = dbapi_con.cursor()
    cur.execute("PRAGMA busy_timeout=10000")  # first: switching a new file to WAL may wait
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def _run_values(r: RunRecord) -> dict[str, Any]:
    return {
        "run_id": r.run_id,
        "sync": r.sync,
        "started_at": r.started_at,
        "ended_at": r.ended_at,
        "status": r.status,
        "full_refresh": r.full_refresh,
        "error_file": r.error_file,
        "message": r.message,
        **r.counts.__dict__,
    }


def _run_record(row: Any) -> RunRecord:
    counts = RunCounts(**{k: getattr(row, k) for k in RunCounts.__dataclass_fields__})
    return RunRecord(
        run_id=row.run_id,
        sync=row.sync,
        started_at=_utc(row.started_at),
        ended_at=_utc(row.ended_at),
        status=row.status,
        full_refresh=row.full_refresh,
        counts=counts,
        error_file=row.error_file,
        message=row.message,
    )

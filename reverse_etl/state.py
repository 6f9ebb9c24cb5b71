"""The state store: watermarks, run history and per-sync locks, on SQLAlchemy.

A SQLite file under the project by default; a PostgreSQL URL lets a team share one store.
The lock is a row with a unique key, so it works the same on both without advisory-lock
features; a lock whose owner stopped heartbeating for ``stale_after`` is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from reverse_etl.errors import LockHeldError

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
    sa.Column("status", sa.String(20), nullable=False),  # running|success|partial|failed|dry_run
    sa.Column("full_refresh", sa.Boolean, nullable=False, default=False),
    sa.Column("read", sa.BigInteger, nullable=False, default=0),
    sa.Column("sent", sa.BigInteger, nullable=False, default=0),
    sa.Column("created", sa.BigInteger, nullable=False, default=0),
    sa.Column("updated", sa.BigInteger, nullable=False, default=0),
    sa.Column("rejected", sa.BigInteger, nullable=False, default=0),
    sa.Column("failed", sa.BigInteger, nullable=False, default=0),
    sa.Column("error_file", sa.Text),
    sa.Column("message", sa.Text),
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


@dataclass(frozen=True)
class Watermark:
    """Compound cursor: the last acknowledged (cursor value, identifier) pair."""

    cursor: Any
    id: Any


@dataclass
class RunCounts:
    read: int = 0
    sent: int = 0
    created: int = 0
    updated: int = 0
    rejected: int = 0
    failed: int = 0

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


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone=True columns; they were stored as UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def encode_value(value: Any) -> str:
    """Typed JSON for a cursor or id value, so it binds back as the same SQL type."""
    if isinstance(value, datetime):
        return json.dumps({"t": "datetime", "v": value.isoformat()})
    if isinstance(value, date):
        return json.dumps({"t": "date", "v": value.isoformat()})
    if isinstance(value, Decimal):
        return json.dumps({"t": "decimal", "v": str(value)})
    if value is None or isinstance(value, bool | int | float | str):
        return json.dumps({"t": "plain", "v": value})
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


class StateStore:
    def __init__(
        self, url: str, *, root: Path | None = None, stale_after: timedelta = timedelta(hours=2)
    ):
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = Path(url.removeprefix("sqlite:///"))
            path = (root or Path.cwd()) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        self.url = url
        self.engine = sa.create_engine(url, future=True)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self.stale_after = stale_after
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    # ---------------------------------------------------------------- watermarks

    def watermark(self, sync: str) -> Watermark | None:
        with self.engine.connect() as con:
            row = con.execute(sa.select(watermarks).where(watermarks.c.sync == sync)).first()
        if row is None:
            return None
        return Watermark(decode_value(row.cursor_value), decode_value(row.id_value))

    def set_watermark(self, sync: str, mark: Watermark) -> None:
        values = {
            "cursor_value": encode_value(mark.cursor),
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

    # ---------------------------------------------------------------- locks

    @contextmanager
    def lock(self, sync: str, run_id: str) -> Iterator[None]:
        """Hold the sync's lock for the block; refuse if another live run holds it."""
        self._acquire(sync, run_id)
        try:
            yield
        finally:
            with self.engine.begin() as con:
                con.execute(sa.delete(locks).where(locks.c.sync == sync, locks.c.run_id == run_id))

    def heartbeat(self, sync: str, run_id: str) -> None:
        with self.engine.begin() as con:
            con.execute(
                sa.update(locks)
                .where(locks.c.sync == sync, locks.c.run_id == run_id)
                .values(heartbeat_at=now())
            )

    def _acquire(self, sync: str, run_id: str) -> None:
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
            return
        except IntegrityError:
            pass
        with self.engine.begin() as con:
            held = con.execute(sa.select(locks).where(locks.c.sync == sync)).first()
            if held is None:  # released between our insert and this read
                con.execute(sa.insert(locks).values(**row))
                return
            beat = _utc(held.heartbeat_at)
            if beat is not None and now() - beat > self.stale_after:
                con.execute(
                    sa.update(locks)
                    .where(locks.c.sync == sync, locks.c.run_id == held.run_id)
                    .values(**row)
                )
                return
        raise LockHeldError(
            f"sync {sync!r} is already running (run {held.run_id} on {held.owner}, "
            f"started {_utc(held.acquired_at):%Y-%m-%d %H:%M:%S} UTC); wait for it to finish, or, "
            f"if that process is gone, run `reverse-etl unlock {sync}`"
        )

    def unlock(self, sync: str) -> bool:
        with self.engine.begin() as con:
            return bool(con.execute(sa.delete(locks).where(locks.c.sync == sync)).rowcount)

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

    def last_started(self, sync: str) -> datetime | None:
        with self.engine.connect() as con:
            value = con.execute(
                sa.select(sa.func.max(runs.c.started_at)).where(
                    runs.c.sync == sync, runs.c.status != "dry_run"
                )
            ).scalar()
        return _utc(value)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_con: Any, _record: Any) -> None:
    cur = dbapi_con.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
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

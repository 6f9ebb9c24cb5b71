"""The state store's schema versions, on SQLite and on PostgreSQL: a fresh store and one written
before versioning both end at the latest version with their rows; a further migration (a test
one, appended to ``MIGRATIONS``) upgrades an old store once, even when several processes open it
at the same moment; a failed migration leaves the store as it was; a store newer than the code is
refused; and replaying the migrations gives exactly the tables the code queries.

No test asserts a duration: racing processes line up on a barrier and are only waited for.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import queue
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reverse_etl import state
from reverse_etl.errors import LockHeldError, ReverseEtlError
from reverse_etl.state import (
    Migration,
    RunRecord,
    StateError,
    StateStore,
    Watermark,
    encode_value,
    latest_schema_version,
    metadata,
    migrate,
    schema_versions,
)

RACERS = 4  # processes (or threads) opening one store at once
DEADLINE = 60.0  # seconds; only ever a bound on waiting, never asserted as a speed
SPAWN = mp.get_context("spawn")
STARTED = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Backend:
    """A state store that does not exist yet: a SQLite file, or an empty PostgreSQL database."""

    name: str
    url: str

    def store(self) -> StateStore:
        return StateStore(self.url)

    def engine(self) -> sa.Engine:
        return sa.create_engine(self.url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path / 'state.db'}")
        return
    dsn: str = request.getfixturevalue("postgres_dsn")
    url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    name = "retl_migrations_" + secrets.token_hex(6)
    admin = sa.create_engine(url)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as con:
            con.execute(sa.text(f"CREATE DATABASE {name}"))
        yield Backend("postgres", f"{url.rsplit('/', 1)[0]}/{name}")
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as con:
            con.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


# --------------------------------------------------------------------------- helpers

RELEASED = state.MIGRATIONS  # the real ones, whatever a test patches in
NEXT = len(RELEASED) + 1  # the version of the test migration


def _next_migration(con: sa.Connection) -> None:
    """What the coming issues do: a column on runs (with a server default, so rows already
    there and older writers are fine) and a table of its own, declared frozen."""
    con.execute(sa.text("ALTER TABLE retl_runs ADD COLUMN test_added BIGINT NOT NULL DEFAULT 0"))
    sa.Table(
        "retl_test_snapshots",
        sa.MetaData(),
        sa.Column("sync", sa.String(200), primary_key=True),
        sa.Column("digest", sa.Text, nullable=False),
    ).create(con)


def with_next(apply: Callable[[sa.Connection], None] = _next_migration) -> tuple[Migration, ...]:
    return (*RELEASED, Migration(NEXT, "runs.test_added; retl_test_snapshots", apply))


def counted(
    calls: list[int], apply: Callable[[sa.Connection], None]
) -> Callable[[sa.Connection], None]:
    def run(con: sa.Connection) -> None:
        calls.append(1)
        apply(con)

    return run


def versions(backend: Backend) -> list[int]:
    engine = backend.engine()
    with engine.connect() as con:
        rows = con.execute(sa.select(schema_versions.c.version).order_by("version")).scalars()
        found = list(rows)
    engine.dispose()
    return found


def tables(backend: Backend) -> set[str]:
    engine = backend.engine()
    names = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    return names


def columns(backend: Backend, table: str) -> set[str]:
    engine = backend.engine()
    names = {c["name"] for c in sa.inspect(engine).get_columns(table)}
    engine.dispose()
    return names


def previous_release_store(backend: Backend) -> None:
    """A store as the releases before versioning left it: their tables (migration 1's frozen
    copy), a watermark, a finished run and a held lock, and no version table."""
    engine = backend.engine()
    with engine.begin() as con:
        state._v1_tables(con)
        old = sa.MetaData()
        old.reflect(con)
        con.execute(
            sa.insert(old.tables["retl_watermarks"]).values(
                sync="s",
                cursor_value=encode_value(STARTED, column="updated_at"),
                id_value=encode_value(7),
                updated_at=STARTED,
            )
        )
        con.execute(
            sa.insert(old.tables["retl_runs"]).values(
                run_id="old-run",
                sync="s",
                started_at=STARTED,
                ended_at=STARTED,
                status="success",
                full_refresh=False,
                read=10,
                sent=10,
                created=4,
                updated=6,
                rejected=0,
                failed=0,
            )
        )
        con.execute(
            sa.insert(old.tables["retl_locks"]).values(
                sync="s",
                run_id="old-run",
                owner="old:1",
                acquired_at=state.now(),
                heartbeat_at=state.now(),
            )
        )
    engine.dispose()
    assert "retl_schema_version" not in tables(backend)


def assert_previous_rows_kept(store: StateStore) -> None:
    assert store.watermark("s") == Watermark(STARTED, 7, "updated_at")
    (run,) = store.last_runs("s")
    assert (run.run_id, run.status, run.started_at) == ("old-run", "success", STARTED)
    assert (run.counts.read, run.counts.created, run.counts.updated) == (10, 4, 6)
    with pytest.raises(LockHeldError, match="run old-run on old:1"):
        store._acquire("s", "new-run")  # the lock row is still there (a live one)


# --------------------------------------------------------------------------- the real schema


def test_the_migrations_are_numbered_from_one_without_gaps() -> None:
    assert [m.version for m in state.MIGRATIONS] == list(range(1, latest_schema_version() + 1))
    for m in state.MIGRATIONS:
        assert m.description.strip() and "\n" not in m.description
    gap = (*RELEASED, Migration(NEXT + 1, "skips one", _next_migration))
    with pytest.raises(ValueError, match="numbered 1, 2, 3"):
        migrate(sa.create_engine("sqlite://"), gap)


def test_replaying_the_migrations_gives_exactly_the_tables_the_code_uses(backend: Backend) -> None:
    """A change to the live tables without a migration (or the reverse) fails here. Only the
    migrations run: opening a store would also create missing tables from the live ones."""
    engine = backend.engine()
    assert migrate(engine) == latest_schema_version()
    built = sa.MetaData()
    built.reflect(engine)
    engine.dispose()
    assert set(built.tables) == set(metadata.tables)
    for name, live in metadata.tables.items():
        got = built.tables[name]
        assert {c.name: c.nullable for c in got.columns} == {
            c.name: c.nullable for c in live.columns
        }, name
        assert [c.name for c in got.primary_key] == [c.name for c in live.primary_key], name
        assert {(i.name, tuple(c.name for c in i.columns)) for i in got.indexes} == {
            (i.name, tuple(c.name for c in i.columns)) for i in live.indexes
        }, name


def test_a_fresh_store_is_created_at_the_latest_version(backend: Backend) -> None:
    store = backend.store()
    assert store.schema_version() == latest_schema_version()
    assert versions(backend) == list(range(1, latest_schema_version() + 1))
    assert tables(backend) == set(metadata.tables)
    store.set_watermark("s", Watermark(1, 2))
    assert store.watermark("s") == Watermark(1, 2)
    store.close()


def test_a_store_from_before_versioning_is_stamped_version_1_with_its_rows(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    previous_release_store(backend)
    caplog.set_level("INFO", logger="reverse_etl.state")
    store = backend.store()
    assert "a state store from before schema versioning, stamped as version 1" in caplog.text
    assert store.schema_version() == latest_schema_version()
    assert versions(backend)[0] == 1
    assert_previous_rows_kept(store)
    store.close()


def test_an_in_memory_store_is_versioned_too() -> None:
    store = StateStore("sqlite://")
    assert store.schema_version() == latest_schema_version()
    store.close()


def test_tables_dropped_by_hand_are_created_again(backend: Backend) -> None:
    """Resetting a store by dropping its tables worked before versioning, and still does."""
    backend.store().close()
    engine = backend.engine()
    with engine.begin() as con:
        con.execute(sa.text("DROP TABLE retl_locks"))
    engine.dispose()
    store = backend.store()
    assert "retl_locks" in tables(backend)
    assert store.schema_version() == latest_schema_version()
    with store.lock("s", "run-1"):
        pass
    store.close()


# --------------------------------------------------------------------------- upgrading


def test_an_old_store_is_upgraded_with_its_rows_kept(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous_release_store(backend)
    backend.store().close()  # stamped at today's latest version
    monkeypatch.setattr(state, "MIGRATIONS", with_next())
    store = backend.store()
    assert store.schema_version() == NEXT
    assert versions(backend) == list(range(1, NEXT + 1))
    assert "test_added" in columns(backend, "retl_runs")
    assert "retl_test_snapshots" in tables(backend)
    assert_previous_rows_kept(store)
    with store.engine.connect() as con:  # the row already there got the column's default
        assert con.execute(sa.text("SELECT test_added FROM retl_runs")).scalars().all() == [0]
    store.start_run(RunRecord(run_id="new-run", sync="s", started_at=STARTED, status="running"))
    assert [r.run_id for r in store.last_runs("s")] == ["old-run", "new-run"]  # same started_at
    store.close()
    engine = backend.engine()
    with engine.connect() as con:
        row = con.execute(sa.select(schema_versions).where(schema_versions.c.version == NEXT)).one()
    engine.dispose()
    assert row.description == "runs.test_added; retl_test_snapshots"
    assert row.applied_by.startswith("reverse-etl ")


def test_reopening_an_upgraded_store_applies_nothing_again(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(state, "MIGRATIONS", with_next(counted(calls, _next_migration)))
    for _ in range(3):
        store = backend.store()
        assert store.schema_version() == NEXT
        store.close()
    engine = backend.engine()
    assert migrate(engine) == NEXT
    engine.dispose()
    assert calls == [1]
    assert versions(backend) == list(range(1, NEXT + 1))


def test_a_failed_migration_leaves_the_store_as_it_was(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.store().close()

    def half_done(con: sa.Connection) -> None:
        con.execute(sa.text("ALTER TABLE retl_runs ADD COLUMN test_added BIGINT"))
        raise RuntimeError("boom")

    monkeypatch.setattr(state, "MIGRATIONS", with_next(half_done))
    with pytest.raises(StateError) as exc:
        backend.store()
    assert f"schema migration {NEXT} (runs.test_added; retl_test_snapshots) failed" in str(
        exc.value
    )
    assert f"the store stays at schema {NEXT - 1}: RuntimeError: boom" in str(exc.value)
    assert versions(backend)[-1] == NEXT - 1
    assert "test_added" not in columns(backend, "retl_runs")  # the DDL was rolled back
    monkeypatch.setattr(state, "MIGRATIONS", with_next())  # fixed forward
    store = backend.store()
    assert store.schema_version() == NEXT
    store.close()


def test_a_store_newer_than_the_code_is_refused(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "MIGRATIONS", with_next())
    newer = backend.store()
    newer.set_watermark("s", Watermark(1, 2))
    newer.close()
    monkeypatch.setattr(state, "MIGRATIONS", RELEASED)
    with pytest.raises(StateError) as exc:
        backend.store()
    message = str(exc.value)
    assert isinstance(exc.value, ReverseEtlError)  # the CLI reports it and exits 3
    assert (
        f"this state store was written by a newer reverse-etl (schema {NEXT}); upgrade "
        "reverse-etl" in message
    )
    assert f"knows schema {NEXT - 1} at most" in message
    if backend.name == "postgres":
        password = sa.make_url(backend.url).password
        assert password and password not in message
    engine = backend.engine()
    with pytest.raises(StateError, match="newer reverse-etl"):
        migrate(engine)
    engine.dispose()
    assert versions(backend)[-1] == NEXT  # untouched
    monkeypatch.setattr(state, "MIGRATIONS", with_next())
    store = backend.store()
    assert store.watermark("s") == Watermark(1, 2)
    store.close()


# --------------------------------------------------------------------------- racing openers


def _marked(path: str, version: int, apply: Callable[[sa.Connection], None], con: Any) -> None:
    """A migration that leaves a mark outside the transaction, so an attempt that was rolled
    back still shows; slow, so the other openers arrive while it runs."""
    with open(path, "a") as marks:
        marks.write(f"{version}\n")
    time.sleep(0.2)
    apply(con)


def _racer(url: str, marks: str, idx: int, barrier: Any, results: Any) -> None:
    """Open the store (with the test migration, every step marked) at the others' moment."""
    try:
        steps = with_next()
        state.MIGRATIONS = tuple(
            Migration(
                m.version, m.description, functools.partial(_marked, marks, m.version, m.apply)
            )
            for m in steps
        )
        barrier.wait(DEADLINE)
        store = StateStore(url)
        version = store.schema_version()
        store.close()
        results.put((idx, version))
    except BaseException:
        results.put((idx, traceback.format_exc()))


def run_racers(url: str, marks: Path) -> list[tuple[int, Any]]:
    barrier = SPAWN.Barrier(RACERS)
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_racer, args=(url, str(marks), i, barrier, results), daemon=True)
        for i in range(RACERS)
    ]
    try:
        for p in procs:
            p.start()
        got: list[tuple[int, Any]] = []
        deadline = time.monotonic() + 2 * DEADLINE
        while len(got) < RACERS:
            try:
                got.append(results.get(timeout=0.1))
            except queue.Empty:
                if time.monotonic() > deadline:
                    pytest.fail(f"racers did not all report: {got}")
        for p in procs:
            p.join(DEADLINE)
        return got
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()


@pytest.mark.parametrize("start", ["fresh", "previous release", "latest"])
def test_processes_opening_one_store_at_once_apply_each_migration_once(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start: str
) -> None:
    if start == "previous release":
        previous_release_store(backend)
    elif start == "latest":
        backend.store().close()
    marks = tmp_path / "marks.txt"
    marks.touch()
    got = run_racers(backend.url, marks)
    assert sorted(got) == [(i, NEXT) for i in range(RACERS)], got
    applied = [int(line) for line in marks.read_text().split()]
    first = NEXT if start == "latest" else 1
    assert sorted(applied) == list(range(first, NEXT + 1))  # each once, none rolled back
    assert versions(backend) == list(range(1, NEXT + 1))
    assert "test_added" in columns(backend, "retl_runs")
    if start == "previous release":
        monkeypatch.setattr(state, "MIGRATIONS", with_next())
        store = backend.store()
        assert_previous_rows_kept(store)
        store.close()


def test_threads_opening_one_store_at_once_apply_each_migration_once(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(state, "MIGRATIONS", with_next(counted(calls, _next_migration)))
    barrier = threading.Barrier(RACERS)
    outcomes: list[Any] = []

    def opener() -> None:
        try:
            barrier.wait(DEADLINE)
            store = backend.store()
            outcomes.append(store.schema_version())
            store.close()
        except BaseException:
            outcomes.append(traceback.format_exc())

    threads = [threading.Thread(target=opener) for _ in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert outcomes == [NEXT] * RACERS, outcomes
    assert calls == [1]
    assert versions(backend) == list(range(1, NEXT + 1))


def test_sqlite_keyed_tables_are_clustered_with_their_rows_kept(tmp_path: Path) -> None:
    """Migration 8 rebuilds problems, consent read back and the retry queue WITHOUT ROWID on
    SQLite (one B-tree per table instead of two); a store at version 7 keeps its rows, and a
    fresh store gets the same tables."""
    old = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    assert migrate(old, RELEASED[:7]) == 7
    with old.begin() as con:
        con.exec_driver_sql(
            "INSERT INTO retl_problems VALUES ('s', 'k1', 'invalid_email', 'email', 'r1', "
            "'2025-03-01 10:00:00', 'r1')"
        )
        con.exec_driver_sql(
            "INSERT INTO retl_retry_queue VALUES ('s', 'o-1', 'missing_parent', 2, "
            "'2025-03-01 10:00:00', 'r1')"
        )
    assert migrate(old) == latest_schema_version()

    def clustered(engine: sa.Engine) -> dict[str, bool]:
        with engine.connect() as con:
            rows = con.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE name IN "
                "('retl_problems', 'retl_consent_seen', 'retl_retry_queue', 'retl_runs')"
            ).all()
        return {name: sql.rstrip().upper().endswith("WITHOUT ROWID") for name, sql in rows}

    want = {
        "retl_problems": True,
        "retl_consent_seen": True,
        "retl_retry_queue": True,
        "retl_runs": False,
    }
    assert clustered(old) == want
    store = StateStore(f"sqlite:///{tmp_path / 'old.db'}")
    assert store.see_problems("s", "r2", {"k1": ("invalid_email", "email")}) == {"k1": "r1"}
    with store.engine.connect() as con:
        assert con.exec_driver_sql("SELECT identifier, attempts FROM retl_retry_queue").all() == [
            ("o-1", 2)
        ]
    store.close()
    old.dispose()
    fresh = StateStore(f"sqlite:///{tmp_path / 'fresh.db'}")
    assert clustered(fresh.engine) == want
    fresh.close()

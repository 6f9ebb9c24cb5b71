"""The per-sync lock under real concurrency, on SQLite and on PostgreSQL: stale-lock takeover by
racing processes, release of one's own run only, schema creation by simultaneous first runs,
runs killed with ``kill -9`` marked abandoned, and the heartbeat thread.

Races use OS processes (multiprocessing, spawn) lined up on a barrier. No test asserts a
duration: timers are short and conditions are polled with generous deadlines, so a loaded
machine only makes them slower.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import secrets
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reverse_etl.errors import LockHeldError
from reverse_etl.state import LockHandle, RunRecord, StateStore, locks, now

ROUNDS = 30  # racing rounds of the stale-takeover test, per backend
FIRST_RUNS = 8  # processes creating one fresh store at once
FIRST_RUN_ROUNDS = 4  # fresh stores they race to create, one after the other
DEADLINE = 60.0  # seconds; only ever a bound on waiting, never asserted as a speed
FAST = timedelta(milliseconds=20)  # heartbeat interval injected by the timer tests

SPAWN = mp.get_context("spawn")


@dataclass(frozen=True)
class Target:
    """A state store that does not exist yet: a SQLite file (and its directory) not yet
    created, or a PostgreSQL database with no tables."""

    url: str
    root: Path

    def store(self, **kwargs: Any) -> StateStore:
        return StateStore(self.url, root=self.root, **kwargs)

    def another(self, name: str) -> str:
        """The URL of one more store that does not exist yet: a new SQLite file, or an empty
        PostgreSQL schema that becomes the connection's search_path."""
        if self.url.startswith("sqlite"):
            return f"sqlite:///{name}/state.db"
        engine = sa.create_engine(self.url)
        with engine.begin() as con:
            con.execute(sa.text(f"CREATE SCHEMA {name}"))
        engine.dispose()
        return f"{self.url}?options=-csearch_path%3D{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "sqlite":
        yield Target("sqlite:///state/state.db", tmp_path)  # relative: the store makes state/
        return
    dsn: str = request.getfixturevalue("postgres_dsn")
    name = "retl_locks_" + secrets.token_hex(6)
    admin = sa.create_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as con:
            con.execute(sa.text(f"CREATE DATABASE {name}"))
        base = dsn.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0]
        yield Target(f"{base}/{name}", tmp_path)
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as con:
            con.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


# --------------------------------------------------------------------------- helpers


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


def lock_row(store: StateStore, sync: str) -> Any:
    with store.engine.connect() as con:
        return con.execute(sa.select(locks).where(locks.c.sync == sync)).first()


def plant_lock(
    store: StateStore, sync: str, run_id: str, beat: datetime, owner: str = "gone:1"
) -> None:
    """A lock as a process that died left it, with its run record still ``running``."""
    with store.engine.begin() as con:
        con.execute(
            sa.insert(locks).values(
                sync=sync, run_id=run_id, owner=owner, acquired_at=beat, heartbeat_at=beat
            )
        )
    store.start_run(RunRecord(run_id=run_id, sync=sync, started_at=beat, status="running"))


def aware(value: datetime) -> datetime:
    """SQLite hands timestamps back naive; they are stored as UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def take_over(store: StateStore, sync: str, run_id: str) -> None:
    """Take a lock whose holder still beats: with ``stale_after=0`` it is always stale, but a
    beat between our read and our swap makes the swap (rightly) fail, so try again."""

    def attempt() -> bool:
        try:
            store._acquire(sync, run_id)
        except LockHeldError:
            return False
        return True

    eventually(attempt, f"{run_id} to take over {sync}")


def beater_threads(sync: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"retl-heartbeat-{sync}"]


def run_processes(target: Callable[..., None], args: list[tuple[Any, ...]]) -> list[Any]:
    """Start one spawned process per args tuple (each gets a result queue last), return every
    result they put; stop any still running on the way out."""
    results = SPAWN.Queue()
    procs = [SPAWN.Process(target=target, args=(*a, results), daemon=True) for a in args]
    try:
        for p in procs:
            p.start()
        got: list[Any] = []
        deadline = time.monotonic() + 2 * DEADLINE
        while any(p.is_alive() for p in procs) or not results.empty():
            try:
                got.append(results.get(timeout=0.1))
            except queue.Empty:
                if time.monotonic() > deadline:
                    pytest.fail("worker processes did not finish")
        for p in procs:
            p.join(DEADLINE)
        assert [p.exitcode for p in procs] == [0] * len(procs), got
        return got
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()


# --------------------------------------------------------------------------- workers (spawned)


def _takeover_worker(
    url: str, root: Path, idx: int, rounds: int, barrier: Any, results: Any
) -> None:
    """Each round, race the other worker to take over that round's stale lock."""
    store = StateStore(url, root=root, stale_after=timedelta(hours=1))
    try:
        for r in range(rounds):
            barrier.wait(DEADLINE)
            try:
                store._acquire(f"race-{r}", f"w{idx}-{r}")  # the lock is kept: one sync a round
                results.put((r, idx, "acquired"))
            except LockHeldError:
                results.put((r, idx, "held"))
    except BaseException:
        results.put((-1, idx, traceback.format_exc()))
        raise
    finally:
        store.close()


def _first_run_worker(urls: list[str], root: Path, idx: int, barrier: Any, results: Any) -> None:
    """For each fresh store: create it at the same moment as the others, then use the lock."""
    for r, url in enumerate(urls):
        barrier.wait(DEADLINE)
        try:
            store = StateStore(url, root=root)
            with store.lock(f"own-{idx}", f"run-{idx}") as handle:
                assert store.heartbeat(handle.sync, handle.run_id)
            assert store.release(handle.sync, handle.run_id) is False  # already released
            store.close()
            results.put((r, idx, "ok"))
        except BaseException:
            results.put((r, idx, traceback.format_exc()))


def _holder_worker(url: str, root: Path, results: Any) -> None:
    """A run that takes the lock and then hangs until killed."""
    store = StateStore(url, root=root)
    store.start_run(RunRecord(run_id="doomed", sync="s", started_at=now(), status="running"))
    with store.lock("s", "doomed"):
        results.put(os.getpid())
        time.sleep(3600)


# --------------------------------------------------------------------------- takeover


def test_two_processes_never_both_take_over_one_stale_lock(target: Target) -> None:
    store = target.store()
    beat = now() - timedelta(hours=3)
    for r in range(ROUNDS):
        plant_lock(store, f"race-{r}", f"dead-{r}", beat)
    barrier = SPAWN.Barrier(2)
    got = run_processes(
        _takeover_worker, [(target.url, target.root, i, ROUNDS, barrier) for i in range(2)]
    )
    outcomes: dict[int, dict[int, str]] = {}
    for r, idx, outcome in got:
        assert r >= 0, outcome  # a worker failed: its traceback
        outcomes.setdefault(r, {})[idx] = outcome
    assert sorted(outcomes) == list(range(ROUNDS))
    for r, by_worker in outcomes.items():
        assert sorted(by_worker.values()) == ["acquired", "held"], (r, by_worker)
        winner = next(i for i, o in by_worker.items() if o == "acquired")
        assert lock_row(store, f"race-{r}").run_id == f"w{winner}-{r}"
    dead = {rec.run_id: rec.status for rec in store.last_runs(limit=ROUNDS)}
    assert dead == {f"dead-{r}": "abandoned" for r in range(ROUNDS)}
    store.close()


def test_a_fresh_lock_is_never_taken_over(target: Target) -> None:
    store = target.store()
    other = target.store()
    with store.lock("s", "live"):
        with pytest.raises(LockHeldError, match="already running") as exc:
            other._acquire("s", "other")
        assert "run live on" in str(exc.value) and "reverse-etl unlock s" in str(exc.value)
    store.close()
    other.close()


# --------------------------------------------------------------------------- release


def test_release_and_unlock_remove_only_the_given_run(target: Target) -> None:
    store = target.store()
    store._acquire("s", "mine")
    assert store.release("s", "someone-else") is False
    assert store.unlock("s", run_id="someone-else") is False
    assert lock_row(store, "s").run_id == "mine"
    assert store.release("s", "mine") is True
    assert lock_row(store, "s") is None
    store._acquire("s", "again")
    assert store.unlock("s") is True  # the CLI's escape hatch: whoever holds it
    assert store.unlock("s") is False
    store.close()


def test_a_run_whose_lock_was_taken_over_learns_it_and_leaves_the_new_lock(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="reverse_etl.state")
    old = target.store(heartbeat_every=FAST)
    new = target.store(stale_after=timedelta(0))
    with old.lock("s", "run-old") as handle:
        assert isinstance(handle, LockHandle) and handle.run_id == "run-old"
        assert not handle.lost
        take_over(new, "s", "run-new")  # e.g. the old run sat in a wait longer than stale_after
        eventually(lambda: handle.lost, "the old run's heartbeat to notice")
        # a lost lock is not beaten any more: the thread flags it, logs, then ends
        eventually(lambda: not beater_threads("s"), "the lost lock's heartbeat thread to end")
    assert lock_row(new, "s").run_id == "run-new"  # the old run's exit left it alone
    assert "run-old: lost its lock" in caplog.text
    old.close()
    new.close()


# --------------------------------------------------------------------------- schema


def test_first_runs_started_at_once_all_create_the_store(target: Target) -> None:
    urls = [target.another(f"fresh{r}") for r in range(FIRST_RUN_ROUNDS)]
    barrier = SPAWN.Barrier(FIRST_RUNS)
    got = run_processes(
        _first_run_worker, [(urls, target.root, i, barrier) for i in range(FIRST_RUNS)]
    )
    failed = [outcome for _r, _i, outcome in got if outcome != "ok"]
    assert not failed, failed[0]
    assert sorted(got) == [(r, i, "ok") for r in range(FIRST_RUN_ROUNDS) for i in range(FIRST_RUNS)]
    for url in urls:
        store = StateStore(url, root=target.root)
        with store.lock("shared", "after"):
            pass
        assert lock_row(store, "shared") is None
        tables = set(sa.inspect(store.engine).get_table_names())  # in the fresh schema
        assert tables == {
            "retl_locks",
            "retl_runs",
            "retl_schema_version",
            "retl_watermarks",
            "retl_consent_seen",
            "retl_consent_cursors",
            "retl_rate_budget",
            "retl_problems",
            "retl_retry_queue",
            "retl_sync_controls",
        }
        store.close()


# --------------------------------------------------------------------------- abandoned runs


def test_a_run_killed_with_kill_9_is_marked_abandoned_when_its_lock_is_taken_over(
    target: Target,
) -> None:
    store = target.store(stale_after=timedelta(0))  # anything not beaten this instant is stale
    results = SPAWN.Queue()
    proc = SPAWN.Process(target=_holder_worker, args=(target.url, target.root, results))
    proc.start()
    try:
        pid = results.get(timeout=DEADLINE)
        os.kill(pid, signal.SIGKILL)
        proc.join(DEADLINE)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        results.close()
    (doomed,) = store.last_runs("s")
    assert doomed.status == "running"  # nobody knows yet
    beat = lock_row(store, "s").heartbeat_at
    with store.lock("s", "next"):
        pass
    (doomed,) = store.last_runs("s")
    assert doomed.status == "abandoned"
    assert doomed.ended_at == aware(beat)
    assert doomed.message == (
        f"abandoned: the process stopped heartbeating at {doomed.ended_at:%Y-%m-%d %H:%M:%S} "
        "UTC (killed or lost); a later run took over its lock"
    )
    store.close()


def a_dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_lock_of_a_process_killed_on_this_host_is_taken_over_without_waiting_hours(
    target: Target,
) -> None:
    """A scheduler killed with SIGKILL and restarted found its sync "already running" for
    ``stale_after`` (two hours by default). A holder on this host whose process is gone and
    that missed two heartbeats is taken over at once; a live holder, or a dead one whose last
    beat is too recent to be sure, is not."""
    store = target.store()  # the default stale_after: two hours; beats every minute
    missed = now() - 3 * store.heartbeat_every
    host = socket.gethostname()
    plant_lock(store, "live", "alive", missed, owner=f"{host}:{os.getpid()}")
    plant_lock(store, "recent", "just-killed", now(), owner=f"{host}:{a_dead_pid()}")
    plant_lock(store, "elsewhere", "other-host", missed, owner=f"not-{host}:{a_dead_pid()}")
    plant_lock(store, "killed", "killed", missed, owner=f"{host}:{a_dead_pid()}")
    for sync in ("live", "recent", "elsewhere"):
        with pytest.raises(LockHeldError, match="already running"):
            store._acquire(sync, "next")
    with store.lock("killed", "next"):
        assert lock_row(store, "killed").run_id == "next"
    (killed,) = store.last_runs("killed")
    assert killed.status == "abandoned" and killed.ended_at == aware(missed)
    assert [store.last_runs(s)[0].status for s in ("live", "recent", "elsewhere")] == [
        "running"
    ] * 3
    store.close()


def test_only_a_run_still_running_is_marked_abandoned(target: Target) -> None:
    store = target.store()
    beat = now() - timedelta(hours=3)
    plant_lock(store, "s", "finished", beat)
    record = store.last_runs("s")[0]
    record.status, record.ended_at, record.message = "success", beat, None
    store.save_run(record)  # it ended, but its lock row was left behind
    with store.lock("s", "next"):
        pass
    (finished,) = store.last_runs("s")
    assert (finished.status, finished.message) == ("success", None)
    store.close()


# --------------------------------------------------------------------------- heartbeat thread


def test_the_lock_heartbeats_on_a_timer_until_released(target: Target) -> None:
    store = target.store(heartbeat_every=FAST)
    with store.lock("s", "run-1") as handle:
        assert len(beater_threads("s")) == 1
        first = lock_row(store, "s").heartbeat_at
        eventually(lambda: lock_row(store, "s").heartbeat_at != first, "a timer heartbeat")
        second = lock_row(store, "s").heartbeat_at
        eventually(lambda: lock_row(store, "s").heartbeat_at != second, "another heartbeat")
        assert not handle.lost
    assert not beater_threads("s")  # stopped and joined on release
    assert lock_row(store, "s") is None
    store.close()


def test_a_failing_heartbeat_is_logged_and_retried_never_raised(
    target: Target, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="reverse_etl.state")
    store = target.store(heartbeat_every=FAST)
    real = store.heartbeat
    calls: list[int] = []

    def flaky(sync: str, run_id: str) -> bool:
        calls.append(1)
        if len(calls) <= 3:
            raise sa.exc.OperationalError("UPDATE retl_locks", {}, Exception("server went away"))
        return real(sync, run_id)

    monkeypatch.setattr(store, "heartbeat", flaky)
    with store.lock("s", "run-1") as handle:
        first = lock_row(store, "s").heartbeat_at
        eventually(lambda: lock_row(store, "s").heartbeat_at != first, "a beat after failures")
        assert len(calls) > 3 and not handle.lost
        assert len(beater_threads("s")) == 1  # the thread survived
    assert caplog.text.count("lock heartbeat failed") == 3
    assert "server went away" in caplog.text
    store.close()


def test_the_heartbeat_interval_defaults_from_stale_after(tmp_path: Path) -> None:
    def every(**kwargs: Any) -> timedelta:
        store = StateStore("sqlite:///state.db", root=tmp_path, **kwargs)
        store.close()
        return store.heartbeat_every

    assert every() == timedelta(seconds=60)  # default stale_after: 2 h
    assert every(stale_after=timedelta(minutes=1)) == timedelta(seconds=10)
    assert every(stale_after=timedelta(0)) > timedelta(0)  # never a busy loop
    assert every(heartbeat_every=FAST) == FAST
    with pytest.raises(ValueError, match="heartbeat_every"):
        every(heartbeat_every=timedelta(0))

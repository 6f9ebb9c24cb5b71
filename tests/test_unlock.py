"""``reverse-etl unlock`` never steals a lock from a live run: a lock whose holder still
heartbeats is refused (naming who holds it) unless ``--force``; a stale one is released and its
run marked abandoned. Against one PostgreSQL store, two processes never hold one sync at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from reverse_etl.cli import main
from reverse_etl.errors import LockHeldError
from reverse_etl.state import RunRecord, StateStore, locks, now
from tests.helpers import API_KEY_ENV, people_db, project_data, write_project

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REVERSE_ETL_CONFIG", "REVERSE_ETL_PROJECT_DIR", "REVERSE_ETL_STATE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(API_KEY_ENV, raising=False)


def cli(root: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--project-dir", str(root), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def flat(text: str) -> str:
    return " ".join(text.split())


def age(store: StateStore, sync: str, hours: float) -> None:
    """Move the lock's heartbeat into the past, as a holder that died then would leave it."""
    with store.engine.begin() as con:
        con.execute(
            sa.update(locks)
            .where(locks.c.sync == sync)
            .values(heartbeat_at=now() - timedelta(hours=hours))
        )


def test_unlock_refuses_a_live_holder_and_releases_a_stale_one(tmp_path: Path) -> None:
    people_db(tmp_path, [])
    write_project(tmp_path, project_data())
    store = StateStore("sqlite:///state/state.db", root=tmp_path)
    try:
        store.start_run(RunRecord("run-live", "people", now(), "running"))
        with store.lock("people", "run-live") as handle:
            refused = cli(tmp_path, "unlock", "people")
            err = flat(refused.stderr)
            assert refused.exit_code == 3
            assert "held by a live run: run run-live on " + store.owner in err
            assert "since" in err and "last heartbeat" in err and "--force" in err
            assert store.lock_info("people").run_id == "run-live"  # still ours
            status = cli(tmp_path, "status")
            assert "people: locked by run run-live on " + store.owner in flat(status.stdout)
            assert cli(tmp_path, "status", "--json").stdout.count('"stale": false') == 1
            assert not handle.lost

            age(store, "people", hours=3)  # the holder stopped beating long ago
            released = cli(tmp_path, "unlock", "people")
            assert released.exit_code == 0
            assert "people: lock released (stale: held by run run-live" in flat(released.stdout)
            assert store.lock_info("people") is None
            assert not store.heartbeat("people", "run-live")  # the holder learns it lost it
        (record,) = store.last_runs("people")
        assert record.status == "abandoned" and "unlock" in (record.message or "")
        assert "was not locked" in cli(tmp_path, "unlock", "people").stdout

        with store.lock("people", "run-forced"):
            forced = cli(tmp_path, "unlock", "people", "--force")
            assert forced.exit_code == 0 and "forced" in forced.stdout
            assert store.lock_info("people") is None
    finally:
        store.close()


# --------------------------------------------------------------------------- two processes

HOLDER = textwrap.dedent(
    """
    import sys
    from datetime import timedelta
    from reverse_etl.state import StateStore

    store = StateStore(sys.argv[1], heartbeat_every=timedelta(milliseconds=100))
    with store.lock(sys.argv[2], sys.argv[3]):
        print("locked", flush=True)
        sys.stdin.readline()  # hold it until told to stop
    store.close()
    print("released", flush=True)
    """
)

WORKER = textwrap.dedent(
    """
    import sys, time
    import sqlalchemy as sa
    from datetime import timedelta
    from reverse_etl.errors import LockHeldError
    from reverse_etl.state import StateStore

    url, sync, name, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = StateStore(url, heartbeat_every=timedelta(milliseconds=50))
    done = refused = 0
    while done < rounds:
        try:
            with store.lock(sync, f"{name}-{done}"):
                with store.engine.begin() as con:  # how many runs of the sync are inside now
                    inside = con.execute(sa.text(
                        "UPDATE retl_test_inside SET n = n + 1, top = GREATEST(top, n + 1) "
                        "RETURNING n")).scalar()
                time.sleep(0.05)  # as a run sending batches would
                with store.engine.begin() as con:
                    con.execute(sa.text("UPDATE retl_test_inside SET n = n - 1"))
                done += 1
        except LockHeldError:
            refused += 1
            time.sleep(0.005)
    store.close()
    print(done, refused, flush=True)
    """
)


def _python(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


@pytest.fixture()
def pg_url(postgres_dsn: str) -> Iterator[str]:
    url = postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(url)
    with engine.begin() as con:
        if sa.inspect(con).has_table("retl_locks"):  # a lock left by an earlier test
            con.execute(sa.delete(locks))
        con.execute(sa.text("DROP TABLE IF EXISTS retl_test_inside"))
        con.execute(sa.text("CREATE TABLE retl_test_inside (n INT NOT NULL, top INT NOT NULL)"))
        con.execute(sa.text("INSERT INTO retl_test_inside VALUES (0, 0)"))
    yield url
    with engine.begin() as con:
        con.execute(sa.text("DROP TABLE IF EXISTS retl_test_inside"))
    engine.dispose()


@pytest.mark.postgres
def test_two_processes_never_hold_one_sync_at_once(pg_url: str) -> None:
    rounds = 6
    workers = [_python(WORKER, pg_url, "people", name, str(rounds)) for name in ("a", "b")]
    outputs = []
    for proc in workers:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append([int(x) for x in out.split()])
    assert [done for done, _ in outputs] == [rounds, rounds]  # each ran every round ...
    engine = sa.create_engine(pg_url)
    with engine.connect() as con:
        n, top = con.execute(sa.text("SELECT n, top FROM retl_test_inside")).one()
    engine.dispose()
    assert (n, top) == (0, 1)  # ... and never two of them inside at once


@pytest.mark.postgres
def test_unlock_refuses_while_the_holder_process_lives(tmp_path: Path, pg_url: str) -> None:
    people_db(tmp_path, [])
    write_project(tmp_path, project_data(state_url=pg_url))
    holder = _python(HOLDER, pg_url, "people", "holder-run")
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked", holder.stderr
        store = StateStore(pg_url)
        try:
            with pytest.raises(LockHeldError, match="holder-run"), store.lock("people", "second"):
                pass  # the second run of the sync never starts
            refused = cli(tmp_path, "unlock", "people")
            assert refused.exit_code == 3
            err = flat(refused.stderr)
            assert f"run holder-run on {store.owner.split(':')[0]}:{holder.pid}" in err
            assert store.lock_info("people").run_id == "holder-run"  # not stolen
            holder.stdin.write("stop\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "released"
            assert holder.wait(timeout=30) == 0
            assert "people: was not locked" in cli(tmp_path, "unlock", "people").stdout
            with store.lock("people", "second"):  # now the sync is free to run
                pass
        finally:
            store.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_unlock_releases_the_lock_of_a_run_killed_on_this_host(tmp_path: Path) -> None:
    """``kill -9`` of a run, then ``unlock`` as the refusal message says: the holder's pid is
    gone from this host, so once it missed two heartbeats (a live holder anywhere would have
    sent them) the lock is released, without waiting the two hours of staleness. Just after
    the kill it says when to try again; a live pid with the same old heartbeat is refused."""
    people_db(tmp_path, [])
    write_project(tmp_path, project_data())
    store = StateStore("sqlite:///state/state.db", root=tmp_path)  # creates the folder
    url = f"sqlite:///{tmp_path / 'state' / 'state.db'}"
    holder = _python(HOLDER, url, "people", "killed-run")
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked", holder.stderr
        store.start_run(RunRecord("killed-run", "people", now(), "running"))
        holder.kill()
        holder.wait(timeout=30)
        soon = cli(tmp_path, "unlock", "people")
        assert soon.exit_code == 3
        assert "a process no longer running on this host" in flat(soon.stderr)
        assert "again after" in flat(soon.stderr)

        age(store, "people", hours=0.05)  # three minutes without a beat: two missed
        released = cli(tmp_path, "unlock", "people")
        assert released.exit_code == 0, released.stderr
        assert "people: lock released" in released.stdout
        assert store.lock_info("people") is None
        (record,) = store.last_runs("people")
        assert record.status == "abandoned"
        assert "no longer running on this host" in (record.message or "")

        # the same old heartbeat from a process that is alive (this one) is a live holder
        with store.engine.begin() as con:
            con.execute(
                sa.insert(locks).values(
                    sync="people",
                    run_id="alive-run",
                    owner=store.owner,
                    acquired_at=now(),
                    heartbeat_at=now() - timedelta(minutes=3),
                )
            )
        alive = cli(tmp_path, "unlock", "people")
        assert alive.exit_code == 3 and "held by a live run" in flat(alive.stderr)
        assert store.lock_info("people").run_id == "alive-run"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        store.close()

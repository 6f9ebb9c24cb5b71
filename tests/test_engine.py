"""run_sync end to end against DuckDB and an in-memory destination: watermarks, resume after a
failure, dry runs, full refreshes, counts, run records, locks and exit codes."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import duckdb
import orjson
import pytest
import sqlalchemy as sa

from reverse_etl.config import Project, load_project
from reverse_etl.engine import RunOptions, RunResult, due_syncs, run_sync
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, EXIT_ROW_ERRORS, LockHeldError
from reverse_etl.state import StateStore, Watermark, locks, now
from reverse_etl.transform.transformer import Transformer
from tests.helpers import (
    FakeDestination,
    at,
    execute,
    people_db,
    person,
    project_data,
    read_csv_rows,
    sync_entry,
    write_project,
)

# Every engine test runs against a destination that keeps two batches in flight: a batch
# is acknowledged only after the next two were pulled, as the real clients do.
LAG = 2


class Env:
    """A project in tmp_path: warehouse, project file, state store and one fake destination."""

    def __init__(self, root: Path, rows, *, syncs=None, **data):
        self.root = root
        self.db = people_db(root, rows)
        write_project(root, project_data(syncs=syncs, **data))
        self.project: Project = load_project(None, root, env={})
        self.store = StateStore(self.project.state.url, root=root)
        self.fake = FakeDestination(lag=LAG)

    def run(
        self, sync: str = "people", fake: FakeDestination | None = None, **options
    ) -> RunResult:
        dest = fake or self.fake
        return run_sync(
            self.project,
            sync,
            self.store,
            RunOptions(**options),
            destination_factory=lambda project, s: dest,
        )

    def watermark(self, sync: str = "people") -> Watermark | None:
        return self.store.watermark(sync)

    def plant_lock(self, run_id: str, owner: str, age: timedelta) -> None:
        """A lock on ``people`` as another process left it, last heartbeat ``age`` ago."""
        beat = now() - age
        with self.store.engine.begin() as con:
            con.execute(
                sa.insert(locks).values(
                    sync="people", run_id=run_id, owner=owner, acquired_at=beat, heartbeat_at=beat
                )
            )


@pytest.fixture()
def make_env(tmp_path: Path):
    envs: list[Env] = []

    def make(rows, **kw) -> Env:
        env = Env(tmp_path, rows, **kw)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.store.close()


def email(n: int) -> str:
    return f"person{n:05d}@example.com"


def clean(n: int, batch_size: int = 10, **kw):
    rows = [person(i) for i in range(n)]
    return rows, [sync_entry(batch_size=batch_size, **kw)]


# --------------------------------------------------------------------------- incremental


def test_first_run_sends_everything_and_sets_the_watermark(make_env) -> None:
    rows, syncs = clean(25)
    env = make_env(rows, syncs=syncs)
    result = env.run()
    assert result.exit_code == EXIT_OK
    rec = result.record
    assert rec.status == "success"
    assert sorted(env.fake.received_ids()) == [email(i) for i in range(25)]
    assert env.fake.batches == [10, 10, 5]
    assert env.fake.prepared == 1 and env.fake.closed == 1
    assert env.watermark() == Watermark(at(24), email(24))
    c = rec.counts
    assert (c.read, c.sent, c.created, c.updated, c.rejected, c.failed) == (25, 25, 25, 0, 0, 0)
    # payload: normalised fields and canonical consent
    first = next(r for r in env.fake.received if r["__id"] == email(0))
    assert first["first_name"] == "Name0"
    assert first["consent.email"] == "subscribed"
    # run record
    [saved] = env.store.last_runs("people")
    assert saved.run_id == rec.run_id
    assert saved.status == "success"
    assert saved.counts == c
    assert saved.ended_at is not None and saved.ended_at >= saved.started_at
    assert saved.error_file == rec.error_file
    assert Path(saved.error_file).is_file()
    assert Path(saved.error_file).parent == env.root / "errors" / "people"
    assert read_csv_rows(saved.error_file) == []  # header only


def test_second_run_sends_nothing(make_env) -> None:
    rows, syncs = clean(25)
    env = make_env(rows, syncs=syncs)
    env.run()
    mark = env.watermark()
    result = env.run()
    assert result.exit_code == EXIT_OK
    assert result.record.status == "success"
    assert result.record.counts.read == 0
    assert result.record.counts.sent == 0
    assert len(env.fake.received) == 25
    assert env.watermark() == mark
    assert len(env.store.last_runs("people")) == 2


def test_changed_rows_are_sent_alone(make_env) -> None:
    rows, syncs = clean(25)
    env = make_env(rows, syncs=syncs)
    env.run()
    later = at(1000).isoformat()
    execute(
        env.db,
        f"UPDATE people SET first_name = 'Changed', modified_at = TIMESTAMPTZ '{later}' "
        f"WHERE email IN ('{email(3)}', '{email(11)}', '{email(20)}')",
    )
    result = env.run()
    new = env.fake.received[25:]
    assert sorted(r["__id"] for r in new) == [email(3), email(11), email(20)]
    assert {r["first_name"] for r in new} == {"Changed"}
    c = result.record.counts
    assert (c.read, c.sent, c.created, c.updated) == (3, 3, 0, 3)
    assert env.watermark() == Watermark(at(1000), email(20))


def test_full_refresh_ignores_the_watermark(make_env) -> None:
    rows, syncs = clean(25)
    env = make_env(rows, syncs=syncs)
    env.run()
    result = env.run(full_refresh=True)
    assert result.record.full_refresh is True
    assert env.store.last_runs("people")[0].full_refresh is True
    assert result.record.counts.read == 25
    # read again, but the destination holds every row as it is: nothing is sent ...
    assert result.record.counts.unchanged == 25 and result.record.counts.sent == 0
    assert env.fake.received_ids()[25:] == []
    # ... unless --resend asks for it
    result = env.run(full_refresh=True, resend=True)
    assert result.record.counts.read == 25 and result.record.counts.unchanged == 0
    assert sorted(env.fake.received_ids()[25:]) == [email(i) for i in range(25)]
    assert result.record.counts.updated == 25
    assert env.watermark() == Watermark(at(24), email(24))


# --------------------------------------------------------------------------- failures and resume


@pytest.mark.parametrize("record_failed_batch", [True, False])
def test_resume_after_a_destination_failure_mid_run(make_env, record_failed_batch: bool) -> None:
    rows, syncs = clean(70)
    env = make_env(rows, syncs=syncs)
    env.fake.fail_on_batch = 5  # batches 3 and 4 are in flight, never acknowledged
    env.fake.record_failed_batch = record_failed_batch
    failed = env.run()
    assert failed.exit_code == EXIT_FAILED
    assert failed.record.status == "failed"
    assert "fake API gave up on batch 5" in failed.record.message
    # the watermark is the last row of the last acknowledged batch, never past it
    assert env.watermark() == Watermark(at(19), email(19))
    saved = env.store.last_runs("people")[0]
    assert saved.status == "failed"
    assert saved.message == failed.record.message
    assert saved.counts.sent == 20
    assert saved.error_file is not None and Path(saved.error_file).is_file()

    env.fake.fail_on_batch = None
    resumed = env.run()
    assert resumed.exit_code == EXIT_OK
    assert resumed.record.status == "success"
    assert resumed.record.counts.read == 50
    assert env.watermark() == Watermark(at(69), email(69))
    received = env.fake.received_ids()
    assert set(received) == {email(i) for i in range(70)}  # no row lost
    twice = {e for e in received if received.count(e) > 1}
    in_flight = range(20, 50) if record_failed_batch else range(20, 40)
    assert twice == {email(i) for i in in_flight}  # only unacknowledged batches go again
    assert env.run().record.counts.read == 0


def test_failure_on_the_first_batch_leaves_no_watermark(make_env) -> None:
    rows, syncs = clean(15)
    env = make_env(rows, syncs=syncs)
    env.fake.fail_on_batch = 1
    assert env.run().exit_code == EXIT_FAILED
    assert env.watermark() is None
    env.fake.fail_on_batch = None
    assert env.run().record.counts.read == 15
    assert set(env.fake.received_ids()) == {email(i) for i in range(15)}


def test_transformer_is_closed_by_the_thread_that_uses_it_on_failure(make_env, monkeypatch) -> None:
    """The read-ahead thread reads and transforms; it closes its transformer itself when the
    run stops, so no other thread can close it under a batch being transformed."""
    rows, syncs = clean(80)
    env = make_env(rows, syncs=syncs)
    env.fake.fail_on_batch = 1
    env.fake.drain_on_failure = False  # fail at once, with later batches still being read
    closed_by: list[str] = []
    original = Transformer.close

    def close(self) -> None:
        closed_by.append(threading.current_thread().name)
        original(self)

    monkeypatch.setattr(Transformer, "close", close)
    try:
        result = env.run()
    except duckdb.Error as exc:  # the race, when it is lost
        pytest.fail(f"the run crashed instead of failing cleanly: {exc!r}")
    assert result.exit_code == EXIT_FAILED
    assert closed_by == ["reverse-etl-prefetch"]


def test_rows_rejected_before_a_failure_are_in_the_error_file(make_env) -> None:
    rows = [person(i, email="broken" if i == 2 else None) for i in range(30)]
    env = make_env(rows, syncs=[sync_entry(batch_size=10)])
    env.fake.fail_on_batch = 2
    result = env.run()
    assert result.record.status == "failed"
    assert result.exit_code == EXIT_FAILED
    errors = read_csv_rows(result.record.error_file)
    rejected = [(e["row_number"], e["reason"]) for e in errors if e["reason"] != "not_sent"]
    assert rejected == [("3", "invalid_email")]
    # the batches handed over but never acknowledged are named too: they are sent next run
    unsent = sorted(int(e["row_number"]) for e in errors if e["reason"] == "not_sent")
    assert unsent == [n for n in range(1, 31) if n != 3]


# --------------------------------------------------------------------------- row problems


def test_rejected_rows_exit_1_and_go_to_the_error_file(make_env) -> None:
    rows = [person(i) for i in range(20)]
    rows[4] = person(4, email="not-an-email")
    rows[7] = person(7, consent="maybe")
    rows[9] = person(9, phone="12345")
    rows.append(person(99, modified_at=None))  # no cursor: reported every run
    env = make_env(rows, syncs=[sync_entry(batch_size=8)])
    result = env.run()
    assert result.exit_code == EXIT_ROW_ERRORS
    rec = result.record
    assert rec.status == "partial"
    c = rec.counts
    assert c.read == 21
    assert c.rejected == 4
    assert c.read == c.sent + c.rejected
    assert c.sent == c.created + c.updated + c.failed
    assert email(7) not in env.fake.received_ids()
    assert result.by_reason == {
        "invalid_email": 1,
        "invalid_consent": 1,
        "invalid_phone": 1,
        "missing_cursor": 1,
    }
    errors = read_csv_rows(rec.error_file)
    by_reason = {e["reason"]: e for e in errors}
    assert by_reason["invalid_email"]["identifier"] == "not-an-email"
    assert by_reason["invalid_consent"]["value"] == "maybe"
    assert by_reason["invalid_consent"]["identifier"] == email(7)
    assert by_reason["invalid_phone"]["column"] == "phone"
    assert by_reason["missing_cursor"]["identifier"] == email(99)
    assert all(e["sync"] == "people" and e["run_id"] == rec.run_id for e in errors)
    assert env.store.last_runs("people")[0].error_file == rec.error_file
    assert env.watermark() == Watermark(at(19), email(19))
    # the cursor-less row comes back (and is reported) every run
    again = env.run()
    assert again.record.counts.read == 1
    assert again.by_reason == {"missing_cursor": 1}
    # ... as a known problem: a warning, not a failed run (issue: red once, not every hour)
    assert again.record.counts.known_problems == 1
    assert again.exit_code == EXIT_OK


def test_destination_failed_rows_are_counted_and_reported(make_env) -> None:
    rows, syncs = clean(12, batch_size=5)
    env = make_env(rows, syncs=syncs)
    env.fake.reject_ids = {email(1), email(8)}
    result = env.run()
    assert result.exit_code == EXIT_ROW_ERRORS
    c = result.record.counts
    assert result.record.status == "partial"
    assert (c.read, c.sent, c.created, c.updated, c.failed, c.rejected) == (12, 12, 10, 0, 2, 0)
    assert c.sent == c.created + c.updated + c.failed
    errors = read_csv_rows(result.record.error_file)
    assert sorted(e["identifier"] for e in errors) == [email(1), email(8)]
    assert {e["reason"] for e in errors} == {"destination_rejected"}
    assert all(e["message"] == "Fake: this profile is refused" for e in errors)
    # the run still finished: the watermark covers the failed rows too
    assert env.watermark() == Watermark(at(11), email(11))


def test_duplicate_identifiers_only_the_latest_is_sent(make_env) -> None:
    rows = [person(i) for i in range(5)]
    rows.append(person(10, email=" Person00001@Example.com", first_name="Newer"))
    env = make_env(rows, syncs=[sync_entry(batch_size=3)])
    result = env.run()
    received = env.fake.received
    ones = [r for r in received if r["__id"] == email(1)]
    assert [r["first_name"] for r in ones] == ["Newer"]
    assert result.by_reason == {"duplicate_identifier": 1}
    [error] = read_csv_rows(result.record.error_file)
    assert error["identifier"] == email(1)
    assert error["row_number"] == "2"


def test_exact_duplicate_rows_are_sent_once(make_env) -> None:
    rows = [person(i) for i in range(3)]
    rows.append(person(1, first_name="Twin"))  # same email, same modified_at as person(1)
    env = make_env(rows, syncs=[sync_entry(batch_size=10)])
    result = env.run()
    assert env.fake.received_ids().count(email(1)) == 1
    assert result.by_reason == {"duplicate_identifier": 1}


# --------------------------------------------------------------------------- dry run


def test_dry_run_sends_nothing_moves_nothing_and_writes_payloads(make_env) -> None:
    rows, syncs = clean(25)
    rows.append(person(50, email="broken"))
    env = make_env(rows, syncs=syncs)
    result = env.run(dry_run=True)
    assert env.fake.received == []
    assert env.fake.prepared == 0
    assert env.watermark() is None
    assert result.record.status == "dry_run"
    assert env.store.last_runs("people")[0].status == "dry_run"
    assert result.dry_run_file is not None
    lines = [orjson.loads(x) for x in Path(result.dry_run_file).read_bytes().splitlines()]
    assert sum(line["rows"] for line in lines) == 25
    assert {line["method"] for line in lines} == {"POST"}
    sent_ids = sorted(p["__id"] for line in lines for p in line["body"])
    assert sent_ids == [email(i) for i in range(25)]
    assert result.record.counts.rejected == 1
    assert result.exit_code == EXIT_ROW_ERRORS
    # a dry run does not count as the schedule's last run, and a real run still sends all
    assert env.store.last_started("people") is None
    assert env.run().record.counts.sent == 25


def test_dry_run_file_option_is_honoured(make_env, tmp_path: Path) -> None:
    rows, syncs = clean(5)
    env = make_env(rows, syncs=syncs)
    target = tmp_path / "payloads" / "out.jsonl"
    result = env.run(dry_run=True, dry_run_file=str(target))
    assert result.dry_run_file == str(target)
    assert target.is_file()


# --------------------------------------------------------------------------- locks


def test_lock_refuses_a_concurrent_run_of_the_same_sync(make_env) -> None:
    rows, _ = clean(5)
    env = make_env(rows, syncs=[sync_entry(), sync_entry("people_copy")])
    with env.store.lock("people", "other-run-123"):
        with pytest.raises(LockHeldError) as info:
            env.run("people")
        message = str(info.value)
        assert "sync 'people' is already running" in message
        assert "other-run-123" in message
        assert env.store.owner in message
        assert "reverse-etl unlock people" in message
        assert env.fake.received == []
        assert env.store.last_runs("people") == []
        # another sync is not blocked
        other = env.run("people_copy")
        assert other.exit_code == EXIT_OK
        assert other.record.counts.sent == 5
    # released: the sync runs now
    assert env.run("people").record.counts.sent == 5


def test_a_stale_lock_is_taken_over(make_env) -> None:
    rows, syncs = clean(5)
    env = make_env(rows, syncs=syncs)
    env.plant_lock("dead-run", "gone:1", timedelta(hours=3))
    result = env.run()
    assert result.exit_code == EXIT_OK
    assert result.record.counts.sent == 5
    with env.store.engine.connect() as con:
        assert con.execute(sa.select(locks)).all() == []  # released after the run


def test_a_fresh_lock_of_another_process_is_not_taken_over(make_env) -> None:
    rows, syncs = clean(5)
    env = make_env(rows, syncs=syncs)
    env.plant_lock("live-run", "elsewhere:42", timedelta(minutes=5))
    with pytest.raises(LockHeldError, match="live-run on elsewhere:42"):
        env.run()
    assert env.store.unlock("people") is True
    assert env.store.unlock("people") is False
    assert env.run().exit_code == EXIT_OK


def test_lock_is_released_after_a_failed_run(make_env) -> None:
    rows, syncs = clean(15)
    env = make_env(rows, syncs=syncs)
    env.fake.fail_on_batch = 1
    assert env.run().exit_code == EXIT_FAILED
    env.fake.fail_on_batch = None
    assert env.run().exit_code == EXIT_OK


# --------------------------------------------------------------------------- could not run


def test_schema_mismatch_sends_nothing_and_exits_3(make_env) -> None:
    rows, _ = clean(5)
    entry = sync_entry(
        mapping={"email": "email", "first_name": "first_name", "loyalty": "properties.Loyalty"}
    )
    env = make_env(rows, syncs=[entry])
    result = env.run()
    assert result.exit_code == EXIT_FAILED
    assert result.record.status == "failed"
    assert "column 'loyalty' is not in the view" in result.record.message
    assert "nothing was sent" in result.record.message
    assert env.fake.received == [] and env.fake.prepared == 0
    assert env.watermark() is None
    assert env.store.last_runs("people")[0].status == "failed"


def test_missing_cursor_column_is_a_schema_mismatch(make_env) -> None:
    rows, _ = clean(3)
    env = make_env(rows, syncs=[sync_entry(cursor="updated_at")])
    result = env.run()
    assert result.exit_code == EXIT_FAILED
    assert "column 'updated_at' is not in the view" in result.record.message


def test_missing_warehouse_file_exits_3(make_env) -> None:
    rows, syncs = clean(3)
    env = make_env(rows, syncs=syncs)
    env.db.unlink()
    result = env.run()
    assert result.exit_code == EXIT_FAILED
    assert "does not exist" in result.record.message
    assert env.fake.received == []


def test_broken_view_sql_exits_3(make_env) -> None:
    rows, _ = clean(3)
    env = make_env(rows, syncs=[sync_entry(source={"connection": "warehouse", "table": "nope"})])
    result = env.run()
    assert result.exit_code == EXIT_FAILED
    assert "DuckDB could not run" in result.record.message


# --------------------------------------------------------------------------- schedules


def test_due_syncs_follow_schedules_and_last_runs(make_env) -> None:
    rows, _ = clean(3)
    env = make_env(
        rows,
        syncs=[
            sync_entry("hourly", schedule="hourly"),
            sync_entry("unscheduled"),
            sync_entry("disabled", schedule="hourly", enabled=False),
        ],
    )
    assert due_syncs(env.project, env.store) == ["hourly"]
    env.run("hourly")
    assert due_syncs(env.project, env.store) == []
    assert due_syncs(env.project, env.store, now() + timedelta(minutes=61)) == ["hourly"]


def test_an_interrupted_run_is_recorded_as_failed(make_env) -> None:
    rows = [person(i) for i in range(30)]
    env = make_env(rows, syncs=[sync_entry(batch_size=10)])

    original = env.fake.load

    def load(batches):
        for i, result in enumerate(original(batches)):
            if i == 1:  # Ctrl-C while the second batch is being sent
                raise KeyboardInterrupt
            yield result

    env.fake.load = load
    with pytest.raises(KeyboardInterrupt):
        env.run()
    run = env.store.last_runs("people", 1)[0]
    assert run.status == "failed"
    assert run.message == "KeyboardInterrupt"
    assert env.store.watermark("people") is not None  # the first batch stays acknowledged

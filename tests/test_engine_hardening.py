"""Defects found by kill, fault and hostile-input runs, through ``run_sync`` (not a copy of its
loop): in-flight batches and the watermark, ties across batches with a failure, late rows and
the lookback window, full refreshes that fail, NaN and future cursors, text cursors, a changed
cursor column, signals, locks taken over mid-run, and secrets in log records."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from reverse_etl.config import load_project
from reverse_etl.engine import RunOptions, RunResult, run_sync, view_problems
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, EXIT_ROW_ERRORS
from reverse_etl.interrupt import Interrupt
from reverse_etl.secrets import register_secret, scrub_log_records
from reverse_etl.sources import open_source
from reverse_etl.state import StateStore, Watermark
from tests.helpers import (
    FakeDestination,
    at,
    create_table,
    execute,
    people_db,
    person,
    project_data,
    read_csv_rows,
    sync_entry,
    write_project,
)
from tests.sandboxes import fast_clients


def run_sql(db: Path, sql: str, params: tuple[Any, ...]) -> None:
    con = duckdb.connect(str(db))
    try:
        con.execute(sql, list(params))
    finally:
        con.close()


def email(n: int) -> str:
    return f"person{n:05d}@example.com"


class Env:
    def __init__(self, root: Path, rows: list[tuple[Any, ...]] | None, **sync: Any):
        self.root = root
        if rows is not None:
            people_db(root, rows)
        write_project(root, project_data(syncs=[sync_entry(**sync)]))
        self.project = load_project(None, root, env={})
        self.store = StateStore(self.project.state.url, root=root)

    def run(self, fake: FakeDestination, **options: Any) -> RunResult:
        return run_sync(
            self.project,
            "people",
            self.store,
            RunOptions(**options),
            destination_factory=lambda project, s: fake,
        )

    def watermark(self) -> Watermark | None:
        return self.store.watermark("people")


@pytest.fixture()
def env(tmp_path: Path):
    made: list[Env] = []

    def make(rows: list[tuple[Any, ...]] | None, **sync: Any) -> Env:
        e = Env(tmp_path, rows, **sync)
        made.append(e)
        return e

    yield make
    for e in made:
        e.store.close()


# --------------------------------------------------------------------------- in flight


@pytest.mark.parametrize("lag", [1, 2, 3])
def test_watermark_never_passes_a_batch_still_in_flight(env, lag: int) -> None:
    e = env([person(i) for i in range(60)], batch_size=10)
    fake = FakeDestination(lag=lag, fail_on_batch=5, drain_on_failure=False)
    assert e.run(fake).exit_code == EXIT_FAILED
    acknowledged = 4 - lag  # batches 5-lag .. 4 were pulled but never acknowledged
    assert e.watermark() == (
        Watermark(at(acknowledged * 10 - 1), email(acknowledged * 10 - 1)) if acknowledged else None
    )
    rest = FakeDestination(lag=lag)
    assert e.run(rest).exit_code == EXIT_OK
    assert set(rest.received_ids()) == {email(i) for i in range(acknowledged * 10, 60)}


def test_results_out_of_order_stop_the_run_and_commit_nothing_past_them(env) -> None:
    e = env([person(i) for i in range(40)], batch_size=10)
    fake = FakeDestination(lag=1, swap_results=True)
    result = e.run(fake)
    assert result.exit_code == EXIT_FAILED
    assert "other than the oldest" in (result.record.message or "")
    assert e.watermark() is None
    again = FakeDestination(lag=1)
    e.run(again)
    assert set(again.received_ids()) == {email(i) for i in range(40)}


def test_ties_across_batch_boundaries_survive_a_failure(env) -> None:
    """Seven rows share each modified_at, batches hold five: every tie group straddles a
    boundary, and the run fails half way."""
    rows = [person(i, modified_at=at(i // 7)) for i in range(63)]
    e = env(rows, batch_size=5)
    first = FakeDestination(lag=2, fail_on_batch=7)
    assert e.run(first).exit_code == EXIT_FAILED
    # batches 1-4 acknowledged (5 and 6 in flight): the watermark sits inside a tie group
    assert e.watermark() == Watermark(at(2), email(19))
    second = FakeDestination(lag=2)
    assert e.run(second).exit_code == EXIT_OK
    assert set(second.received_ids()) == {email(i) for i in range(20, 63)}
    # nothing behind the watermark was sent again, nothing past it was skipped
    assert {email(i) for i in range(20)}.isdisjoint(second.received_ids())


def test_a_late_row_is_caught_only_through_the_lookback_window(env, tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    rows = [person(i, modified_at=now - timedelta(minutes=30 - i)) for i in range(10)]
    late = person(99, modified_at=now - timedelta(minutes=25))  # committed after the first run

    for lookback, caught in ((0, False), (60, True)):
        e = env(rows, lookback_minutes=lookback)
        e.store.reset_watermark("people")
        e.run(FakeDestination())
        run_sql(e.root / "warehouse.duckdb", "INSERT INTO people VALUES (?, ?, ?, ?, ?)", late)
        fake = FakeDestination()
        e.run(fake)
        assert (email(99) in fake.received_ids()) is caught
        e.store.close()


# --------------------------------------------------------------------------- full refresh


def test_failed_full_refresh_keeps_the_old_watermark(env) -> None:
    e = env([person(i) for i in range(30)], batch_size=10)
    e.run(FakeDestination())
    before = e.watermark()
    assert before == Watermark(at(29), email(29))
    # a wrong API key: the very first batch is refused
    failing = FakeDestination(fail_on_batch=1)
    assert e.run(failing, full_refresh=True, resend=True).exit_code == EXIT_FAILED
    assert e.watermark() == before
    nothing_new = FakeDestination()
    assert e.run(nothing_new).record.counts.read == 0  # not the whole view again


def test_full_refresh_replaces_the_watermark_once_its_first_batch_lands(env) -> None:
    e = env([person(i) for i in range(30)], batch_size=10)
    e.run(FakeDestination())
    fake = FakeDestination(fail_on_batch=3, drain_on_failure=False)
    assert e.run(fake, full_refresh=True, resend=True).exit_code == EXIT_FAILED
    assert e.watermark() == Watermark(at(19), email(19))  # rebuilt by the refresh's batches
    rest = FakeDestination()
    counts = e.run(rest).record.counts
    # the run goes on from the rebuilt watermark: rows 20-29 are read again, and the snapshot
    # (from the first run) says the destination holds them as they are
    assert (counts.read, counts.unchanged, counts.sent) == (10, 10, 0)
    assert rest.received_ids() == []


def test_dry_run_full_refresh_leaves_the_watermark_alone(env) -> None:
    e = env([person(i) for i in range(12)], batch_size=5)
    e.run(FakeDestination())
    before = e.watermark()
    result = e.run(FakeDestination(), full_refresh=True, dry_run=True)
    assert result.record.status == "dry_run" and result.record.counts.read == 12
    assert e.watermark() == before


# --------------------------------------------------------------------------- hostile values


def test_one_nan_is_a_row_error_and_the_good_rows_land(env, tmp_path: Path) -> None:
    execute(
        tmp_path / "warehouse.duckdb",
        "CREATE TABLE people (email VARCHAR, score DOUBLE, big HUGEINT, modified_at TIMESTAMPTZ)",
        f"INSERT INTO people VALUES ('{email(0)}', 1.5, {2**70}, '{at(0).isoformat()}'), "
        f"('{email(1)}', 'NaN', 1, '{at(1).isoformat()}'), "
        f"('{email(2)}', '-Infinity', 1, '{at(2).isoformat()}'), "
        f"('{email(3)}', 2.0, {-(2**70)}, '{at(3).isoformat()}')",
    )
    e = env(
        None,
        mapping={"email": "email", "score": "properties.Score", "big": "properties.Big"},
        consent=None,
        default_phone_region=None,
    )
    fake = FakeDestination(lag=1)
    result = e.run(fake)
    assert result.exit_code == EXIT_ROW_ERRORS and result.record.status == "partial"
    assert sorted(fake.received_ids()) == [email(0), email(3)]
    assert {r["__id"]: r["properties.Big"] for r in fake.received} == {
        email(0): 2**70,
        email(3): -(2**70),
    }
    errors = read_csv_rows(result.record.error_file)
    assert {(x["identifier"], x["column"], x["value"], x["reason"]) for x in errors} == {
        (email(1), "score", "NaN", "invalid_number"),
        (email(2), "score", "'-Infinity", "invalid_number"),  # neutralised for spreadsheets,
    }
    assert e.watermark() == Watermark(at(3), email(3))


def test_a_future_cursor_never_freezes_the_sync(env) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    rows = [person(i, modified_at=now - timedelta(hours=2, minutes=-i)) for i in range(5)]
    rows.append(person(50, modified_at=datetime(9999, 12, 31, tzinfo=UTC)))
    rows.append(person(51, modified_at=now + timedelta(days=365)))
    e = env(rows, batch_size=3)
    first = FakeDestination(lag=1)
    result = e.run(first)
    assert sorted(first.received_ids()) == [email(i) for i in range(5)]
    assert result.by_reason["cursor_in_future"] == 2
    assert e.watermark() == Watermark(rows[4][4], email(4))
    # a change made after the bad rows is still read by the next run
    run_sql(
        e.root / "warehouse.duckdb",
        "UPDATE people SET first_name = 'Changed', modified_at = ? WHERE email = ?",
        (now - timedelta(minutes=1), email(1)),
    )
    second = FakeDestination()
    again = e.run(second)
    assert second.received_ids() == [email(1)]
    assert again.by_reason["cursor_in_future"] == 2  # still reported, still held back


def test_a_text_cursor_is_refused_before_reading(env, tmp_path: Path) -> None:
    create_table(
        tmp_path / "warehouse.duckdb",
        "people",
        {"email": "VARCHAR", "modified_at": "VARCHAR"},
        [(email(0), "9"), (email(1), "10")],
    )
    e = env(None, mapping={"email": "email"}, consent=None, default_phone_region=None)
    fake = FakeDestination()
    result = e.run(fake)
    assert result.exit_code == EXIT_FAILED and fake.received == []
    message = result.record.message or ""
    assert "'people'" in message and "'modified_at'" in message and "CAST(" in message
    with open_source(e.project.connections["warehouse"], e.project) as source:  # type: ignore[arg-type]
        problems = view_problems(e.project, e.project.sync("people"), source)
    assert any("cursor column 'modified_at'" in p for p in problems)


def test_a_new_cursor_column_of_the_same_type_is_noticed_too(env, tmp_path: Path) -> None:
    e = env([person(i) for i in range(5)])
    e.run(FakeDestination())
    assert e.watermark().column == "modified_at"  # type: ignore[union-attr]
    execute(
        tmp_path / "warehouse.duckdb",
        "ALTER TABLE people ADD COLUMN updated_at TIMESTAMPTZ",
        "UPDATE people SET updated_at = modified_at",
    )
    e2 = Env(tmp_path, None, cursor="updated_at")
    result = e2.run(FakeDestination())
    e2.store.close()
    assert result.exit_code == EXIT_FAILED
    assert "'modified_at'" in (result.record.message or "")
    assert "--full-refresh" in (result.record.message or "")


def test_changing_the_cursor_column_says_what_to_run(env, tmp_path: Path) -> None:
    e = env([person(i) for i in range(5)])
    e.run(FakeDestination())
    execute(tmp_path / "warehouse.duckdb", "ALTER TABLE people ADD COLUMN version BIGINT")
    execute(tmp_path / "warehouse.duckdb", "UPDATE people SET version = 7")
    e2 = Env(tmp_path, None, cursor="version")
    result = e2.run(FakeDestination())
    e2.store.close()
    assert result.exit_code == EXIT_FAILED
    message = result.record.message or ""
    assert "'version'" in message and "reverse-etl run people --full-refresh" in message
    assert "Error" not in message.split(":")[0]  # the user's message, not a raw driver error


# --------------------------------------------------------------------------- signals, locks


class StopAfter(FakeDestination):
    """Asks the run to stop (as SIGTERM's handler does) once ``after`` batches were pulled."""

    def __init__(self, interrupt: Interrupt, after: int, **kw: Any):
        super().__init__(**kw)
        self.interrupt, self.after = interrupt, after

    def _accept(self, batches):  # type: ignore[no-untyped-def]
        for n, result in enumerate(super()._accept(batches), start=1):
            if n == self.after:
                self.interrupt.signum = 15  # what Interrupt.request records, minus the timer
            yield result


def test_a_stop_request_commits_what_is_in_flight_and_records_interrupted(env) -> None:
    e = env([person(i) for i in range(100)], batch_size=10)
    interrupt = Interrupt()
    fake = StopAfter(interrupt, after=3, lag=2)
    result = e.run(fake, interrupt=interrupt)
    rec = result.record
    assert rec.status == "interrupted" and "SIGTERM" in (rec.message or "")
    sent = len(fake.received_ids())
    # the batches handed before the stop were acknowledged; none read ahead was handed after
    # it (they were sent after SIGTERM, using up the grace period)
    assert sent == 30
    # every row read was sent, or is named in the error file as not sent (the read-ahead's)
    assert result.by_reason["not_sent"] == rec.counts.read - sent
    assert e.watermark() == Watermark(at(sent - 1), email(sent - 1))
    assert e.store.last_runs("people")[0].status == "interrupted"
    rest = FakeDestination()
    e.run(rest)
    assert set(rest.received_ids()) == {email(i) for i in range(sent, 100)}


def test_a_run_whose_lock_was_taken_over_does_not_release_the_new_holder(env) -> None:
    e = env([person(i) for i in range(30)], batch_size=10)
    other = StateStore(e.project.state.url, root=e.root)

    class TakenOver(FakeDestination):
        def _accept(self, batches):  # type: ignore[no-untyped-def]
            for n, result in enumerate(super()._accept(batches), start=1):
                if n == 3:  # another process decides the lock is stale and takes it
                    with other.engine.begin() as con:
                        con.exec_driver_sql(
                            "UPDATE retl_locks SET run_id = 'intruder', owner = 'elsewhere'"
                        )
                yield result

    result = e.run(TakenOver(lag=1))
    with other.engine.connect() as con:
        holders = con.exec_driver_sql("SELECT run_id FROM retl_locks").fetchall()
    other.close()
    assert holders == [("intruder",)]
    # it stopped committing the moment it knew: two runs never move one watermark
    assert result.record.status == "failed" and "lost its lock" in (result.record.message or "")
    assert e.watermark() == Watermark(at(9), email(9))


def test_log_records_never_carry_a_secret(tmp_path: Path, caplog, monkeypatch) -> None:
    fast_clients(monkeypatch)
    secret = "pk_live_LOGCANARY_77a1"
    write_project(
        tmp_path,
        project_data(
            syncs=[sync_entry()],
            connections={
                "warehouse": {"type": "duckdb", "path": "warehouse.duckdb"},
                "klaviyo": {
                    "type": "klaviyo",
                    "api_key": "{{ env_var('CANARY_KEY') }}",
                    "base_url": "http://127.0.0.1:9",  # nothing listens: the call fails
                },
            },
        ),
    )
    people_db(tmp_path, [person(0)])
    project = load_project(None, tmp_path, env={"CANARY_KEY": secret})
    store = StateStore(project.state.url, root=tmp_path)
    logging.getLogger("reverse_etl").warning("key in use: %s", secret)
    with caplog.at_level(logging.DEBUG):
        result = run_sync(project, "people", store, RunOptions())
        # as a library logging a header after the run has started would
        logging.getLogger("httpx").debug("Authorization: Klaviyo-API-Key %s", secret)
    store.close()
    assert result.record.status == "failed"
    assert caplog.records, "the run logged nothing: the test would prove nothing"
    assert any("Klaviyo-API-Key ***" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert secret not in record.getMessage()
    assert secret not in caplog.text
    assert secret not in (result.record.message or "")


def test_scrubbed_records_keep_their_arguments_for_formatters_that_unpack_them() -> None:
    secret = "pk_live_ARGSHAPE_93c2"
    register_secret(secret)
    scrub_log_records()
    record = logging.getLogger("uvicorn.access").makeRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s"',
        ("1.2.3.4", "GET", f"/x?key={secret}"),
        None,
    )
    client, method, path = record.args  # type: ignore[misc]
    assert (client, method) == ("1.2.3.4", "GET") and secret not in path
    assert record.getMessage() == '1.2.3.4 - "GET /x?key=***"'

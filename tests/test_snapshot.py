"""The synced-state snapshot: a row the destination already holds as it is costs no API call,
whatever re-reads it (a lookback, a moved modified_at, a full refresh); a changed row, a
changed sync definition or --resend sends again; the snapshot only remembers what the
destination acknowledged, so nothing is lost after a failure at any point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

from reverse_etl.config import load_project
from reverse_etl.engine import RunOptions, RunResult, run_sync
from reverse_etl.errors import EXIT_FAILED
from reverse_etl.state import StateStore
from tests.helpers import (
    FakeDestination,
    at,
    people_db,
    person,
    project_data,
    sync_entry,
    write_project,
)


def email(n: int) -> str:
    return f"person{n:05d}@example.com"


class Env:
    def __init__(self, root: Path, rows: list[tuple[Any, ...]], **sync: Any):
        self.root = root
        self.db = people_db(root, rows)
        self.configure(**sync)
        self.store = StateStore(self.project.state.url, root=root)

    def configure(self, **sync: Any) -> None:
        write_project(self.root, project_data(syncs=[sync_entry(**sync)]))
        self.project = load_project(None, self.root, env={})

    def sql(self, statement: str) -> None:
        con = duckdb.connect(str(self.db))
        try:
            con.execute(statement)
        finally:
            con.close()

    def run(self, fake: FakeDestination | None = None, **options: Any) -> RunResult:
        fake = fake or FakeDestination()
        self.last = fake
        return run_sync(
            self.project,
            "people",
            self.store,
            RunOptions(**options),
            destination_factory=lambda project, s: fake,
        )


@pytest.fixture()
def env(tmp_path: Path):
    made: list[Env] = []

    def make(rows: list[tuple[Any, ...]], **sync: Any) -> Env:
        e = Env(tmp_path, rows, **sync)
        made.append(e)
        return e

    yield make
    for e in made:
        e.store.close()


def counts(result: RunResult) -> tuple[int, int, int, int]:
    c = result.record.counts
    assert c.read == c.sent + c.unchanged + c.rejected, c
    return c.read, c.sent, c.unchanged, c.rejected


def test_a_moved_cursor_without_a_change_sends_nothing(env) -> None:
    e = env([person(i) for i in range(20)], batch_size=7)
    assert counts(e.run()) == (20, 20, 0, 0)
    # profiles.sql moves modified_at on every order: the rows are read again, not sent
    e.sql("UPDATE people SET modified_at = modified_at + INTERVAL 1 HOUR")
    assert counts(e.run()) == (20, 0, 20, 0)
    assert e.last.received == []
    assert e.last.batches == [0, 0, 0]  # every batch read, none of its rows sent
    # and the watermark moved past them: the next run reads nothing
    assert counts(e.run()) == (0, 0, 0, 0)


def test_one_changed_value_sends_exactly_that_row(env) -> None:
    e = env([person(i) for i in range(20)])
    e.run()
    e.sql(
        f"UPDATE people SET first_name = 'Changed', modified_at = modified_at + INTERVAL 1 HOUR "
        f"WHERE email = '{email(7)}'"
    )
    e.sql("UPDATE people SET modified_at = modified_at + INTERVAL 1 HOUR")
    assert counts(e.run()) == (20, 1, 19, 0)
    assert [r["first_name"] for r in e.last.received] == ["Changed"]


def test_a_consent_change_alone_sends_the_row(env) -> None:
    e = env([person(i) for i in range(5)])
    e.run()
    e.sql(
        f"UPDATE people SET email_consent = 'no', modified_at = now() WHERE email = '{email(3)}'"
    )
    assert counts(e.run()) == (1, 1, 0, 0)
    assert e.last.received_ids() == [email(3)]


def test_a_lookback_rereads_without_resending(env) -> None:
    e = env([person(i) for i in range(10)], lookback_minutes=60)
    e.run()
    result = e.run()
    assert counts(result) == (10, 0, 10, 0)  # the window re-read them all
    assert e.last.received == []


def test_full_refresh_skips_unchanged_rows_unless_resend(env) -> None:
    e = env([person(i) for i in range(10)])
    e.run()
    assert counts(e.run(full_refresh=True)) == (10, 0, 10, 0)
    assert counts(e.run(full_refresh=True, resend=True)) == (10, 10, 0, 0)
    assert sorted(e.last.received_ids()) == [email(i) for i in range(10)]


def test_a_changed_definition_sends_every_row_again(env) -> None:
    e = env([person(i) for i in range(10)])
    e.run()
    e.configure(mapping={"email": "email", "first_name": "last_name", "phone": "phone_number"})
    assert counts(e.run(full_refresh=True)) == (10, 10, 0, 0)
    assert {r["last_name"] for r in e.last.received} == {f"Name{i}" for i in range(10)}


def test_rows_the_destination_refused_are_sent_again_when_read_again(env) -> None:
    e = env([person(i) for i in range(6)], lookback_minutes=60)
    first = e.run(FakeDestination(reject_ids=[email(2)]))
    assert first.record.counts.failed == 1
    again = e.run()  # the lookback reads all six: only the refused one was never held
    assert counts(again) == (6, 1, 5, 0)
    assert e.last.received_ids() == [email(2)]


def test_rows_rejected_before_sending_are_reported_every_time_they_are_read(env) -> None:
    rows = [person(i) for i in range(6)]
    rows[4] = person(4, email="not-an-email")
    e = env(rows, lookback_minutes=60)
    assert counts(e.run()) == (6, 5, 0, 1)
    again = e.run()
    assert counts(again) == (6, 0, 5, 1)
    assert again.by_reason["invalid_email"] == 1


def test_a_failed_batch_is_not_remembered(env) -> None:
    e = env([person(i) for i in range(30)], batch_size=10)
    failing = FakeDestination(fail_on_batch=2, drain_on_failure=False)
    assert e.run(failing).exit_code == EXIT_FAILED
    # batch 2 reached the API but was never acknowledged: it is sent again, batch 1 is not
    result = e.run(full_refresh=True)
    assert counts(result) == (30, 20, 10, 0)
    assert sorted(e.last.received_ids()) == [email(i) for i in range(10, 30)]


def test_a_dry_run_diffs_and_remembers_nothing(env) -> None:
    e = env([person(i) for i in range(8)])
    dry = e.run(dry_run=True)
    assert counts(dry) == (8, 8, 0, 0)
    assert counts(e.run()) == (8, 8, 0, 0)  # the dry run remembered nothing
    e.sql(f"UPDATE people SET first_name = 'X', modified_at = now() WHERE email = '{email(1)}'")
    e.sql("UPDATE people SET modified_at = now()")
    assert counts(e.run(dry_run=True)) == (8, 1, 7, 0)


def test_duplicates_of_an_identifier_are_still_reported(env) -> None:
    rows = [person(i) for i in range(4)] + [person(1, first_name="Older", modified_at=at(-5))]
    e = env(rows, lookback_minutes=60 * 24 * 30)
    e.run()
    again = e.run()
    assert again.by_reason["duplicate_identifier"] == 1
    assert again.record.counts.unchanged == 4

"""Exit codes a scheduler can alert on (issue 17): ``fail_on`` thresholds per project and per
sync, known problems (reported by an earlier run) told from new ones in the state store, the
error file's ``first_seen_run``, and the exit code of each outcome: 0 within thresholds, 1
crossed, 3 could not run or finish, 130/143 stopped by a signal.

Rows without an identifier are read and reported every run (they never move the watermark):
they are the problems a scheduled sync meets again and again.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reverse_etl.cli import main
from reverse_etl.config import load_project
from reverse_etl.config.models import FailOn
from reverse_etl.engine import RunOptions, RunResult, run_sync
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, EXIT_ROW_ERRORS, ConfigError
from reverse_etl.interrupt import EXIT_SIGINT, EXIT_SIGTERM, Interrupt
from reverse_etl.problems import Thresholds, judge, problem_key, thresholds_for
from reverse_etl.state import StateStore, problems
from reverse_etl.transform.rowerrors import RowError
from tests.helpers import (
    PEOPLE_COLUMNS,
    FakeDestination,
    at,
    create_table,
    person,
    project_data,
    read_csv_rows,
    sync_entry,
    write_project,
)


def nameless(n: int) -> tuple[Any, ...]:
    """A row without an identifier: rejected, and read again by every run."""
    return (None, f"Nameless{n}", None, "yes", at(n))


class Env:
    def __init__(self, root: Path, fail_on: dict[str, Any] | None = None, **top: Any):
        self.root = root
        self.rows: list[tuple[Any, ...]] = []
        entry = sync_entry(batch_size=10, **({"fail_on": fail_on} if fail_on else {}))
        write_project(root, project_data(syncs=[entry], **top))
        self.project = load_project(None, root, env={})
        self.store = StateStore(self.project.state.url, root=root)

    def add(self, *rows: tuple[Any, ...]) -> None:
        self.rows.extend(rows)
        create_table(self.root / "warehouse.duckdb", "people", PEOPLE_COLUMNS, self.rows)

    def run(self, fake: FakeDestination | None = None, **options: Any) -> RunResult:
        dest = fake or FakeDestination(lag=1)
        return run_sync(
            self.project,
            "people",
            self.store,
            RunOptions(**options),
            destination_factory=lambda project, s: dest,
        )


@pytest.fixture()
def make_env(tmp_path: Path) -> Iterator[Any]:
    made: list[Env] = []

    def make(**kw: Any) -> Env:
        env = Env(tmp_path, **kw)
        made.append(env)
        return env

    yield make
    for env in made:
        env.store.close()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("written", "share"), [("1%", 0.01), (" 5 % ", 0.05), (0.05, 0.05), (0, 0.0), (1, 1.0)]
)
def test_rejected_share_takes_a_percentage_or_a_share(written: Any, share: float) -> None:
    assert FailOn.model_validate({"rejected_share": written}).rejected_share == share


@pytest.mark.parametrize(
    ("written", "says"),
    [
        (5, 'did you mean "5%"?'),
        ("150%", "a percentage runs from 0% to 100%"),
        ("lots", "a share from 0 to 1 (0.05) or a percentage"),
        (True, "a share from 0 to 1"),
        (-0.1, "is not a share from 0 to 1"),
    ],
)
def test_a_bad_rejected_share_says_what_to_write(tmp_path: Path, written: Any, says: str) -> None:
    write_project(tmp_path, project_data(fail_on={"rejected_share": written}))
    with pytest.raises(ConfigError) as exc:
        load_project(None, tmp_path, env={})
    assert "fail_on.rejected_share" in str(exc.value) and says in str(exc.value)


def test_new_reasons_is_new_problems_under_the_issues_name(tmp_path: Path) -> None:
    assert FailOn.model_validate({"new_reasons": False}).new_problems is False
    with pytest.raises(ValueError, match="give new_problems once"):
        FailOn.model_validate({"new_reasons": False, "new_problems": True})
    write_project(tmp_path, project_data(fail_on={"new_problem": True}))
    with pytest.raises(ConfigError, match="new_problem"):
        load_project(None, tmp_path, env={})


def test_a_sync_overrides_the_projects_fail_on_key_by_key(tmp_path: Path) -> None:
    syncs = [
        sync_entry("people"),
        sync_entry("strict", fail_on={"new_problems": True}),
        sync_entry("lenient", fail_on={"rejected_share": "10%", "new_problems": False}),
    ]
    write_project(tmp_path, project_data(syncs=syncs, fail_on={"rejected_share": "2%"}))
    project = load_project(None, tmp_path, env={})
    got = {s.name: thresholds_for(project, s) for s in project.syncs}
    assert got == {
        "people": Thresholds(0.02, True),
        "strict": Thresholds(0.02, True),
        "lenient": Thresholds(0.10, False),
    }
    write_project(tmp_path, project_data())
    bare = load_project(None, tmp_path, env={})
    assert thresholds_for(bare, bare.syncs[0]) == Thresholds(0.0, True)  # today's behaviour


def test_judge_crosses_on_the_share_or_on_new_problems() -> None:
    th = Thresholds(rejected_share=0.05, new_problems=True)
    assert judge(th, read=100, rows=0, known=0, new=0).summary is None
    within = judge(th, read=100, rows=5, known=5, new=0)
    assert within.crossed == () and "within fail_on: 0 new and 5 known" in str(within.summary)
    assert judge(th, read=100, rows=60, known=60, new=0).crossed == ()  # known never fails
    loose = Thresholds(0.05, False)
    assert (
        "6 of 100 rows with a new problem (6.00%), more than fail_on.rejected_share (5.00%)"
        in judge(loose, read=100, rows=9, known=3, new=6).crossed[0]
    )
    assert "1 new problems" in judge(th, read=100, rows=1, known=0, new=1).crossed[0]
    assert judge(loose, read=100, rows=1, known=0, new=1).crossed == ()
    assert judge(loose, read=0, rows=1, known=0, new=1).crossed  # failing, none read: 100%


def test_a_row_without_identifier_is_known_by_its_cursor_email_and_value() -> None:
    def err(ident: Any, cursor: Any = None, reason: str = "invalid_email", column: str = "email"):
        return RowError(1, ident, column, "x", reason, "m", cursor=cursor)

    assert problem_key(err("a@x")) == problem_key(
        RowError(9, "a@x", "email", "y", "invalid_email", "other")
    )
    assert problem_key(err("a@x")) != problem_key(err("a@x", column="phone"))
    assert problem_key(err("a@x")) != problem_key(err("a@x", reason="invalid_phone"))
    assert problem_key(err(None, at(1))) != problem_key(err(None, at(2)))
    assert problem_key(err("a@x", reason="kept_unsubscribed")) is None  # a note
    assert problem_key(err("a@x", reason="not_sent")) is None  # the run stopped, not the row


# --------------------------------------------------------------------------- known and new


def test_the_same_bad_rows_twice_are_known_and_a_new_one_exits_1(make_env) -> None:
    """The issue's case: within ``rejected_share: 5%`` with ``new_reasons: true``, a second
    run meeting the same bad rows exits 0; a new bad row makes the next exit 1."""
    env = make_env(fail_on={"rejected_share": "5%", "new_reasons": True})
    env.add(*(person(i) for i in range(100)), nameless(1000), nameless(1001))
    first = env.run()
    assert first.exit_code == EXIT_ROW_ERRORS  # 2 of 102 rows, but both new
    c = first.record.counts
    assert (c.read, c.rejected, c.new_problems, c.known_problems) == (102, 2, 2, 0)
    assert "fail_on crossed: 2 new problems" in str(first.record.message)

    env.add(*(person(i) for i in range(100, 160)))  # the next hour's changes
    second = env.run()
    c = second.record.counts
    assert (c.read, c.rejected, c.new_problems, c.known_problems) == (62, 2, 0, 2)
    assert second.exit_code == EXIT_OK, second.record.message
    assert second.record.status == "partial"  # the rows are still refused and reported
    assert "within fail_on: 0 new and 2 known problems in 2 of 62 rows" in str(
        second.record.message
    )
    rows = read_csv_rows(str(second.record.error_file))
    assert {r["first_seen_run"] for r in rows} == {first.record.run_id}
    saved = env.store.last_runs("people", 1)[0]
    assert (saved.counts.known_problems, saved.counts.new_problems) == (2, 0)

    env.add(*(person(i) for i in range(160, 220)), nameless(1002))
    third = env.run()
    assert third.exit_code == EXIT_ROW_ERRORS
    c = third.record.counts
    assert (c.new_problems, c.known_problems) == (1, 2)
    seen = {r["cursor"]: r["first_seen_run"] for r in read_csv_rows(str(third.record.error_file))}
    assert seen[at(1002).isoformat()] == third.record.run_id  # new: first seen now
    assert seen[at(1000).isoformat()] == first.record.run_id


def test_by_default_a_problem_fails_the_run_that_first_meets_it_only(make_env) -> None:
    env = make_env()
    env.add(*(person(i) for i in range(100)), nameless(1000))
    assert env.run().exit_code == EXIT_ROW_ERRORS  # new
    env.add(*(person(i) for i in range(100, 200)))
    again = env.run()
    assert again.record.counts.known_problems == 1
    assert again.exit_code == EXIT_OK  # the same row, still broken: a warning, not red again
    assert "within fail_on: 0 new and 1 known" in str(again.record.message)


def test_a_quiet_incremental_run_of_known_problems_exits_0(make_env) -> None:
    """An incremental run that reads only the rows read every run, all of them rejected as
    before: the share counts new problems, so it stays green."""
    env = make_env(fail_on={"rejected_share": "5%"})
    env.add(*(person(i) for i in range(100)), nameless(1000))
    env.run()
    again = env.run()
    assert again.record.counts.read == 1 and again.record.counts.known_problems == 1
    assert again.exit_code == EXIT_OK


def test_new_problems_off_leaves_only_the_share(make_env) -> None:
    env = make_env(fail_on={"rejected_share": 0.05, "new_problems": False})
    env.add(*(person(i) for i in range(100)), nameless(1000))
    assert env.run().exit_code == EXIT_OK  # 1 new problem in 101 rows, under 5%
    env.add(*(nameless(2000 + i) for i in range(10)))
    assert env.run().exit_code == EXIT_ROW_ERRORS  # 11 of 11 rows


def test_problems_not_seen_again_are_dropped(make_env) -> None:
    """The table holds the sync's open problems only: fixing a row forgets it, and the same
    problem coming back later is new again."""
    env = make_env(fail_on={"rejected_share": "100%"})
    env.add(*(person(i) for i in range(20)), nameless(1000), nameless(1001))
    env.run()

    def kept() -> int:
        with env.store.engine.connect() as con:
            return int(con.execute(sa.select(sa.func.count()).select_from(problems)).scalar() or 0)

    assert kept() == 2
    assert env.store.open_problems("people") == {"missing_identifier": 2}
    env.rows.remove(nameless(1001))  # fixed (filtered out of the view)
    env.add()
    assert env.run().record.counts.known_problems == 1
    assert kept() == 1
    env.add(nameless(1001))
    back = env.run()
    assert (back.record.counts.known_problems, back.record.counts.new_problems) == (1, 1)


def test_a_dry_run_classifies_but_keeps_nothing(make_env) -> None:
    env = make_env(fail_on={"rejected_share": "100%"})
    env.add(*(person(i) for i in range(20)), nameless(1000))
    dry = env.run(dry_run=True)
    assert dry.record.counts.new_problems == 1 and dry.exit_code == EXIT_ROW_ERRORS
    assert env.store.open_problems("people") == {}
    first = env.run()
    assert first.record.counts.new_problems == 1
    dry = env.run(dry_run=True)
    assert dry.record.counts.known_problems == 1 and dry.exit_code == EXIT_OK


def test_problem_keys_are_written_a_chunk_at_a_time(make_env) -> None:
    """One insert for a batch's new problems (executemany), never one statement per row."""
    env = make_env(fail_on={"rejected_share": "100%"})
    env.add(*(nameless(i) for i in range(30)))  # three batches of ten
    statements: list[tuple[str, bool]] = []

    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if "retl_problems" in statement:
            statements.append((statement.split()[0].upper(), executemany))

    sa.event.listen(env.store.engine, "before_cursor_execute", count)
    try:
        env.run()
    finally:
        sa.event.remove(env.store.engine, "before_cursor_execute", count)
    inserts = [s for s in statements if s[0] == "INSERT"]
    assert len(inserts) == 3  # one a batch
    assert len([s for s in statements if s[0] == "SELECT"]) == 3


# --------------------------------------------------------------------------- exit codes


def test_a_clean_run_exits_0_and_a_run_that_could_not_finish_exits_3(make_env) -> None:
    env = make_env()
    env.add(*(person(i) for i in range(30)))
    assert env.run().exit_code == EXIT_OK
    env.add(*(person(i) for i in range(30, 60)))
    broken = env.run(FakeDestination(fail_on_batch=2))
    assert broken.record.status == "failed" and broken.exit_code == EXIT_FAILED


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, EXIT_SIGTERM), (signal.SIGINT, EXIT_SIGINT)]
)
def test_a_stopped_run_exits_with_its_signals_code(make_env, signum: int, code: int) -> None:
    env = make_env()
    env.add(*(person(i) for i in range(100)), nameless(1000))
    interrupt = Interrupt()

    class StopAfter(FakeDestination):
        def _accept(self, batches):  # type: ignore[no-untyped-def]
            for n, result in enumerate(super()._accept(batches), start=1):
                if n == 2:
                    interrupt.signum = signum  # what the handler records, minus the timer
                yield result

    result = env.run(StopAfter(lag=1), interrupt=interrupt)
    assert result.record.status == "interrupted"
    assert result.exit_code == code
    assert env.store.watermark("people") is not None  # what was acknowledged is committed
    assert env.store.open_problems("people") == {}  # not read to the end: nothing settled


class CliFake(FakeDestination):
    """What ``engine.destination_for`` hands the CLI's run: built from (connection, sync)."""

    def __init__(self, conn: Any, sync: Any) -> None:
        super().__init__()


def test_the_cli_exits_by_fail_on_and_status_shows_known_and_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from reverse_etl import engine

    monkeypatch.setattr(engine, "destination_for", lambda type_, obj="profiles": CliFake)
    env = Env(tmp_path, fail_on={"rejected_share": "100%", "new_problems": True})
    try:
        env.add(*(person(i) for i in range(20)), nameless(1000))
        runner = CliRunner()
        args = ["--project-dir", str(tmp_path)]
        first = runner.invoke(main, [*args, "run", "people"])
        assert first.exit_code == EXIT_ROW_ERRORS, first.output
        second = runner.invoke(main, [*args, "run", "people"])
        assert second.exit_code == EXIT_OK, second.output
        assert "within fail_on: 0 new and 1 known" in " ".join(second.output.split())
        status = runner.invoke(main, [*args, "status", "people"])
        assert status.exit_code == EXIT_OK
        assert "known" in status.stdout and "new" in status.stdout
        rows = [line for line in status.stdout.splitlines() if "partial" in line]
        cells = [c.strip() for c in rows[0].split("│") if c.strip()]  # the latest run first
        assert cells[10:12] == ["1", "0"], status.stdout  # its known and new problems
    finally:
        env.store.close()


# --------------------------------------------------------------------------- the store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
        admin = None
    else:
        import secrets

        dsn: str = request.getfixturevalue("postgres_dsn")
        base = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
        name = "retl_problems_" + secrets.token_hex(6)
        admin = sa.create_engine(base)
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as con:
            con.execute(sa.text(f"CREATE DATABASE {name}"))
        url = f"{base.rsplit('/', 1)[0]}/{name}"
    opened = StateStore(url)
    try:
        yield opened
    finally:
        opened.close()
        if admin is not None:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as con:
                con.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            admin.dispose()


def test_the_store_keeps_first_seen_runs_and_settles_per_sync(store: StateStore) -> None:
    many = {f"k{i:04d}": ("invalid_email", "email") for i in range(1200)}  # > one chunk
    assert set(store.see_problems("a", "run1", many).values()) == {"run1"}
    assert store.see_problems("b", "run1", {"k0000": ("invalid_phone", "phone")}) == {
        "k0000": "run1"
    }
    again = store.see_problems("a", "run2", {"k0001": ("x", "y"), "new": ("missing_cursor", "c")})
    assert again == {"k0001": "run1", "new": "run2"}
    peek = store.see_problems("a", "run3", {"k0002": ("x", "y"), "other": ("x", "y")}, record=False)
    assert peek == {"k0002": "run1", "other": "run3"}  # read only: nothing kept
    assert store.settle_problems("a", "run2") == 1199  # all but k0001 and new, not seen by run2
    assert store.open_problems("a") == {"invalid_email": 1, "missing_cursor": 1}
    assert store.open_problems("b") == {"invalid_phone": 1}  # another sync's are its own

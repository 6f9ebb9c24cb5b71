"""The scheduler and ``run --due`` left alone for weeks: two of them on one project run a due
sync once, a run in progress is "not due" rather than a failure, a check that fails is tried
again, an edited project file applies without a restart, an interrupted run is retried, a
clock set back does not stall a schedule, a paused dependency blocks its dependents (and says
so), and the schedules and options that would misfire are refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.exc import OperationalError

from reverse_etl import cli as cli_module
from reverse_etl import controls, engine
from reverse_etl.cli import Ctx, SchedulerLoop, main
from reverse_etl.config import load_project
from reverse_etl.engine import due_syncs
from reverse_etl.errors import LockHeldError, NotDueError
from reverse_etl.interrupt import Interrupt
from reverse_etl.schedule import RETRY_FIRST, parse_schedule
from reverse_etl.state import RunRecord, StateStore, locks, now, runs
from reverse_etl.ui import views
from reverse_etl.ui.app import templates
from tests.helpers import (
    API_KEY_ENV,
    FakeDestination,
    people_db,
    person,
    project_data,
    sync_entry,
    write_project,
)

SECRET = "pk_live_SCHED_s3cr3t_77a1"
STATE_URL = "sqlite:///state/state.db"


class Fake(FakeDestination):
    """Built by the engine's make_destination(conn, sync); all instances share one log."""

    log: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, conn: Any = None, sync: Any = None) -> None:
        super().__init__()
        self.received = Fake.log


@pytest.fixture(autouse=True)
def setting(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A fake destination, a clean environment and no wait between the scheduler's checks."""
    for name in ("REVERSE_ETL_CONFIG", "REVERSE_ETL_PROJECT_DIR", "REVERSE_ETL_STATE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(API_KEY_ENV, SECRET)
    Fake.log = []
    monkeypatch.setattr(engine, "destination_for", lambda type_, obj="profiles": Fake)
    monkeypatch.setattr(cli_module, "_wait", lambda seconds, interrupt: None)
    return Fake.log


def cli(root: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--project-dir", str(root), *args])
    assert SECRET not in result.output + (result.stderr or ""), "the API key was printed"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def flat(text: str) -> str:
    return " ".join(text.split())


def project(root: Path, syncs: list[dict[str, Any]] | None = None, **top: Any) -> None:
    people_db(root, [person(i) for i in range(4)])
    write_project(root, project_data(syncs=syncs or [sync_entry(schedule="hourly")], **top))


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[StateStore]:
    opened = StateStore(STATE_URL, root=tmp_path)
    yield opened
    opened.close()


def records(store: StateStore, sync: str = "people") -> list[RunRecord]:
    return [r for r in store.last_runs(sync, 50) if r.status != "dry_run"]


def forget_runs(store: StateStore) -> None:
    """Every scheduled sync is due at once, as if its slot had come."""
    with store.engine.begin() as con:
        con.execute(sa.delete(runs))


@pytest.fixture()
def loop(tmp_path: Path) -> Iterator[Any]:
    """``loop()``: the scheduler of the project in ``tmp_path``, checked by hand (``check()``)."""
    made: list[StateStore] = []

    def make() -> SchedulerLoop:
        obj = Ctx(None, str(tmp_path))
        opened = obj.store()
        made.append(opened)
        return SchedulerLoop(obj, opened, Interrupt())

    yield make
    for opened in made:
        opened.close()


# --------------------------------------------------------------------------- 1: run once per due time


@pytest.fixture()
def rival(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The first due list read is followed by a rival process running every sync on it (the
    other scheduler, which found them due too and took the lock first)."""
    real = engine.due_syncs
    rivals: list[str] = []

    def due_then_rival(*args: Any, **kwargs: Any) -> list[str]:
        found = real(*args, **kwargs)
        if not rivals:
            rivals.extend(found)
            other = StateStore(STATE_URL, root=tmp_path)
            try:
                proj = load_project(None, tmp_path)
                for name in found:
                    engine.run_sync(proj, name, other, engine.RunOptions())
            finally:
                other.close()
        return found

    monkeypatch.setattr(engine, "due_syncs", due_then_rival)
    return rivals


def test_the_scheduler_does_not_run_a_sync_a_rival_ran_for_the_same_due_time(
    tmp_path: Path, store: StateStore, rival: list[str], setting: list[dict[str, Any]], capsys
) -> None:
    project(tmp_path)
    result = cli(tmp_path, "scheduler", "--cycles", "1")
    assert result.exit_code == 0, result.output
    assert rival == ["people"]
    assert [r.status for r in records(store)] == ["success"]  # the rival's run, not a second
    assert len(setting) == 4
    assert "no longer due" not in result.output + result.stderr  # nothing to say


def test_run_due_notes_a_sync_a_rival_ran_and_exits_0(
    tmp_path: Path, store: StateStore, rival: list[str], setting: list[dict[str, Any]]
) -> None:
    project(tmp_path)
    result = cli(tmp_path, "run", "--due")
    assert result.exit_code == 0, result.output
    assert "people: not due now: another process ran it for this due time" in flat(result.stderr)
    assert [r.status for r in records(store)] == ["success"]
    assert len(setting) == 4


def test_run_due_with_names_runs_only_those_of_them_that_are_due(
    tmp_path: Path, store: StateStore, setting: list[dict[str, Any]]
) -> None:
    """``run --due NAME`` ran NAME whatever its schedule: --due was ignored once syncs were
    named, though its help says it runs only syncs that are due."""
    project(
        tmp_path, [sync_entry("people", schedule="hourly"), sync_entry("later", schedule="daily")]
    )
    first = cli(tmp_path, "run", "--due", "people")
    assert first.exit_code == 0, first.output
    assert [r.sync for r in store.last_runs(None, 10)] == ["people"]  # not "later", not named
    again = cli(tmp_path, "run", "--due", "people")  # ran a moment ago: not due
    assert again.exit_code == 0 and "nothing to run" in again.stdout
    assert len(store.last_runs(None, 10)) == 1


# --------------------------------------------------------------------------- 2: a long run in progress


def test_run_due_takes_a_sync_running_elsewhere_as_not_due(
    tmp_path: Path, store: StateStore, setting: list[dict[str, Any]]
) -> None:
    project(tmp_path)
    store._acquire("people", "long-run")  # a live run holds it: its heartbeat is fresh
    due = cli(tmp_path, "run", "--due")
    assert due.exit_code == 0, due.output
    assert "people: not due now: a run of it is still in progress" in flat(due.stderr)
    named = cli(tmp_path, "run", "people")  # named by hand: still "could not run"
    assert named.exit_code == 3
    assert "already running" in named.stderr
    assert setting == []


def test_run_due_says_a_lock_whose_holder_missed_its_heartbeats_is_an_error(
    tmp_path: Path, store: StateStore, setting: list[dict[str, Any]]
) -> None:
    """A pod restarted while a shared PostgreSQL store was away leaves its lock, which no
    other host can prove dead: ``run --due`` said "not due now" (exit 0) for the two hours
    until it went stale, and nothing synced. A holder that missed its heartbeats is an error
    naming when its lock is taken over and how to release it; unlock says the same."""
    project(tmp_path)
    silent = now() - 3 * store.heartbeat_every
    with store.engine.begin() as con:
        con.execute(
            sa.insert(locks).values(
                sync="people",
                run_id="pod-a-run",
                owner="pod-a-7f9c:17",
                acquired_at=silent,
                heartbeat_at=silent,
            )
        )
    due = cli(tmp_path, "run", "--due")
    err = flat(due.stderr)
    assert due.exit_code == 3, due.output
    assert "missed its heartbeats" in err and "unlock people --force" in err
    assert "not due now" not in err
    refused = cli(tmp_path, "unlock", "people")
    assert refused.exit_code == 3
    assert "missed its heartbeats" in flat(refused.stderr)
    assert "Its heartbeat is recent" not in refused.stderr
    assert setting == []


# --------------------------------------------------------------------------- 3: a daemon survives


def test_the_scheduler_says_a_failed_check_and_tries_again(
    tmp_path: Path, store: StateStore, monkeypatch: pytest.MonkeyPatch, setting: list[dict]
) -> None:
    project(tmp_path)
    real_due, real_run = engine.due_syncs, engine.run_sync
    calls = {"due": 0, "run": 0}

    def locked(what: str) -> OperationalError:
        return OperationalError(f"UPDATE retl_runs -- {what} {SECRET}", {}, Exception("locked"))

    def due_once_broken(*args: Any, **kwargs: Any) -> list[str]:
        calls["due"] += 1
        if calls["due"] == 1:
            raise locked("database is locked")
        return real_due(*args, **kwargs)

    def run_once_broken(*args: Any, **kwargs: Any) -> Any:
        calls["run"] += 1
        if calls["run"] == 1:
            raise locked("database or disk is full")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(engine, "due_syncs", due_once_broken)
    monkeypatch.setattr(engine, "run_sync", run_once_broken)
    result = cli(tmp_path, "scheduler", "--cycles", "3")
    assert result.exit_code == 0, result.output
    said = flat(result.stderr)
    # the store's failure in its words, never the statement (which quoted the key)
    assert "the schedule check: state store sqlite:///" in said
    assert "sync 'people': state store sqlite:///" in said
    assert said.count("will try again at the next check") == 2
    assert "UPDATE retl_runs" not in said
    assert "internal error" not in said
    assert [r.status for r in records(store)] == ["success"]  # the third check ran it
    assert len(setting) == 4


def test_a_scheduler_check_that_fails_in_blocked_by_is_said_too(
    loop: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    project(tmp_path)
    scheduler = loop()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("reverse_etl.schedule.blocked_by", broken)
    scheduler.check()
    said = flat(capsys.readouterr().err)
    assert "sync 'people': RuntimeError: a bug; will try again at the next check" in said


# --------------------------------------------------------------------------- 4: reload the project


def test_the_scheduler_reloads_an_edited_project_file(
    loop: Any, tmp_path: Path, store: StateStore, setting: list[dict], capsys
) -> None:
    project(tmp_path)
    scheduler = loop()
    scheduler.check()
    assert [r.status for r in records(store)] == ["success"]
    # a new sync and a mapping change: both apply at the next check
    mapping = {"email": "email", "first_name": "properties.Given_Name"}
    project(
        tmp_path,
        [sync_entry(schedule="hourly", mapping=mapping), sync_entry("buyers", schedule="hourly")],
    )
    scheduler.check()
    out = capsys.readouterr()
    assert "profiles.yml: changed; reloaded (2 syncs)" in flat(out.out)
    assert [r.status for r in records(store, "buyers")] == ["success"]
    # people's definition changed: refused until accepted by hand
    forget_runs(store)
    scheduler.check()
    assert "its definition changed since its last accepted run" in flat(capsys.readouterr().out)
    accepted = cli(tmp_path, "run", "people", "--accept-changes")
    assert accepted.exit_code == 0, accepted.output
    forget_runs(store)
    scheduler.check()  # the definition accepted by hand is the one the scheduler runs
    assert [r.status for r in records(store)] == ["success"]
    assert any("properties.Given_Name" in row for row in setting)


def test_a_broken_project_file_runs_nothing_until_fixed_said_once(
    loop: Any, tmp_path: Path, store: StateStore, capsys
) -> None:
    project(tmp_path)
    scheduler = loop()
    scheduler.check()
    path = tmp_path / "profiles" / "profiles.yml"
    good = path.read_text()
    path.write_text(good.replace("syncs:", "sinks:"))
    forget_runs(store)
    scheduler.check()
    scheduler.check()
    err = flat(capsys.readouterr().err)
    assert err.count("changed but not usable; no sync runs until it is fixed") == 1
    assert records(store) == []  # the old definition did not run
    path.write_text(good)
    scheduler.check()
    assert "changed; reloaded" in flat(capsys.readouterr().out)
    assert [r.status for r in records(store)] == ["success"]


def test_a_reloaded_sync_lacking_its_secret_is_refused_as_at_the_start(
    loop: Any, tmp_path: Path, store: StateStore, capsys
) -> None:
    project(tmp_path)
    scheduler = loop()
    data = project_data(syncs=[sync_entry(schedule="hourly")])
    data["connections"]["klaviyo"]["api_key"] = "{{ env_var('RETL_TEST_UNSET_KEY') }}"
    write_project(tmp_path, data)
    scheduler.check()
    err = flat(capsys.readouterr().err)
    assert "environment variable 'RETL_TEST_UNSET_KEY' is not set" in err
    assert records(store) == []


# --------------------------------------------------------------------------- 5: interrupted runs


def test_an_interrupted_run_is_retried_after_the_backoff(tmp_path: Path, store: StateStore) -> None:
    project(tmp_path, [sync_entry(schedule="every 24 hours")])
    proj = load_project(None, tmp_path)
    t = now()
    record = RunRecord(store.new_run_id(), "people", t, "running")
    store.start_run(record)
    record.status, record.ended_at = "interrupted", t + timedelta(minutes=1)
    store.save_run(record)
    assert controls.failure_streak(store, "people") == (1, record.ended_at)
    assert due_syncs(proj, store, record.ended_at + timedelta(minutes=4)) == []
    assert due_syncs(proj, store, record.ended_at + RETRY_FIRST + timedelta(seconds=1)) == [
        "people"
    ]


# --------------------------------------------------------------------------- 6: clock set back


def test_a_last_start_or_failure_in_the_future_is_read_as_now() -> None:
    """After the clock is set back 5 hours, the next due time is one slot from now, not one
    slot from a start 5 hours ahead (the store's latest start: ``due_syncs``)."""
    moment = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    ahead = moment + timedelta(hours=5)
    hourly = parse_schedule("hourly")
    assert hourly.next_due(ahead, now=moment) == moment + timedelta(hours=1)
    assert not hourly.is_due(ahead, moment)
    daily = parse_schedule("every 24 hours")
    failed = {"failures": 1, "failed_at": ahead}
    assert daily.next_due(ahead, now=moment, **failed) == moment + RETRY_FIRST


def test_runs_that_started_in_the_future_do_not_hold_a_schedule_after_the_clock_is_set_back(
    tmp_path: Path, store: StateStore
) -> None:
    """The store's latest start is 5 hours ahead of the clock (it was set back): an hourly
    sync whose latest run by the clock's time started 2 hours ago is due now, not in 6 hours;
    the run it makes is then the latest start that counts."""
    project(tmp_path)
    proj = load_project(None, tmp_path)
    moment = now()
    for started in (moment - timedelta(hours=2), moment + timedelta(hours=5)):
        record = RunRecord(store.new_run_id(), "people", started, "running")
        store.start_run(record)
        record.status, record.ended_at = "success", started + timedelta(minutes=1)
        store.save_run(record)
    assert due_syncs(proj, store, moment) == ["people"]
    ran = RunRecord(store.new_run_id(), "people", moment, "success", ended_at=moment)
    store.start_run(ran)
    assert due_syncs(proj, store, moment + timedelta(minutes=30)) == []
    assert due_syncs(proj, store, moment + timedelta(minutes=61)) == ["people"]


# --------------------------------------------------------------------------- 7: paused dependency


def chain(root: Path, **contacts: Any) -> None:
    """``orders`` depends on ``contacts``; both hourly."""
    project(
        root,
        [
            sync_entry("orders", depends_on=["contacts"], schedule="hourly"),
            sync_entry("contacts", schedule="hourly", **contacts),
        ],
    )


@pytest.mark.parametrize("how", ["file", "state"])
def test_a_disabled_dependency_blocks_its_dependents_and_says_what_to_do(
    tmp_path: Path, store: StateStore, how: str, setting: list[dict]
) -> None:
    chain(tmp_path, **({"enabled": False} if how == "file" else {}))
    if how == "state":
        assert cli(tmp_path, "disable", "contacts").exit_code == 0
    due = cli(tmp_path, "run", "--due")
    said = flat(due.stderr)
    assert "orders: skipped: it depends on 'contacts', which is disabled" in said
    assert "`reverse-etl enable contacts`" in said
    assert "`reverse-etl run orders --no-deps`" in said
    assert records(store, "orders") == [] and setting == []
    scheduled = cli(tmp_path, "scheduler", "--cycles", "2")
    assert flat(scheduled.stderr).count("orders: skipped: it depends on 'contacts'") == 1
    assert records(store, "orders") == []
    status = cli(tmp_path, "status")
    assert "orders: blocked: it depends on 'contacts', which is disabled" in flat(status.stderr)
    doc = cli(tmp_path, "status", "--json").stdout
    assert '"blocked": "it depends on \'contacts\', which is disabled' in doc
    assert cli(tmp_path, "run", "orders", "--no-deps").exit_code == 0
    assert [r.status for r in records(store, "orders")] == ["success"]


def test_a_dependency_run_by_hand_although_disabled_does_not_block(
    tmp_path: Path, store: StateStore
) -> None:
    chain(tmp_path, enabled=False)
    ran = cli(tmp_path, "run", "contacts", "orders", "--even-if-disabled")
    assert ran.exit_code == 0, ran.output
    assert [r.status for r in records(store, "orders")] == ["success"]


def test_the_run_page_shows_a_blocked_sync_as_blocked_not_due_now(
    tmp_path: Path, store: StateStore
) -> None:
    chain(tmp_path, enabled=False)
    proj = load_project(None, tmp_path)
    page = views.syncs_page(proj, store)
    rows = {r["name"]: r for r in page["syncs"]}
    assert "which is disabled" in rows["orders"]["blocked"]
    assert rows["contacts"]["blocked"] is None
    html = templates().get_template("syncs.html").render(csrf="x", csrf_field="csrf", **page)
    cell = html.split('data-sync="orders"', 1)[1].split("</tr>", 1)[0]
    assert ">blocked<" in cell and "<strong>now</strong>" not in cell
    own = views.sync_page(proj, store, "orders")
    assert own["blocked"] == rows["orders"]["blocked"]


# --------------------------------------------------------------------------- 8, 9: refused inputs


@pytest.mark.parametrize("line", ["0 0 9 * * *", "0 9 * * * 2026", "@daily"])
def test_a_cron_line_of_other_than_5_fields_is_refused(line: str) -> None:
    with pytest.raises(ValueError, match="a cron line must have exactly 5 fields"):
        parse_schedule(line)


def test_a_quartz_line_says_seconds_are_not_supported(tmp_path: Path) -> None:
    project(tmp_path, [sync_entry(schedule="0 0 9 * * *")])
    result = cli(tmp_path, "check", "--offline")
    assert result.exit_code == 3
    said = flat(result.stderr)
    assert "exactly 5 fields" in said and "seconds are not supported" in said
    assert "'0 9 * * *'" in said  # the line without its seconds field


@pytest.mark.parametrize("interval", ["0", "-5"])
def test_a_scheduler_interval_below_one_second_is_a_usage_error(
    tmp_path: Path, interval: str
) -> None:
    project(tmp_path)
    result = cli(tmp_path, "scheduler", "--interval", interval, "--cycles", "1")
    assert result.exit_code == 2
    assert "--interval" in result.stderr


# --------------------------------------------------------------------------- 10: the deploy doc


def test_the_deploy_readme_says_a_failed_run_is_retried_after_the_backoff() -> None:
    readme = flat((Path(__file__).parent.parent / "deploy" / "README.md").read_text())
    minutes = int(RETRY_FIRST.total_seconds() // 60)
    assert f"is due again {minutes} minutes after it ended" in readme
    assert "not at once" not in readme


class Said:
    """A progress sink that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def started(self, run: Any) -> None:
        self.lines.append("started")

    def batch(self, run: Any) -> None:
        pass

    def read(self, run: Any) -> None:
        pass

    def phase(self, run: Any, *, back: bool = False) -> None:
        pass

    def finished(self, run: Any, status: str) -> None:
        self.lines.append(f"finished {status}")


def test_a_run_that_never_starts_is_no_run_in_the_progress_log(
    tmp_path: Path, store: StateStore
) -> None:
    """A scheduler found a due sync locked by a run elsewhere at every check and logged
    "run ... started" and "ended failed" each time (alerts grep for "failed"); a run found no
    longer due logged the same. Neither started: the progress log says nothing of them."""
    project(tmp_path)
    proj = load_project(None, tmp_path)
    said = Said()
    with store.lock("people", "elsewhere"), pytest.raises(LockHeldError):
        engine.run_sync(proj, "people", store, progress=said)
    assert said.lines == []
    ran = engine.run_sync(proj, "people", store, progress=said)  # due: it never ran
    assert said.lines == ["started", f"finished {ran.record.status}"]
    with pytest.raises(NotDueError):  # hourly: it just ran
        engine.run_sync(proj, "people", store, engine.RunOptions(only_if_due=True), progress=said)
    assert len(said.lines) == 2

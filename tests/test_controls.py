"""Controls for unattended runs (reverse_etl/controls.py): enable/disable kept in the state store
over the project file, the definition lock (a changed sync is refused until accepted by hand),
and failed runs due again after a backoff instead of at their next slot."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from reverse_etl import controls, engine
from reverse_etl.cli import main
from reverse_etl.config import Project, load_project
from reverse_etl.engine import RunOptions, RunResult, due_syncs, run_sync
from reverse_etl.errors import EXIT_FAILED, EXIT_OK
from reverse_etl.schedule import parse_schedule, retry_delay
from reverse_etl.state import StateStore, runs
from tests.helpers import (
    API_KEY_ENV,
    FakeDestination,
    people_db,
    person,
    project_data,
    sync_entry,
    write_project,
)

SQL_SYNC = {"connection": "warehouse", "sql": "sql/people.sql"}


class Env:
    """A project in ``root`` whose file can be rewritten between runs, with its store."""

    def __init__(self, root: Path, syncs: list[dict[str, Any]]) -> None:
        self.root = root
        people_db(root, [person(i) for i in range(5)])
        (root / "sql").mkdir(exist_ok=True)
        self.write_sql("SELECT * FROM people")
        self.rewrite(syncs)
        self.store = StateStore(self.project.state.url, root=root)
        self.fake = FakeDestination()

    def write_sql(self, text: str) -> None:
        (self.root / "sql" / "people.sql").write_text(text)

    def rewrite(self, syncs: list[dict[str, Any]]) -> None:
        write_project(self.root, project_data(syncs=syncs))
        self.project: Project = load_project(None, self.root, env={})

    def run(self, sync: str = "people", **options: Any) -> RunResult:
        return run_sync(
            self.project,
            sync,
            self.store,
            RunOptions(**options),
            destination_factory=lambda project, s: self.fake,
        )


@pytest.fixture()
def make_env(tmp_path: Path):
    made: list[Env] = []

    def make(syncs: list[dict[str, Any]]) -> Env:
        env = Env(tmp_path, syncs)
        made.append(env)
        return env

    yield make
    for env in made:
        env.store.close()


def cli(root: Path, *args: str) -> Result:
    result = CliRunner().invoke(
        main, ["--project-dir", str(root), *args], env={API_KEY_ENV: "pk_test_controls"}
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


class CliFake(FakeDestination):
    """Built by the engine's make_destination(conn, sync)."""

    def __init__(self, conn: Any = None, sync: Any = None) -> None:
        super().__init__()


@pytest.fixture()
def fake_destination(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "destination_for", lambda type_, obj="profiles": CliFake)


# --------------------------------------------------------------------------- enable/disable


def test_disable_and_enable_override_the_project_file(make_env) -> None:
    env = make_env(
        [
            sync_entry("people", schedule="hourly"),
            sync_entry("paused", schedule="hourly", enabled=False),
        ]
    )
    assert due_syncs(env.project, env.store) == ["people"]
    controls.set_enabled(env.store, "people", False)
    controls.set_enabled(env.store, "paused", True)
    assert due_syncs(env.project, env.store) == ["paused"]
    states = controls.enabled_states(env.project, env.store)
    assert (states["people"].enabled, states["people"].source) == (False, "state")
    assert "disabled (state store: `reverse-etl disable` by " in states["people"].describe()
    controls.set_enabled(env.store, "people", None)  # --reset: the file decides again
    controls.set_enabled(env.store, "paused", None)
    assert due_syncs(env.project, env.store) == ["people"]
    assert controls.enabled_states(env.project, env.store)["people"].source == "file"


def test_cli_disable_skips_every_run_but_one_forced_by_hand(
    tmp_path: Path, fake_destination: None
) -> None:
    people_db(tmp_path, [person(i) for i in range(3)])
    write_project(tmp_path, project_data(syncs=[sync_entry(schedule="hourly")]))
    said = cli(tmp_path, "disable", "people")
    assert said.exit_code == EXIT_OK and "people: disabled (state store" in said.output
    listed = json.loads(cli(tmp_path, "ls", "--json").output)["syncs"][0]
    assert (listed["enabled"], listed["enabled_from"]) == (False, "state")
    status = json.loads(cli(tmp_path, "status", "--json").output)["syncs"][0]
    assert (status["enabled"], status["enabled_from"]) == (False, "state")
    due = cli(tmp_path, "run", "--due")
    assert due.exit_code == EXIT_OK and "nothing to run" in due.output
    assert "nothing to run" in cli(tmp_path, "run").output  # run without names: enabled only
    named = cli(tmp_path, "run", "people")  # named is not enough: Airflow names syncs too
    assert named.exit_code == EXIT_OK and "nothing to run" in named.output
    assert "skipped; `reverse-etl enable people`" in " ".join(named.stderr.split())
    forced = cli(tmp_path, "run", "people", "--even-if-disabled")  # "Sync Now", by hand
    assert forced.exit_code == EXIT_OK and "success" in forced.output
    assert "running it anyway (--even-if-disabled)" in " ".join(forced.stderr.split())
    assert cli(tmp_path, "enable", "people", "--reset").exit_code == EXIT_OK
    listed = json.loads(cli(tmp_path, "ls", "--json").output)["syncs"][0]
    assert (listed["enabled"], listed["enabled_from"]) == (True, "file")


# --------------------------------------------------------------------------- definition lock


def test_a_guarded_run_refuses_a_changed_mapping_and_sql_naming_them(make_env) -> None:
    env = make_env([sync_entry(source=SQL_SYNC, schedule="hourly")])
    first = env.run(guard_definition=True)  # a first run stores the fingerprint
    assert first.record.status == "success"
    assert controls.stored_fingerprint(env.store, "people") is not None
    sent = len(env.fake.received)

    env.write_sql("SELECT *, 'Gold' AS tier FROM people")
    mapping = {**sync_entry()["mapping"], "tier": "properties.Tier"}
    env.rewrite([sync_entry(source=SQL_SYNC, schedule="hourly", mapping=mapping)])
    refused = env.run(guard_definition=True)
    assert refused.exit_code == EXIT_FAILED and refused.record.status == "failed"
    message = refused.record.message or ""
    assert "mapping: added properties.Tier" in message
    assert "sql/people.sql changed" in message
    assert "--accept-changes" in message
    assert len(env.fake.received) == sent  # nothing was sent
    # still refused on the next scheduled try; status names the change
    assert env.run(guard_definition=True).record.status == "failed"
    pending = controls.pending_changes(env.project, env.store, ["people"])
    assert pending["people"].startswith("mapping: added properties.Tier")


def test_accept_changes_by_hand_clears_the_lock(tmp_path: Path, fake_destination: None) -> None:
    people_db(tmp_path, [person(i) for i in range(3)])
    write_project(tmp_path, project_data(syncs=[sync_entry(schedule="hourly")]))
    assert cli(tmp_path, "run", "people").exit_code == EXIT_OK
    entry = sync_entry(schedule="hourly", destination={"connection": "klaviyo", "list": "VIP"})
    write_project(tmp_path, project_data(syncs=[entry]))
    refused = cli(tmp_path, "run", "people")  # by hand without the flag: refused too (safer)
    assert refused.exit_code == EXIT_FAILED
    assert "destination.list changed (now 'VIP')" in " ".join(refused.stderr.split())
    status = json.loads(cli(tmp_path, "status", "--json").output)["syncs"][0]
    assert status["definition_changed"] == "destination.list changed (now 'VIP')"
    # plan shows what the change would do, and says a run would refuse it
    planned = cli(tmp_path, "plan", "people", "--json")
    assert planned.exit_code == EXIT_OK
    assert json.loads(planned.stdout)["definition_changed"] == status["definition_changed"]
    assert "--accept-changes" in " ".join(cli(tmp_path, "plan", "people").stdout.split())
    # the flag belongs to a run by hand, with the syncs named (not a cron line)
    assert cli(tmp_path, "run", "--due", "--accept-changes").exit_code == 2
    accepted = cli(tmp_path, "run", "people", "--accept-changes")
    assert accepted.exit_code == EXIT_OK
    assert "definition changes accepted: destination.list changed (now 'VIP')" in " ".join(
        accepted.stderr.split()
    )
    assert cli(tmp_path, "run", "people").exit_code == EXIT_OK  # guarded again, and passing
    status = json.loads(cli(tmp_path, "status", "--json").output)["syncs"][0]
    assert status["definition_changed"] is None


def forget_runs(root: Path) -> None:
    """Delete the run history (not the fingerprints): every scheduled sync is due at once."""
    store = StateStore("sqlite:///state/state.db", root=root)
    try:
        with store.engine.begin() as con:
            con.execute(sa.delete(runs))
    finally:
        store.close()


def test_run_due_and_the_scheduler_refuse_a_changed_sync(
    tmp_path: Path, fake_destination: None
) -> None:
    people_db(tmp_path, [person(i) for i in range(3)])
    write_project(tmp_path, project_data(syncs=[sync_entry(schedule="hourly")]))
    assert cli(tmp_path, "run", "--due").exit_code == EXIT_OK  # first run: stores it
    write_project(tmp_path, project_data(syncs=[sync_entry(schedule="hourly", lookback_minutes=5)]))
    forget_runs(tmp_path)  # due again at once: as if its slot had come
    # lookback_minutes is not part of the definition: nothing to accept
    assert cli(tmp_path, "run", "--due").exit_code == EXIT_OK
    mapping = {"email": "email", "first_name": "properties.Given_Name"}
    write_project(tmp_path, project_data(syncs=[sync_entry(schedule="hourly", mapping=mapping)]))
    forget_runs(tmp_path)
    due = cli(tmp_path, "run", "--due")
    assert due.exit_code == EXIT_FAILED
    said = " ".join(due.stderr.split())
    # keyed by destination field: first_name now goes to a custom property
    assert "mapping: removed first_name, removed phone_number, added properties.Given_Name" in said
    assert cli(tmp_path, "run", "--due").output.strip() == "nothing to run"  # backing off
    forget_runs(tmp_path)
    looped = cli(tmp_path, "scheduler", "--cycles", "1", "--interval", "1")
    assert "its definition changed since its last accepted run" in " ".join(looped.output.split())


def test_full_refresh_accepts_the_change(make_env) -> None:
    env = make_env([sync_entry()])
    env.run(guard_definition=True)
    consent = {"email": {"column": "email_consent", "no_means": "not_subscribed"}}
    env.rewrite([sync_entry(consent=consent)])
    refused = env.run(guard_definition=True)
    assert "consent: changed email" in (refused.record.message or "")
    refreshed = env.run(full_refresh=True)  # the CLI runs --full-refresh unguarded
    assert refreshed.record.status == "success"
    assert refreshed.accepted_changes == ["consent: changed email"]
    assert env.run(guard_definition=True).record.status == "success"


def test_reindenting_the_sql_is_no_change_and_a_dry_run_stores_nothing(make_env) -> None:
    env = make_env([sync_entry(source=SQL_SYNC)])
    env.run(dry_run=True)
    assert controls.stored_fingerprint(env.store, "people") is None
    env.run(guard_definition=True)
    env.write_sql("SELECT *\n    FROM   people;\n")
    assert env.run(guard_definition=True).record.status == "success"


def test_the_fingerprint_holds_no_secret_and_names_parts(make_env) -> None:
    env = make_env([sync_entry()])
    parts = controls.fingerprint(env.project, env.project.sync("people"))
    assert {"source", "identifier", "cursor", "mapping:email", "consent:email"} <= set(parts)
    assert "destination.object" in parts and "destination.list" in parts
    assert all(len(d) == 16 for d in parts.values())
    assert "pk_test" not in json.dumps(parts)


# --------------------------------------------------------------------------- failed runs due


def test_retry_delay_doubles_and_the_next_slot_still_comes_first() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [timedelta(minutes=m) for m in (5, 10, 20, 40)]
    assert retry_delay(100) == retry_delay(13)  # bounded
    hourly = parse_schedule("hourly")
    t0 = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    assert not hourly.is_due(t0, t0 + timedelta(minutes=30))  # succeeded: next slot only
    failed = {"failures": 1, "failed_at": t0 + timedelta(minutes=1)}
    assert not hourly.is_due(t0, t0 + timedelta(minutes=5), **failed)
    assert hourly.is_due(t0, t0 + timedelta(minutes=6), **failed)
    # six failures in a row: 160 minutes of backoff, but the hourly slot comes first
    sixth = {"failures": 6, "failed_at": t0 + timedelta(minutes=1)}
    assert not hourly.is_due(t0, t0 + timedelta(minutes=59), **sixth)
    assert hourly.is_due(t0, t0 + timedelta(minutes=60), **sixth)


def test_a_failed_run_is_due_again_after_the_backoff(make_env) -> None:
    env = make_env([sync_entry(schedule="every 24 hours", batch_size=2)])
    env.fake.fail_on_batch = 1
    failed = env.run()
    assert failed.record.status == "failed"
    ended = failed.record.ended_at
    assert ended is not None
    assert due_syncs(env.project, env.store, ended + timedelta(minutes=4)) == []
    assert due_syncs(env.project, env.store, ended + timedelta(minutes=5, seconds=1)) == ["people"]

    # a second failure in a row waits twice as long
    second = env.run()
    assert second.record.status == "failed" and second.record.ended_at is not None
    assert controls.failure_streak(env.store, "people")[0] == 2
    assert due_syncs(env.project, env.store, second.record.ended_at + timedelta(minutes=9)) == []
    later = second.record.ended_at + timedelta(minutes=10, seconds=1)
    assert due_syncs(env.project, env.store, later) == ["people"]

    # an abandoned run counts as failed; a success ends the streak
    with env.store.engine.begin() as con:
        con.execute(
            sa.update(runs).where(runs.c.run_id == second.record.run_id).values(status="abandoned")
        )
    assert controls.failure_streak(env.store, "people")[0] == 2
    env.fake.fail_on_batch = None
    ok = env.run()
    assert ok.record.status == "success" and ok.record.ended_at is not None
    assert controls.failure_streak(env.store, "people") == (0, None)
    assert due_syncs(env.project, env.store, ok.record.ended_at + timedelta(hours=1)) == []

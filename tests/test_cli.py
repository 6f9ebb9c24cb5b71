"""The command line through click's CliRunner: check, run (dry and, with an in-memory
destination, real), status, validate, export, unlock; exit codes 0/1/2/3, error messages, and
no API key ever printed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import update

from reverse_etl import engine
from reverse_etl.cli import main
from reverse_etl.state import StateStore, locks, now
from tests.helpers import (
    API_KEY_ENV,
    FakeDestination,
    people_db,
    person,
    project_data,
    read_csv_rows,
    sync_entry,
    write_project,
)

SECRET = "pk_live_CLI_s3cr3t_9f27c1"


class CliFake(FakeDestination):
    """Built by the engine's make_destination(conn, sync); all instances share one log."""

    log: ClassVar[list[dict]] = []

    def __init__(self, conn=None, sync=None):
        super().__init__()
        self.received = CliFake.log


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REVERSE_ETL_CONFIG", "REVERSE_ETL_PROJECT_DIR", "REVERSE_ETL_STATE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(API_KEY_ENV, SECRET)


@pytest.fixture()
def fake_destination(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    CliFake.log = []
    monkeypatch.setattr(engine, "destination_for", lambda type_, obj="profiles": CliFake)
    return CliFake.log


def cli(root: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, ["--project-dir", str(root), *args], env=env)
    everything = result.output + (result.stderr or "")
    assert SECRET not in everything, "the API key was printed"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def flat(text: str) -> str:
    """Output with rich's wrapping undone: runs of whitespace become one space."""
    return " ".join(text.split())


def make_project(root: Path, rows=None, **kw) -> None:
    people_db(root, rows if rows is not None else [person(i) for i in range(12)])
    write_project(root, project_data(**kw))


def dirty() -> list[tuple]:
    rows = [person(i) for i in range(12)]
    rows[3] = person(3, email="nope")
    rows[5] = person(5, consent="maybe")
    return rows


# --------------------------------------------------------------------------- check


def test_check_ok(tmp_path: Path) -> None:
    make_project(tmp_path)
    result = cli(tmp_path, "check")
    assert result.exit_code == 0
    assert "profiles.yml: OK" in result.stdout
    assert "2 connections, 1 syncs" in result.stdout


def test_check_with_explicit_config_path(tmp_path: Path) -> None:
    make_project(tmp_path)
    moved = tmp_path / "elsewhere.yml"
    (tmp_path / "profiles" / "profiles.yml").rename(moved)
    assert cli(tmp_path, "--config", str(moved), "check").exit_code == 0
    assert cli(tmp_path, "check").exit_code == 3


def test_check_failing(tmp_path: Path) -> None:
    make_project(tmp_path, syncs=[sync_entry(identifer="email", identifier=None)])
    result = cli(tmp_path, "check")
    assert result.exit_code == 3
    assert result.stdout == ""
    assert "error:" in result.stderr
    assert "profiles.yml" in result.stderr
    assert (
        "syncs[0].identifer: unknown key 'identifer'; did you mean 'identifier'?" in result.stderr
    )


def test_check_probes_each_view_and_names_what_to_fix(tmp_path: Path) -> None:
    make_project(
        tmp_path,
        syncs=[
            sync_entry(),
            sync_entry("from_sql", source={"connection": "warehouse", "sql": "sql/gone.sql"}),
            sync_entry("text_cursor", cursor="first_name"),
        ],
    )
    result = cli(tmp_path, "check")
    assert result.exit_code == 3
    err = flat(result.stderr)
    assert "from_sql:" in err and "gone.sql" in err
    assert "sync 'text_cursor': cursor column 'first_name'" in err
    assert "CAST(first_name AS TIMESTAMP)" in err
    assert "people:" not in err  # the sync that fits is not reported
    offline = cli(tmp_path, "check", "--offline")  # the views are not probed, the files are
    assert offline.exit_code == 3
    assert "from_sql: source.sql:" in flat(offline.stderr) and "gone.sql" in offline.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    result = cli(tmp_path, "check")
    assert result.exit_code == 3
    assert "file not found" in result.stderr


def test_check_missing_env_var_names_it(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["klaviyo"]["api_key"] = "{{ env_var('RETL_CLI_UNSET_KEY') }}"
    people_db(tmp_path, [])
    write_project(tmp_path, data)
    result = cli(tmp_path, "check")  # checking needs no API key: a warning names it
    assert result.exit_code == 0
    assert "RETL_CLI_UNSET_KEY" in result.stderr and "warning" in result.stderr
    result = cli(tmp_path, "run")  # a run calls the API: it stops before starting
    assert result.exit_code == 3
    assert "connections.klaviyo.api_key: environment variable 'RETL_CLI_UNSET_KEY'" in flat(
        result.stderr
    )


def test_check_never_prints_the_api_key_on_a_mistyped_type(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["klaviyo"]["type"] = "Klaviyo"
    people_db(tmp_path, [])
    write_project(tmp_path, data)
    secret = "pk_live_CLI_TYPO_5d1e0a"
    result = CliRunner().invoke(
        main, ["--project-dir", str(tmp_path), "check"], env={API_KEY_ENV: secret}
    )
    assert result.exit_code == 3
    assert secret not in result.output + result.stderr


def test_usage_error_exits_2(tmp_path: Path) -> None:
    make_project(tmp_path)
    result = CliRunner().invoke(main, ["--project-dir", str(tmp_path), "run", "--no-such-flag"])
    assert result.exit_code == 2
    assert "No such option" in result.stderr


# --------------------------------------------------------------------------- run


def test_run_dry_run_clean(tmp_path: Path) -> None:
    make_project(tmp_path)
    result = cli(tmp_path, "run", "--dry-run")
    assert result.exit_code == 0
    assert "dry_run" in result.stdout
    assert "dry run, payloads written to" in result.stdout
    assert "(nothing sent, nothing committed)" in flat(result.stdout)
    payloads = list((tmp_path / ".reverse_etl" / "dry-run" / "people").glob("*.jsonl"))
    assert len(payloads) == 1 and payloads[0].stat().st_size > 0
    assert SECRET not in payloads[0].read_text()
    store = StateStore("sqlite:///state/state.db", root=tmp_path)
    try:
        assert store.watermark("people") is None
    finally:
        store.close()


def test_run_dry_run_with_rejected_rows_exits_1(tmp_path: Path) -> None:
    make_project(tmp_path, rows=dirty())
    result = cli(tmp_path, "run", "--dry-run", "people")
    assert result.exit_code == 1
    assert "rejected/failed rows by reason:" in result.stdout
    assert "invalid_email=1" in result.stdout and "invalid_consent=1" in result.stdout
    assert "error file:" in result.stdout
    [error_file] = list((tmp_path / "errors" / "people").glob("*.csv"))
    assert {e["reason"] for e in read_csv_rows(error_file)} == {"invalid_email", "invalid_consent"}


def test_run_status_and_second_run(tmp_path: Path, fake_destination: list[dict]) -> None:
    make_project(tmp_path)
    result = cli(tmp_path, "run")
    assert result.exit_code == 0, result.output
    assert len(fake_destination) == 12
    assert "success" in result.stdout
    again = cli(tmp_path, "run", "people")
    assert again.exit_code == 0
    assert len(fake_destination) == 12
    status = cli(tmp_path, "status")
    assert status.exit_code == 0
    assert status.stdout.count("success") == 2
    assert "people: watermark 2025-03-01 12:00:11+00:00" in status.stdout


def test_status_before_any_run(tmp_path: Path) -> None:
    make_project(tmp_path, syncs=[sync_entry(schedule="every 6 hours")])
    result = cli(tmp_path, "status", "people")
    assert result.exit_code == 0
    assert (
        "people: watermark (none: next run reads everything), schedule every 6 hours"
        in result.stdout
    )


def test_status_unknown_sync(tmp_path: Path) -> None:
    make_project(tmp_path)
    result = cli(tmp_path, "status", "peple")
    assert result.exit_code == 2
    assert "no sync named 'peple'; did you mean 'people'?" in result.stderr


def test_run_with_rejected_rows_exits_1(tmp_path: Path, fake_destination: list[dict]) -> None:
    make_project(tmp_path, rows=dirty())
    result = cli(tmp_path, "run")
    assert result.exit_code == 1
    assert "partial" in result.stdout
    assert len(fake_destination) == 10


def test_run_schema_mismatch_exits_3(tmp_path: Path, fake_destination: list[dict]) -> None:
    entry = sync_entry(mapping={"email": "email", "tier": "properties.Tier"})
    make_project(tmp_path, syncs=[entry])
    result = cli(tmp_path, "run")
    assert result.exit_code == 3
    assert "failed" in result.stdout
    assert "column 'tier' is not in the view" in result.stderr
    assert fake_destination == []


def test_an_unknown_sync_name_is_a_usage_error_naming_the_known_ones(tmp_path: Path) -> None:
    """A typo in a cron line is the command line's mistake (2), not a sync that could not
    run (3), whatever the command."""
    make_project(tmp_path, syncs=[sync_entry("people"), sync_entry("buyers")])
    for command in ("run", "plan", "runs", "unlock", "enable", "disable", "export", "validate"):
        extra = ["--csv", str(tmp_path / "x.csv")] if command == "export" else []
        result = cli(tmp_path, command, "nosuchsync", *extra)
        assert result.exit_code == 2, (command, result.output)
        said = flat(result.stderr)
        assert "no sync named 'nosuchsync'" in said and "Known syncs: people, buyers" in said
    assert cli(tmp_path, "run", "people", "nosuchsync").exit_code == 2


def test_run_when_locked_exits_3_and_unlock(tmp_path: Path, fake_destination: list[dict]) -> None:
    make_project(tmp_path)
    store = StateStore("sqlite:///state/state.db", root=tmp_path)
    try:
        store._acquire("people", "stuck-run")
        result = cli(tmp_path, "run", "people")
        assert result.exit_code == 3
        assert "already running" in result.stderr
        assert "reverse-etl unlock people" in result.stderr
        assert fake_destination == []
        assert cli(tmp_path, "unlock", "people").exit_code == 3  # its heartbeat is fresh
        with store.engine.begin() as con:  # as a process that died hours ago would leave it
            con.execute(update(locks).values(heartbeat_at=now() - timedelta(hours=3)))
        released = cli(tmp_path, "unlock", "people")
        assert released.exit_code == 0
        assert "people: lock released" in released.stdout
        assert "people: was not locked" in cli(tmp_path, "unlock", "people").stdout
        assert cli(tmp_path, "run", "people").exit_code == 0
        assert len(fake_destination) == 12
    finally:
        store.close()


def test_unlock_unknown_sync(tmp_path: Path) -> None:
    make_project(tmp_path)
    result = cli(tmp_path, "unlock", "nope")
    assert result.exit_code == 2
    assert "no sync named 'nope'" in result.stderr


def test_run_nothing_enabled(tmp_path: Path) -> None:
    make_project(tmp_path, syncs=[sync_entry(enabled=False)])
    result = cli(tmp_path, "run")
    assert result.exit_code == 0
    assert "nothing to run" in result.stdout


# --------------------------------------------------------------------------- validate / export


def test_validate_live_view(tmp_path: Path) -> None:
    make_project(tmp_path, rows=dirty())
    result = cli(tmp_path, "validate", "people")
    assert result.exit_code == 1
    assert "people: 12 rows checked, 2 with problems" in flat(result.stdout)
    assert "invalid_email" in result.stdout and "invalid_consent" in result.stdout
    default = tmp_path / "errors" / "people" / "validate-errors.csv"
    assert f"error file: {default}" in result.stdout.replace("\n", "")
    assert len(read_csv_rows(default)) == 2


def test_validate_clean_exits_0(tmp_path: Path) -> None:
    make_project(tmp_path)
    result = cli(tmp_path, "validate", "people", "--errors", str(tmp_path / "e.csv"))
    assert result.exit_code == 0
    assert "people: 12 rows checked, 0 with problems" in flat(result.stdout)
    assert read_csv_rows(tmp_path / "e.csv") == []


def test_export_then_validate_csv(tmp_path: Path) -> None:
    make_project(tmp_path, rows=dirty())
    target = tmp_path / "out.csv"
    exported = cli(tmp_path, "export", "people", "--csv", str(target))
    assert exported.exit_code == 0
    assert "people: exported 12 rows to" in exported.stdout
    assert target.is_file()
    result = cli(
        tmp_path, "validate", "people", "--csv", str(target), "--errors", str(tmp_path / "e.csv")
    )
    assert result.exit_code == 1
    rows = {(e["row_number"], e["reason"]) for e in read_csv_rows(tmp_path / "e.csv")}
    assert rows == {("5", "invalid_email"), ("7", "invalid_consent")}  # CSV lines


def test_export_requires_csv_option(tmp_path: Path) -> None:
    make_project(tmp_path)
    result = CliRunner().invoke(main, ["--project-dir", str(tmp_path), "export", "people"])
    assert result.exit_code == 2
    assert "--csv" in result.stderr


def test_export_missing_warehouse_exits_3(tmp_path: Path) -> None:
    make_project(tmp_path)
    (tmp_path / "warehouse.duckdb").unlink()
    result = cli(tmp_path, "export", "people", "--csv", str(tmp_path / "x.csv"))
    assert result.exit_code == 3
    assert "does not exist" in result.stderr


def test_validate_csv_missing_file_exits_3(tmp_path: Path) -> None:
    make_project(tmp_path)
    missing = tmp_path / "missing.csv"
    result = CliRunner().invoke(
        main, ["--project-dir", str(tmp_path), "validate", "people", "--csv", str(missing)]
    )
    assert result.exit_code == 3
    assert "error:" in result.stderr
    assert "missing.csv" in result.stderr


# --------------------------------------------------------------------------- scheduler


def test_scheduler_runs_only_due_syncs(tmp_path: Path, fake_destination: list[dict]) -> None:
    make_project(
        tmp_path,
        syncs=[
            sync_entry("hourly_people", schedule="hourly"),
            sync_entry("unscheduled", mapping={"email": "email"}),
        ],
    )
    first = cli(tmp_path, "scheduler", "--cycles", "1", "--interval", "1")
    assert first.exit_code == 0, first.output
    assert "hourly_people: success, read 12, sent 12" in flat(first.stdout)
    assert "unscheduled" not in first.stdout  # no schedule: run only by `run`
    again = cli(tmp_path, "scheduler", "--cycles", "1", "--interval", "1")
    assert again.exit_code == 0
    assert "hourly_people" not in again.stdout  # ran less than an hour ago: not due
    assert len(fake_destination) == 12


def test_an_unexpected_error_exits_3_not_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_project(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError(f"boom with {SECRET}")

    monkeypatch.setattr(engine, "run_sync", broken)
    result = cli(tmp_path, "run")
    assert result.exit_code == 3
    assert "internal error: RuntimeError: boom with ***" in flat(result.stderr)


def test_columns_duckdb_takes_for_one_name_are_refused_before_anything_is_read(
    tmp_path: Path,
) -> None:
    """``'yes' AS Consent, 'no' AS consent``: DuckDB renames the second ``consent_1`` in the
    read's subquery, so a mapping of ``consent`` once read ``Consent`` and subscribed a row
    whose configured column said no. ``check`` and ``run`` refuse the view and say why."""
    make_project(
        tmp_path,
        syncs=[sync_entry("clash", source={"connection": "warehouse", "sql": "sql/clash.sql"})],
    )
    (tmp_path / "sql").mkdir(exist_ok=True)
    (tmp_path / "sql" / "clash.sql").write_text(
        "SELECT *, 'yes' AS Consent, 'no' AS consent FROM people -- who said yes?\n"
    )
    for command in ("check", "run"):
        result = cli(tmp_path, command)
        assert result.exit_code == 3, result.output
        err = flat(result.stderr)
        assert "columns DuckDB takes for one name: 'Consent' and 'consent'" in err
        assert "give each column its own name with AS" in err
        assert "Traceback" not in result.output + result.stderr


def test_a_run_message_holding_markup_is_printed_as_text(tmp_path: Path) -> None:
    """A failed run's message is printed escaped: a column named ``[/red]`` in it once made
    rich raise MarkupError, turning the user's mistake into an internal error."""
    make_project(tmp_path, syncs=[sync_entry(mapping={"email": "email", "[/red]": "first_name"})])
    result = cli(tmp_path, "run")
    assert result.exit_code == 3, result.output
    assert "[/red]" in flat(result.stderr)
    assert "internal error" not in result.output + result.stderr

"""Inspecting a project without calling an API: ``runs``, ``errors``, ``ls``, ``status`` (text
and ``--json``), ``check`` finding missing SQL files, and every read-only command working
while a destination's secret is not in the environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from reverse_etl import engine, inspect
from reverse_etl.cli import main
from reverse_etl.config import load_project, require_env
from reverse_etl.errors import ConfigError, ReverseEtlError
from tests.helpers import (
    API_KEY_ENV,
    people_db,
    project_data,
    sync_entry,
    write_project,
)
from tests.test_cli import CliFake, dirty, flat
from tests.test_csv_debug import BUCKET, moto_endpoint, s3  # noqa: F401 - fixtures

UNSET = "RETL_INSPECT_NEVER_SET_KEY"
RUN_KEYS = {
    "run_id",
    "sync",
    "status",
    "started_at",
    "ended_at",
    "duration_seconds",
    "full_refresh",
    "counts",
    "message",
    "error_file",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REVERSE_ETL_CONFIG", "REVERSE_ETL_PROJECT_DIR", "REVERSE_ETL_STATE_URL", UNSET):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(API_KEY_ENV, "pk_test_inspect_0a1b2c3d")


@pytest.fixture()
def fake_destination(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    CliFake.log = []
    monkeypatch.setattr(engine, "destination_for", lambda type_, obj="profiles": CliFake)
    return CliFake.log


def cli(root: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--project-dir", str(root), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def as_json(root: Path, *args: str) -> dict:
    result = cli(root, *args, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def test_runs_errors_and_status_say_what_happened(
    tmp_path: Path, fake_destination: list[dict]
) -> None:
    people_db(tmp_path, dirty())
    write_project(tmp_path, project_data())
    assert cli(tmp_path, "run").exit_code == 1  # partial: two rows rejected
    broken = sync_entry(mapping={"email": "email", "tier": "properties.Tier"})
    write_project(tmp_path, project_data(syncs=[broken]))
    assert cli(tmp_path, "run").exit_code == 3  # failed before sending anything

    found = as_json(tmp_path, "runs", "people")
    assert found["sync"] == "people"
    failed, partial = found["runs"]  # newest first
    assert set(failed) == RUN_KEYS and set(partial) == RUN_KEYS
    assert failed["status"] == "failed" and "column 'tier' is not in the view" in failed["message"]
    assert partial["status"] == "partial"
    assert partial["counts"]["read"] == 12 and partial["counts"]["rejected"] == 2
    assert partial["duration_seconds"] >= 0 and partial["ended_at"] >= partial["started_at"]
    assert Path(partial["error_file"]).is_file()
    assert len(as_json(tmp_path, "runs", "people", "--limit", "1")["runs"]) == 1
    text = flat(cli(tmp_path, "runs", "people").stdout)
    assert partial["run_id"] in text and "is not in the view" in text

    summary = as_json(tmp_path, "errors", partial["run_id"])
    assert summary["error_file"] == partial["error_file"] and summary["problems"] == 2
    reasons = {r["reason"]: r["count"] for r in summary["by_reason"]}
    assert reasons == {"invalid_email": 1, "invalid_consent": 1}
    assert all(r["how_to_fix"] for r in summary["by_reason"])
    shown = cli(tmp_path, "errors", partial["run_id"])
    assert "invalid_email" in shown.stdout and "error file:" in shown.stdout
    missing = cli(tmp_path, "errors", "no-such-run")
    assert missing.exit_code == 3 and "no run 'no-such-run'" in missing.stderr

    status = cli(tmp_path, "status")  # says why the last run failed
    assert status.exit_code == 0
    assert "column 'tier' is not in the view" in flat(status.stderr)
    (entry,) = as_json(tmp_path, "status")["syncs"]
    assert {"sync", "watermark", "schedule", "lock", "runs"} <= set(entry)
    # enable/disable and the definition lock (controls.py): the file's; the new mapping was
    # never accepted (the run stopped at the view first), so it is pending
    assert (entry["enabled"], entry["enabled_from"]) == (True, "file")
    assert entry["definition_changed"] == (
        "mapping: removed first_name, removed phone_number, added properties.Tier"
    )
    assert entry["lock"] is None and entry["watermark"]["id"] == "person00011@example.com"
    assert entry["watermark"]["cursor"] == "2025-03-01T12:00:11+00:00"
    assert [r["status"] for r in entry["runs"]] == ["failed", "partial"]


def test_ls_lists_every_sync(tmp_path: Path) -> None:
    people_db(tmp_path, [])
    syncs = [
        sync_entry(schedule="hourly"),
        sync_entry(
            "from_sql", source={"connection": "warehouse", "sql": "sql/people.sql"}, enabled=False
        ),
    ]
    write_project(tmp_path, project_data(syncs=syncs))
    found = as_json(tmp_path, "ls")["syncs"]
    assert [s["name"] for s in found] == ["people", "from_sql"]
    first, second = found
    assert first["schedule"] == "hourly" and first["enabled"] is True
    assert first["destination"] == {"connection": "klaviyo", "type": "klaviyo", "list": None}
    assert first["object"] == "profiles" and first["source"]["table"] == "people"
    assert second["source"] == {"connection": "warehouse", "sql": "sql/people.sql", "table": None}
    assert second["enabled"] is False and second["schedule"] is None
    text = cli(tmp_path, "ls")
    assert text.exit_code == 0 and "from_sql" in text.stdout and "sql/people.sql" in text.stdout


def test_check_finds_missing_and_empty_sql_files_offline(tmp_path: Path) -> None:
    people_db(tmp_path, [])
    syncs = [
        sync_entry("gone", source={"connection": "warehouse", "sql": "sql/gone.sql"}),
        sync_entry("blank", source={"connection": "warehouse", "sql": "sql/blank.sql"}),
    ]
    write_project(tmp_path, project_data(syncs=syncs))
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "blank.sql").write_text("  \n")
    for args in (("check", "--offline"), ("check",)):
        result = cli(tmp_path, *args)
        err = flat(result.stderr)
        assert result.exit_code == 3, args
        assert f"gone: source.sql: {tmp_path / 'sql' / 'gone.sql'} does not exist" in err
        assert "blank: source.sql:" in err and "is empty" in err
    (tmp_path / "sql" / "gone.sql").write_text("SELECT * FROM people")
    (tmp_path / "sql" / "blank.sql").write_text("SELECT * FROM people")
    assert cli(tmp_path, "check", "--offline").exit_code == 0


def test_read_only_commands_need_no_destination_secret(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["klaviyo"]["api_key"] = "{{ env_var('" + UNSET + "') }}"
    people_db(tmp_path, dirty())
    write_project(tmp_path, data)
    for args in (
        ("status",),
        ("status", "--json"),
        ("runs", "people"),
        ("ls", "--json"),
        ("check", "--offline"),
        ("check",),
        ("export", "people", "--csv", str(tmp_path / "out.csv")),
    ):
        result = cli(tmp_path, *args)
        assert result.exit_code == 0, (args, result.stderr)
    assert UNSET in cli(tmp_path, "check").stderr  # a warning, so a run is not a surprise
    # these find the dirty rows (exit 1), which needs the destination's rules, not its key
    validated = cli(tmp_path, "validate", "people")
    assert validated.exit_code == 1 and "invalid_email" in validated.stdout
    planned = cli(tmp_path, "plan", "people", "--json")  # request bodies, no API call
    assert planned.exit_code == 0, planned.stderr
    assert json.loads(planned.stdout)["rejected"] == 2
    assert cli(tmp_path, "run", "--dry-run").exit_code == 1
    # what calls the API stops before it starts, naming the variable
    for args in (
        ("run",),
        ("run", "people"),
        ("optouts", "people"),
        ("scheduler", "--cycles", "1"),
    ):
        result = cli(tmp_path, *args)
        assert result.exit_code == 3, args
        assert f"connections.klaviyo.api_key: environment variable '{UNSET}' is not set" in flat(
            result.stderr
        )
    statuses = {r["status"] for r in as_json(tmp_path, "runs", "people")["runs"]}
    assert statuses == {"dry_run"}, "a run started without its key"


def test_deferred_secret_is_raised_by_require_env(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["klaviyo"]["api_key"] = "{{ env_var('" + UNSET + "') }}"
    data["connections"]["other"] = {
        "type": "dotdigital",
        "username": "{{ env_var('RETL_INSPECT_DD_USER') }}",
        "password": "{{ env_var('RETL_INSPECT_DD_PASSWORD') }}",
        "region": "{{ env_var('RETL_INSPECT_DD_REGION') }}",  # not a secret: still needed
    }
    path = write_project(tmp_path, data)
    with pytest.raises(ConfigError, match="RETL_INSPECT_DD_REGION"):
        load_project(path, tmp_path, env={}, defer_secrets=True)  # empty is no region
    data["connections"]["other"]["region"] = "r2"
    write_project(tmp_path, data)
    with pytest.raises(ConfigError, match=UNSET):  # the default stays strict
        load_project(path, tmp_path, env={})
    project = load_project(path, tmp_path, env={}, defer_secrets=True)
    assert project.missing_env("klaviyo") == [("connections.klaviyo.api_key", UNSET)]
    assert project.missing_env("warehouse") == []
    require_env(project, ["warehouse"])  # nothing missing there
    with pytest.raises(ConfigError) as info:
        require_env(project, ["other", "klaviyo"])
    message = str(info.value)
    assert message.startswith(str(path))
    assert "connections.other.username: environment variable 'RETL_INSPECT_DD_USER'" in message
    assert "RETL_INSPECT_DD_PASSWORD" in message and UNSET in message
    ok = load_project(
        path, tmp_path, env={UNSET: "pk_x", "RETL_INSPECT_DD_USER": "u"}, defer_secrets=True
    )
    assert ok.missing_env("klaviyo") == []
    assert [name for _, name in ok.missing_env("other")] == ["RETL_INSPECT_DD_PASSWORD"]


def test_errors_reads_an_s3_error_file(
    tmp_path: Path, fake_destination: list[dict], request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue("s3")  # a moto S3 on 127.0.0.1 with BUCKET (test_csv_debug.py)
    people_db(tmp_path, dirty())
    write_project(tmp_path, project_data(error_dir=f"s3://{BUCKET}/errors"))
    assert cli(tmp_path, "run").exit_code == 1
    (run,) = as_json(tmp_path, "runs", "people")["runs"]
    summary = as_json(tmp_path, "errors", run["run_id"])
    assert summary["error_file"] == f"s3://{BUCKET}/errors/people/{run['run_id']}.csv"
    assert {r["reason"]: r["count"] for r in summary["by_reason"]} == {
        "invalid_email": 1,
        "invalid_consent": 1,
    }
    assert (
        f"error file: s3://{BUCKET}/errors/people/" in cli(tmp_path, "errors", run["run_id"]).stdout
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("row,reason\n1,bad\n2,bad\n3,worse\n", {"bad": 2, "worse": 1}),  # no how_to_fix column
        ("row,reason,how_to_fix\n1,bad,mend it\n", {"bad": 1}),
        ("", {}),
    ],
)
def test_error_files_count_by_reason_without_how_to_fix(
    tmp_path: Path, text: str, expected: dict[str, int]
) -> None:
    path = tmp_path / "errors.csv"
    path.write_text(text)
    counts, fixes = inspect._count_reasons(str(path))
    assert dict(counts) == expected
    assert set(fixes) == set(expected)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("row,column\n1,email\n", "no reason column"),
        ('row,reason,how_to_fix\n1,"never closed\n', "not an error file"),
    ],
)
def test_a_file_that_is_not_an_error_file_is_refused_clearly(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "errors.csv"
    path.write_text(text)
    with pytest.raises(ReverseEtlError, match=says):
        inspect._count_reasons(str(path))

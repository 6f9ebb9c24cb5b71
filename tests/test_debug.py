"""``reverse-etl debug``: a good project (DuckDB warehouse, both sandboxes) passes every check
and exits 0; each kind of broken connection fails its own check, names its fix and exits 1;
a bad project file exits 3. No secret is ever printed."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from reverse_etl.cli import main
from reverse_etl.sandbox import DotdigitalSandbox, KlaviyoSandbox, SandboxServer, SandboxSettings
from tests.helpers import execute, write_project
from tests.sandboxes import PROFILE_COLUMNS, create_table, profile_rows, sync_entry

KEY = "pk_debug_0123456789abcdef"
PASSWORD = "debug-s3cret-password"


@contextlib.contextmanager
def _served(klaviyo: dict[str, Any], dotdigital: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    k = KlaviyoSandbox(SandboxSettings(api_key=KEY, **klaviyo))
    d = DotdigitalSandbox(SandboxSettings(password=PASSWORD, **dotdigital))
    with SandboxServer(k) as ks, SandboxServer(d) as ds:
        yield (k, ks.base_url), (d, ds.base_url)


def _project(root: Path, k_url: str, d_url: str, **change: Any) -> dict[str, Any]:
    people = {"email": "email", "first_name": "first_name"}
    syncs = [
        sync_entry(
            "k_people",
            "klaviyo",
            people,
            destination={"list": "Members"},
            consent={"email": "email_consent"},
        ),
        sync_entry(
            "k_orders",
            "klaviyo",
            {"order_id": "order_id", "email": "email", "order_total": "value"},
            table="orders",
            object="orders",
            identifier="order_id",
        ),
        sync_entry("d_people", "dotdigital", people),
    ]
    return {
        "connections": {
            "warehouse": {"type": "duckdb", "path": change.get("db", "warehouse.duckdb")},
            "klaviyo": {"type": "klaviyo", "api_key": change.get("key", KEY), "base_url": k_url},
            "dotdigital": {
                "type": "dotdigital",
                "username": SandboxSettings().username,
                "password": change.get("password", PASSWORD),
                "base_url": d_url,
            },
        },
        "state": {"url": "sqlite:///state/state.db"},
        "syncs": [{**s, **change.get(s["name"], {})} for s in syncs],
    }


def _warehouse(root: Path) -> None:
    db = root / "warehouse.duckdb"
    create_table(db, "people", PROFILE_COLUMNS, profile_rows(range(3)))
    execute(
        db,
        "CREATE TABLE orders AS SELECT 'o' || n AS order_id, 'a@example.com' AS email, "
        "CAST(n AS DECIMAL(12, 2)) AS order_total, TIMESTAMPTZ '2025-03-01 12:00:00+00' "
        "AS modified_at FROM range(3) AS r(n)",
    )
    (root / "sql").mkdir()


Debug = Callable[..., tuple[Result, dict[tuple[str, str], dict[str, Any]]]]


@pytest.fixture()
def debug(tmp_path: Path) -> Iterator[Debug]:
    """``debug(klaviyo={settings}, dotdigital={settings}, sql={file: text}, **change)``: the
    exit and each check by (target, name), from ``--json``; the table is printed too."""
    _warehouse(tmp_path)
    sandboxes: list[Any] = []

    def run(
        klaviyo: dict[str, Any] | None = None,
        dotdigital: dict[str, Any] | None = None,
        sql: dict[str, str] | None = None,
        **change: Any,
    ) -> tuple[Result, dict[tuple[str, str], dict[str, Any]]]:
        for name, text in (sql or {}).items():
            (tmp_path / "sql" / name).write_text(text)
        with _served(klaviyo or {}, dotdigital or {}) as ((k, k_url), (d, d_url)):
            sandboxes[:] = [k, d]
            write_project(tmp_path, _project(tmp_path, k_url, d_url, **change))
            args = ["--project-dir", str(tmp_path), "debug"]
            table = CliRunner().invoke(main, args)
            found = CliRunner().invoke(main, [*args, "--json"])
        for result in (table, found):
            everything = result.output + (result.stderr or "")
            assert KEY not in everything and PASSWORD not in everything, "a secret was printed"
            assert "wrong-key" not in everything and "wrong-password" not in everything
        assert table.exit_code == found.exit_code, table.output
        checks = {(c["target"], c["name"]): c for c in json.loads(found.stdout)}
        run.table = table.output  # type: ignore[attr-defined]
        return found, checks

    run.sandboxes = sandboxes  # type: ignore[attr-defined]
    yield run
    for sandbox in sandboxes:
        assert sandbox.internal_errors == []


def _failed(checks: dict[tuple[str, str], dict[str, Any]]) -> list[tuple[str, str]]:
    return [key for key, c in checks.items() if not c["ok"]]


# --------------------------------------------------------------------------- all good


def test_a_good_project_passes_every_check_and_exits_0(debug):
    result, checks = debug()
    assert result.exit_code == 0, result.output
    assert _failed(checks) == []
    assert set(checks) == {
        ("warehouse", "warehouse reachable"),
        *(
            (s, n)
            for s in ("k_people", "k_orders", "d_people")
            for n in ("sql runs", "identifier and cursor", "mapping")
        ),
        ("klaviyo", "api key"),
        *(("klaviyo", f"scope {f}") for f in ("profiles", "lists", "subscriptions", "events")),
        ("dotdigital", "api user"),
        ("dotdigital", "region"),
    }
    assert (
        "write access (profiles:write) cannot be checked"
        in checks[("klaviyo", "scope profiles")]["detail"]
    )
    k, d = debug.sandboxes
    assert k.violations == [] and d.violations == []  # every probe on spec
    assert all(method == "GET" for method, *_ in k.request_log)  # nothing written
    assert all(method == "GET" for method, *_ in d.request_log)
    assert "all checks passed" in debug.table


def test_a_bad_project_file_exits_3(tmp_path):
    write_project(tmp_path, "connections: {warehouse: {type: duckdb, pathh: x}}\n")
    result = CliRunner().invoke(main, ["--project-dir", str(tmp_path), "debug"])
    assert result.exit_code == 3


# --------------------------------------------------------------------------- warehouse


def test_a_missing_warehouse_file_says_to_create_it_or_fix_the_path(debug):
    result, checks = debug(db="gone.duckdb")
    assert result.exit_code == 1
    check = checks[("warehouse", "warehouse reachable")]
    assert not check["ok"]
    assert "gone.duckdb" in check["fix"] and "correct `path:`" in check["fix"]
    assert not any(target == "k_people" for target, _ in checks)  # syncs not probed
    assert checks[("klaviyo", "api key")]["ok"]  # the other connections still checked


def test_an_sql_error_names_the_file_to_fix(debug):
    result, checks = debug(
        sql={"broken.sql": "SELECT no_such_column FROM people"},
        k_people={"source": {"connection": "warehouse", "sql": "sql/broken.sql"}},
    )
    assert result.exit_code == 1
    assert _failed(checks) == [("k_people", "sql runs")]
    check = checks[("k_people", "sql runs")]
    assert "no_such_column" in check["detail"]
    assert (
        check["fix"]
        == "fix the SELECT in sql/broken.sql (run it in the warehouse to see the error)"
    )


def test_a_missing_identifier_column_says_to_add_it(debug):
    result, checks = debug(
        sql={"no_email.sql": "SELECT first_name, email_consent, modified_at FROM people"},
        d_people={"source": {"connection": "warehouse", "sql": "sql/no_email.sql"}},
    )
    assert result.exit_code == 1
    assert _failed(checks) == [("d_people", "identifier and cursor")]
    check = checks[("d_people", "identifier and cursor")]
    assert "identifier column 'email' is not in the view" in check["detail"]
    assert check["fix"] == (
        "add 'email' to the view's SELECT, or set `identifier:` to one of its columns"
    )


def test_a_varchar_cursor_is_refused_with_a_cast(debug):
    result, checks = debug(
        sql={
            "text_cursor.sql": "SELECT * REPLACE (CAST(modified_at AS VARCHAR) AS modified_at) FROM people"
        },
        k_people={"source": {"connection": "warehouse", "sql": "sql/text_cursor.sql"}},
    )
    assert result.exit_code == 1
    assert _failed(checks) == [("k_people", "identifier and cursor")]
    check = checks[("k_people", "identifier and cursor")]
    assert "'modified_at' is string" in check["detail"]
    assert "cast it to a timestamp or number in the view" in check["fix"]
    assert "CAST(modified_at AS TIMESTAMP) AS modified_at" in check["fix"]


# --------------------------------------------------------------------------- Klaviyo


def test_a_wrong_klaviyo_key_is_a_401_with_where_to_get_one(debug):
    result, checks = debug(key="pk_wrong-key_000")
    assert result.exit_code == 1
    check = checks[("klaviyo", "api key")]
    assert not check["ok"] and "HTTP 401" in check["detail"]
    assert check["fix"].startswith("set api_key to a private API key (pk_...)")
    assert not any(name.startswith("scope") for _, name in checks)  # no scope checks after it
    assert {v.kind for v in debug.sandboxes[0].violations} == {"auth"}  # table and --json runs


def test_a_klaviyo_key_missing_a_scope_names_the_scope_to_grant(debug):
    scopes = ("profiles:write", "lists:write", "events:write")  # no subscriptions
    result, checks = debug(klaviyo={"klaviyo_key_scopes": scopes})
    assert result.exit_code == 1
    assert _failed(checks) == [("klaviyo", "scope subscriptions")]
    check = checks[("klaviyo", "scope subscriptions")]
    assert "403 permission_denied" in check["detail"] and "subscriptions:write" in check["detail"]
    assert check["fix"].startswith("create a private key with Full access to Subscriptions")
    assert checks[("klaviyo", "api key")]["ok"]  # the key itself is known
    assert {v.kind for v in debug.sandboxes[0].violations} == {"scope"}  # table and --json runs


def test_a_read_only_key_passes_the_read_probes_as_documented(debug):
    """What cannot be checked without writing: a read-only key passes the probes."""
    scopes = ("profiles:read", "lists:read", "events:read", "subscriptions:read")
    result, checks = debug(klaviyo={"klaviyo_key_scopes": scopes})
    assert result.exit_code == 0
    assert "cannot be checked without writing" in checks[("klaviyo", "scope events")]["detail"]


# --------------------------------------------------------------------------- Dotdigital


def test_a_wrong_dotdigital_password_says_to_use_an_api_user(debug):
    result, checks = debug(password="wrong-password")
    assert result.exit_code == 1
    assert _failed(checks) == [("dotdigital", "api user")]
    check = checks[("dotdigital", "api user")]
    assert "HTTP 401" in check["detail"]
    assert "API user" in check["fix"] and "not a login" in check["fix"]
    assert ("dotdigital", "region") not in checks


def test_a_wrong_dotdigital_region_names_the_right_one(debug):
    result, checks = debug(dotdigital={"dotdigital_region": "r2"})
    assert result.exit_code == 1
    assert _failed(checks) == [("dotdigital", "region")]
    check = checks[("dotdigital", "region")]
    assert "https://r2-api.dotdigital.com" in check["detail"]
    assert check["fix"] == "set region: r2 (or region: auto) in connection 'dotdigital'"
    assert checks[("dotdigital", "api user")]["ok"]  # account info answers on r1
    assert {v.kind for v in debug.sandboxes[1].violations} == {"region"}  # table and --json runs


def test_an_unset_secret_variable_is_a_failed_check_not_a_401(debug, monkeypatch):
    monkeypatch.delenv("RETL_DEBUG_KEY", raising=False)
    result, checks = debug(key="{{ env_var('RETL_DEBUG_KEY') }}")
    assert result.exit_code == 1
    check = checks[("klaviyo", "secrets set")]
    assert not check["ok"] and "RETL_DEBUG_KEY" in check["detail"]
    assert check["fix"].startswith("export RETL_DEBUG_KEY")
    assert debug.sandboxes[0].request_log == []  # the API was not called without its key

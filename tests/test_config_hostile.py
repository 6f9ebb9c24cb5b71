"""Hostile project files: each mistake a hostile-input run found is a ConfigError (exit 3 from
the command line) that names the file, the key and what to write instead, never a traceback or
an "internal error": a file that is not UTF-8, a key given twice in one mapping, a time zone,
a phone region or a memory percentage that does not exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from reverse_etl.cli import main
from reverse_etl.config import load_project
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.errors import EXIT_FAILED, ConfigError
from reverse_etl.util import memory
from tests.helpers import API_KEY, API_KEY_ENV, project_data, sync_entry, write_project


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("REVERSE_ETL_CONFIG", "REVERSE_ETL_PROJECT_DIR", "REVERSE_ETL_STATE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(memory.ENV, raising=False)
    yield
    monkeypatch.delenv(memory.ENV, raising=False)
    memory.configure(None)  # a check that loaded a project set the process's budget


def check(root: Path, env: dict[str, str] | None = None) -> Result:
    """``reverse-etl check --offline``: a bad project file exits 3 with an error, not a bug."""
    result = CliRunner().invoke(
        main, ["--project-dir", str(root), "check", "--offline"], env=env or {}
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def refused(root: Path, env: dict[str, str] | None = None) -> str:
    """The check's error message, flattened; asserting it is a plain config error."""
    result = check(root, env)
    everything = result.output + (result.stderr or "")
    assert result.exit_code == EXIT_FAILED, everything
    assert "internal error" not in everything
    assert "Traceback" not in everything
    assert "error:" in everything
    return " ".join(everything.split())


def load_error(root: Path, data: dict | str, env: dict[str, str] | None = None) -> str:
    path = write_project(root, data)
    with pytest.raises(ConfigError) as info:
        load_project(path, root, env=env if env is not None else {})
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message


# --------------------------------------------------------------------------- 1. not UTF-8


def test_a_project_file_that_is_not_utf8_says_so_and_where(tmp_path: Path) -> None:
    path = tmp_path / "profiles" / "profiles.yml"
    path.parent.mkdir()
    path.write_bytes(b"\xff\xfe bad")  # a UTF-16 byte order mark, then text
    message = refused(tmp_path)
    assert f"{path}: not UTF-8 text" in message
    assert "byte 0" in message
    assert "UTF-16" in message and "save it as UTF-8" in message

    # a Latin-1 file: the line and the byte offset of the first character that is not UTF-8
    path.write_bytes(b"connections: {}\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_project(path, tmp_path, env={})
    message = str(info.value)
    assert message.startswith(f"{path}: not UTF-8 text")
    assert "line 2" in message and "byte 21" in message
    assert "save it as UTF-8" in message


def test_a_source_sql_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "people.sql").write_bytes(b"SELECT 'caf\xe9' AS x FROM people\n")
    entry = sync_entry(source={"connection": "warehouse", "sql": "sql/people.sql"})
    project = load_project(write_project(tmp_path, project_data(syncs=[entry])), tmp_path, env={})
    with pytest.raises(ConfigError) as info:
        project.source_sql(project.sync("people"))
    message = str(info.value)
    assert "source.sql" in message and "people.sql" in message
    assert "not UTF-8 text" in message and "byte 11" in message
    assert "save it as UTF-8" in message


# --------------------------------------------------------------------------- 2. duplicate keys

DUPLICATE_CURSOR = f"""\
connections:
  warehouse: {{type: duckdb, path: warehouse.duckdb}}
  klaviyo:
    type: klaviyo
    api_key: "{{{{ env_var('{API_KEY_ENV}', '{API_KEY}') }}}}"
syncs:
  - name: people
    source: {{connection: warehouse, table: people}}
    object: profiles
    identifier: email
    cursor: modified_at
    destination: {{connection: klaviyo}}
    mapping: {{email: email}}
    cursor: email
"""
CURSOR_ONCE = DUPLICATE_CURSOR.replace("    cursor: email\n", "")


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path: Path) -> None:
    write_project(tmp_path, DUPLICATE_CURSOR)
    message = refused(tmp_path)
    assert "key 'cursor' appears twice" in message
    assert "lines 11 and 14" in message
    assert "remove one of them" in message

    # anywhere in the file: a top-level key, a connection, a flow mapping
    message = load_error(tmp_path, "error_dir: a\nconnections: {}\nerror_dir: b\n")
    assert "key 'error_dir' appears twice" in message and "lines 1 and 3" in message
    message = load_error(tmp_path, CURSOR_ONCE.replace("table: people}", "table: a, table: b}"))
    assert "key 'table' appears twice" in message and "both on line 8" in message
    # spelled differently, the same key: quoted and plain
    message = load_error(tmp_path, 'connections: {}\n"syncs": []\nsyncs: []\n')
    assert "key 'syncs' appears twice" in message and "lines 2 and 3" in message


def test_keys_once_each_merge_keys_and_templates_still_load(tmp_path: Path) -> None:
    text = CURSOR_ONCE + (
        "  - &base\n"
        "    name: base\n"
        "    source: {connection: warehouse, table: people}\n"
        "    object: profiles\n"
        "    identifier: email\n"
        "    destination: {connection: klaviyo}\n"
        "    mapping: {email: email}\n"
        "  - <<: *base\n"
        "    name: copy\n"  # a merged key given again overrides it: not a duplicate
        "    cursor: updated_at\n"
    )
    project = load_project(write_project(tmp_path, text), tmp_path, env={})
    assert [s.name for s in project.syncs] == ["people", "base", "copy"]
    assert project.sync("copy").cursor == "updated_at"
    conn = project.connections["klaviyo"]
    assert isinstance(conn, KlaviyoConnection)
    assert conn.api_key.get_secret_value() == API_KEY  # env_var(...) with its default


# --------------------------------------------------------------------------- 3. time zones


def test_an_unknown_naive_timezone_is_refused_with_an_example(tmp_path: Path) -> None:
    write_project(tmp_path, project_data(syncs=[sync_entry(naive_timezone="Mars/Olympus")]))
    message = refused(tmp_path)
    assert "syncs[0].naive_timezone" in message
    assert "'Mars/Olympus' is not an IANA time zone" in message
    assert "Europe/London" in message

    message = load_error(tmp_path, project_data(syncs=[sync_entry(naive_timezone="Europe/Lodnon")]))
    assert "did you mean 'Europe/London'?" in message
    # not a zone, although the machine has a file of that name
    message = load_error(tmp_path, project_data(syncs=[sync_entry(naive_timezone="localtime")]))
    assert "syncs[0].naive_timezone" in message

    # real zones load; DuckDB reads their names whatever the case, so that still works
    for zone in ("Europe/London", "UTC", "America/New_York", "Etc/GMT+5", "utc", "europe/london"):
        data = project_data(syncs=[sync_entry(naive_timezone=zone)])
        project = load_project(write_project(tmp_path, data), tmp_path, env={})
        assert project.sync("people").naive_timezone == zone


# --------------------------------------------------------------------------- 4. phone regions


def test_an_unknown_default_phone_region_is_refused_with_an_example(tmp_path: Path) -> None:
    write_project(tmp_path, project_data(syncs=[sync_entry(default_phone_region="XX")]))
    message = refused(tmp_path)
    assert "syncs[0].default_phone_region" in message
    assert "'XX' is not a region phonenumbers knows" in message
    assert "GB" in message

    message = load_error(tmp_path, project_data(syncs=[sync_entry(default_phone_region="UK")]))
    assert "did you mean 'GB'?" in message

    for region in ("GB", "US", "gb"):  # the transform upper-cases the default region
        data = project_data(syncs=[sync_entry(default_phone_region=region)])
        project = load_project(write_project(tmp_path, data), tmp_path, env={})
        assert project.sync("people").default_phone_region == region


# --------------------------------------------------------------------------- 5. memory percentages


@pytest.mark.parametrize("text", ["150%", "100.5%", "0%", "0.0%"])
def test_a_memory_percentage_outside_0_to_100_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match=r"runs from above 0% to 100%.*e\.g\. 25%"):
        memory.parse_size(text)

    # the project's key
    write_project(tmp_path, project_data(memory_limit=text))
    message = refused(tmp_path)
    assert f"memory_limit: memory_limit {text!r} is not a share of the machine's memory" in message
    assert "e.g. 25%" in message

    # a DuckDB connection's key
    data = project_data()
    data["connections"]["warehouse"]["memory_limit"] = text
    message = load_error(tmp_path, data)
    assert "connections.warehouse.memory_limit" in message and "25%" in message

    # the environment's
    write_project(tmp_path, project_data())
    message = refused(tmp_path, env={memory.ENV: text})
    assert f"{memory.ENV}: memory_limit {text!r} is not a share" in message


def test_memory_sizes_duckdb_spells_still_load() -> None:
    for text in ("100%", "25%", " 50 % ", "33.3%", "512MiB", "1GB", "2G"):
        assert memory.parse_size(text) >= memory.SMALLEST
    assert memory.parse_size("100%") // 4 == memory.parse_size("25%")

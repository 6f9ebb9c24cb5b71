"""The project file: every mistake is a ConfigError naming file, key path, bad value and the fix;
secrets stay out of reprs and messages; schedules parse and fire when they should."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reverse_etl.config import load_project
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.destinations.registry import UnsupportedObject, destination_for
from reverse_etl.errors import ConfigError
from reverse_etl.schedule import parse_schedule
from reverse_etl.secrets import register_secret, render, scrub
from tests.helpers import API_KEY, API_KEY_ENV, project_data, sync_entry, write_project


def load_error(root: Path, data, env: dict[str, str] | None = None) -> str:
    path = write_project(root, data)
    with pytest.raises(ConfigError) as info:
        load_project(path, root, env=env if env is not None else {})
    message = str(info.value)
    assert message.startswith(str(path)), message  # every message names the file first
    return message


# --------------------------------------------------------------------------- happy path


def test_valid_project_loads_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    path = write_project(tmp_path, project_data(syncs=[sync_entry(schedule="hourly")]))
    project = load_project(path, tmp_path, env={})
    sync = project.sync("people")
    assert sync.lookback_minutes == 0
    assert sync.null_values == "skip"
    assert sync.schedule is not None and sync.schedule.every_minutes == 60
    assert sync.fields()["email"].field == "email"
    assert sync.consent.columns()["email"].column == "email_consent"
    assert project.path("warehouse.duckdb") == tmp_path / "warehouse.duckdb"
    assert project.source_sql(sync) == "SELECT * FROM people"
    assert project.file == path


def test_sql_file_source_is_read_relative_to_project_and_semicolon_dropped(
    tmp_path: Path,
) -> None:
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "people.sql").write_text("SELECT * FROM people;\n\n")
    entry = sync_entry(source={"connection": "warehouse", "sql": "sql/people.sql"})
    project = load_project(write_project(tmp_path, project_data(syncs=[entry])), tmp_path, env={})
    assert project.source_sql(project.sync("people")) == "SELECT * FROM people"


def test_missing_sql_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    entry = sync_entry(source={"connection": "warehouse", "sql": "sql/nope.sql"})
    project = load_project(write_project(tmp_path, project_data(syncs=[entry])), tmp_path, env={})
    with pytest.raises(ConfigError, match=r"source\.sql: cannot read .*nope\.sql"):
        project.source_sql(project.sync("people"))


def test_unknown_sync_name_suggests_the_closest(tmp_path: Path) -> None:
    project = load_project(write_project(tmp_path), tmp_path, env={})
    with pytest.raises(ConfigError) as info:
        project.sync("peeple")
    assert "no sync named 'peeple'" in str(info.value)
    assert "did you mean 'people'?" in str(info.value)


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key(tmp_path: Path) -> None:
    data = project_data()
    data["sync"] = data.pop("syncs")
    message = load_error(tmp_path, data)
    assert "sync: unknown key 'sync'" in message
    assert "did you mean 'syncs'?" in message
    assert (
        "Valid keys: connections, error_dir, fail_on, memory_limit, snapshot, state, syncs"
        in message
    )


def test_unknown_key_in_a_connection(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["warehouse"]["pth"] = data["connections"]["warehouse"].pop("path")
    message = load_error(tmp_path, data)
    assert "connections.warehouse.pth: unknown key 'pth'" in message
    assert "did you mean 'path'?" in message
    assert "Valid keys: memory_limit, path, threads, type" in message


def test_unknown_key_in_a_connection_named_like_its_type(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["klaviyo"]["base_ur"] = "http://127.0.0.1:1"
    message = load_error(tmp_path, data)
    assert "did you mean 'base_url'?" in message
    assert "connections.klaviyo.base_ur: unknown key 'base_ur'" in message


def test_unknown_key_in_a_sync_with_did_you_mean(tmp_path: Path) -> None:
    entry = sync_entry()
    entry["identifer"] = entry.pop("identifier")
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "syncs[0].identifer: unknown key 'identifer'; did you mean 'identifier'?" in message
    assert "syncs[0].identifier: Field required" in message
    assert "Valid keys:" in message and "batch_size" in message


def test_unknown_key_in_a_sync_source(tmp_path: Path) -> None:
    entry = sync_entry(source={"connection": "warehouse", "tabel": "people"})
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "syncs[0].source.tabel: unknown key 'tabel'; did you mean 'table'?" in message
    assert "Valid keys: connection, sql, table" in message


def test_unknown_key_in_sync_consent_column(tmp_path: Path) -> None:
    entry = sync_entry(consent={"email": {"colum": "email_consent"}})
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "syncs[0].consent.email.colum: unknown key 'colum'; did you mean 'column'?" in message
    assert "Valid keys: column, consented_at" in message


def test_unknown_key_in_state_lists_state_keys(tmp_path: Path) -> None:
    message = load_error(tmp_path, project_data(state={"uri": "sqlite:///x.db"}))
    assert "state.uri: unknown key 'uri'" in message
    assert "did you mean 'url'?" in message


def test_unknown_key_in_a_mapping_entry_lists_field_and_type(tmp_path: Path) -> None:
    entry = sync_entry(
        mapping={"email": "email", "tier": {"field": "properties.Tier", "typ": "string"}}
    )
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "syncs[0].mapping.tier.typ: unknown key 'typ'; did you mean 'type'?" in message
    assert "Valid keys: field, type" in message


def test_unknown_destination_option_suggests_list(tmp_path: Path) -> None:
    entry = sync_entry(destination={"connection": "klaviyo", "lst": "VIPs"})
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "destination.lst" in message
    assert "'list'" in message


# --------------------------------------------------------------------------- references


def test_sync_naming_a_missing_connection(tmp_path: Path) -> None:
    entry = sync_entry(source={"connection": "warehose", "table": "people"})
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "syncs[0].source.connection: no connection named 'warehose'" in message
    assert "did you mean 'warehouse'?" in message
    assert "Connections of type duckdb/postgres/snowflake/bigquery: warehouse" in message


def test_source_naming_a_destination_connection(tmp_path: Path) -> None:
    entry = sync_entry(source={"connection": "klaviyo", "table": "people"})
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "syncs[0].source.connection: connection 'klaviyo' is a klaviyo" in message
    assert "needs one of duckdb, postgres, snowflake, bigquery" in message


def test_destination_naming_a_warehouse_connection(tmp_path: Path) -> None:
    entry = sync_entry(destination={"connection": "warehouse"})
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "syncs[0].destination.connection: connection 'warehouse' is a duckdb" in message
    assert "dotdigital, klaviyo" in message


def test_source_needs_exactly_one_of_sql_or_table(tmp_path: Path) -> None:
    entry = sync_entry(source={"connection": "warehouse", "table": "people", "sql": "a.sql"})
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "syncs[0].source: give exactly one of `sql`" in message


# --------------------------------------------------------------------------- values


def test_wrong_object(tmp_path: Path) -> None:
    message = load_error(tmp_path, project_data(syncs=[sync_entry(object="contacts")]))
    assert "syncs[0].object:" in message
    assert "'profiles', 'orders' or 'catalog'" in message
    assert "(got 'contacts')" in message


def test_object_the_destination_does_not_support() -> None:
    # Both destinations take every object a sync may name (profiles, orders, catalog), so the
    # registry's refusal is checked directly: it names the objects the type does support.
    with pytest.raises(UnsupportedObject) as info:
        destination_for("klaviyo", "segments")
    assert "object 'segments' is not supported by klaviyo" in str(info.value)
    assert "supported: profiles, orders, catalog" in str(info.value)
    with pytest.raises(UnsupportedObject, match="unknown destination type 'mailchimp'"):
        destination_for("mailchimp", "profiles")


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("every fortnight", "is not understood; use hourly, daily"),
        ("every 0 hours", "the interval must be at least 1"),
        ("61 * * * *", "5-field cron line"),
    ],
)
def test_bad_schedule(tmp_path: Path, schedule: str, expected: str) -> None:
    message = load_error(tmp_path, project_data(syncs=[sync_entry(schedule=schedule)]))
    assert "syncs[0].schedule:" in message
    assert expected in message
    assert f"(got {schedule!r})" in message


def test_batch_size_out_of_range(tmp_path: Path) -> None:
    message = load_error(tmp_path, project_data(syncs=[sync_entry(batch_size=0)]))
    assert "syncs[0].batch_size:" in message
    assert "(got 0)" in message


def test_duplicate_sync_names(tmp_path: Path) -> None:
    message = load_error(tmp_path, project_data(syncs=[sync_entry(), sync_entry()]))
    assert "syncs[1].name: duplicate sync name 'people'" in message


def test_column_mapped_twice_to_one_field(tmp_path: Path) -> None:
    entry = sync_entry(mapping={"email": "email", "email_2": "email"})
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "syncs[0].mapping:" in message
    assert "columns 'email' and 'email_2' both map to field 'email'" in message


def test_non_standard_klaviyo_field_without_properties_prefix(tmp_path: Path) -> None:
    entry = sync_entry(mapping={"email": "email", "tier": "Loyalty_Tier"})
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert (
        "syncs[0] (people): mapping.tier: 'Loyalty_Tier' is neither a standard klaviyo" in message
    )
    assert "properties.<Name>" in message
    # and the prefixed spelling is accepted
    ok = sync_entry(mapping={"email": "email", "tier": "properties.Loyalty_Tier"})
    load_project(write_project(tmp_path, project_data(syncs=[ok])), tmp_path, env={})


def test_identifier_not_mapped(tmp_path: Path) -> None:
    entry = sync_entry(mapping={"first_name": "first_name"})
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "identifier 'email' must also be mapped" in message


def test_identifier_mapped_to_a_non_identifier_klaviyo_field(tmp_path: Path) -> None:
    entry = sync_entry(identifier="first_name")
    message = load_error(tmp_path, project_data(syncs=[entry]))
    assert "identifier 'first_name' maps to 'first_name'" in message
    assert "email, phone_number, external_id" in message


# --------------------------------------------------------------------------- env vars


def test_missing_env_var_without_default_names_the_var_and_key(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["klaviyo"]["api_key"] = "{{ env_var('RETL_NOT_SET_ANYWHERE') }}"
    message = load_error(tmp_path, data, env={})
    assert "connections.klaviyo.api_key" in message
    assert "environment variable 'RETL_NOT_SET_ANYWHERE' is not set" in message
    assert "env_var('RETL_NOT_SET_ANYWHERE', 'value')" in message


def test_env_var_with_default_and_set(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["klaviyo"]["base_url"] = "{{ env_var('RETL_BASE', 'http://127.0.0.1:9') }}"
    data["error_dir"] = "{{ env_var('RETL_ERRS', 'errs') }}/x"
    path = write_project(tmp_path, data)
    project = load_project(path, tmp_path, env={})
    conn = project.connections["klaviyo"]
    assert isinstance(conn, KlaviyoConnection)
    assert conn.base_url == "http://127.0.0.1:9"
    assert conn.api_key.get_secret_value() == API_KEY  # the helper's default
    assert project.error_dir == "errs/x"
    project = load_project(path, tmp_path, env={"RETL_BASE": "http://h", API_KEY_ENV: "k-123456"})
    assert project.connections["klaviyo"].base_url == "http://h"
    assert project.connections["klaviyo"].api_key.get_secret_value() == "k-123456"


def test_unsupported_template_is_an_error(tmp_path: Path) -> None:
    data = project_data(error_dir="{{ var('x') }}")
    message = load_error(tmp_path, data)
    assert "unsupported template" in message


def test_render_templates() -> None:
    assert render("a-{{ env_var('X') }}-b", {"X": "1"}) == "a-1-b"
    assert render('{{env_var("Y", "d")}}', {}) == "d"
    assert render("{{ env_var('Y', '') }}", {}) == ""


# --------------------------------------------------------------------------- files


def test_yaml_syntax_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, "connections:\n  warehouse: {type: duckdb\nsyncs: []\n")
    assert "not valid YAML" in message
    assert "line" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    message = load_error(tmp_path, "- just\n- a list\n")
    assert "top level must be a mapping" in message


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "profiles.yml"
    with pytest.raises(ConfigError) as info:
        load_project(missing, tmp_path, env={})
    assert str(info.value).startswith(f"{missing}: file not found")
    assert "--config" in str(info.value)


def test_default_file_location_is_profiles_yml_under_root(tmp_path: Path) -> None:
    write_project(tmp_path)
    project = load_project(None, tmp_path, env={})
    assert project.file == tmp_path / "profiles" / "profiles.yml"


# --------------------------------------------------------------------------- secrets


def test_api_key_not_in_repr_or_dump(tmp_path: Path) -> None:
    path = write_project(tmp_path)
    project = load_project(path, tmp_path, env={API_KEY_ENV: "pk_live_REPRCHECK_77"})
    assert "pk_live_REPRCHECK_77" not in repr(project)
    assert "pk_live_REPRCHECK_77" not in str(project)
    assert "pk_live_REPRCHECK_77" not in project.model_dump_json()
    # it is registered for scrubbing once loaded
    assert scrub("key=pk_live_REPRCHECK_77.") == "key=***."


def test_api_key_not_in_config_error_for_a_sync_problem(tmp_path: Path) -> None:
    data = project_data(syncs=[sync_entry(object="contacts")])
    message = load_error(tmp_path, data, env={API_KEY_ENV: "pk_live_SYNCERR_991"})
    assert "pk_live_SYNCERR_991" not in message


def test_api_key_not_in_config_error_for_unknown_connection_key(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["klaviyo"]["revison"] = "2026-07-15"
    message = load_error(tmp_path, data, env={API_KEY_ENV: "pk_live_CONNERR_552"})
    assert "revison" in message
    assert "pk_live_CONNERR_552" not in message


def test_api_key_not_in_config_error_for_a_mistyped_connection_type(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["klaviyo"]["type"] = "Klaviyo"
    message = load_error(tmp_path, data, env={API_KEY_ENV: "pk_live_TAGERR_3141"})
    assert "'Klaviyo'" in message
    assert "pk_live_TAGERR_3141" not in message


def test_scrub_only_registers_secrets_of_four_or_more_chars() -> None:
    register_secret("abc")
    register_secret("s3cr3t-value-xyz")
    assert scrub("abc s3cr3t-value-xyz") == "abc ***"


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("text", "every", "cron"),
    [
        ("hourly", 60, None),
        ("Hourly", 60, None),
        ("daily", None, "0 0 * * *"),
        ("every 6 hours", 360, None),
        ("every 1 hour", 60, None),
        ("every 30 minutes", 30, None),
        ("every 5 min", 5, None),
        ("every 2 days", 2880, None),
        ("*/15 * * * *", None, "*/15 * * * *"),
        ("0 */6 * * *", None, "0 */6 * * *"),
        ({"cron": "30 2 * * 1"}, None, "30 2 * * 1"),
    ],
)
def test_parse_schedule(text, every, cron) -> None:
    schedule = parse_schedule(text)
    assert schedule.every_minutes == every
    assert schedule.cron == cron


@pytest.mark.parametrize("text", ["sometimes", "every hour", "every -5 minutes", "", 5])
def test_parse_schedule_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_schedule(text)


def test_never_run_sync_is_due() -> None:
    assert parse_schedule("daily").is_due(None)
    assert parse_schedule("every 30 minutes").is_due(None, datetime(2025, 1, 1, tzinfo=UTC))


def test_interval_schedule_is_due_after_the_interval() -> None:
    last = datetime(2025, 1, 1, 10, 0, tzinfo=UTC)
    hourly = parse_schedule("hourly")
    assert not hourly.is_due(last, last + timedelta(minutes=59, seconds=59))
    assert hourly.is_due(last, last + timedelta(hours=1))
    every = parse_schedule("every 30 minutes")
    assert not every.is_due(last, last + timedelta(minutes=29))
    assert every.is_due(last, last + timedelta(minutes=31))


def test_cron_schedule_is_due_at_the_next_fire_time() -> None:
    last = datetime(2025, 1, 1, 10, 1, tzinfo=UTC)
    quarter = parse_schedule("*/15 * * * *")
    assert quarter.next_after(last) == datetime(2025, 1, 1, 10, 15, tzinfo=UTC)
    assert not quarter.is_due(last, datetime(2025, 1, 1, 10, 14, 59, tzinfo=UTC))
    assert quarter.is_due(last, datetime(2025, 1, 1, 10, 15, tzinfo=UTC))
    daily = parse_schedule("daily")
    assert daily.next_after(last) == datetime(2025, 1, 2, 0, 0, tzinfo=UTC)
    assert not daily.is_due(last, datetime(2025, 1, 1, 23, 59, tzinfo=UTC))
    assert daily.is_due(last, datetime(2025, 1, 2, 0, 0, 1, tzinfo=UTC))

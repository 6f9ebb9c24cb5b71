"""resolve_sync_columns: a sync's column names respelled as the view spells them, without a
warehouse (the view's columns are given as a list, as ``Source.schema`` reports them)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from reverse_etl.columns import resolve_sync_columns
from reverse_etl.config import FieldMapping, Sync
from reverse_etl.destinations.klaviyo.profiles import KlaviyoProfiles
from reverse_etl.engine import transform_spec
from reverse_etl.errors import ConfigError, ReverseEtlError
from reverse_etl.sources.bigquery import DIALECT as BIGQUERY
from reverse_etl.sources.duckdb import DIALECT as DUCKDB
from reverse_etl.sources.postgres import DIALECT as POSTGRES
from reverse_etl.sources.snowflake import DIALECT as SNOWFLAKE
from reverse_etl.transform.transformer import schema_problems


def make_sync(**overrides: Any) -> Sync:
    """A profiles sync naming a column through every key that can name one, all lower-case,
    as the README writes them."""
    data: dict[str, Any] = {
        "name": "profiles",
        "source": {"connection": "warehouse", "sql": "sql/profiles.sql"},
        "object": "profiles",
        "identifier": "email",
        "cursor": "modified_at",
        "destination": {"connection": "klaviyo", "sms_without_consent_time": True},
        "mapping": {
            "email": "email",
            "phone": "phone_number",
            "points": {"field": "properties.Points", "type": "integer"},
        },
        "consent": {
            "email": {"column": "email_consent", "consented_at": "consent_at"},
            "sms": "sms_consent",
        },
        "phone_region_column": "country",
        "batch_size": 7,
    }
    data.update(overrides)
    return Sync.model_validate(data)


UPPER = [
    "EMAIL",
    "PHONE",
    "POINTS",
    "EMAIL_CONSENT",
    "CONSENT_AT",
    "SMS_CONSENT",
    "COUNTRY",
    "MODIFIED_AT",
]


def test_snowflake_upper_case_view_every_column_key_is_respelled() -> None:
    sync = make_sync()
    resolved = resolve_sync_columns(sync, UPPER, SNOWFLAKE)

    assert isinstance(resolved, Sync) and resolved is not sync
    assert resolved.identifier == "EMAIL"
    assert resolved.cursor == "MODIFIED_AT"
    assert resolved.phone_region_column == "COUNTRY"
    # keys respelled, targets (short and long form) untouched, order kept
    assert list(resolved.mapping) == ["EMAIL", "PHONE", "POINTS"]
    assert resolved.mapping["EMAIL"] == "email"
    assert resolved.mapping["POINTS"] == FieldMapping(field="properties.Points", type="integer")
    consent = resolved.consent.columns()
    assert (consent["email"].column, consent["email"].consented_at) == (
        "EMAIL_CONSENT",
        "CONSENT_AT",
    )
    assert (consent["sms"].column, consent["sms"].consented_at) == ("SMS_CONSENT", None)
    # everything that is not a column name is as configured
    assert resolved.name == "profiles" and resolved.batch_size == 7
    assert resolved.source == sync.source and resolved.destination == sync.destination
    # the input is not modified (Sync is frozen, but nested models must not be shared-mutated)
    assert sync.identifier == "email" and list(sync.mapping) == ["email", "phone", "points"]
    assert sync.consent.email is not None and sync.consent.email.column == "email_consent"


def test_the_respelled_sync_passes_the_engines_schema_check_and_the_destinations_checks() -> None:
    schema = pa.schema(
        [
            ("EMAIL", pa.string()),
            ("PHONE", pa.string()),
            ("POINTS", pa.int64()),
            ("EMAIL_CONSENT", pa.string()),
            ("CONSENT_AT", pa.timestamp("us", tz="UTC")),
            ("SMS_CONSENT", pa.string()),
            ("COUNTRY", pa.string()),
            ("MODIFIED_AT", pa.timestamp("us", tz="UTC")),
        ]
    )
    sync = make_sync()
    assert schema_problems(transform_spec(sync, KlaviyoProfiles), schema)  # as written: fails

    resolved = resolve_sync_columns(sync, schema.names, SNOWFLAKE)
    spec = transform_spec(resolved, KlaviyoProfiles)
    assert schema_problems(spec, schema) == []
    assert spec.identifier_field().kind == "email"  # the identifier is still the mapped one
    assert spec.phone_region_column == "COUNTRY"
    assert KlaviyoProfiles.check_sync(resolved) == []


def test_a_name_the_view_lacks_is_left_for_the_schema_check_to_report() -> None:
    columns = [c for c in UPPER if c != "PHONE"]
    resolved = resolve_sync_columns(make_sync(), columns, SNOWFLAKE)
    assert "phone" in resolved.mapping and "PHONE" not in resolved.mapping
    assert resolved.identifier == "EMAIL"  # the others are still respelled

    schema = pa.schema([(c, pa.string()) for c in columns])
    problems = schema_problems(transform_spec(resolved, KlaviyoProfiles), schema)
    assert len(problems) == 1 and "column 'phone' is not in the view" in problems[0]


def test_exact_spelling_wins_then_the_warehouses_folding() -> None:
    # a Snowflake view may hold a quoted lower-case "email" next to EMAIL: exact spelling wins
    sync = make_sync(mapping={"email": "email", "Phone": "phone_number"})
    resolved = resolve_sync_columns(sync, ["email", "EMAIL", "PHONE", "MODIFIED_AT"], SNOWFLAKE)
    assert resolved.identifier == "email" and list(resolved.mapping) == ["email", "PHONE"]
    # PostgreSQL folds to lower case
    resolved = resolve_sync_columns(
        make_sync(identifier="Email", mapping={"Email": "email"}, cursor="Modified_At"),
        ["email", "EMAIL", "modified_at"],
        POSTGRES,
    )
    assert (resolved.identifier, resolved.cursor, list(resolved.mapping)) == (
        "email",
        "modified_at",
        ["email"],
    )
    # DuckDB and BigQuery keep the view's spelling and match case-insensitively
    for dialect in (DUCKDB, BIGQUERY):
        resolved = resolve_sync_columns(make_sync(), ["Email", "Modified_At"], dialect)
        assert resolved.identifier == "Email" and resolved.cursor == "Modified_At"


def test_a_view_that_already_matches_gives_an_equal_sync() -> None:
    sync = make_sync()
    columns = ["email", "phone", "points", "email_consent", "consent_at", "sms_consent"]
    columns += ["country", "modified_at"]
    assert resolve_sync_columns(sync, columns, DUCKDB) == sync


def test_an_ambiguous_name_is_a_config_error_naming_sync_key_and_candidates() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_sync_columns(make_sync(), ["Email_Consent", "EMAIL_CONSENT", "email"], DUCKDB)
    message = str(err.value)
    assert isinstance(err.value, ReverseEtlError)
    assert "sync 'profiles'" in message
    assert "consent.email.column" in message and "'email_consent'" in message
    assert "'Email_Consent'" in message and "'EMAIL_CONSENT'" in message

    with pytest.raises(ConfigError, match=r"cursor names column 'modified_at'"):
        resolve_sync_columns(make_sync(), ["Modified_At", "MODIFIED_at"], BIGQUERY)


def test_two_mapping_keys_naming_one_column_is_a_config_error() -> None:
    sync = make_sync(mapping={"email": "email", "EMAIL": "properties.Email2"})
    with pytest.raises(ConfigError) as err:
        resolve_sync_columns(sync, ["EMAIL", "MODIFIED_AT"], SNOWFLAKE)
    message = str(err.value)
    assert "'email' and 'EMAIL' both name the view's column 'EMAIL'" in message
    assert "sync 'profiles'" in message


def test_consent_evidence_columns_are_respelled_and_fixed_values_kept() -> None:
    evidence = {
        "text": "I agree",
        "url": "https://shop.example.com/signup",
        "ip_address": {"column": "signup_ip"},
        "user_agent": {"column": "signup_ua"},
    }
    sync = make_sync(
        consent={
            "email": {"column": "email_consent", "consented_at": "consent_at", "evidence": evidence}
        }
    )
    resolved = resolve_sync_columns(sync, [*UPPER, "SIGNUP_IP", "SIGNUP_UA"], SNOWFLAKE)
    got = resolved.consent.email.evidence
    assert got is not None
    assert (got.ip_address.column, got.user_agent.column) == ("SIGNUP_IP", "SIGNUP_UA")
    assert (got.text, got.url) == ("I agree", "https://shop.example.com/signup")

"""Hostile numbers against both sandboxes, through the real engine and clients: one NaN or
Infinity is a row error and every good row of its batch lands; wide integers, HUGEINT,
UBIGINT and DECIMAL(38,10) leave in the request body digit for digit; REAL is sent as it
prints. Nothing off-spec reaches either API."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from reverse_etl.errors import EXIT_ROW_ERRORS
from tests.helpers import at, execute
from tests.sandboxes import Rig, assert_counts, email_of, error_rows, sync_entry

BIG = 2**53 + 1  # the first integer a double cannot hold
HUGE = 2**70  # beyond 64 bits
UMAX = 2**64 - 1
DEC = "1234567890123456789012345.1234567890"

COLUMNS = (
    "email VARCHAR, score DOUBLE, ratio REAL, big BIGINT, huge HUGEINT, umax UBIGINT, "
    "exact DECIMAL(38,10), modified_at TIMESTAMPTZ"
)


def rows_sql() -> str:
    values = [
        (0, "1.5", "1.1", BIG, HUGE, UMAX, DEC),
        (1, "'NaN'", "2.5", 1, 1, 1, "1"),
        (2, "'Infinity'", "'-Infinity'", 1, 1, 1, "1"),
        (3, "-0.25", "0.1", -BIG, -HUGE, 0, "-0.0000000001"),
    ]
    return ", ".join(
        f"('{email_of(n)}', {s}, {r}, {b}, {h}, {u}, {d}, '{at(n).isoformat()}')"
        for n, s, r, b, h, u, d in values
    )


def hostile_table(rig: Rig) -> None:
    execute(
        rig.db,
        "DROP TABLE IF EXISTS hostile",
        f"CREATE TABLE hostile ({COLUMNS})",
        f"INSERT INTO hostile VALUES {rows_sql()}",
    )


def assert_only_the_bad_rows_refused(result: Any) -> None:
    assert_counts(result, EXIT_ROW_ERRORS, read=4, rejected=2, sent=2)
    found = {(e["identifier"], e["column"], e["value"], e["reason"]) for e in error_rows(result)}
    assert found == {
        (email_of(1), "score", "NaN", "invalid_number"),
        (email_of(2), "score", "Infinity", "invalid_number"),
        (email_of(2), "ratio", "'-Infinity", "invalid_number"),  # neutralised for spreadsheets
    }


def dry_bodies(rig: Rig, sync: str, tmp_path: Path) -> bytes:
    target = tmp_path / f"{sync}.jsonl"
    rig.run(sync, dry_run=True, dry_run_file=str(target))
    return target.read_bytes()


KLAVIYO_MAPPING = {
    "email": "email",
    "score": "properties.Score",
    "ratio": "properties.Ratio",
    "big": "properties.Big",
    "huge": "properties.Huge",
    "umax": "properties.UMax",
    "exact": "properties.Exact",
}


def test_klaviyo_gets_exact_numbers_and_never_a_nan(klaviyo, tmp_path: Path) -> None:
    rig = klaviyo()
    hostile_table(rig)
    rig.configure([sync_entry("hostile", "klaviyo", dict(KLAVIYO_MAPPING), table="hostile")])
    body = dry_bodies(rig, "hostile", tmp_path)
    for digits in (str(BIG), str(HUGE), str(UMAX), DEC, str(-BIG), str(-HUGE)):
        assert f":{digits}".encode() in body, digits
    assert b'"Ratio":1.1' in body and b"NaN" not in body and b"Infinity" not in body

    result = rig.run("hostile")
    assert_only_the_bad_rows_refused(result)
    landed = rig.sandbox.profile_by_email(email_of(0))
    assert landed is not None
    props = landed["properties"]
    assert (props["Big"], props["UMax"], props["Ratio"]) == (BIG, UMAX, 1.1)
    assert rig.sandbox.profile_by_email(email_of(1)) is None
    assert rig.sandbox.violations == []


@pytest.mark.parametrize("kind", ["number", "string"])
def test_dotdigital_gets_exact_numbers_or_text(dotdigital, tmp_path: Path, kind: str) -> None:
    rig = dotdigital()
    hostile_table(rig)
    mapping: dict[str, Any] = {
        "email": "email",
        "score": "SCORE",
        "big": {"field": "BIG_NUMBER", "type": kind},
        "exact": {"field": "EXACT_VALUE", "type": kind},
    }
    rig.configure([sync_entry("hostile", "dotdigital", mapping, table="hostile")])
    body = dry_bodies(rig, "hostile", tmp_path)
    if kind == "number":
        assert f":{BIG}".encode() in body and f":{DEC}".encode() in body
    else:
        assert f'"{BIG}"'.encode() in body and f'"{Decimal(DEC)}"'.encode() in body
    assert b"NaN" not in body and b"Infinity" not in body

    result = rig.run("hostile")
    found = {(e["identifier"], e["column"], e["reason"]) for e in error_rows(result)}
    assert found == {
        (email_of(1), "score", "invalid_number"),
        (email_of(2), "score", "invalid_number"),
    }
    assert result.record.counts.sent == 2
    emails = {c["identifiers"]["email"] for c in rig.sandbox.contacts()}
    assert emails == {email_of(0), email_of(3)}
    assert rig.sandbox.violations == []


def test_a_dry_run_body_is_valid_json_whatever_the_numbers(klaviyo, tmp_path: Path) -> None:
    rig = klaviyo()
    hostile_table(rig)
    rig.configure([sync_entry("hostile", "klaviyo", dict(KLAVIYO_MAPPING), table="hostile")])
    for line in dry_bodies(rig, "hostile", tmp_path).splitlines():
        request = orjson.loads(line)  # strict: NaN or Infinity would raise here
        assert request["rows"] >= 1


def test_infinite_timestamps_are_row_errors_and_the_rest_lands(klaviyo) -> None:
    """DuckDB's ``infinity`` (and years past 9999) have no Python value: reporting such a row
    once raised OverflowError and stopped every run. As a cursor, a mapped timestamp or a
    consent date it is a row error naming the value, and the other rows land."""
    rig = klaviyo()
    ok = at(0).isoformat()
    execute(
        rig.db,
        "DROP TABLE IF EXISTS odd_times",
        "CREATE TABLE odd_times (email VARCHAR, joined TIMESTAMPTZ, email_consent VARCHAR, "
        "consent_at TIMESTAMPTZ, modified_at TIMESTAMPTZ)",
        f"INSERT INTO odd_times VALUES ('{email_of(0)}', TIMESTAMPTZ '2020-01-02 03:04:05+00', 'yes', '{ok}', '{ok}'),"
        f" ('{email_of(1)}', TIMESTAMPTZ '2020-01-02 03:04:05+00', 'yes', '{ok}', 'infinity'),"
        f" ('{email_of(2)}', 'infinity', 'yes', '{ok}', '{at(2).isoformat()}'),"
        f" ('{email_of(3)}', TIMESTAMPTZ '2020-01-02 03:04:05+00', 'yes', 'infinity', '{at(3).isoformat()}'),"
        f" ('{email_of(4)}', TIMESTAMPTZ '2020-01-02 03:04:05+00', 'yes', '{ok}', '{at(4).isoformat()}')",
    )
    consent = {"email": {"column": "email_consent", "consented_at": "consent_at"}}
    mapping = {"email": "email", "joined": "properties.Joined"}
    rig.configure([sync_entry("odd", "klaviyo", mapping, table="odd_times", consent=consent)])
    result = rig.run("odd")
    errors = {(e["identifier"], e["column"]): e for e in error_rows(result)}
    assert {k[0] for k in errors} == {email_of(1), email_of(2), email_of(3)}
    assert all(e["value"] == "infinity" for e in errors.values()), errors
    assert rig.sandbox.profile_by_email(email_of(0)) is not None
    assert rig.sandbox.profile_by_email(email_of(4)) is not None
    assert rig.sandbox.violations == []

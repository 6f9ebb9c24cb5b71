"""The error file users download: its columns, one row per problem, cell text for every value a
driver can return, formula neutralisation, and no registered secret ever written."""

from __future__ import annotations

import csv
import io
import shutil
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from reverse_etl.errors import ReverseEtlError
from reverse_etl.secrets import register_secret
from reverse_etl.transform.rowerrors import (
    CELL_LIMIT,
    ERROR_FILE_COLUMNS,
    FIXES,
    ErrorFileWriter,
    RowError,
    cell_text,
    spreadsheet_safe,
)


def write(
    errors: list[RowError], sync: str = "people", run_id: str = "run-1"
) -> tuple[str, ErrorFileWriter]:
    fh = io.StringIO(newline="")
    with ErrorFileWriter(fh, sync, run_id) as writer:
        writer.write(errors)
    text = fh.getvalue()
    assert text.startswith("\ufeff")  # so Excel on Windows reads it as UTF-8
    return text.removeprefix("\ufeff"), writer


def parse(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def test_header_is_the_documented_columns() -> None:
    text, writer = write([])
    assert parse(text) == [
        [
            "sync",
            "run_id",
            "row_number",
            "identifier",
            "email",
            "cursor",
            "column",
            "value",
            "reason",
            "message",
            "how_to_fix",
            "first_seen_run",
        ]
    ]
    assert list(ERROR_FILE_COLUMNS) == parse(text)[0]
    assert writer.count == 0


def test_one_row_per_problem_with_every_field() -> None:
    errors = [
        RowError(
            3, "a@x.com", "phone", "12345", "invalid_phone", "phone: not a valid phone number"
        ),
        RowError(3, "a@x.com", "email_consent", "maybe", "invalid_consent", "email_consent: no"),
        RowError(
            7, None, "email", None, "missing_identifier", "email: the identifier column is empty"
        ),
    ]
    text, writer = write(errors, sync="people", run_id="20250301T120000-abcd")
    header, *rows = parse(text)
    assert len(rows) == 3
    records = [dict(zip(header, r, strict=True)) for r in rows]
    assert records[0] == {
        "sync": "people",
        "run_id": "20250301T120000-abcd",
        "row_number": "3",
        "identifier": "a@x.com",
        "email": "",
        "cursor": "",
        "column": "phone",
        "value": "12345",
        "reason": "invalid_phone",
        "message": "phone: not a valid phone number",
        "how_to_fix": FIXES["invalid_phone"],
        "first_seen_run": "",  # no problem tracker (validate): left empty
    }
    assert records[1]["how_to_fix"] == FIXES["invalid_consent"]
    assert records[2]["identifier"] == "" and records[2]["value"] == ""
    assert records[2]["row_number"] == "7"
    assert writer.count == 3
    assert writer.by_reason == {"invalid_phone": 1, "invalid_consent": 1, "missing_identifier": 1}


def test_every_reason_code_has_a_fix() -> None:
    from reverse_etl.transform.transformer import MESSAGES

    assert set(MESSAGES) <= set(FIXES)
    assert all(FIXES.values())


def test_unknown_reason_gets_an_empty_fix_not_a_crash() -> None:
    text, _ = write([RowError(1, "x", "c", "v", "something_new", "m")])
    assert parse(text)[1][-1] == ""


@pytest.mark.parametrize(
    "value",
    ['=HYPERLINK("http://evil")', "+1+2", "-2+3", "@SUM(A1)", "\t=1", "\r=1", "=cmd|' /C calc'!A0"],
)
def test_formula_cells_are_neutralised(value: str) -> None:
    text, _ = write([RowError(1, value, value, value, "invalid_email", value)])
    row = parse(text)[1]
    for cell in (row[3], row[6], row[7], row[9]):  # identifier, column, value, message
        assert cell == "'" + value
    assert spreadsheet_safe(value) == "'" + value


def test_safe_cells_are_unchanged() -> None:
    for value in ["ann@example.com", "a=b", "1-2", "", "'quoted", " =x"]:
        assert spreadsheet_safe(value) == value


def test_negative_number_values_are_neutralised_too() -> None:
    text, _ = write([RowError(1, "id", "points", -5, "invalid_number", "points: not a number")])
    assert parse(text)[1][7] == "'-5"


def test_csv_quoting_of_commas_quotes_and_newlines() -> None:
    value = 'a, "b"\nc'
    text, _ = write([RowError(1, "id", "col", value, "invalid_email", "m")])
    assert parse(text)[1][7] == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ""),
        ("text", "text"),
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (Decimal("1234.5600"), "1234.5600"),
        (Decimal("-0.01"), "-0.01"),
        (Decimal("1E+3"), "1E+3"),
        (1.5, "1.5"),
        (float("nan"), "NaN"),
        (float("-inf"), "-Infinity"),
        (datetime(2025, 3, 1, 10, 0, tzinfo=UTC), "2025-03-01T10:00:00+00:00"),
        (
            datetime(2025, 3, 1, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-5))),
            "2025-03-01T10:00:00.123456-05:00",
        ),
        (datetime(2025, 3, 1, 10, 0), "2025-03-01T10:00:00"),
        (date(2025, 3, 1), "2025-03-01"),
        (time(9, 30), "09:30:00"),
        (b"\x00\xffab", "00ff6162"),
        (bytearray(b"\x01"), "01"),
        (memoryview(b"\x02"), "02"),
        ([1, "a", None], '[1,"a",null]'),
        ({"a": 1, "b": [True]}, '{"a":1,"b":[true]}'),
        ({1: "x"}, '{"1":"x"}'),
        ([Decimal("1.5"), date(2025, 1, 2)], '["1.5","2025-01-02"]'),
    ],
)
def test_cell_text(value, expected: str) -> None:
    assert cell_text(value) == expected


def test_cell_text_in_the_file() -> None:
    errors = [
        RowError(1, Decimal("10.50"), "amount", Decimal("10.50"), "invalid_number", "m"),
        RowError(2, "x", "at", datetime(2025, 1, 1, tzinfo=UTC), "timestamp_too_old", "m"),
        RowError(3, "x", "blob", b"\xde\xad", "invalid_email", "m"),
        RowError(4, "x", "tags", ["a", "b"], "invalid_email", "m"),
        RowError(5, "x", "f", float("nan"), "invalid_number", "m"),
        RowError(6, "x", "flag", True, "invalid_boolean", "m"),
    ]
    text, _ = write(errors)
    values = [r[7] for r in parse(text)[1:]]
    assert values == ["10.50", "2025-01-01T00:00:00+00:00", "dead", '["a","b"]', "NaN", "true"]
    assert parse(text)[1][3] == "10.50"  # the identifier goes through cell_text too


def test_registered_secret_never_appears_in_the_file() -> None:
    secret = "sk_live_ERRFILE_4e9d7"
    register_secret(secret)
    errors = [
        RowError(
            1,
            secret,
            "api_key",
            f"token={secret}",
            "destination_rejected",
            f"HTTP 401 for {secret}",
        ),
        RowError(2, "x", secret, [secret], "invalid_email", "m"),
    ]
    text, _ = write(errors, sync=f"sync-{secret}", run_id=secret)
    assert secret not in text
    assert "***" in text
    row = parse(text)[1]
    assert row[7] == "token=***"
    assert row[9] == "HTTP 401 for ***"


def test_rows_are_ordered_by_row_number_whatever_order_they_were_found_in() -> None:
    fh = io.StringIO(newline="")
    with ErrorFileWriter(fh, "people", "run-1") as writer:
        writer.write([RowError(9, "a", "c", "v", "invalid_email", "m")])  # the transform's
        writer.write([RowError(2, "b", "c", "v", "missing_required_field", "m")])  # screen's
        writer.write(
            [
                RowError(5, "c", "c", "v", "destination_rejected", "first"),  # the API's
                RowError(5, "c", "c", "v", "destination_rejected", "second"),
            ]
        )
    rows = parse(fh.getvalue().removeprefix("\ufeff"))[1:]
    assert [(r[2], r[9]) for r in rows] == [("2", "m"), ("5", "first"), ("5", "second"), ("9", "m")]
    assert writer.by_reason["destination_rejected"] == 2


def test_where_to_find_the_row_is_in_the_file() -> None:
    when = datetime(2025, 3, 1, 10, tzinfo=UTC)
    error = RowError(4, None, "id", None, "missing_identifier", "m", email="a@x.com", cursor=when)
    text, _ = write([error])
    header, row = parse(text)
    record = dict(zip(header, row, strict=True))
    assert (record["email"], record["cursor"]) == ("a@x.com", "2025-03-01T10:00:00+00:00")


def test_a_value_longer_than_a_spreadsheet_cell_is_cut_and_every_error_kept() -> None:
    """A 140,000-digit phone and a 200 KB event body an API refused: past csv's field limit
    (131,072) the merge on close once failed and the run lost its whole error file."""
    huge = "9" * 140_000
    event = '{"data": "' + "x" * 200_000 + '"}'
    errors = [
        RowError(1, "a@example.com", "phone", "+1", "invalid_phone", "too short"),
        RowError(2, "b@example.com", "phone", huge, "invalid_phone", "not a number"),
        RowError(3, "c@example.com", "(event)", event, "destination_rejected", "too large"),
    ]
    fh = io.StringIO(newline="")
    with ErrorFileWriter(fh, "people", "run-1") as writer:
        writer.write(errors[2:])  # out of row order: merged from two spools on close
        writer.write(errors[:2])
    rows = parse(fh.getvalue().removeprefix("\ufeff"))[1:]
    assert [r[2] for r in rows] == ["1", "2", "3"]
    for row, original in zip(rows[1:], (huge, event), strict=True):
        value = row[7]
        assert len(value) == CELL_LIMIT
        assert value.startswith(original[:1000])
        assert value.endswith(f"[{len(original):,} characters; cut to fit a spreadsheet cell]")
    assert rows[0][7] == "'+1"  # short values as they were (formula-safe)


def test_an_error_file_that_cannot_be_written_keeps_the_errors_on_disk() -> None:
    """A full disk while the file is merged: the run is told where the errors are kept (the
    watermark may already be past their rows), and the spool is not deleted."""

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            if self.tell() > 200:
                raise OSError(28, "No space left on device")
            return super().write(text)

    writer = ErrorFileWriter(Full(newline=""), "people", "run-1")
    writer.write(
        [RowError(n, f"p{n}@example.com", "email", "x", "invalid_email", "bad") for n in range(50)]
    )
    with pytest.raises(ReverseEtlError, match="No space left on device") as exc:
        writer.close()
    kept = Path(str(exc.value).rsplit(" in ", 1)[1])
    spooled = "".join(p.read_text() for p in sorted(kept.glob("*.csv")))
    assert all(f"p{n}@example.com" in spooled for n in range(50))
    shutil.rmtree(kept)

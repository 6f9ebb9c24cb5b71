"""The vectorised transform: consent spellings, timestamps, emails, phones, numbers, booleans,
dates, row-level checks, and that good and bad rows partition every batch."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from reverse_etl.extract import DUP_RANK
from reverse_etl.transform.consent import (
    NEVER_SUBSCRIBED,
    SUBSCRIBED,
    UNSUBSCRIBED,
    WORDS,
    canonical,
)
from reverse_etl.transform.transformer import (
    FieldSpec,
    Transformer,
    TransformResult,
    TransformSpec,
    schema_problems,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
CURSOR = pa.timestamp("us", tz="UTC")


def run(
    columns: dict[str, Any],
    fields: list[tuple[str, str, str | None]],
    *,
    identifier: str = "email",
    first_row: int = 1,
    now: datetime = NOW,
    **spec: Any,
) -> TransformResult:
    """Transform one batch: ``columns`` are the view's columns (an ``email`` identifier and a
    ``modified_at`` cursor are added when absent), ``fields`` (column, field, kind)."""
    n = len(next(iter(columns.values())))
    data: dict[str, Any] = {}
    if identifier == "email" and "email" not in columns:
        data["email"] = pa.array([f"p{i}@example.com" for i in range(n)])
    data.update(columns)
    if "modified_at" not in data:
        data["modified_at"] = pa.array([NOW - timedelta(days=1)] * n, CURSOR)
    batch = pa.RecordBatch.from_pydict(data)
    specs = [FieldSpec(c, f, k) for c, f, k in fields]
    if not any(f.column == identifier for f in specs):
        specs.insert(0, FieldSpec(identifier, "email", "email"))
    tspec = TransformSpec(
        sync="s", identifier=identifier, cursor="modified_at", fields=tuple(specs), **spec
    )
    transformer = Transformer(tspec, batch.schema, now=now)
    try:
        return transformer.transform(batch, first_row)
    finally:
        transformer.close()


def by_row(result: TransformResult, field: str) -> dict[int, Any]:
    rows = result.good.to_pylist()
    return {r["__row"]: r[field] for r in rows}


def errors_by_row(result: TransformResult) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in result.errors:
        out.setdefault(e.row_number, []).append(e.reason)
    return out


def assert_partition(result: TransformResult, n: int, first_row: int = 1) -> None:
    good = result.good["__row"].to_pylist()
    bad = {e.row_number for e in result.errors}
    assert len(good) == len(set(good)), "a row was output twice"
    assert not set(good) & bad, "a row is both sent and rejected"
    assert set(good) | bad == set(range(first_row, first_row + n)), "a row was lost"
    assert result.rejected == len(bad)
    assert result.good.num_rows + result.rejected == n


# --------------------------------------------------------------------------- consent


def consent_spellings() -> list[str]:
    words = list(WORDS)
    return words + [w.upper() for w in words] + [f"  {w.title()} " for w in words]


def test_every_consent_spelling_maps_to_its_canonical_value() -> None:
    spellings = consent_spellings()
    result = run({"c": spellings}, [("c", "consent.email", "consent")])
    assert result.errors == []
    got = by_row(result, "consent.email")
    for row, spelling in enumerate(spellings, start=1):
        expected = WORDS[spelling.strip().lower()]
        assert got[row] == expected, spelling
        assert canonical(spelling) == expected, spelling
    assert set(got.values()) == {SUBSCRIBED, UNSUBSCRIBED, NEVER_SUBSCRIBED}


@pytest.mark.parametrize("value", ["maybe", "2", "unknown?", "yess", "opt-in-ish", "-1"])
def test_invalid_consent_values_are_row_errors(value: str) -> None:
    result = run({"c": ["yes", value]}, [("c", "consent.email", "consent")])
    assert errors_by_row(result) == {2: ["invalid_consent"]}
    [error] = result.errors
    assert error.column == "c"
    assert error.value == value
    assert error.message == "c: not a recognised consent value"
    assert error.identifier == "p1@example.com"
    with pytest.raises(KeyError):
        canonical(value)
    assert_partition(result, 2)


def test_empty_or_null_consent_is_no_change_not_an_error() -> None:
    result = run({"c": ["", "   ", None, "no"]}, [("c", "consent.sms", "consent")])
    assert result.errors == []
    assert by_row(result, "consent.sms") == {1: None, 2: None, 3: None, 4: UNSUBSCRIBED}
    assert canonical("") is None and canonical("  ") is None and canonical(None) is None


def test_boolean_and_integer_consent_columns() -> None:
    result = run(
        {"b": [True, False, None], "i": pa.array([1, 0, None], pa.int64())},
        [("b", "consent.email", "consent"), ("i", "consent.sms", "consent")],
    )
    assert result.errors == []
    assert by_row(result, "consent.email") == {1: SUBSCRIBED, 2: UNSUBSCRIBED, 3: None}
    assert by_row(result, "consent.sms") == {1: SUBSCRIBED, 2: UNSUBSCRIBED, 3: None}
    assert canonical(True) == SUBSCRIBED and canonical(False) == UNSUBSCRIBED
    assert canonical(1) == SUBSCRIBED and canonical(0) == UNSUBSCRIBED


def test_consent_whitespace_agrees_with_canonical() -> None:
    spellings = ["yes\r", "\tno", "Opt-In\n"]
    result = run({"c": spellings}, [("c", "consent.email", "consent")])
    assert [canonical(s) for s in spellings] == [SUBSCRIBED, UNSUBSCRIBED, SUBSCRIBED]
    assert result.errors == []
    assert by_row(result, "consent.email") == {1: SUBSCRIBED, 2: UNSUBSCRIBED, 3: SUBSCRIBED}


@pytest.mark.parametrize("no_means", ["unsubscribed", "not_subscribed"])
def test_an_ambiguous_no_means_what_the_column_says(no_means: str) -> None:
    """ "no", "0" or a false boolean is an opt-out, or (not_subscribed) a box never ticked,
    which leaves the destination alone; an explicit opt-out word is an opt-out either way."""
    untouched = frozenset({"consent.email"}) if no_means == "not_subscribed" else frozenset()
    words = ["no", "0", "N", "unsubscribed", "opt-out", "yes"]
    texts = run({"c": words}, [("c", "consent.email", "consent")], no_change_on_no=untouched)
    flags = run(
        {"b": pa.array([False, True, None])},
        [("b", "consent.email", "consent")],
        no_change_on_no=untouched,
    )
    no = None if no_means == "not_subscribed" else UNSUBSCRIBED
    assert by_row(texts, "consent.email") == {
        1: no,
        2: no,
        3: no,
        4: UNSUBSCRIBED,
        5: UNSUBSCRIBED,
        6: SUBSCRIBED,
    }
    assert by_row(flags, "consent.email") == {1: no, 2: SUBSCRIBED, 3: None}
    assert texts.errors == [] and flags.errors == []


# --------------------------------------------------------------------------- timestamps


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def ts_run(values: list[Any], tz: str = "UTC", dtype: pa.DataType | None = None, **kw: Any):
    column = pa.array(values, dtype) if dtype is not None else pa.array(values)
    return run({"ts": column}, [("ts", "properties.ts", "datetime")], naive_timezone=tz, **kw)


def test_iso_timestamps_with_z_and_offsets_become_utc() -> None:
    result = ts_run(
        [
            "2025-03-01T10:00:00Z",
            "2025-03-01T10:00:00+02:00",
            "2025-03-01T10:00:00-0500",
            "2025-03-01 10:00:00.250+05:30",
        ],
        tz="America/New_York",  # must not affect values that carry an offset
    )
    assert result.errors == []
    got = by_row(result, "properties.ts")
    assert got == {
        1: utc(2025, 3, 1, 10),
        2: utc(2025, 3, 1, 8),
        3: utc(2025, 3, 1, 15),
        4: utc(2025, 3, 1, 4, 30, 0, 250000),
    }


def test_lower_case_z_suffix_is_utc() -> None:
    result = ts_run(["2025-03-01T10:00:00z"])
    assert result.errors == []
    assert by_row(result, "properties.ts") == {1: utc(2025, 3, 1, 10)}


@pytest.mark.parametrize(
    ("tz", "expected"),
    [
        ("UTC", utc(2025, 3, 1, 10)),
        ("America/New_York", utc(2025, 3, 1, 15)),  # EST, UTC-5
        ("Europe/Berlin", utc(2025, 3, 1, 9)),  # CET, UTC+1
    ],
)
def test_naive_timestamps_are_read_in_naive_timezone(tz: str, expected: datetime) -> None:
    result = ts_run(["2025-03-01 10:00:00", "2025-03-01T10:00"], tz=tz)
    assert result.errors == []
    assert by_row(result, "properties.ts") == {1: expected, 2: expected}


def test_naive_timezone_follows_daylight_saving() -> None:
    result = ts_run(["2025-05-01 10:00:00"], tz="America/New_York")
    assert by_row(result, "properties.ts") == {1: utc(2025, 5, 1, 14)}  # EDT, UTC-4


def test_date_only_text_is_midnight_in_utc() -> None:
    result = ts_run(["2025-03-01"], tz="UTC")
    assert result.errors == []
    assert by_row(result, "properties.ts") == {1: utc(2025, 3, 1)}


def test_date_only_text_is_midnight_in_naive_timezone() -> None:
    result = ts_run(["2025-03-01"], tz="America/New_York")
    assert result.errors == []
    assert by_row(result, "properties.ts") == {1: utc(2025, 3, 1, 5)}


@pytest.mark.parametrize(
    "value", ["yesterday", "31/02/2025", "2025-02-30T10:00:00", "2025-03-01T25:00:00", "soon"]
)
def test_unparseable_timestamps_are_row_errors(value: str) -> None:
    result = ts_run(["2025-03-01T10:00:00Z", value])
    assert errors_by_row(result) == {2: ["invalid_timestamp"]}
    assert result.errors[0].value == value
    assert result.errors[0].message == "ts: not a timestamp that can be read"
    assert_partition(result, 2)


def test_timestamps_before_1990_are_refused() -> None:
    result = ts_run(["1989-12-31T23:59:59Z", "1990-01-01T00:00:00Z", "1970-01-01", "0001-01-01"])
    assert errors_by_row(result) == {
        1: ["timestamp_too_old"],
        3: ["timestamp_too_old"],
        4: ["timestamp_too_old"],
    }
    assert by_row(result, "properties.ts") == {2: utc(1990, 1, 1)}


def test_future_timestamps_beyond_the_skew_are_refused() -> None:
    values = [
        (NOW + timedelta(minutes=5)).isoformat(),  # within the 10 minute skew
        (NOW + timedelta(minutes=11)).isoformat(),
        (NOW + timedelta(days=365)).isoformat(),
        NOW.isoformat(),
    ]
    result = ts_run(values)
    assert errors_by_row(result) == {2: ["timestamp_in_future"], 3: ["timestamp_in_future"]}
    assert result.errors[0].message == "ts: in the future"
    # a larger skew lets the 11-minute one through
    wider = ts_run(values, max_future_skew=timedelta(minutes=30))
    assert errors_by_row(wider) == {3: ["timestamp_in_future"]}


def test_tz_aware_arrow_timestamp_column() -> None:
    berlin = pa.timestamp("us", tz="Europe/Berlin")
    values = [utc(2025, 3, 1, 9), utc(1980, 1, 1), None]
    result = ts_run(values, tz="America/New_York", dtype=berlin)
    assert errors_by_row(result) == {2: ["timestamp_too_old"]}
    assert by_row(result, "properties.ts") == {1: utc(2025, 3, 1, 9), 3: None}


def test_naive_arrow_timestamp_column_uses_naive_timezone() -> None:
    naive = pa.timestamp("us")
    values = [datetime(2025, 3, 1, 10), datetime(2025, 5, 1, 10)]
    result = ts_run(values, tz="America/New_York", dtype=naive)
    assert result.errors == []
    assert by_row(result, "properties.ts") == {1: utc(2025, 3, 1, 15), 2: utc(2025, 5, 1, 14)}
    result = ts_run(values, tz="UTC", dtype=naive)
    assert by_row(result, "properties.ts") == {1: utc(2025, 3, 1, 10), 2: utc(2025, 5, 1, 10)}


def test_date_arrow_column_mapped_as_datetime() -> None:
    result = ts_run([date(2025, 3, 1)], tz="Europe/Berlin", dtype=pa.date32())
    assert by_row(result, "properties.ts") == {1: utc(2025, 2, 28, 23)}


def test_kind_inferred_from_arrow_timestamp_type() -> None:
    column = pa.array([utc(1980, 1, 1), utc(2025, 1, 1)], CURSOR)
    result = run({"ts": column}, [("ts", "properties.Last_Order_At", None)])
    assert errors_by_row(result) == {1: ["timestamp_too_old"]}


# --------------------------------------------------------------------------- emails


def test_emails_are_trimmed_and_lower_cased() -> None:
    result = run({"email": ["  Ann.Lee@Example.COM ", "BOB@EXAMPLE.ORG", "c@d.io"]}, [])
    assert result.errors == []
    assert by_row(result, "email") == {
        1: "ann.lee@example.com",
        2: "bob@example.org",
        3: "c@d.io",
    }
    assert by_row(result, "__id") == by_row(result, "email")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("not-an-email", "@-sign"),
        ("a@b", "period"),
        ("a@@b.com", "@"),
        ("ann@example..com", "two periods"),
        ("ann smith@example.com", ""),
        # well-formed but too long (the fast path's pattern has no lengths)
        ("b" + "x" * 300 + "@example.com", "too long"),
    ],
)
def test_malformed_emails_are_rejected_with_a_message(value: str, fragment: str) -> None:
    result = run({"email": ["ok@example.com", value]}, [])
    assert errors_by_row(result) == {2: ["invalid_email"]}  # no extra missing_identifier
    [error] = result.errors
    assert error.column == "email"
    assert error.value == value
    assert error.identifier == value
    assert error.message.startswith("email: ")
    assert fragment in error.message
    assert_partition(result, 2)


def test_malformed_email_in_a_non_identifier_column() -> None:
    result = run(
        {"customer_id": ["c1", "c2"], "email": ["x@example.com", "nope"]},
        [("customer_id", "external_id", "string"), ("email", "email", "email")],
        identifier="customer_id",
    )
    assert errors_by_row(result) == {2: ["invalid_email"]}
    assert result.errors[0].identifier == "c2"


def test_internationalised_address_is_rescued_by_the_slow_path() -> None:
    result = run({"email": ["用户@例子.广告", "José@Example.com", "ann@bücher.de"]}, [])
    assert result.errors == []
    got = by_row(result, "email")
    assert got[1] == "用户@例子.广告"
    assert got[2] == "josé@example.com"
    assert got[3] == "ann@bücher.de"
    assert by_row(result, "__id") == got


# --------------------------------------------------------------------------- phones


def phone_run(phones: list[Any], **kw: Any) -> TransformResult:
    columns: dict[str, Any] = {"phone": phones}
    if "country" in kw:
        columns["country"] = kw.pop("country")
    return run(columns, [("phone", "phone_number", "phone")], **kw)


def test_e164_numbers_are_kept() -> None:
    result = phone_run(["+14155552671", "+442079460958", "+33612345678"])
    assert result.errors == []
    assert list(by_row(result, "phone_number").values()) == [
        "+14155552671",
        "+442079460958",
        "+33612345678",
    ]


def test_formatted_international_numbers_are_normalised() -> None:
    result = phone_run(["+1 (415) 555-2671", "0044 20 7946 0958", "+44 (0)20 7946 0958"])
    got = by_row(result, "phone_number")
    assert got.get(1) == "+14155552671"
    assert got.get(2) == "+442079460958"
    # '(0)' is a common UK spelling: either normalised or reported, never sent as is
    assert got.get(3) in (None, "+442079460958")
    assert_partition(result, 3)


def test_national_numbers_use_default_phone_region() -> None:
    result = phone_run(
        ["(415) 555-2671", "415.555.2671", "415-555-2671"], default_phone_region="US"
    )
    assert result.errors == []
    assert set(by_row(result, "phone_number").values()) == {"+14155552671"}


def test_national_numbers_use_phone_region_column() -> None:
    result = phone_run(
        ["020 7946 0958", "07911 123456", "(415) 555-2671", "06 12 34 56 78", "020 7946 0958"],
        country=["GB", " gb ", "US", "FR", None],
        phone_region_column="country",
        default_phone_region="GB",
    )
    assert result.errors == []
    assert by_row(result, "phone_number") == {
        1: "+442079460958",
        2: "+447911123456",
        3: "+14155552671",
        4: "+33612345678",
        5: "+442079460958",  # no region on the row: the default
    }


def test_national_number_without_any_region_is_rejected_with_a_hint() -> None:
    result = phone_run(["415.555.2671"])
    assert errors_by_row(result) == {1: ["invalid_phone"]}
    assert "default_phone_region" in result.errors[0].message


@pytest.mark.parametrize("value", ["12345", "+1 555", "+999 1234567", "call me", "+1415555267100"])
def test_invalid_phones_are_rejected(value: str) -> None:
    result = phone_run(["+14155552671", value], default_phone_region="US")
    assert errors_by_row(result) == {2: ["invalid_phone"]}
    assert result.errors[0].column == "phone"
    assert result.errors[0].value == value
    assert result.errors[0].message.startswith("phone: ")


def test_empty_phone_is_no_error() -> None:
    result = phone_run(["", None, "   "])
    assert result.errors == []
    assert set(by_row(result, "phone_number").values()) == {None}


# --------------------------------------------------------------------------- other kinds


def test_number_coercion_and_errors() -> None:
    result = run(
        {
            "n": ["12", " 7 ", "1,000", "$5", "abc", "", None],
            "x": ["3.5", "1e3", "-2", "", "x", "1", "2"],
        },
        [("n", "properties.n", "integer"), ("x", "properties.x", "number")],
    )
    assert errors_by_row(result) == {
        3: ["invalid_number"],
        4: ["invalid_number"],
        5: ["invalid_number", "invalid_number"],
    }
    assert by_row(result, "properties.n") == {1: 12, 2: 7, 6: None, 7: None}
    assert by_row(result, "properties.x") == {1: 3.5, 2: 1000.0, 6: 1.0, 7: 2.0}
    messages = {(e.row_number, e.column): e.message for e in result.errors}
    assert messages[(5, "x")].startswith("x: not a number")


def test_numeric_arrow_columns_cast() -> None:
    result = run(
        {"n": pa.array([1.0, 2.5, None]), "d": pa.array([1, 2, 3], pa.int32())},
        [("n", "properties.n", "integer"), ("d", "properties.d", "number")],
    )
    # 2.5 is not rounded into an integer field: the row says so instead
    assert errors_by_row(result) == {2: ["invalid_number"]}
    assert by_row(result, "properties.n") == {1: 1, 3: None}
    assert by_row(result, "properties.d") == {1: 1, 3: 3}


def test_boolean_coercion_and_errors() -> None:
    result = run(
        {
            "b": ["yes", "N", "0", "TRUE", "t", "maybe", "", None],
            "i": pa.array([1, 0, 5, None, 0, 0, 0, 0]),
        },
        [("b", "properties.b", "boolean"), ("i", "properties.i", "boolean")],
    )
    assert errors_by_row(result) == {6: ["invalid_boolean"]}
    assert result.errors[0].message == "b: not a true/false value"
    assert by_row(result, "properties.b") == {
        1: True,
        2: False,
        3: False,
        4: True,
        5: True,
        7: None,
        8: None,
    }
    assert by_row(result, "properties.i") == {
        1: True,
        2: False,
        3: True,
        4: None,
        5: False,
        7: False,
        8: False,
    }


def test_dates_no_destination_can_read_are_row_errors() -> None:
    """DuckDB reads 'infinity' and years 0 or past 9999 as dates; they were sent as the text
    "infinity" or "10000-01-01". As text or as DATE values (infinity is int32's extreme in
    Arrow), each is an ``invalid_date`` naming its value, and the good row still passes."""
    text = run(
        {"d": ["infinity", "-infinity", "10000-01-01", "0000-01-01", "9999-12-31", "0001-01-01"]},
        [("d", "properties.d", "date")],
    )
    assert errors_by_row(text) == {r: ["invalid_date"] for r in (1, 2, 3, 4)}
    assert by_row(text, "properties.d") == {5: date(9999, 12, 31), 6: date(1, 1, 1)}
    typed = run(
        {"d": pa.array([2**31 - 1, -(2**31 - 1), 3_000_000, 20_000], pa.date32())},
        [("d", "properties.d", "date")],
    )
    assert errors_by_row(typed) == {r: ["invalid_date"] for r in (1, 2, 3)}
    values = [e.value for e in typed.errors]
    assert values[:2] == ["infinity", "-infinity"] and "3000000" in values[2]
    assert by_row(typed, "properties.d") == {4: date(1970, 1, 1) + timedelta(days=20_000)}


def test_date_coercion_and_errors() -> None:
    result = run(
        {"d": ["2025-03-01", "2025-03-01T23:00:00", "2025-13-01", "01/02/2025", "", None]},
        [("d", "properties.d", "date")],
    )
    assert errors_by_row(result) == {3: ["invalid_date"], 4: ["invalid_date"]}
    assert by_row(result, "properties.d") == {
        1: date(2025, 3, 1),
        2: date(2025, 3, 1),
        5: None,
        6: None,
    }


def test_string_fields_are_trimmed_and_blank_is_null() -> None:
    result = run(
        {"f": ["  Ann ", "", None, pa.scalar("x").as_py()]}, [("f", "first_name", "string")]
    )
    assert by_row(result, "first_name") == {1: "Ann", 2: None, 3: None, 4: "x"}


# --------------------------------------------------------------------------- row checks


def test_missing_identifier() -> None:
    result = run({"email": ["a@example.com", None, "", "   "]}, [])
    assert errors_by_row(result) == {
        2: ["missing_identifier"],
        3: ["missing_identifier"],
        4: ["missing_identifier"],
    }
    assert result.errors[0].column == "email"
    assert result.errors[0].message == "email: the identifier column is empty"
    assert_partition(result, 4)


def test_missing_cursor() -> None:
    cursor = pa.array([NOW - timedelta(days=1), None], CURSOR)
    result = run({"email": ["a@example.com", "b@example.com"], "modified_at": cursor}, [])
    assert errors_by_row(result) == {2: ["missing_cursor"]}
    assert result.errors[0].column == "modified_at"
    assert result.errors[0].identifier == "b@example.com"


def test_superseded_duplicates_are_rejected() -> None:
    older, newer = NOW - timedelta(days=2), NOW - timedelta(days=1)
    cursor = pa.array([older, newer, older], CURSOR)
    result = run(
        {
            "email": ["A@example.com", "a@example.com", "b@example.com"],
            "modified_at": cursor,
            DUP_RANK: pa.array([2, 1, 1], pa.int64()),  # ranked by the read (extract.build_query)
        },
        [],
    )
    assert errors_by_row(result) == {1: ["duplicate_identifier"]}
    assert result.errors[0].column == "email"
    assert by_row(result, "email") == {2: "a@example.com", 3: "b@example.com"}


def test_row_numbers_continue_from_first_row() -> None:
    result = run({"email": ["a@example.com", "bad", "c@example.com"]}, [], first_row=501)
    assert errors_by_row(result) == {502: ["invalid_email"]}
    assert sorted(result.good["__row"].to_pylist()) == [501, 503]
    assert_partition(result, 3, first_row=501)


def test_good_and_bad_rows_partition_the_batch() -> None:
    n = 400
    emails, phones, consent, ts = [], [], [], []
    for i in range(n):
        emails.append(
            [f"u{i}@example.com", f"U{i}@Example.com ", "bad", None, "用户@例子.广告"][i % 5]
        )
        phones.append(["+14155552671", "(415) 555-2671", "123", None, "+447911123456", "x"][i % 6])
        consent.append(["yes", "no", "maybe", "", None, "opt-in", "2"][i % 7])
        ts.append(["2025-03-01T10:00:00Z", "yesterday", "1970-01-01", None, "2025-03-01"][i % 4])
    cursor = pa.array([None if i % 11 == 0 else NOW - timedelta(days=1) for i in range(n)], CURSOR)
    result = run(
        {"email": emails, "phone": phones, "c": consent, "ts": ts, "modified_at": cursor},
        [
            ("email", "email", "email"),
            ("phone", "phone_number", "phone"),
            ("c", "consent.email", "consent"),
            ("ts", "properties.ts", "datetime"),
        ],
        default_phone_region="US",
        first_row=1001,
    )
    assert_partition(result, n, first_row=1001)
    assert 0 < result.good.num_rows < n
    # every error row really has a problem, and no good row carries one
    good = result.good.to_pylist()
    assert all(r["__id"] is not None and r["email"] is not None for r in good)
    reasons = {e.reason for e in result.errors}
    assert reasons >= {
        "invalid_email",
        "missing_identifier",
        "invalid_phone",
        "invalid_consent",
        "invalid_timestamp",
        "timestamp_too_old",
        "missing_cursor",
    }
    # one row with several problems is counted once but reports each problem
    per_row = errors_by_row(result)
    assert any(len(v) > 1 for v in per_row.values())


def test_schema_problems_name_missing_and_mistyped_columns() -> None:
    schema = pa.schema(
        [("Email", pa.string()), ("modified_at", CURSOR), ("n", pa.list_(pa.int64()))]
    )
    spec = TransformSpec(
        sync="s",
        identifier="email",
        cursor="modified_at",
        fields=(FieldSpec("email", "email", "email"), FieldSpec("n", "properties.n", "integer")),
    )
    problems = schema_problems(spec, schema)
    assert any("column 'email' is not in the view" in p and "'Email'" in p for p in problems)
    assert any("column 'n' is list<item: int64>" in p and "needs a integer" in p for p in problems)
    with pytest.raises(ValueError, match="not in the view"):
        Transformer(spec, schema)


# --------------------------------------------------------------------------- hostile numbers


def test_nan_and_infinity_are_row_errors_and_the_good_rows_pass() -> None:
    values = [1.5, float("nan"), float("inf"), float("-inf"), None, -2.0]
    result = run(
        {"x": pa.array(values, pa.float64()), "r": pa.array(values, pa.float32())},
        [("x", "properties.x", None), ("r", "properties.r", None)],
    )
    assert errors_by_row(result) == {
        2: ["invalid_number", "invalid_number"],
        3: ["invalid_number", "invalid_number"],
        4: ["invalid_number", "invalid_number"],
    }
    shown = {(e.row_number, e.column): e.value for e in result.errors}
    assert shown[(2, "x")] != shown[(2, "x")]  # the NaN itself is what the error file names
    assert (shown[(3, "x")], shown[(4, "r")]) == (float("inf"), float("-inf"))
    assert by_row(result, "properties.x") == {1: 1.5, 5: None, 6: -2.0}
    # REAL is sent as the number it prints as, not as its widened binary value
    assert by_row(result, "properties.r")[1] == 1.5
    real = run({"r": pa.array([1.1], pa.float32())}, [("r", "properties.r", None)])
    assert by_row(real, "properties.r") == {1: 1.1}


def test_wide_integers_and_decimals_keep_every_digit() -> None:
    big = 2**53 + 1
    result = run(
        {
            "i": pa.array([big, -big], pa.int64()),
            "u": pa.array([2**64 - 1, 0], pa.uint64()),
            "d": pa.array(
                [Decimal("1234567890123456789012345.1234567890"), Decimal("0.1000000000")],
                pa.decimal128(38, 10),
            ),
        },
        [("i", "properties.i", None), ("u", "properties.u", None), ("d", "properties.d", None)],
    )
    assert result.errors == []
    assert by_row(result, "properties.i") == {1: big, 2: -big}
    assert by_row(result, "properties.u") == {1: 2**64 - 1, 2: 0}
    assert by_row(result, "properties.d")[1] == Decimal("1234567890123456789012345.1234567890")


def test_text_numbers_are_exact_or_refused() -> None:
    result = run(
        {
            "x": ["0.1", "123456789012345", "1234567890123456789", "NaN", "inf", "1e400", "7"],
            "n": ["9007199254740993", "2.0", "2.5", "99999999999999999999", "1", "1", "1"],
        },
        [("x", "properties.x", "number"), ("n", "properties.n", "integer")],
    )
    assert errors_by_row(result) == {
        3: ["number_out_of_range", "invalid_number"],  # 19 digits; 2.5 is not an integer
        4: ["invalid_number", "number_out_of_range"],
        5: ["invalid_number"],
        6: ["invalid_number"],
    }
    assert by_row(result, "properties.x") == {1: 0.1, 2: 123456789012345.0, 7: 7.0}
    assert by_row(result, "properties.n") == {1: 2**53 + 1, 2: 2, 7: 1}
    assert errors_by_row(run({"n": ["2.5"]}, [("n", "properties.n", "integer")])) == {
        1: ["invalid_number"]
    }


def test_nested_values_holding_nan_are_row_errors() -> None:
    nested = pa.array(
        [[1.0, 2.0], [1.0, float("nan")], None, [float("inf")]], pa.list_(pa.float64())
    )
    labels = pa.array([{"k": "NaN"}, {"k": "fine"}, {"k": "x"}, {"k": "y"}])
    result = run(
        {"l": nested, "s": labels}, [("l", "properties.l", None), ("s", "properties.s", None)]
    )
    assert errors_by_row(result) == {2: ["invalid_number"], 4: ["invalid_number"]}
    assert "NaN" in next(e.message for e in result.errors if e.row_number == 2)
    # a string "NaN" inside a record is text, not a number: sent as it is
    assert by_row(result, "properties.s")[1] == {"k": "NaN"}


# --------------------------------------------------------------------------- the cursor


def test_cursor_in_the_future_is_a_row_error_that_holds_back_the_watermark() -> None:
    cursor = pa.array(
        [NOW - timedelta(days=1), NOW + timedelta(minutes=5), NOW + timedelta(days=3650)], CURSOR
    )
    result = run({"email": ["a@x.com", "b@x.com", "c@x.com"], "modified_at": cursor}, [])
    assert errors_by_row(result) == {3: ["cursor_in_future"]}  # 5 minutes is within the skew
    assert result.future == frozenset({2})  # batch position of row 3
    err = result.errors[0]
    assert (err.column, err.cursor) == ("modified_at", NOW + timedelta(days=3650))


def test_naive_and_date_cursors_are_checked_for_the_future_too() -> None:
    naive = pa.array([datetime(2099, 1, 1), datetime(2025, 1, 1)], pa.timestamp("us"))
    assert errors_by_row(run({"modified_at": naive}, [])) == {1: ["cursor_in_future"]}
    days = pa.array([date(9999, 12, 31), date(2025, 1, 1)], pa.date32())
    assert errors_by_row(run({"modified_at": days}, [])) == {1: ["cursor_in_future"]}
    counter = pa.array([10**15, 1], pa.int64())  # a counter has no future
    assert run({"modified_at": counter}, []).errors == []


def test_unreadable_cursor_text_is_reported_as_itself() -> None:
    cursor = pa.array([None, None, NOW - timedelta(days=1)], CURSOR)
    text = pa.array(["yesterday", " ", "2025-05-31T12:00:00Z"])
    result = run(
        {"email": ["a@x.com", "b@x.com", "c@x.com"], "modified_at": cursor, "raw": text},
        [],
        cursor_text="raw",
    )
    assert errors_by_row(result) == {1: ["invalid_cursor"], 2: ["missing_cursor"]}
    bad = result.errors[0]
    assert (bad.column, bad.value) == ("modified_at", "yesterday")
    assert "modified_at" in bad.message


def test_row_errors_carry_the_email_and_cursor_to_find_the_row() -> None:
    when = NOW - timedelta(days=1)
    result = run(
        {
            "id": [None, "c2"],
            "mail": ["Lost@Example.com", "bad"],
            "modified_at": pa.array([when, when], CURSOR),
        },
        [("id", "external_id", "string"), ("mail", "email", "email")],
        identifier="id",
    )
    by_reason = {e.reason: e for e in result.errors}
    missing = by_reason["missing_identifier"]
    assert (missing.email, missing.cursor) == ("Lost@Example.com", when)
    assert by_reason["invalid_email"].email == "bad"


def test_one_column_read_by_two_fields_is_reported_once() -> None:
    """Email and SMS consent sharing one ``consented_at`` column: a bad time in it is one
    problem of the row, one line of the error file, not one per channel."""
    late = (NOW + timedelta(days=30)).isoformat()
    result = run(
        {"consent_at": [NOW.isoformat(), late]},
        [
            ("consent_at", "consent.email.at", "datetime"),
            ("consent_at", "consent.sms.at", "datetime"),
        ],
    )
    assert errors_by_row(result) == {2: ["timestamp_in_future"]}


@pytest.mark.parametrize("strict", [False, True])
def test_a_lower_case_default_phone_region_works_on_both_paths(strict: bool) -> None:
    """``default_phone_region: gb`` is accepted by the config: the strict check (every number
    through phonenumbers) once passed it as written and refused every national number."""
    result = phone_run(
        ["020 7946 0958", "07911 123456"], default_phone_region="gb", strict_phones=strict
    )
    assert result.errors == []
    assert by_row(result, "phone_number") == {1: "+442079460958", 2: "+447911123456"}

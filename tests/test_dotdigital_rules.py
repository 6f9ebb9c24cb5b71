"""Unit tests of the Dotdigital pieces that need no sandbox: call-budget pacing and the insight
data rules (names, and the DuckDB checks and rewrites applied to whole batches)."""

from __future__ import annotations

from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pytest

from reverse_etl.destinations.dotdigital import insight_rules as rules
from reverse_etl.destinations.dotdigital.pacing import CallBudget

# --------------------------------------------------------------------------- pacing


class FakeTime:
    def __init__(self, now: float = 1_750_000_000.0):
        self.now = now
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def budget(t: FakeTime) -> CallBudget:
    return CallBudget(margin=0.05, clock=t.clock, sleep=t.sleep)


def test_budget_lets_calls_through_until_the_window_is_spent_then_waits_for_the_reset():
    t = FakeTime()
    b = budget(t)
    assert b.acquire() == 0.0  # nothing known yet: nothing held back
    b.observe(
        {
            "X-RateLimit-Limit": "2000",
            "X-RateLimit-Remaining": "2",
            "X-RateLimit-Reset": str(int(t.now) + 30),
        }
    )
    assert b.acquire() == 0.0 and b.acquire() == 0.0
    assert t.slept == []
    waited = b.acquire()  # the third call would be refused: wait for the reset
    assert waited == pytest.approx(30.05)
    assert t.slept == [pytest.approx(30.05)] and b.waits == 1
    assert b.acquire() == 0.0  # a new window: unknown until the next answer


def test_budget_follows_each_answer_and_reads_a_relative_reset():
    t = FakeTime()
    b = budget(t)
    b.observe({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "12"})  # seconds from now
    assert b.acquire() == pytest.approx(12.05)
    b.observe({"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": str(int(t.now) + 60)})
    assert b.remaining == 5 and b.acquire() == 0.0 and b.remaining == 4


def test_budget_ignores_answers_without_or_with_bad_headers():
    t = FakeTime()
    b = budget(t)
    b.observe({})
    b.observe({"X-RateLimit-Remaining": "lots"})
    assert b.remaining is None and b.acquire() == 0.0


def test_budget_does_not_wait_for_a_reset_already_past():
    t = FakeTime()
    b = budget(t)
    b.observe({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(t.now) - 5)})
    assert b.acquire() == 0.0 and t.slept == []


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("orders", True),
        ("catalog_estar", True),
        ("-x", True),
        ("x", False),  # two characters at least
        ("2024_catalog", False),
        ("my catalog", False),
        ("a" * 255, True),
        ("a" * 256, False),
    ],
)
def test_collection_names_follow_the_spec_pattern(name, ok):
    assert (rules.collection_problem(name) is None) is ok


@pytest.mark.parametrize(
    ("key", "proposal"),
    [
        ("Unit Price", "Unit_Price"),
        ("2nd_line", "_2nd_line"),
        ("price€", "price"),
        ("a" * 300, "a" * 255),
    ],
)
def test_invalid_keys_get_a_proposal(key, proposal):
    problem = rules.key_problem(key)
    assert problem is not None and f"try {proposal!r}" in problem
    assert rules.key_problem(proposal) is None


def test_dash_underscore_twins_clash():
    assert rules.clashes(["a-b", "c", "a_b", "d-e"]) == [("a-b", "a_b")]


# --------------------------------------------------------------------------- batch SQL


def evaluate(sql_of: Any, values: list[Any], dtype: pa.DataType) -> list[Any]:
    sql = sql_of('t."v"', dtype)
    if sql is None:
        return [None] * len(values)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("batch", pa.table({"v": pa.array(values, dtype)}))
    return [row[0] for row in con.execute(f"SELECT {sql} FROM batch AS t").fetchall()]


def test_nested_arrays_are_found_at_any_depth_but_arrays_of_records_are_fine():
    lists = pa.list_(pa.list_(pa.int64()))
    assert evaluate(rules.nested_array_sql, [[[1]], [], None, [None], [[]]], lists) == [
        True,
        False,
        False,
        False,
        True,  # an empty inner array is still an array
    ]
    records = pa.list_(
        pa.struct([("dims", pa.list_(pa.int64())), ("deep", pa.list_(pa.list_(pa.int64())))])
    )
    assert evaluate(
        rules.nested_array_sql,
        [[{"dims": [1], "deep": None}], [{"dims": None, "deep": [[2]]}]],
        records,
    ) == [False, True]
    assert rules.nested_array_sql('t."v"', pa.list_(pa.struct([("a", pa.int64())]))) is None
    assert rules.nested_array_sql('t."v"', pa.string()) is None


def test_bad_keys_in_records_and_maps_are_found_row_by_row():
    bad_struct = pa.struct([("unit price", pa.float64())])
    assert evaluate(rules.bad_key_sql, [{"unit price": 1.0}, None], bad_struct) == [True, False]
    assert rules.bad_struct_keys(pa.list_(bad_struct), "lines") == ["lines[].unit price"]
    maps = pa.map_(pa.string(), pa.int64())
    values = [[("fine", 1)], [("not fine", 1)], [("a-b", 1), ("a_b", 2)], None]
    assert evaluate(rules.bad_key_sql, values, maps) == [False, True, True, False]
    assert rules.bad_key_sql('t."v"', pa.struct([("ok", pa.int64())])) is None


def test_values_are_rewritten_to_what_the_api_reads_at_any_depth():
    from datetime import UTC, datetime
    from decimal import Decimal

    dtype = pa.list_(
        pa.struct(
            [
                ("at", pa.timestamp("us", tz="UTC")),
                ("price", pa.decimal128(10, 2)),
                ("n", pa.int64()),
            ]
        )
    )
    value = [
        {"at": datetime(2025, 3, 1, 10, 0, tzinfo=UTC), "price": Decimal("1.50"), "n": 2},
        None,
    ]
    [out] = evaluate(
        lambda e, d: f"CAST(to_json({rules.json_value_sql(e, d)}) AS VARCHAR)", [value], dtype
    )
    assert orjson.loads(out) == [{"at": "2025-03-01T10:00:00Z", "price": 1.5, "n": 2}, None]
    assert rules.json_value_sql('t."v"', pa.list_(pa.int64())) == 't."v"'  # untouched

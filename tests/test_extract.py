"""The incremental read against DuckDB: compound (cursor, id) watermark, ties at batch and run
boundaries, NULL cursors and identifiers, lookback for late rows, duplicate ranking."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from reverse_etl.extract import DUP_RANK, batch_watermark, build_query, plan_read
from reverse_etl.sources.base import Dialect
from reverse_etl.sources.duckdb import DuckDBSource
from reverse_etl.state import StateStore, Watermark
from tests.helpers import T0, create_table, execute

COLUMNS = {"n": "INTEGER", "id": "VARCHAR", "modified_at": "TIMESTAMPTZ"}
VIEW = "SELECT * FROM t"


def query(source: DuckDBSource, watermark, *, lookback=timedelta(0), view=VIEW):
    return build_query(
        view,
        source.dialect,
        cursor="modified_at",
        identifier="id",
        watermark=watermark,
        lookback=lookback,
    )


def read_all(db: Path, watermark=None, **kwargs) -> pa.Table:
    with DuckDBSource(db) as source:
        q = query(source, watermark, **kwargs)
        batches = list(source.stream(q.sql, q.params, 1000))
    if not batches:
        return pa.table({"n": pa.array([], pa.int32())})
    return pa.Table.from_batches(batches)


def run_one_batch_at_a_time(db: Path, store: StateStore, batch_size: int, limit: int = 100):
    """Each loop is a separate 'run' that stops (as if it crashed) right after the first batch
    that moved the watermark: a fresh query from the stored watermark, batches read until one
    moves it, which is then stored (as the engine does after an acknowledged batch). Rows
    without a cursor or an identifier are read again by every run (so they are reported every
    time); each is recorded once. Returns the ``n`` of every row read, in first-read order, and
    the number of runs; reading stops when a whole run moves nothing."""
    seen: list[int] = []
    for runs in range(1, limit + 1):
        moved = False
        with DuckDBSource(db) as source:
            q = query(source, store.watermark("t"))
            for batch in source.stream(q.sql, q.params, batch_size):
                assert batch.num_rows <= batch_size
                seen.extend(n for n in batch.column("n").to_pylist() if n not in seen)
                mark = batch_watermark(batch, "modified_at", "id")
                if mark is not None and mark != store.watermark("t"):
                    store.set_watermark("t", mark)
                    moved = True
                    break
        if not moved:
            return seen, runs
    raise AssertionError(f"still reading after {limit} runs; read {len(seen)} rows")


@pytest.fixture()
def store(tmp_path: Path) -> StateStore:
    s = StateStore("sqlite:///state.db", root=tmp_path)
    yield s
    s.close()


def tied_rows_db(db: Path) -> None:
    """2,500 rows; n 0..1199 share one modified_at, the rest each have their own (later) one.
    ids are shuffled relative to n so the view's order is not the (cursor, id) order."""
    execute(
        db,
        "CREATE TABLE t AS SELECT i::INTEGER AS n, "
        "'id' || lpad(((i * 7919) % 2500)::VARCHAR, 5, '0') AS id, "
        "TIMESTAMPTZ '2025-03-01 12:00:00+00' + to_seconds(CASE WHEN i < 1200 THEN 0 ELSE i END) "
        "AS modified_at FROM range(2500) r(i) ORDER BY random()",
    )


def test_ties_across_batch_boundaries_each_row_once(tmp_path: Path, store: StateStore) -> None:
    db = tmp_path / "w.duckdb"
    tied_rows_db(db)
    seen, runs = run_one_batch_at_a_time(db, store, batch_size=500)
    assert sorted(seen) == list(range(2500))  # every row, none twice
    assert len(seen) == 2500
    assert runs == 6  # 5 full batches, then an empty read


def test_one_run_streams_in_cursor_id_order(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    tied_rows_db(db)
    with DuckDBSource(db) as source:
        q = query(source, None)
        batches = list(source.stream(q.sql, q.params, 500))
    assert [b.num_rows for b in batches] == [500] * 5
    table = pa.Table.from_batches(batches)
    keys = list(zip(table["modified_at"].to_pylist(), table["id"].to_pylist(), strict=True))
    assert keys == sorted(keys)
    assert len(set(table["n"].to_pylist())) == 2500


def test_watermark_survives_the_state_store_round_trip(store: StateStore) -> None:
    mark = Watermark(datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC), "id00042")
    store.set_watermark("t", mark)
    assert store.watermark("t") == mark
    store.set_watermark("t", Watermark(5, None))
    assert store.watermark("t") == Watermark(5, None)
    store.reset_watermark("t")
    assert store.watermark("t") is None


def test_ties_across_runs(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    create_table(db, "t", COLUMNS, [(i, f"id{i:03d}", T0) for i in range(10, 20)])
    first = read_all(db)
    assert first.num_rows == 10
    mark = batch_watermark(first.to_batches()[0], "modified_at", "id")
    assert mark == Watermark(T0, "id019")
    # new rows at the watermark's cursor value: above the watermark's id they are new,
    # below it they sort before what was already read (a late row: see lookback)
    create_table(
        db,
        "t",
        COLUMNS,
        [(30, "id030", T0), (5, "id005", T0), (40, "id040", T0 + timedelta(seconds=1))],
        replace=False,
    )
    second = read_all(db, mark)
    assert second["n"].to_pylist() == [30, 40]


def test_null_identifiers_within_a_tied_cursor_value(tmp_path: Path, store: StateStore) -> None:
    db = tmp_path / "w.duckdb"
    rows = []
    for i in range(30):  # 10 rows at T0, then 20 at T0+1s of which 6 have no id
        cursor = T0 if i < 10 else T0 + timedelta(seconds=1)
        rows.append((i, None if i in (12, 13, 14, 20, 21, 22) else f"id{i:03d}", cursor))
    create_table(db, "t", COLUMNS, rows)
    seen, _ = run_one_batch_at_a_time(db, store, batch_size=10)
    assert sorted(seen) == list(range(30))
    assert len(seen) == 30
    # NULL ids sort first within their cursor value
    table = read_all(db)
    assert table["id"].to_pylist()[10:16] == [None] * 6


def test_null_identifiers_straddling_a_batch_boundary_are_not_lost(
    tmp_path: Path, store: StateStore
) -> None:
    db = tmp_path / "w.duckdb"
    rows = [(i, f"id{i:03d}", T0 + timedelta(seconds=i)) for i in range(3)]
    rows += [(i, None, T0 + timedelta(seconds=10)) for i in range(3, 9)]  # 6 NULL ids, tied
    rows += [(i, f"id{i:03d}", T0 + timedelta(seconds=10)) for i in range(9, 12)]
    create_table(db, "t", COLUMNS, rows)
    seen, _ = run_one_batch_at_a_time(db, store, batch_size=5)
    assert set(seen) == set(range(12))


def test_null_cursor_rows_are_returned_every_run(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    rows = [(i, f"id{i:03d}", T0 + timedelta(seconds=i)) for i in range(5)]
    rows += [(100, "id100", None), (101, None, None)]
    create_table(db, "t", COLUMNS, rows)
    first = read_all(db)
    assert first["n"].to_pylist()[:2] == [101, 100]  # NULL cursors first
    assert first.num_rows == 7
    mark = batch_watermark(first.to_batches()[0], "modified_at", "id")
    assert mark == Watermark(T0 + timedelta(seconds=4), "id004")
    for _ in range(2):
        again = read_all(db, mark)
        assert sorted(again["n"].to_pylist()) == [100, 101]
    # with a lookback too
    assert sorted(read_all(db, mark, lookback=timedelta(minutes=5))["n"].to_pylist()) == [
        0,
        1,
        2,
        3,
        4,
        100,
        101,
    ]


def test_batch_watermark_skips_trailing_null_cursor_and_handles_all_null() -> None:
    batch = pa.RecordBatch.from_pydict(
        {"id": ["a", "b", "c"], "modified_at": pa.array([T0, T0, None], pa.timestamp("us", "UTC"))}
    )
    assert batch_watermark(batch, "modified_at", "id") == Watermark(T0, "b")
    empty = pa.RecordBatch.from_pydict(
        {"id": ["a"], "modified_at": pa.array([None], pa.timestamp("us", "UTC"))}
    )
    assert batch_watermark(empty, "modified_at", "id") is None


def late_row_setup(tmp_path: Path) -> tuple[Path, Watermark]:
    db = tmp_path / "w.duckdb"
    create_table(
        db, "t", COLUMNS, [(i, f"id{i:03d}", T0 + timedelta(minutes=i)) for i in range(11)]
    )
    first = read_all(db)
    mark = batch_watermark(first.to_batches()[-1], "modified_at", "id")
    assert mark == Watermark(T0 + timedelta(minutes=10), "id010")
    # committed after the run, with a modified_at older than the watermark
    create_table(
        db,
        "t",
        COLUMNS,
        [
            (50, "id050", T0 + timedelta(minutes=8)),  # 2 minutes behind the watermark
            (60, "id060", T0 + timedelta(minutes=1)),  # 9 minutes behind
        ],
        replace=False,
    )
    return db, mark


def test_late_row_is_missed_without_lookback(tmp_path: Path) -> None:
    db, mark = late_row_setup(tmp_path)
    assert read_all(db, mark).num_rows == 0


def test_late_row_is_caught_with_lookback(tmp_path: Path) -> None:
    db, mark = late_row_setup(tmp_path)
    got = read_all(db, mark, lookback=timedelta(minutes=5))
    # the window [wm - 5 min, ...] is re-read (inclusive), which catches the late row;
    # the row 9 minutes late is outside the window
    assert sorted(got["n"].to_pylist()) == [5, 6, 7, 8, 9, 10, 50]
    got = read_all(db, mark, lookback=timedelta(minutes=10))
    assert 60 in got["n"].to_pylist()


def test_lookback_on_a_non_temporal_cursor_falls_back_to_the_compound_watermark(
    tmp_path: Path,
) -> None:
    db = tmp_path / "w.duckdb"
    create_table(
        db,
        "t",
        {"n": "INTEGER", "id": "VARCHAR", "modified_at": "BIGINT"},
        [(i, f"id{i}", i // 2) for i in range(6)],
    )
    got = read_all(db, Watermark(1, "id2"), lookback=timedelta(minutes=5))
    assert got["n"].to_pylist() == [3, 4, 5]


def superseded_rows(db: Path, *, email: bool, watermark=None) -> set[tuple]:
    """(id, cursor) of the rows the run's one read ranks behind a later row of their key."""
    with DuckDBSource(db) as source:
        plan = plan_read(
            source,
            VIEW,
            cursor="modified_at",
            identifier="id",
            email_identifier=email,
            watermark=watermark,
            lookback=timedelta(0),
        )
        rows = pa.Table.from_batches(
            list(source.stream(plan.query.sql, plan.query.params, 3)),  # ranks span batches
        )
    late = rows.filter(pc.greater(rows[DUP_RANK], 1))
    return set(zip(late["id"].to_pylist(), late["modified_at"].to_pylist(), strict=True))


def test_the_view_is_executed_once_per_read() -> None:
    """Every warehouse runs the statement once: duplicates are ranked by a window inside it,
    not found by extra queries over the view (each a full scan, billed on BigQuery)."""
    view = "SELECT * FROM analytics.people_v"
    for dialect in (DuckDBSource.dialect, Dialect("postgres", "pyformat")):
        query = build_query(
            view,
            dialect,
            cursor="modified_at",
            identifier="id",
            email_identifier=True,
            watermark=Watermark(T0, "a"),
            lookback=timedelta(0),
        )
        assert query.sql.count("analytics.people_v") == 1
        assert "ROW_NUMBER() OVER" in query.sql


def test_exact_duplicates_send_one_row(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    create_table(db, "t", COLUMNS, [(1, "a@x.com", T0), (2, "a@x.com", T0), (3, "b@x.com", T0)])
    assert len(superseded_rows(db, email=True)) == 1


def test_duplicates_only_latest_kept_email_case_and_space_insensitive(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    create_table(
        db,
        "t",
        COLUMNS,
        [
            (1, "Ann@Example.com ", T0 + timedelta(seconds=1)),
            (2, "ann@example.com", T0 + timedelta(seconds=3)),  # latest of the three
            (3, "  ANN@EXAMPLE.COM", T0 + timedelta(seconds=2)),
            (4, "bob@example.com", T0),
            (5, None, T0),
            (6, None, T0),
            (7, "cat@example.com", None),  # no cursor: reported as missing_cursor instead
            (8, "cat@example.com", T0),
        ],
    )
    assert superseded_rows(db, email=True) == {
        ("Ann@Example.com ", T0 + timedelta(seconds=1)),
        ("  ANN@EXAMPLE.COM", T0 + timedelta(seconds=2)),
    }


def test_duplicates_are_case_sensitive_for_non_email_identifiers(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    create_table(
        db,
        "t",
        COLUMNS,
        [(1, "ABC", T0), (2, "abc", T0 + timedelta(seconds=1)), (3, " abc ", T0)],
    )
    # trimmed, but not lower-cased: ' abc ' is an older 'abc'; 'ABC' is another record
    assert superseded_rows(db, email=False) == {(" abc ", T0)}


def test_duplicates_only_within_the_read(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    create_table(
        db,
        "t",
        COLUMNS,
        [(1, "a@x.com", T0), (2, "a@x.com", T0 + timedelta(seconds=5)), (3, "b@x.com", T0)],
    )
    assert superseded_rows(db, email=True) == {("a@x.com", T0)}
    # after a watermark past the first version, the newer one is alone in the read
    assert superseded_rows(db, email=True, watermark=Watermark(T0, "b@x.com")) == set()


def test_view_with_its_own_sql_is_wrapped(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    create_table(db, "t", COLUMNS, [(i, f"id{i}", T0 + timedelta(seconds=i)) for i in range(6)])
    view = "SELECT n, upper(id) AS id, modified_at FROM t WHERE n % 2 = 0"
    got = read_all(db, Watermark(T0, "ID0"), view=view)
    assert got["n"].to_pylist() == [2, 4]
    assert got["id"].to_pylist() == ["ID2", "ID4"]

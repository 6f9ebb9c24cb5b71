"""Every warehouse source against a real engine or emulator: DuckDB, PostgreSQL, fakesnow,
bqemulator. One small table (2,500 rows) is loaded into each, then the same checks run."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from reverse_etl.sources.base import Dialect, Source, SourceError, rebatch, render_pyformat

pytest_plugins = ["tests.warehouses"]
pytestmark = pytest.mark.filterwarnings(
    "ignore:Arrow output on a DB-API result makes an extra copy:UserWarning"  # fakesnow's own
)

UTC = dt.UTC
T0 = dt.datetime(2024, 1, 1, tzinfo=UTC)
PLUS2 = dt.timezone(dt.timedelta(hours=2))
N_ROWS = 2500
BATCH = 1000


# --------------------------------------------------------------------------- the data


def _row(i: int) -> dict[str, Any]:
    return {
        # ids are a permutation of i, so id order differs from load order; 10 NULL ids
        "customer_id": None if i % 250 == 17 else f"c{(i * 7) % N_ROWS:05d}",
        # rows i and i + 2400 share an email once trimmed and lower-cased
        "email": f"  User{i % 2400}@Example.com ",
        # groups of 10 rows share one modified_at; 5 rows have none
        "modified_at": None if i % 500 == 3 else T0 + dt.timedelta(minutes=i // 10),
        "amount": (Decimal(i) * Decimal("1.25")).quantize(Decimal("0.01")),
        "birthday": dt.date(1990, 1, 1) + dt.timedelta(days=i),
        "vip": i % 3 == 0,
    }


ROWS = [_row(i) for i in range(N_ROWS)]
COLUMNS = list(ROWS[0])


def _ts_text(value: dt.datetime | None) -> str | None:
    """Loaded with a +02:00 offset everywhere, to check that sources hand back UTC."""
    return None if value is None else value.astimezone(PLUS2).isoformat()


def _sort_key(row: dict[str, Any]) -> tuple:
    """ORDER BY modified_at ASC NULLS FIRST, customer_id ASC NULLS FIRST."""
    ts, cid = row["modified_at"], row["customer_id"]
    return (ts is not None, ts or T0, cid is not None, cid or "")


def _after(row: dict[str, Any], wm_ts: dt.datetime, wm_id: str) -> bool:
    """The compound cursor's WHERE, with SQL's NULL semantics."""
    ts, cid = row["modified_at"], row["customer_id"]
    if ts is None:
        return True
    return ts > wm_ts or (ts == wm_ts and cid is not None and cid > wm_id)


def compound_sql(d: Dialect, view: str, columns: list[str], *, dup_nulls: str = "") -> str:
    """The statement the engine wraps around a view, spelled for ``d``."""
    q = d.quote
    email = q(d.resolve_column("email", columns))
    ts = q(d.resolve_column("modified_at", columns))
    cid = q(d.resolve_column("customer_id", columns))
    p_ts, p_id = d.param("wm_ts"), d.param("wm_id")
    return (
        f"SELECT * FROM (SELECT v.*, ROW_NUMBER() OVER (PARTITION BY "
        f"LOWER(TRIM(CAST(v.{email} AS {d.string_type}))) ORDER BY v.{ts} DESC{dup_nulls}) "
        f"AS __retl_dup FROM ({d.embed_sql(view)}) AS v "
        f"WHERE (v.{ts} > {p_ts} OR (v.{ts} = {p_ts} AND v.{cid} > {p_id})) "
        f"OR v.{ts} IS NULL) AS q "
        f"ORDER BY {ts} ASC NULLS FIRST, {cid} ASC NULLS FIRST"
    )


def ordered_sql(d: Dialect, view: str, columns: list[str]) -> str:
    ts = d.quote(d.resolve_column("modified_at", columns))
    cid = d.quote(d.resolve_column("customer_id", columns))
    return (
        f"SELECT * FROM ({d.embed_sql(view)}) AS v "
        f"ORDER BY {ts} ASC NULLS FIRST, {cid} ASC NULLS FIRST"
    )


# --------------------------------------------------------------------------- the warehouses


@dataclass
class Warehouse:
    name: str
    open: Callable[[], Source]
    table: str  # the loaded table, as the view's SQL names it
    secret: str | None = None  # a password that must never appear in an error
    real_batches: bool = True  # False: the driver sends one batch (fakesnow)
    writable: Callable[[], Source] | None = None  # when ``open`` gives a read-only source

    def view(self, where: str = "") -> str:
        # the `%` checks that pyformat statements keep the user's literal percent signs
        return (
            "SELECT customer_id, email, modified_at, amount, birthday, vip "
            f"FROM {self.table} WHERE email LIKE '%@%'{where}"
        )


def _duckdb(tmp_path_factory: pytest.TempPathFactory) -> Warehouse:
    import duckdb

    from reverse_etl.sources.duckdb import DuckDBSource

    path = tmp_path_factory.mktemp("duckdb") / "warehouse.duckdb"
    table = pa.Table.from_pylist(
        ROWS,
        schema=pa.schema(
            [
                ("customer_id", pa.string()),
                ("email", pa.string()),
                ("modified_at", pa.timestamp("us", tz="UTC")),
                ("amount", pa.decimal128(12, 2)),
                ("birthday", pa.date32()),
                ("vip", pa.bool_()),
            ]
        ),
    )
    with duckdb.connect(str(path)) as con:
        con.register("rows_in", table)
        con.execute("CREATE TABLE customers AS SELECT * FROM rows_in")
    return Warehouse(
        "duckdb",
        lambda: DuckDBSource(path),
        "customers",
        writable=lambda: DuckDBSource(path, read_only=False),
    )


def _postgres(dsn: str) -> Warehouse:
    import psycopg
    import psycopg.conninfo

    from reverse_etl.sources.postgres import PostgresSource

    with psycopg.connect(dsn, autocommit=True) as con:
        con.execute("DROP TABLE IF EXISTS customers")
        con.execute(
            "CREATE TABLE customers (customer_id text, email text, modified_at timestamptz, "
            "amount numeric(12,2), birthday date, vip boolean)"
        )
        with con.cursor().copy(
            "COPY customers (customer_id, email, modified_at, amount, birthday, vip) FROM STDIN"
        ) as copy:
            for r in ROWS:
                copy.write_row([r[c] for c in COLUMNS])
    password = psycopg.conninfo.conninfo_to_dict(dsn)["password"]
    return Warehouse("postgres", lambda: PostgresSource(dsn), "customers", secret=password)


def _snowflake(kwargs: dict[str, Any]) -> Warehouse:
    import snowflake.connector

    from reverse_etl.sources.snowflake import SnowflakeSource

    doc = json.dumps(
        [
            {
                "id": r["customer_id"],
                "email": r["email"],
                "ts": _ts_text(r["modified_at"]),
                "amount": str(r["amount"]),
                "d": r["birthday"].isoformat(),
                "vip": r["vip"],
            }
            for r in ROWS
        ]
    )
    # fakesnow: executemany and multi-row VALUES take seconds; one FLATTEN over JSON is instant
    with snowflake.connector.connect(**kwargs) as con, con.cursor() as cur:
        cur.execute(
            "CREATE OR REPLACE TABLE customers (customer_id VARCHAR, email VARCHAR, "
            "modified_at TIMESTAMP_TZ, amount NUMBER(12,2), birthday DATE, vip BOOLEAN)"
        )
        cur.execute(
            "INSERT INTO customers SELECT f.value:id::VARCHAR, f.value:email::VARCHAR, "
            "f.value:ts::TIMESTAMP_TZ, f.value:amount::NUMBER(12,2), f.value:d::DATE, "
            "f.value:vip::BOOLEAN FROM TABLE(FLATTEN(INPUT => PARSE_JSON(%(doc)s))) AS f",
            {"doc": doc},
        )
    return Warehouse(
        "snowflake",
        lambda: SnowflakeSource(**kwargs),
        "customers",
        secret=kwargs["password"],
        real_batches=False,
    )


def _bigquery(project: str, endpoint: str) -> Warehouse:
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    from reverse_etl.sources.bigquery import BigQuerySource

    client = bigquery.Client(
        project=project,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=endpoint),
    )
    client.create_dataset("retl", exists_ok=True)
    client.delete_table(f"{project}.retl.customers", not_found_ok=True)
    client.create_table(
        bigquery.Table(
            f"{project}.retl.customers",
            schema=[
                bigquery.SchemaField("customer_id", "STRING"),
                bigquery.SchemaField("email", "STRING"),
                bigquery.SchemaField("modified_at", "TIMESTAMP"),
                bigquery.SchemaField("amount", "NUMERIC"),
                bigquery.SchemaField("birthday", "DATE"),
                bigquery.SchemaField("vip", "BOOL"),
            ],
        )
    )
    errors = client.insert_rows_json(
        f"{project}.retl.customers",
        [
            {
                **r,
                "modified_at": _ts_text(r["modified_at"]),
                "amount": str(r["amount"]),
                "birthday": r["birthday"].isoformat(),
            }
            for r in ROWS
        ],
    )
    assert not errors, errors[:3]
    client.close()
    return Warehouse(
        "bigquery",
        lambda: BigQuerySource(project, api_endpoint=endpoint),
        "`retl.customers`",
    )


WAREHOUSES = ["duckdb", "postgres", "snowflake", "bigquery"]
_loaded: dict[str, Warehouse] = {}


@pytest.fixture(scope="session", params=WAREHOUSES)
def warehouse(request: pytest.FixtureRequest) -> Warehouse:
    name = request.param
    if name not in _loaded:
        started = time.monotonic()
        if name == "duckdb":
            wh = _duckdb(request.getfixturevalue("tmp_path_factory"))
        elif name == "postgres":
            wh = _postgres(request.getfixturevalue("postgres_dsn"))
        elif name == "snowflake":
            wh = _snowflake(request.getfixturevalue("snowflake_kwargs"))
        else:
            wh = _bigquery(*request.getfixturevalue("bigquery_endpoint"))
        print(f"\n[test_sources] {name}: ready and loaded in {time.monotonic() - started:.2f}s")
        _loaded[name] = wh
    return _loaded[name]


@pytest.fixture
def source(warehouse: Warehouse) -> Iterator[Source]:
    with warehouse.open() as src:
        yield src


def _rows(batches: list[pa.RecordBatch]) -> list[dict[str, Any]]:
    """Rows keyed by the lower-case column names, whatever the warehouse calls them."""
    out = []
    for batch in batches:
        for row in batch.to_pylist():
            out.append({k.lower(): v for k, v in row.items()})
    return out


# --------------------------------------------------------------------------- the checks


def test_schema_names_and_types_without_reading_rows(warehouse: Warehouse, source: Source):
    # every row of this view fails to convert, so the schema cannot have come from reading rows
    boom = "CAST(CONCAT('x', email) AS INTEGER)"
    if warehouse.name == "bigquery":  # bqemulator runs dry runs (real BigQuery only plans them)
        boom = "LENGTH(email)"
    view = (
        f"SELECT {boom} AS boom, customer_id, email, "
        f"modified_at, amount, birthday, vip FROM {warehouse.table}"
    )
    schema = source.schema(view)
    names = schema.names
    d = source.dialect
    assert [d.resolve_column(c, names) for c in ["boom", *COLUMNS]] == names
    types = {n.lower(): t for n, t in zip(names, schema.types, strict=True)}
    assert pa.types.is_integer(types["boom"])
    assert types["customer_id"] == pa.string()
    assert types["email"] == pa.string()
    assert pa.types.is_timestamp(types["modified_at"]) and types["modified_at"].tz == "UTC"
    assert pa.types.is_decimal(types["amount"]) and types["amount"].scale in (2, 9)
    assert types["birthday"] == pa.date32()
    assert types["vip"] == pa.bool_()
    if warehouse.name != "bigquery":
        with pytest.raises(SourceError):  # ... and reading them does fail
            list(source.stream(d.embed_sql(view), {}, BATCH))


def test_stream_yields_bounded_batches_in_order(warehouse: Warehouse, source: Source):
    view = warehouse.view()
    columns = source.schema(view).names
    batches = list(source.stream(ordered_sql(source.dialect, view, columns), {}, BATCH))

    assert all(0 < b.num_rows <= BATCH for b in batches)
    assert sum(b.num_rows for b in batches) == N_ROWS
    if warehouse.real_batches:
        assert len(batches) > 1
    schema = source.schema(view)
    for b in batches:
        assert b.schema.equals(schema), (b.schema, schema)

    got = _rows(batches)
    expected = sorted(ROWS, key=_sort_key)
    assert [(r["modified_at"], r["customer_id"]) for r in got] == [
        (r["modified_at"], r["customer_id"]) for r in expected
    ]
    # values, with UTC-aware timestamps (the data was loaded with a +02:00 offset)
    for g, e in zip(got[:50] + got[-50:], expected[:50] + expected[-50:], strict=True):
        assert g == e
        if g["modified_at"] is not None:
            assert g["modified_at"].utcoffset() == dt.timedelta(0)


def test_compound_cursor_returns_exactly_the_rows_after_the_watermark(
    warehouse: Warehouse, source: Source
):
    view = warehouse.view()
    columns = source.schema(view).names
    # the watermark sits inside a group of 10 rows sharing modified_at, one with a NULL id
    null_id = next(i for i in range(N_ROWS // 2, N_ROWS) if ROWS[i]["customer_id"] is None)
    wm_ts = ROWS[null_id]["modified_at"]
    group = [r for r in ROWS if r["modified_at"] == wm_ts]
    assert len(group) == 10
    ids = sorted(r["customer_id"] for r in group if r["customer_id"] is not None)
    wm_id = ids[4]
    params = {"wm_ts": wm_ts.astimezone(PLUS2), "wm_id": wm_id}  # an offset, on purpose

    sql = compound_sql(source.dialect, view, columns)
    batches = list(source.stream(sql, params, BATCH))
    assert all(b.num_rows <= BATCH for b in batches)
    got = _rows(batches)

    expected = sorted((r for r in ROWS if _after(r, wm_ts, wm_id)), key=_sort_key)
    assert BATCH < len(expected) < N_ROWS
    assert [(r["modified_at"], r["customer_id"]) for r in got] == [
        (r["modified_at"], r["customer_id"]) for r in expected
    ]
    assert got[0]["modified_at"] is None  # NULL cursor rows come first
    tied = [r["customer_id"] for r in got if r["modified_at"] == wm_ts]
    assert tied == ids[5:]  # ties broken by id; the NULL id at the watermark is not re-read
    if warehouse.real_batches:
        assert len(batches) > 1


def test_duplicate_rank_is_portable_with_desc_nulls_last(warehouse: Warehouse, source: Source):
    """``ORDER BY ts DESC`` puts NULLs first on PostgreSQL and Snowflake but last on DuckDB and
    BigQuery; spelling ``DESC NULLS LAST`` gives every warehouse the same ``__retl_dup``."""
    view = warehouse.view()
    columns = source.schema(view).names
    wm_ts, wm_id = T0 - dt.timedelta(days=1), ""
    sql = compound_sql(source.dialect, view, columns, dup_nulls=" NULLS LAST")
    got = _rows(list(source.stream(sql, {"wm_ts": wm_ts, "wm_id": wm_id}, BATCH)))
    assert len(got) == N_ROWS

    by_email: dict[str, list[dict[str, Any]]] = {}
    for r in ROWS:
        by_email.setdefault(r["email"].strip().lower(), []).append(r)
    expected = {}
    for rows in by_email.values():
        ranked = sorted(rows, key=lambda r: (r["modified_at"] is None, r["modified_at"] or T0))
        ranked.reverse()  # DESC; then NULLs go last
        ranked.sort(key=lambda r: r["modified_at"] is None)
        if len({r["modified_at"] for r in rows}) == len(rows):  # no ties within the email
            for rank, r in enumerate(ranked, start=1):
                expected[r["customer_id"], r["email"]] = rank
    assert len(expected) > 2000
    for r in got:
        key = (r["customer_id"], r["email"])
        if key in expected:
            assert r["__retl_dup"] == expected[key], r


def test_percent_signs_of_the_view_survive_wrapping_and_parameters(
    warehouse: Warehouse, source: Source
):
    """The user's SQL holds ``%`` in LIKE patterns and literals, even text shaped like a
    pyformat parameter: the schema takes it as written, and once ``embed_sql`` has escaped it,
    a wrapping statement runs it unchanged with and without bind parameters."""
    view = (
        "SELECT customer_id, email, '50%' AS pct, '%(wm_id)s' AS lookalike "
        f"FROM {warehouse.table} WHERE email LIKE '%@%' AND email LIKE '%User1%'"
    )
    schema = source.schema(view)
    d = source.dialect
    assert [d.resolve_column(c, schema.names) for c in ("pct", "lookalike")] == schema.names[2:]
    cid = d.quote(d.resolve_column("customer_id", schema.names))
    matching = sorted(
        r["customer_id"] for r in ROWS if "User1" in r["email"] and r["customer_id"] is not None
    )
    assert 100 < len(matching) < N_ROWS
    wm_id = matching[len(matching) // 2]

    wrapped = f"SELECT * FROM ({d.embed_sql(view)}) AS v WHERE v.{cid} > {d.param('wm_id')}"
    got = _rows(list(source.stream(f"{wrapped} ORDER BY v.{cid}", {"wm_id": wm_id}, BATCH)))
    assert [r["customer_id"] for r in got] == [c for c in matching if c > wm_id]
    assert {(r["pct"], r["lookalike"]) for r in got} == {("50%", "%(wm_id)s")}

    plain = f"SELECT * FROM ({d.embed_sql(view)}) AS v WHERE v.{cid} IS NOT NULL ORDER BY v.{cid}"
    got = _rows(list(source.stream(plain, {}, BATCH)))
    assert [r["customer_id"] for r in got] == matching
    assert {(r["pct"], r["lookalike"]) for r in got} == {("50%", "%(wm_id)s")}


def test_a_view_ending_in_a_line_comment_can_be_wrapped(warehouse: Warehouse, source: Source):
    """Analysts end views with comments; the statements that wrap a view add text after it,
    which a ``-- comment`` on the view's last line must not swallow (a ``%`` in it neither)."""
    view = warehouse.view() + " -- 100% of rows with an address; (cut here"
    schema = source.schema(view)
    assert len(schema.names) == len(COLUMNS)
    d = source.dialect
    wrapped = ordered_sql(d, view, schema.names)
    assert sum(b.num_rows for b in source.stream(wrapped, {}, BATCH)) == N_ROWS


def test_bad_sql_raises_source_error_without_the_password(warehouse: Warehouse, source: Source):
    with pytest.raises(SourceError) as stream_error:
        list(source.stream("SELECT no_such_column FROM no_such_table_retl", {}, BATCH))
    with pytest.raises(SourceError) as schema_error:
        source.schema("SELECT no_such_column FROM no_such_table_retl")
    for err in (stream_error, schema_error):
        message = str(err.value)
        assert "no_such" in message.lower()
        if warehouse.secret:
            assert warehouse.secret not in message


def test_empty_result_and_abandoned_stream(warehouse: Warehouse, source: Source):
    empty = warehouse.view(" AND 1 = 0")
    columns = source.schema(warehouse.view()).names
    assert list(source.stream(ordered_sql(source.dialect, empty, columns), {}, BATCH)) == []
    # stop after one batch: the connection must then serve the next statements with their own
    # rows, none left over from the abandoned result
    ordered = ordered_sql(source.dialect, warehouse.view(), columns)
    stream = source.stream(ordered, {}, 100)
    first = _rows([next(stream)])
    stream.close()
    expected = sorted(ROWS, key=_sort_key)
    assert [r["customer_id"] for r in first] == [r["customer_id"] for r in expected[:100]]
    assert list(source.stream(ordered_sql(source.dialect, empty, columns), {}, BATCH)) == []
    again = _rows(list(source.stream(ordered, {}, BATCH)))
    assert [(r["modified_at"], r["customer_id"]) for r in again] == [
        (r["modified_at"], r["customer_id"]) for r in expected
    ]


# --------------------------------------------------------------------------- per warehouse


def test_replace_table_holds_exactly_the_rows_given_each_time(warehouse: Warehouse):
    """The opt-outs table: created with its schema, then replaced whole by each write, with
    strings (quotes, accents, NULL) and UTC times intact, readable back through the view SQL."""
    at = dt.datetime(2025, 6, 1, 12, 30, 15, 123456, tzinfo=dt.UTC)
    first = pa.table(
        {
            "person": ["a@example.com", "b@example.com"],
            "at": pa.array([at, at + dt.timedelta(days=1)], pa.timestamp("us", "UTC")),
            "reason": ['it\'s "spam"', None],
        }
    )
    second = pa.table(
        {
            "person": ["c@exämple.com"],
            "at": pa.array([at], pa.timestamp("us", "UTC")),
            "reason": ["Unsubscribed"],
        }
    )
    name = ["retl_written", "optouts"]
    upper = warehouse.name == "snowflake"  # stored as unquoted names are: upper-case
    for rows in (first, second):
        with (warehouse.writable or warehouse.open)() as src:
            src.replace_table(name, rows)
        with warehouse.open() as src:
            table = ".".join(src.dialect.quote(p.upper() if upper else p) for p in name)
            got = _rows(list(src.stream(f"SELECT * FROM {table}", {}, 100)))
        assert sorted(got, key=lambda r: r["person"]) == rows.to_pylist()


def test_replace_table_refuses_what_it_cannot_write(warehouse: Warehouse, source: Source):
    with pytest.raises(SourceError, match="(type int64|opened for writing)"):
        source.replace_table(["retl_written", "numbers"], pa.table({"n": [1]}))


def test_postgres_streams_without_buffering_the_result(postgres_dsn: str):
    """Every row the server produces takes a number from a sequence, which another connection
    reads: a driver that buffered the result (ADBC does, given bind parameters) would have made
    the server produce all of them before the first batch arrived, and a stream that drained
    the rest on close (instead of cancelling the server's COPY) would produce them before the
    next statement ran. Sequences are not transactional, so a cancelled statement's numbers
    stay counted."""
    import psycopg

    from reverse_etl.sources.postgres import PostgresSource

    total = 2_000_000
    sql = (
        "SELECT nextval('retl_produced') AS n, now() AS ts "
        f"FROM generate_series(1, {total}) AS b WHERE b > %(after)s"
    )
    with psycopg.connect(postgres_dsn, autocommit=True) as observer:
        observer.execute("DROP SEQUENCE IF EXISTS retl_produced")
        observer.execute("CREATE SEQUENCE retl_produced")

        def produced() -> int:
            row = observer.execute("SELECT last_value, is_called FROM retl_produced").fetchone()
            assert row is not None
            return row[0] if row[1] else 0

        with PostgresSource(postgres_dsn, batch_size_hint_bytes=1 << 20) as src:
            stream = src.stream(sql, {"after": 10}, 5000)
            first = next(stream)
            assert first.column("n").to_pylist() == list(range(1, 5001))
            assert first.schema.field("ts").type == pa.timestamp("us", tz="UTC")
            at_first_batch = produced()
            assert 5000 <= at_first_batch < total - 10  # streamed: the server is still going
            stream.close()  # cancels the server's COPY
            (again,) = list(src.stream("SELECT 1 AS one", {}, 10))
            assert again.column("one")[0].as_py() == 1
            assert produced() < total - 10  # the rest was never produced, so never drained


def test_postgres_types_and_literals(postgres_dsn: str):
    from reverse_etl.sources.postgres import PostgresSource

    sql = (
        "SELECT %(s)s::text AS s, %(n)s::numeric(10,3) AS n, %(ts)s AS ts, %(d)s AS d, "
        "%(b)s AS b, gen_random_uuid() AS u, '{\"a\": 1}'::jsonb AS j, 2.5::numeric AS free, "
        "'50%%' AS pct"
    )
    params = {
        "s": "it's a \\ back'slash",
        "n": Decimal("-12.345"),
        "ts": dt.datetime(2024, 5, 1, 12, 0, tzinfo=PLUS2),
        "d": dt.date(2024, 5, 1),
        "b": True,
    }
    with PostgresSource(postgres_dsn) as src:
        (batch,) = list(src.stream(sql, params, 10))
        row = batch.to_pylist()[0]
        assert row["s"] == params["s"]
        assert row["n"] == Decimal("-12.345") and batch.schema.field("n").type == pa.decimal128(
            10, 3
        )
        assert row["ts"] == dt.datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
        assert batch.schema.field("ts").type == pa.timestamp("us", tz="UTC")
        assert row["d"] == params["d"] and row["b"] is True
        assert isinstance(row["u"], str) and len(row["u"]) == 36
        assert row["j"] == '{"a": 1}' and row["free"] == Decimal("2.5") and row["pct"] == "50%"
        with pytest.raises(SourceError, match="NUMERIC"):
            list(src.stream("SELECT 1.0000000001::numeric AS x", {}, 10))
        with pytest.raises(SourceError, match="embed_sql"):
            list(src.stream("SELECT 'a%b'", {}, 10))


def test_postgres_connection_errors_hide_the_password(postgres_dsn: str):
    import psycopg.conninfo

    from reverse_etl.sources.postgres import PostgresSource

    info = psycopg.conninfo.conninfo_to_dict(postgres_dsn)
    wrong = "Wr0ng-" + info["password"]
    bad_dsn = postgres_dsn.replace(info["password"], wrong)
    with pytest.raises(SourceError) as err:
        PostgresSource(bad_dsn)
    assert "password authentication failed" in str(err.value)
    assert wrong not in str(err.value) and info["password"] not in str(err.value)
    with pytest.raises(SourceError) as err:
        PostgresSource(f"postgresql://retl:{wrong}@127.0.0.1:1/retl_test")
    assert wrong not in str(err.value)


def test_snowflake_names_are_upper_case_and_params_bind(snowflake_kwargs: dict[str, Any]):
    from reverse_etl.sources.snowflake import DIALECT, SnowflakeSource

    with SnowflakeSource(**snowflake_kwargs) as src:
        schema = src.schema("SELECT 1 AS customer_id, 'x' AS email")
        assert schema.names == ["CUSTOMER_ID", "EMAIL"]
        assert DIALECT.resolve_column("customer_id", schema.names) == "CUSTOMER_ID"
        sql = (
            "SELECT %(ts)s::TIMESTAMP_TZ AS ts, %(n)s::NUMBER(10,3) AS n, %(s)s AS s, "
            "'50%%' AS pct, 3::NUMBER(38,0) AS i"
        )
        params = {
            "ts": dt.datetime(2024, 5, 1, 12, tzinfo=PLUS2),
            "n": Decimal("1.500"),
            "s": "o'k",
        }
        (batch,) = list(src.stream(sql, params, 10))
        row = batch.to_pylist()[0]
        assert row == {
            "TS": dt.datetime(2024, 5, 1, 10, tzinfo=UTC),
            "N": Decimal("1.500"),
            "S": "o'k",
            "PCT": "50%",
            "I": 3,
        }
        assert batch.schema.field("N").type == pa.decimal128(10, 3)
        assert batch.schema.field("I").type == pa.int64()
        (batch,) = list(src.stream("SELECT '50%%' AS pct", {}, 10))  # no params: still pyformat
        assert batch.column("PCT")[0].as_py() == "50%"


def test_bigquery_parameter_types(bigquery_endpoint: tuple[str, str]):
    from reverse_etl.sources.bigquery import BigQuerySource, query_parameter

    assert query_parameter("a", True).type_ == "BOOL"
    assert query_parameter("a", 3).type_ == "INT64"
    assert query_parameter("a", Decimal("1.25")).type_ == "NUMERIC"
    assert query_parameter("a", Decimal("1.0000000001")).type_ == "BIGNUMERIC"
    assert query_parameter("a", T0).type_ == "TIMESTAMP"
    assert query_parameter("a", dt.datetime(2024, 1, 1)).type_ == "DATETIME"
    assert query_parameter("a", dt.date(2024, 1, 1)).type_ == "DATE"
    assert query_parameter("a", "x").type_ == "STRING"
    project, endpoint = bigquery_endpoint
    with BigQuerySource(project, api_endpoint=endpoint) as src:
        sql = "SELECT @ts AS ts, @n AS n, @s AS s, @b AS b, @d AS d"
        params = {
            "ts": dt.datetime(2024, 5, 1, 12, tzinfo=PLUS2),
            "n": Decimal("1.25"),
            "s": "o'k",
            "b": False,
            "d": dt.date(2024, 5, 1),
        }
        (batch,) = list(src.stream(sql, params, 10))
        row = batch.to_pylist()[0]
        assert row["ts"] == dt.datetime(2024, 5, 1, 10, tzinfo=UTC)
        assert row["n"] == Decimal("1.25") and row["s"] == "o'k" and row["b"] is False
        assert row["d"] == dt.date(2024, 5, 1)


# --------------------------------------------------------------------------- no warehouse


def test_dialects():
    from reverse_etl.sources.bigquery import DIALECT as BQ
    from reverse_etl.sources.duckdb import DIALECT as DUCK
    from reverse_etl.sources.postgres import DIALECT as PG
    from reverse_etl.sources.snowflake import DIALECT as SF

    assert [d.param("x") for d in (DUCK, PG, SF, BQ)] == ["$x", "%(x)s", "%(x)s", "@x"]
    assert [d.string_type for d in (DUCK, PG, SF, BQ)] == ["VARCHAR", "TEXT", "VARCHAR", "STRING"]
    assert PG.quote('a"b') == '"a""b"' and SF.quote("EMAIL") == '"EMAIL"'
    assert BQ.quote("a`b") == "`a\\`b`"
    assert PG.embed_sql("LIKE 'a%'") == "LIKE 'a%%'\n" and BQ.embed_sql("'a%'") == "'a%'\n"
    assert SF.resolve_column("email", ["CUSTOMER_ID", "EMAIL"]) == "EMAIL"
    assert SF.resolve_column("email", ["email", "EMAIL"]) == "email"
    assert PG.resolve_column("Email", ["email"]) == "email"
    assert BQ.resolve_column("email", ["Email"]) == "Email"
    with pytest.raises(SourceError, match="no column"):
        BQ.resolve_column("phone", ["email"])
    with pytest.raises(SourceError, match="ambiguous"):
        DUCK.resolve_column("email", ["Email", "EMAIL"])


def test_render_pyformat():
    lit = repr
    assert render_pyformat("a %(x)s %% %(x)s", {"x": 1}, lit) == "a 1 % 1"
    with pytest.raises(SourceError, match="lone"):
        render_pyformat("LIKE 'a%'", {}, lit)
    with pytest.raises(SourceError, match="'y'"):
        render_pyformat("%(y)s", {"x": 1}, lit)


def test_rebatch_cuts_and_merges():
    parts = [pa.record_batch({"a": list(range(n))}) for n in (5, 2500, 1, 0, 494)]
    sizes = [b.num_rows for b in rebatch(iter(parts), 1000)]
    assert sizes == [1000, 1000, 1000]


def test_duckdb_missing_file(tmp_path: Path):
    from reverse_etl.sources.duckdb import DuckDBSource

    with pytest.raises(SourceError, match="does not exist"):
        DuckDBSource(tmp_path / "missing.duckdb")

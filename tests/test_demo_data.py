"""The demo warehouse: deterministic, big enough, dirty in the promised ways; the views run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from reverse_etl.demo.generate import ANCHOR, generate_demo_warehouse, generate_profile_rows

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
TABLES = ["raw.customers", "raw.products", "raw.orders", "raw.order_items"]

# a deliberately simple "valid address" shape: enough to tell the planted dirt from clean rows
VALID_EMAIL = r"[a-z0-9._%+-]+@[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{2,}"
KNOWN_CONSENT = (
    "'yes','no','y','n','true','false','1','0','subscribed','unsubscribed','opt-in','opted_out'"
)

# raw.customers as generated; the profiles view adds the order columns after them
CUSTOMER_COLUMNS = {
    "customer_id": "VARCHAR",
    "email": "VARCHAR",
    "phone": "VARCHAR",
    "first_name": "VARCHAR",
    "last_name": "VARCHAR",
    "city": "VARCHAR",
    "country": "VARCHAR",
    "postcode": "VARCHAR",
    "loyalty_tier": "VARCHAR",
    "loyalty_points": "INTEGER",
    "lifetime_value": "DECIMAL(12,2)",
    "birthday": "DATE",
    "is_vip": "BOOLEAN",
    "email_consent": "VARCHAR",
    "sms_consent": "VARCHAR",
    "consent_updated_at": "VARCHAR",
    "created_at": "TIMESTAMP",
    "modified_at": "TIMESTAMP WITH TIME ZONE",
}


def view_sql(name: str) -> str:
    return (SQL_DIR / f"{name}.sql").read_text()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("demo") / "demo.duckdb"
    return path, generate_demo_warehouse(path)


@pytest.fixture()
def con(demo: tuple[Path, dict[str, int]]):
    connection = duckdb.connect(str(demo[0]), read_only=True)
    connection.execute("SET TimeZone = 'UTC'")
    yield connection
    connection.close()


def one(con: duckdb.DuckDBPyConnection, sql: str):
    return con.execute(sql).fetchone()[0]


def table_digests(path: Path) -> dict[str, tuple[int, str]]:
    with duckdb.connect(str(path), read_only=True) as c:
        c.execute("SET TimeZone = 'UTC'")
        return {
            t: c.execute(
                f"SELECT count(*), md5(string_agg(CAST(r AS VARCHAR), chr(10) "
                f"ORDER BY CAST(r AS VARCHAR))) FROM {t} AS r"
            ).fetchone()
            for t in TABLES
        }


# --- generation -------------------------------------------------------------------------------


def test_counts(demo, con):
    # how long the default demo takes to generate is printed by `make bench`
    # (tests/bench/sandbox_speed.py), not asserted: a loaded machine is no slower a generator
    path, counts = demo
    assert set(counts) == set(TABLES)
    for table, n in counts.items():
        assert one(con, f"SELECT count(*) FROM {table}") == n
    assert counts["raw.customers"] >= 10_000
    assert 450 <= counts["raw.products"] <= 600
    per_customer = counts["raw.orders"] / 12_000
    assert 2.0 <= per_customer <= 3.0
    assert counts["raw.orders"] <= counts["raw.order_items"] <= 5 * counts["raw.orders"]


def test_same_seed_same_contents_and_overwrites(tmp_path):
    a, b = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    assert generate_demo_warehouse(a, profiles=1_500, seed=3) == generate_demo_warehouse(
        b, profiles=1_500, seed=3
    )
    first = table_digests(a)
    assert first == table_digests(b)
    generate_demo_warehouse(a, profiles=1_500, seed=3)  # overwrite in place: same again
    assert table_digests(a) == first
    generate_demo_warehouse(b, profiles=1_500, seed=4)
    other = table_digests(b)
    assert all(other[t][1] != first[t][1] for t in TABLES)


def test_schemas(con):
    assert _types(con, "raw.customers") == CUSTOMER_COLUMNS
    assert _types(con, "raw.products")["price"] == "DECIMAL(10,2)"
    assert _types(con, "raw.orders")["ordered_at"] == "TIMESTAMP WITH TIME ZONE"
    assert _types(con, "raw.order_items")["line_no"] == "INTEGER"


def _types(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    return {row[0]: row[1] for row in con.execute(f"DESCRIBE {relation}").fetchall()}


# --- the dirt ---------------------------------------------------------------------------------


def test_customer_id_dirt(con):
    assert one(con, "SELECT count(*) FROM raw.customers WHERE customer_id IS NULL") > 0
    dupes = con.execute(
        """
        SELECT count(*), count(DISTINCT loyalty_points), min(modified_at) < max(modified_at)
        FROM raw.customers WHERE customer_id IS NOT NULL
        GROUP BY customer_id HAVING count(*) > 1
        """
    ).fetchall()
    assert dupes
    assert all(n == 2 and points == 2 and later for n, points, later in dupes)
    total = one(con, "SELECT count(*) FROM raw.customers")
    assert 0.002 < len(dupes) / total < 0.01


def test_email_dirt(con):
    total = one(con, "SELECT count(*) FROM raw.customers")
    counts = con.execute(
        f"""
        SELECT
            count(*) FILTER (WHERE email IS NULL),
            count(*) FILTER (WHERE NOT regexp_full_match(lower(trim(email)), '{VALID_EMAIL}')),
            count(*) FILTER (WHERE email <> lower(trim(email))
                             AND regexp_full_match(lower(trim(email)), '{VALID_EMAIL}'))
        FROM raw.customers
        """
    ).fetchone()
    null, malformed, fixable = (n / total for n in counts)
    assert 0.003 < null < 0.02
    assert 0.003 < malformed < 0.02
    assert 0.02 < fixable < 0.06
    # the same person under two customer_ids, the address cased or padded differently
    twins = one(
        con,
        """
        SELECT count(*) FROM (
            SELECT lower(trim(email)) FROM raw.customers WHERE email IS NOT NULL
            GROUP BY 1 HAVING count(DISTINCT customer_id) > 1 AND count(DISTINCT email) > 1
        )
        """,
    )
    assert twins > 0


def test_phone_dirt(con):
    total, filled, invalid, plus, bracket, zero_zero = con.execute(
        """
        SELECT count(*), count(phone),
               count(*) FILTER (WHERE phone IN ('12345', 'call me', 'n/a', '123', '+44')),
               count(*) FILTER (WHERE phone LIKE '+%'),
               count(*) FILTER (WHERE phone LIKE '(%'),
               count(*) FILTER (WHERE phone LIKE '00%')
        FROM raw.customers
        """
    ).fetchone()
    assert 0.5 < filled / total < 0.7
    assert invalid > 0 and plus > 0 and bracket > 0 and zero_zero > 0


def test_phones_parse_with_country_except_planted_junk(con):
    phonenumbers = pytest.importorskip("phonenumbers")
    rows = con.execute(
        "SELECT phone, country FROM raw.customers WHERE phone IS NOT NULL"
    ).fetchall()
    bad = 0
    for phone, country in rows:
        try:
            ok = phonenumbers.is_valid_number(phonenumbers.parse(phone, country))
        except phonenumbers.NumberParseException:
            ok = False
        bad += not ok
    assert 0.01 < bad / one(con, "SELECT count(*) FROM raw.customers") < 0.03


def test_consent_dirt(con):
    for column in ("email_consent", "sms_consent"):
        spellings, invalid, nulls = con.execute(
            f"""
            SELECT count(DISTINCT {column}),
                   count(*) FILTER (WHERE lower(trim({column})) NOT IN ({KNOWN_CONSENT})),
                   count(*) FILTER (WHERE {column} IS NULL)
            FROM raw.customers
            """
        ).fetchone()
        assert spellings >= 12 and invalid > 0 and nulls > 0
    assert one(con, "SELECT count(*) FROM raw.customers WHERE email_consent = ' Yes '") > 0


def test_consent_timestamp_dirt(con):
    forms = con.execute(
        f"""
        SELECT
            count(*) FILTER (WHERE consent_updated_at LIKE '____-__-__T__:__:__Z'),
            count(*) FILTER (WHERE regexp_full_match(consent_updated_at,
                                                     '....-..-..T..:..:..[+-]..:..')),
            count(*) FILTER (WHERE consent_updated_at LIKE '____-__-__ __:__:__'),
            count(*) FILTER (WHERE consent_updated_at LIKE '____-__-__'),
            count(*) FILTER (WHERE consent_updated_at IS NOT NULL
                             AND try_cast(consent_updated_at AS TIMESTAMPTZ) IS NULL),
            count(*) FILTER (WHERE try_cast(consent_updated_at AS TIMESTAMPTZ) < '1990-01-01'),
            count(*) FILTER (WHERE try_cast(consent_updated_at AS TIMESTAMPTZ)
                                   > TIMESTAMPTZ '{ANCHOR.isoformat()}')
        FROM raw.customers
        """
    ).fetchone()
    assert all(n > 0 for n in forms), forms


def test_modified_at_ties_and_bounds(con):
    groups = con.execute(
        "SELECT count(*) FROM raw.customers GROUP BY modified_at HAVING count(*) >= 300"
    ).fetchall()
    assert groups and all(n <= 1_500 for (n,) in groups)
    share = sum(n for (n,) in groups) / one(con, "SELECT count(*) FROM raw.customers")
    assert 0.15 <= share <= 0.25
    latest, earliest, created_after = con.execute(
        """SELECT max(modified_at), min(modified_at),
                  count(*) FILTER (WHERE created_at > CAST(modified_at AS TIMESTAMP))
           FROM raw.customers"""
    ).fetchone()
    assert latest <= ANCHOR - timedelta(hours=2)
    assert earliest >= ANCHOR - timedelta(days=400)
    assert created_after == 0


def test_products_dirt(con):
    null_title, null_price, negative, dupes, specials = con.execute(
        """
        SELECT count(*) FILTER (WHERE title IS NULL), count(*) FILTER (WHERE price IS NULL),
               count(*) FILTER (WHERE price < 0), count(*) - count(DISTINCT product_id),
               count(special_price)
        FROM raw.products
        """
    ).fetchone()
    assert null_title > 0 and null_price > 0 and negative > 0 and dupes == 1
    assert 0 < specials < one(con, "SELECT count(*) FROM raw.products") / 2


def test_orders_shape(con):
    statuses = {s for (s,) in con.execute("SELECT DISTINCT status FROM raw.orders").fetchall()}
    assert {"Open", "Confirmed", "Complete", "Cancelled", "OnHold"} <= statuses
    backwards, ties, latest, guests, orphans = con.execute(
        """
        SELECT count(*) FILTER (WHERE modified_at < ordered_at),
               (SELECT count(*) FROM (SELECT modified_at FROM raw.orders
                                      GROUP BY 1 HAVING count(*) > 1)),
               max(modified_at),
               count(*) FILTER (WHERE customer_id IS NULL),
               count(*) FILTER (WHERE order_id NOT IN (SELECT order_id FROM raw.order_items))
        FROM raw.orders
        """
    ).fetchone()
    assert backwards == 0 and ties > 0 and guests > 0 and orphans == 0
    assert latest <= ANCHOR - timedelta(hours=2)
    no_orders = one(
        con,
        """SELECT count(*) FROM raw.customers c WHERE customer_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM raw.orders o WHERE o.customer_id = c.customer_id)""",
    )
    assert no_orders > 0
    lines = con.execute(
        "SELECT min(n), max(n) FROM (SELECT count(*) AS n FROM raw.order_items GROUP BY order_id)"
    ).fetchone()
    assert lines == (1, 5)


# --- the views --------------------------------------------------------------------------------

PROFILE_COLUMNS = {
    **CUSTOMER_COLUMNS,
    "order_count": "BIGINT",
    "last_order_at": "TIMESTAMP WITH TIME ZONE",
}
ORDER_COLUMNS = {
    "order_id": "VARCHAR",
    "customer_id": "VARCHAR",
    "email": "VARCHAR",
    "status": "VARCHAR",
    "currency": "VARCHAR",
    "ordered_at": "TIMESTAMP WITH TIME ZONE",
    "modified_at": "TIMESTAMP WITH TIME ZONE",
    "subtotal": "DECIMAL(12,2)",
    "shipping": "DECIMAL(10,2)",
    "discount": "DECIMAL(10,2)",
    "order_total": "DECIMAL(12,2)",
    "item_count": "INTEGER",
    "items": 'STRUCT(sku VARCHAR, product_id VARCHAR, "name" VARCHAR, quantity INTEGER, '
    "unit_price DECIMAL(10,2))[]",
}
CATALOG_COLUMNS = {
    "product_id": "VARCHAR",
    "sku": "VARCHAR",
    "title": "VARCHAR",
    "description": "VARCHAR",
    "url": "VARCHAR",
    "image_url": "VARCHAR",
    "price": "DECIMAL(10,2)",
    "special_price": "DECIMAL(10,2)",
    "currency": "VARCHAR",
    "category": "VARCHAR",
    "stock": "INTEGER",
    "published": "BOOLEAN",
    "modified_at": "TIMESTAMP WITH TIME ZONE",
}


@pytest.mark.parametrize(
    ("view", "columns"),
    [("profiles", PROFILE_COLUMNS), ("orders", ORDER_COLUMNS), ("catalog", CATALOG_COLUMNS)],
)
def test_view_columns_and_types(con, view, columns):
    sql = view_sql(view)
    assert not sql.rstrip().endswith(";")
    described = con.execute(f"DESCRIBE ({sql})").fetchall()
    assert [(name, sql_type) for name, sql_type, *_ in described] == list(columns.items())


def test_profiles_view_one_row_per_customer(con):
    rows, ids, null_ids = con.execute(
        f"""SELECT count(*), count(DISTINCT customer_id), count(*) FILTER (WHERE customer_id IS NULL)
            FROM ({view_sql("profiles")})"""
    ).fetchone()
    assert rows == ids + null_ids
    assert ids == one(con, "SELECT count(DISTINCT customer_id) FROM raw.customers")
    assert null_ids == one(con, "SELECT count(*) FROM raw.customers WHERE customer_id IS NULL")
    # of a customer exported twice, the newer row wins
    duplicated, matched, newer_kept = con.execute(
        f"""
        WITH newest AS (
            SELECT customer_id, arg_max(loyalty_points, modified_at) AS points
            FROM raw.customers WHERE customer_id IS NOT NULL
            GROUP BY customer_id HAVING count(*) > 1
        )
        SELECT (SELECT count(*) FROM newest), count(*),
               count(*) FILTER (WHERE p.loyalty_points = n.points)
        FROM ({view_sql("profiles")}) AS p JOIN newest AS n USING (customer_id)
        """
    ).fetchone()
    assert duplicated > 0
    assert duplicated == matched == newer_kept


def test_profile_modified_at_follows_orders(con):
    late, moved, counts_off = con.execute(
        f"""
        WITH p AS ({view_sql("profiles")}),
        o AS (SELECT customer_id, max(modified_at) AS m,
                     count(*) FILTER (WHERE status <> 'Cancelled') AS n
              FROM raw.orders WHERE customer_id IS NOT NULL GROUP BY 1),
        c AS (SELECT customer_id, max(modified_at) AS m FROM raw.customers GROUP BY 1)
        SELECT count(*) FILTER (WHERE p.modified_at < o.m),
               count(*) FILTER (WHERE p.modified_at = o.m AND o.m > c.m),
               count(*) FILTER (WHERE p.order_count <> coalesce(o.n, 0))
        FROM p LEFT JOIN o USING (customer_id) LEFT JOIN c USING (customer_id)
        WHERE p.customer_id IS NOT NULL
        """
    ).fetchone()
    assert late == 0
    assert moved > 0  # some profiles changed only because an order did
    assert counts_off == 0


def test_profiles_view_keeps_bulk_ties(con):
    biggest = one(
        con,
        f"SELECT max(n) FROM (SELECT count(*) AS n FROM ({view_sql('profiles')}) GROUP BY modified_at)",
    )
    assert biggest >= 300


def test_orders_view(con):
    sql = view_sql("orders")
    rows, bad_total, bad_count, bad_order = con.execute(
        f"""
        SELECT count(*),
               count(*) FILTER (WHERE order_total <> subtotal + shipping - discount),
               count(*) FILTER (WHERE item_count <> list_sum([i.quantity FOR i IN items])),
               count(*) FILTER (WHERE subtotal <>
                   list_sum([i.quantity * i.unit_price FOR i IN items]))
        FROM ({sql})
        """
    ).fetchone()
    assert rows == one(con, "SELECT count(*) FROM raw.orders")
    assert bad_total == bad_count == bad_order == 0
    # items come in line order
    first = con.execute(
        f"SELECT order_id, items FROM ({sql}) WHERE len(items) >= 3 ORDER BY order_id LIMIT 1"
    ).fetchone()
    skus = con.execute(
        "SELECT sku FROM raw.order_items WHERE order_id = ? ORDER BY line_no", [first[0]]
    ).fetchall()
    assert [item["sku"] for item in first[1]] == [s for (s,) in skus]


def test_catalog_view(con):
    rows, ids = con.execute(
        f"SELECT count(*), count(DISTINCT product_id) FROM ({view_sql('catalog')})"
    ).fetchone()
    assert rows == ids == one(con, "SELECT count(DISTINCT product_id) FROM raw.products")


# --- the benchmark table ----------------------------------------------------------------------


def test_generate_profile_rows(con):
    bench = duckdb.connect()
    try:
        generate_profile_rows(bench, "raw.customers_big", 50_000)
        assert _types(bench, "raw.customers_big") == _types(con, "raw.customers")
        rows, ids, null_email, bad_consent, junk_phone, ties, latest = bench.execute(
            f"""
            SELECT count(*), count(DISTINCT customer_id),
                   count(*) FILTER (WHERE email IS NULL
                                    OR NOT regexp_full_match(email, '{VALID_EMAIL}')),
                   count(*) FILTER (WHERE lower(trim(email_consent)) NOT IN ({KNOWN_CONSENT})),
                   count(*) FILTER (WHERE phone IN ('12345', 'call me', 'n/a', '0000000',
                                                    '+44', '123', 'ask in store')),
                   (SELECT max(n) FROM (SELECT count(*) AS n FROM raw.customers_big
                                        GROUP BY modified_at)),
                   max(modified_at)
            FROM raw.customers_big
            """
        ).fetchone()
        assert rows == ids == 50_000
        assert 0.005 < null_email / rows < 0.03
        assert 0.005 < bad_consent / rows < 0.02
        assert 0.005 < junk_phone / rows < 0.02
        assert ties >= 100
        assert latest <= datetime(2026, 10, 31, 22, tzinfo=UTC)

        generate_profile_rows(bench, "again", 1_234, seed=7)
        generate_profile_rows(bench, "again_b", 1_234, seed=7)
        assert bench.execute(
            "SELECT count(*) FROM (SELECT * FROM again EXCEPT ALL SELECT * FROM again_b)"
        ).fetchone() == (0,)
        assert bench.execute("SELECT count(*) FROM again").fetchone() == (1_234,)
        generate_profile_rows(bench, "empty", 0)
        assert bench.execute("SELECT count(*) FROM empty").fetchone() == (0,)
    finally:
        bench.close()


def test_generate_profile_rows_rejects_odd_table_names():
    with duckdb.connect() as bench, pytest.raises(ValueError):
        generate_profile_rows(bench, "x; DROP TABLE y", 10)

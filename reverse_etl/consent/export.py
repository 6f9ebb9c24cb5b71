"""The consent read back from a destination, written where analysts can join it.

``optouts_table: schema.table`` on a sync: after each run's read-back (and each ``reverse-etl
optouts``), the table in the sync's own warehouse holds every statement read back from the
sync's destination account (person, channel, status, at, reason, source), replaced whole in
one transaction, so a view can leave out who opted out at the vendor (the two-way pattern of
the BigCommerce integration, ``../shared/seeds/001_596cbdf24110c389.txt``). PostgreSQL and
DuckDB warehouses, the ones the snapshot can live in too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from reverse_etl.config import DuckDBConnection, PostgresConnection, WarehouseConnection
from reverse_etl.consent.memory import Seen
from reverse_etl.errors import SourceError
from reverse_etl.secrets import scrub
from reverse_etl.sql import ident

COLUMNS = "person text, channel text, status text, at timestamptz, reason text, source text"


def as_table(seen: Sequence[Seen], source: str) -> pa.Table:
    return pa.table(
        {
            "person": pa.array([s.person for s in seen], pa.string()),
            "channel": pa.array([s.channel for s in seen], pa.string()),
            "status": pa.array([s.status for s in seen], pa.string()),
            "at": pa.array([s.at for s in seen], pa.timestamp("us", "UTC")),
            "reason": pa.array([s.reason for s in seen], pa.string()),
            "source": pa.array([source] * len(seen), pa.string()),
        }
    )


def write(conn: WarehouseConnection, warehouse: Any, name: str, rows: pa.Table) -> None:
    """Replace ``name`` (``schema.table`` or ``table``) with ``rows``; ``warehouse``: the
    open DuckDB source (its file is written through its own connection)."""
    parts = name.split(".")
    qualified = ".".join(ident(p) for p in parts)
    schema = ident(parts[0]) if len(parts) == 2 else None
    if isinstance(conn, DuckDBConnection):
        _duckdb(warehouse, schema, qualified, rows)
    elif isinstance(conn, PostgresConnection):
        _postgres(conn, schema, qualified, rows)
    else:  # the config refuses it: optouts_table
        raise SourceError(f"no opt-outs table in a {conn.type} warehouse")


def _duckdb(source: Any, schema: str | None, qualified: str, rows: pa.Table) -> None:
    import duckdb

    if not callable(getattr(source, "cursor", None)) or getattr(source, "read_only", True):
        raise SourceError("the opt-outs table needs the DuckDB warehouse opened for writing")
    cur = source.cursor()
    try:
        cur.register("retl_optouts", rows)
        if schema:
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        cur.execute(f"CREATE OR REPLACE TABLE {qualified} AS SELECT * FROM retl_optouts")
    except duckdb.Error as exc:
        raise SourceError(f"cannot write the opt-outs table {qualified}: {exc}") from None
    finally:
        cur.close()


def _postgres(conn: PostgresConnection, schema: str | None, qualified: str, rows: pa.Table) -> None:
    import psycopg

    try:
        with (
            psycopg.connect(conn.dsn(), application_name="reverse-etl") as con,
            con.transaction(),
        ):
            if schema:
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            con.execute(f"CREATE TABLE IF NOT EXISTS {qualified} ({COLUMNS})")
            con.execute(f"DELETE FROM {qualified}")
            names = ", ".join(rows.column_names)
            with con.cursor().copy(f"COPY {qualified} ({names}) FROM STDIN") as copy:
                for row in zip(*(rows[c].to_pylist() for c in rows.column_names), strict=True):
                    copy.write_row(row)
    except psycopg.Error as exc:
        raise SourceError(
            f"cannot write the opt-outs table {qualified}: {scrub(str(exc))}"
        ) from None

"""What every Klaviyo object shares: one paced client per run, and row errors built from a
mask over the batch so only failing rows touch Python.

The objects are subclasses: profiles (``profiles.py``, with consent from ``consent.py``),
orders as events (``orders.py``) and the catalog (``catalog.py``).
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.config import Sync
from reverse_etl.destinations.base import Destination
from reverse_etl.destinations.klaviyo.client import KlaviyoClient
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.transform.rowerrors import RowError


class KlaviyoBase(Destination):
    type = "klaviyo"
    # The client's rate limiters run this many times faster than the published limits: 1 in
    # production; tests and benchmarks raise it together with the sandbox's speedup.
    client_speedup: ClassVar[float] = 1.0

    def __init__(self, conn: KlaviyoConnection, sync: Sync, *, speedup: float | None = None):
        super().__init__(conn, sync)
        self.conn: KlaviyoConnection = conn
        self.client = KlaviyoClient(conn, speedup=speedup or self.client_speedup)

    def close(self) -> None:
        self.client.close()


def row_errors(
    table: pa.Table,
    mask: pa.Array | pa.ChunkedArray,
    column: str,
    reason: str,
    message: str,
    value: str | None = None,
) -> list[RowError]:
    """One row error for each row of ``table`` where ``mask`` is true; ``value`` names the
    column whose value the error file shows."""
    bad = table.filter(mask)
    if bad.num_rows == 0:
        return []
    values = bad[value].to_pylist() if value else [None] * bad.num_rows
    return [
        RowError(row, ident, column, v, reason, message)
        for row, ident, v in zip(
            bad["__row"].to_pylist(), bad["__id"].to_pylist(), values, strict=True
        )
    ]


def any_true(mask: pa.Array | pa.ChunkedArray) -> bool:
    return bool(pc.any(mask).as_py())


def column_or_null(table: pa.Table, name: str, dtype: pa.DataType | None = None) -> pa.ChunkedArray:
    """The column ``name``, or all nulls (of ``dtype``, default text) when it is not mapped."""
    if name in table.column_names:
        return table[name]
    return pa.chunked_array([pa.nulls(table.num_rows, dtype or pa.string())])

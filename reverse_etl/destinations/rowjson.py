"""Build one JSON document per row for a whole batch in DuckDB, not in a Python loop.

A template is a nested dict whose leaves are ``Col(name)`` (a column of the batch) or plain
literals. With ``drop_nulls`` a null leaf is left out (the property is untouched at the
destination); without it the null is sent (the property is cleared). Timestamps are written
as ISO 8601 UTC (``2025-03-01T10:00:00Z``), dates as ``YYYY-MM-DD``, numbers exactly as the
column holds them (the transform has refused NaN and Infinity, which JSON cannot carry).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pt

from reverse_etl.sql import ident, literal
from reverse_etl.util import scratch


@dataclass(frozen=True)
class Col:
    name: str


@dataclass(frozen=True)
class Expr:
    """A SQL expression over the batch (columns as ``t."name"``), for derived values."""

    sql: str


def nest(fields: dict[str, str]) -> dict[str, Any]:
    """``{'location.city': 'col'}`` → ``{'location': {'city': Col('col')}}`` (first dot only
    for ``properties.*``, so custom property names may contain dots)."""
    tree: dict[str, Any] = {}
    for path, column in fields.items():
        head, _, rest = path.partition(".")
        if rest:
            tree.setdefault(head, {})[rest] = Col(column)
        else:
            tree[head] = Col(column)
    return tree


def null_names(columns: dict[str, str]) -> str:
    """SQL: the list of the ``columns`` keys (names) whose column is null in the row."""
    items = ", ".join(
        f"CASE WHEN t.{ident(col)} IS NULL THEN {literal(name)} END"
        for name, col in columns.items()
    )
    return f"list_filter([{items}], lambda x: x IS NOT NULL)"


# ``json_strip_nulls`` re-reads the document and turns a number a double cannot hold into a
# rounded double. Wide decimals therefore travel through it as strings marked with a random
# nonce (drawn per compiled query, so no user text can forge it) and are unquoted afterwards.
def _unmark(nonce: str) -> str:
    return f'"{nonce}(-?[0-9]+([.][0-9]+)?)"'


def _wide_decimal(dtype: pa.DataType) -> bool:
    return pt.is_decimal(dtype) and dtype.precision > 15


def _leaf(col: Col, schema: pa.Schema, *, mark_wide: str = "") -> str:
    ref = f"t.{ident(col.name)}"
    dtype = schema.field(col.name).type
    if mark_wide and _wide_decimal(dtype):
        return f"({literal(mark_wide)} || CAST({ref} AS VARCHAR))"
    if pt.is_timestamp(dtype):
        if dtype.tz is None:
            return f"strftime({ref}, '%Y-%m-%dT%H:%M:%S')"
        return f"strftime(CAST({ref} AS TIMESTAMPTZ) AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ')"
    return ref  # DECIMAL, HUGEINT and UBIGINT: to_json writes every digit, never a rounded double


def _render(node: Any, schema: pa.Schema, *, mark_wide: str = "") -> str:
    if isinstance(node, Col):
        return _leaf(node, schema, mark_wide=mark_wide)
    if isinstance(node, Expr):
        return node.sql
    if isinstance(node, dict):
        inner = ", ".join(
            f"{literal(k)}: {_render(v, schema, mark_wide=mark_wide)}" for k, v in node.items()
        )
        return "{" + inner + "}"
    return f"json({literal(orjson.dumps(node).decode())})"


class RowJson:
    """Compiles a template once per schema; ``build`` returns a string array, one doc a row."""

    def __init__(self, template: dict[str, Any], *, drop_nulls: bool):
        self.template = template
        self.drop_nulls = drop_nulls
        self._con = scratch.cursor()
        self._sql: str | None = None
        self._schema: pa.Schema | None = None

    def build(self, table: pa.Table) -> pa.Array:
        if table.num_rows == 0:
            return pa.array([], pa.string())
        if self._schema is None or not table.schema.equals(self._schema):
            wide = self.drop_nulls and any(_wide_decimal(f.type) for f in table.schema)
            mark = f"retl-{secrets.token_hex(12)}:" if wide else ""
            expr = f"to_json({_render(self.template, table.schema, mark_wide=mark)})"
            if self.drop_nulls:
                expr = f"json_strip_nulls({expr})"
            expr = f"CAST({expr} AS VARCHAR)"
            if mark:
                expr = f"regexp_replace({expr}, {literal(_unmark(mark))}, '\\1', 'g')"
            self._sql = f"SELECT {expr} AS doc FROM tbl AS t"
            self._schema = table.schema
        parts = [self._build(part) for part in _slices(table, CHUNK_BYTES)]
        return parts[0] if len(parts) == 1 else pa.concat_arrays(parts)

    def _build(self, table: pa.Table) -> pa.Array:
        with scratch.registered(self._con, "tbl", table):
            result: pa.Table = self._con.execute(str(self._sql)).to_arrow_table()  # see scratch.py
        return result.column("doc").combine_chunks()

    def close(self) -> None:
        self._con.close()


# Bytes of values one JSON query takes: DuckDB's JSON functions hold several copies of a
# vector's values in 16 MB arenas, so 2 MB of long strings in one query outgrew the scratch
# database's 64 MB (an OutOfMemoryException); a batch of long values goes in slices instead.
CHUNK_BYTES = 4_000_000


def _slices(table: pa.Table, limit: int) -> list[pa.Table]:
    """``table`` in consecutive row slices of about ``limit`` bytes of values each (a row
    larger than that alone); one slice when it is small, the common case."""
    if table.nbytes <= limit:
        return [table]
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        if (
            pt.is_string(column.type)
            or pt.is_large_string(column.type)
            or pt.is_binary(column.type)
        ):
            sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)
        else:  # fixed width or nested: its share of the column's bytes
            sizes += max(column.nbytes // table.num_rows, 8)
    ends = np.cumsum(sizes)
    cuts = np.unique(np.searchsorted(ends, np.arange(limit, int(ends[-1]), limit), side="right"))
    bounds = [0, *(int(c) for c in cuts if 0 < c < table.num_rows), table.num_rows]
    return [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def pack(
    docs: list[bytes] | pa.Array, max_items: int, max_bytes: int, overhead: int
) -> list[tuple[int, int]]:
    """Split docs into [start, end) runs of at most ``max_items`` and ``max_bytes`` (counting
    ``overhead`` bytes of envelope and one comma a doc)."""
    sizes = (
        [len(d) for d in docs]
        if isinstance(docs, list)
        else pa.compute.binary_length(docs).to_pylist()
    )
    runs: list[tuple[int, int]] = []
    start, total = 0, overhead
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_items or total + size + 1 > max_bytes):
            runs.append((start, i))
            start, total = i, overhead
        total += size + 1
    if start < len(sizes):
        runs.append((start, len(sizes)))
    return runs

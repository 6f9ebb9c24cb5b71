"""Build one JSON document per row for a whole batch in DuckDB, not in a Python loop.

A template is a nested dict whose leaves are ``Col(name)`` (a column of the batch) or plain
literals. With ``drop_nulls`` a null leaf is left out (the property is untouched at the
destination); without it the null is sent (the property is cleared). Timestamps are written
as ISO 8601 UTC (``2025-03-01T10:00:00Z``), dates as ``YYYY-MM-DD``, numbers exactly as the
column holds them (the transform has refused NaN and Infinity, which JSON cannot carry).
"""

from __future__ import annotations

from collections.abc import Iterator
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


def _leaf(col: Col, schema: pa.Schema) -> str:
    ref = f"t.{ident(col.name)}"
    dtype = schema.field(col.name).type
    if pt.is_timestamp(dtype):
        if dtype.tz is None:
            return f"strftime({ref}, '%Y-%m-%dT%H:%M:%S')"
        return f"strftime(CAST({ref} AS TIMESTAMPTZ) AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ')"
    return ref  # DECIMAL, HUGEINT and UBIGINT: to_json writes every digit, never a rounded double


def _render(node: Any, schema: pa.Schema) -> str:
    """SQL for ``node`` as a DuckDB value (a struct for a dict), for ``to_json``."""
    if isinstance(node, Col):
        return _leaf(node, schema)
    if isinstance(node, Expr):
        return node.sql
    if isinstance(node, dict):
        inner = ", ".join(f"{literal(k)}: {_render(v, schema)}" for k, v in node.items())
        return "{" + inner + "}"
    return f"json({literal(orjson.dumps(node).decode())})"


def _nested(dtype: pa.DataType) -> bool:
    return pt.is_nested(dtype) or pt.is_dictionary(dtype)


def _text(node: Any, schema: pa.Schema) -> str:
    """SQL for ``node`` as JSON text with its null properties left out, NULL when ``node``
    is null (so its key is left out too). The text is put together from each value's own
    ``to_json`` with ``concat_ws``, which skips NULLs: a scalar is rendered once and never
    parsed again (``json_strip_nulls`` over a whole document re-read it, about half the
    cost, and turned a number a double cannot hold into a rounded double). A nested value
    or a derived ``Expr`` still goes through ``json_strip_nulls``, which also reaches into
    it; a dict whose values are all null is ``{}``, as the strip left it."""
    if isinstance(node, Col):
        leaf = _leaf(node, schema)
        if _nested(schema.field(node.name).type):
            return f"CAST(json_strip_nulls(to_json({leaf})) AS VARCHAR)"
        return f"CAST(to_json({leaf}) AS VARCHAR)"
    if isinstance(node, Expr):  # JSON null (a NULL struct) leaves its key out, as before
        return f"NULLIF(CAST(json_strip_nulls(to_json({node.sql})) AS VARCHAR), 'null')"
    if isinstance(node, dict):
        if not node:
            return "'{}'"
        pairs = ", ".join(
            f"{literal(orjson.dumps(k).decode() + ':')} || {_text(v, schema)}"
            for k, v in node.items()
        )
        return f"('{{' || concat_ws(',', {pairs}) || '}}')"
    if node is None:
        return "NULL"
    if isinstance(node, str | bool | int):
        return literal(orjson.dumps(node).decode())
    # a float or a nested literal: as DuckDB's JSON writes it, with its nulls stripped
    return f"CAST(json_strip_nulls(json({literal(orjson.dumps(node).decode())})) AS VARCHAR)"


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
            if self.drop_nulls:
                expr = _text(self.template, table.schema)
            else:
                expr = f"CAST(to_json({_render(self.template, table.schema)}) AS VARCHAR)"
            self._sql = f"SELECT {expr} AS doc FROM tbl AS t"
            self._schema = table.schema
        parts = [self._build(part) for part in scratch.row_slices(table)]
        return parts[0] if len(parts) == 1 else pa.concat_arrays(parts)

    def _build(self, table: pa.Table) -> pa.Array:
        with scratch.registered(self._con, "tbl", table):
            result: pa.Table = self._con.execute(str(self._sql)).to_arrow_table()  # see scratch.py
        return result.column("doc").combine_chunks()

    def close(self) -> None:
        self._con.close()


def pack(
    docs: list[bytes] | pa.Array, max_items: int, max_bytes: int, overhead: int
) -> list[tuple[int, int]]:
    """Split docs into [start, end) runs of at most ``max_items`` and ``max_bytes`` (counting
    ``overhead`` bytes of envelope and one comma a doc); a doc larger than that goes alone.
    One search per run over the cumulative sizes, not a Python step per doc."""
    if isinstance(docs, list):
        sizes = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    elif len(docs) == 0:
        return []
    else:
        _no_nulls(docs)
        sizes = pc.binary_length(docs).to_numpy(zero_copy_only=False).astype(np.int64)
    ends = np.cumsum(sizes + 1)  # bytes of docs [0, i] with their commas
    runs: list[tuple[int, int]] = []
    start, n = 0, len(sizes)
    while start < n:
        before = int(ends[start - 1]) if start else 0
        fits = int(np.searchsorted(ends, before + max_bytes - overhead, side="right"))
        stop = max(start + 1, min(fits, start + max_items, n))
        runs.append((start, stop))
        start = stop
    return runs


def bodies(
    docs: pa.Array, head: bytes, tail: bytes, max_items: int, max_bytes: int
) -> Iterator[tuple[int, int, bytes]]:
    """[start, end) runs of ``docs`` packed to a call's limits (``pack``, counting the
    envelope), each with its body: ``head``, the run's docs joined by commas, ``tail``."""
    for start, end in pack(docs, max_items, max_bytes, len(head) + len(tail)):
        yield start, end, head + joined(docs, start, end) + tail


def joined(docs: pa.Array, start: int, stop: int) -> bytes:
    """``docs[start:stop]`` joined by commas, as UTF-8: Arrow's join over a zero-copy list
    view of the slice, so a 10,000-doc body never becomes 10,000 Python strings."""
    part = docs.slice(start, stop - start)
    if len(part) == 0:
        return b""
    _no_nulls(part)
    if isinstance(part, pa.ChunkedArray):
        part = part.combine_chunks()
    if part.type != pa.string():
        part = part.cast(pa.string())
    one = pa.ListArray.from_arrays(pa.array([0, len(part)], pa.int32()), part)
    whole = pc.binary_join(one, ",")
    offsets = np.frombuffer(whole.buffers()[1], dtype=np.int32, count=2, offset=whole.offset * 4)
    return whole.buffers()[2].to_pybytes()[int(offsets[0]) : int(offsets[1])]


def _no_nulls(docs: pa.Array | pa.ChunkedArray) -> None:
    """A body must never lose a record silently: a null doc is a bug upstream."""
    if docs.null_count:
        raise ValueError(f"{docs.null_count} of {len(docs)} documents are null")

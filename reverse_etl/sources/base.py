"""What every warehouse source offers the engine: a schema probe and a stream of Arrow batches.

The engine never fetches a whole result: a source yields record batches of at most
``batch_size`` rows, in the order the query asks for, so memory stays flat as views grow.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from reverse_etl import errors


@dataclass(frozen=True)
class Dialect:
    """The few SQL spellings that differ between warehouses.

    ``param(name)`` renders a named bind parameter (``$name`` for DuckDB, ``%(name)s`` for
    PostgreSQL/Snowflake pyformat, ``@name`` for BigQuery); ``string_type`` is the type to CAST
    identifiers to before comparing them.

    With ``pyformat`` every ``%`` of the statement is significant, so the user's SQL must pass
    through ``embed_sql`` before it is wrapped in a statement that ``Source.stream`` runs
    (``LIKE 'a%'`` becomes ``LIKE 'a%%'``). ``Source.schema`` takes the user's SQL as written
    (it runs no parameters) and wraps it on lines of its own, as ``embed_sql`` does.

    ``unquoted_case`` is how the warehouse folds an unquoted identifier: Snowflake stores
    ``email`` as ``EMAIL``, PostgreSQL as ``email``; DuckDB and BigQuery match names
    case-insensitively. ``resolve_column`` uses it to find the view's own spelling of a
    configured column name, which is the spelling ``quote`` must be given.
    """

    name: str
    param_style: str  # "dollar" | "pyformat" | "at"
    string_type: str = "VARCHAR"
    unquoted_case: str = "insensitive"  # "upper" | "lower" | "insensitive"

    def param(self, name: str) -> str:
        if self.param_style == "dollar":
            return f"${name}"
        if self.param_style == "pyformat":
            return f"%({name})s"
        if self.param_style == "at":
            return f"@{name}"
        raise ValueError(f"unknown param style {self.param_style!r}")

    def quote(self, ident: str) -> str:
        if self.name == "bigquery":  # GoogleSQL escapes inside backticks with a backslash
            return "`" + ident.replace("\\", "\\\\").replace("`", "\\`") + "`"
        return '"' + ident.replace('"', '""') + '"'

    def embed_sql(self, sql: str) -> str:
        """The user's SQL made safe to embed in a statement with this dialect's parameters:
        ``%`` doubled for pyformat, and a line break after it, so that a view ending in a
        ``-- comment`` does not comment out what the statement adds after it (``) AS v``)."""
        escaped = sql.replace("%", "%%") if self.param_style == "pyformat" else sql
        return escaped + "\n"

    def resolve_column(self, name: str, columns: Iterable[str]) -> str:
        """The view's spelling of the configured column ``name``.

        Exact match first, then ``name`` folded as the warehouse folds an unquoted identifier,
        then a unique case-insensitive match. ``MissingColumnError`` when there is none,
        ``AmbiguousColumnError`` when there are several (both are ``SourceError``s).
        """
        columns = list(columns)
        if name in columns:
            return name
        folded = {"upper": name.upper(), "lower": name.lower()}.get(self.unquoted_case)
        if folded is not None and folded in columns:
            return folded
        matches = [c for c in columns if c.casefold() == name.casefold()]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AmbiguousColumnError(name, matches)
        raise MissingColumnError(name, columns)


SourceError = errors.SourceError  # where the sources raise it from


class MissingColumnError(SourceError):
    """``Dialect.resolve_column`` found no spelling of the name in the view. A class of its own
    so a caller can tell "not there" (leave it to the schema check) from "ambiguous"."""

    def __init__(self, name: str, columns: list[str]):
        super().__init__(f"the view has no column {name!r}; its columns are {columns}")
        self.name = name
        self.columns = columns


class AmbiguousColumnError(SourceError):
    """``Dialect.resolve_column`` found several columns differing from the name only in case
    (``Email`` and ``EMAIL``) and none spelled exactly or as the warehouse folds it."""

    def __init__(self, name: str, candidates: list[str]):
        super().__init__(
            f"column {name!r} is ambiguous in the view: it matches {candidates}; "
            "use the exact spelling"
        )
        self.name = name
        self.candidates = candidates


class Source(ABC):
    """One open connection to a warehouse. Use as a context manager."""

    dialect: Dialect

    @abstractmethod
    def schema(self, sql: str) -> pa.Schema:
        """Column names and Arrow types of ``sql`` (the user's SQL as written, ``%`` and
        trailing ``-- comment`` included) without reading its rows."""

    @abstractmethod
    def stream(
        self, sql: str, params: Mapping[str, Any], batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        """Run ``sql`` with named ``params`` (rendered with ``dialect.param``) and yield batches
        of at most ``batch_size`` rows in the query's order. Batches may be smaller."""

    @abstractmethod
    def close(self) -> None: ...

    def replace_table(self, name: Sequence[str], rows: pa.Table) -> None:
        """Make the table ``name`` (``[schema, table]`` or ``[table]``, plain identifiers)
        hold exactly ``rows``, created with its schema when missing, replaced in one step:
        the small tables the tool keeps in the warehouse for analysts (the opt-outs read
        back). ``rows``' columns are strings and UTC timestamps."""
        raise SourceError(f"{self.dialect.name} warehouses cannot be written to")

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PYFORMAT_TOKEN = re.compile(r"%\((?P<name>[^()]*)\)s|%%|%")


def column_kind(type_: pa.DataType) -> str:
    """A written table's column kind (``Source.replace_table`` takes strings and UTC times)."""
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return "string"
    if pa.types.is_timestamp(type_) and type_.tz is not None:
        return "timestamp"
    raise SourceError(f"cannot write a column of type {type_} to a warehouse table")


def probe_sql(sql: str) -> str:
    """The statement ``Source.schema`` types: the user's SQL as written, with a line break
    before the closing parenthesis so a trailing ``-- comment`` cannot swallow it."""
    return f"SELECT * FROM (\n{sql}\n) AS q"


def render_pyformat(sql: str, params: Mapping[str, Any], literal: Callable[[Any], str]) -> str:
    """Fill a pyformat statement: ``%(name)s`` becomes ``literal(params[name])``, ``%%`` ``%``.

    A lone ``%`` or a parameter missing from ``params`` raises ``SourceError``."""

    def fill(m: re.Match[str]) -> str:
        token = m.group(0)
        if token == "%%":
            return "%"
        name = m.group("name")
        if name is None:
            raise SourceError(
                f"lone '%' at offset {m.start()} of a pyformat statement: the user's SQL must "
                "go through Dialect.embed_sql (which writes % as %%) before it is wrapped"
            )
        if name not in params:
            raise SourceError(f"the statement uses parameter {name!r} but none was given")
        return literal(params[name])

    return _PYFORMAT_TOKEN.sub(fill, sql)


def utc_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with every time-zone-aware timestamp labelled UTC (the instants are unchanged)."""
    fields = []
    for f in schema:
        if pa.types.is_timestamp(f.type) and f.type.tz is not None and f.type.tz != "UTC":
            f = f.with_type(pa.timestamp(f.type.unit, tz="UTC"))
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Cast ``batch`` to ``schema`` (same column order); a lossy cast raises ``SourceError``."""
    if batch.schema.equals(schema):
        return batch
    columns = []
    for column, field in zip(batch.columns, schema, strict=True):
        if not column.type.equals(field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise SourceError(
                    f"column {field.name!r}: cannot convert {column.type} to {field.type}: {exc}"
                ) from exc
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def rebatch(batches: Iterator[pa.RecordBatch], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Cut or merge upstream batches (a driver may send one huge batch) to ``batch_size`` rows."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in batches:
        offset = 0
        while offset < batch.num_rows:
            take = min(batch_size - pending_rows, batch.num_rows - offset)
            pending.append(batch.slice(offset, take))
            pending_rows += take
            offset += take
            if pending_rows == batch_size:
                yield _combine(pending)
                pending, pending_rows = [], 0
    if pending_rows:
        yield _combine(pending)


def _combine(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(parts) == 1:
        return parts[0]
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]

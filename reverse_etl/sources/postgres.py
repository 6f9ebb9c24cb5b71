"""PostgreSQL through ADBC: Arrow batches decoded by the driver from a binary COPY stream.

ADBC's PostgreSQL driver streams a result only when the statement has no bind parameters (it
then runs ``COPY (query) TO STDOUT (FORMAT binary)`` and decodes it batch by batch). With bind
parameters it uses ``PQexecPrepared``, which buffers the *whole* result in client memory before
the first batch (measured: 3 M rows -> one batch, 1 GB RSS). So the statement is written in
pyformat (``%(name)s``, like psycopg and Snowflake) and its parameters are rendered as SQL
literals by psycopg's own quoting (``psycopg.sql.Literal``): strings become untyped literals
(so they compare with text, varchar or uuid columns alike), aware datetimes
``'…+00:00'::timestamptz``, naive ones ``'…'::timestamp``, Decimals numeric constants.

Types the driver leaves as extension types are made plain: ``numeric(p,s)`` -> decimal128(p,s)
(decimal256 above 38 digits), unconstrained ``numeric`` -> decimal128(38,9) (a value with more
than 9 decimals is an error telling to cast it in the view), ``uuid`` and ``json``/``jsonb`` ->
string, other opaque types -> their storage type. ``timestamptz`` is timestamp[us, UTC];
``timestamp`` stays naive.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import adbc_driver_manager
import adbc_driver_postgresql.dbapi as adbc_pg
import psycopg.conninfo
import psycopg.sql
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.sources.base import (
    Dialect,
    Source,
    SourceError,
    column_kind,
    probe_sql,
    rebatch,
    render_pyformat,
    utc_schema,
)

DIALECT = Dialect(
    name="postgres", param_style="pyformat", string_type="TEXT", unquoted_case="lower"
)

UNCONSTRAINED_NUMERIC = pa.decimal128(38, 9)
_NUMERIC_TYPMOD_OFFSET = 4  # VARHDRSZ: typmod = ((precision << 16) | scale) + 4


def literal(value: Any) -> str:
    """``value`` as a PostgreSQL literal, quoted by psycopg (no connection needed)."""
    try:
        text = psycopg.sql.Literal(value).as_string().strip()
    except (psycopg.Error, TypeError, ValueError) as exc:
        raise SourceError(
            f"cannot bind a {type(value).__name__} value as a PostgreSQL literal: {exc}"
        ) from exc
    # `-1.5::numeric(4,2)` would cast before negating (and lose the typmod): parenthesise
    return f"({text})" if text.startswith("-") else text


class PostgresSource(Source):
    dialect = DIALECT

    def __init__(self, dsn: str, *, batch_size_hint_bytes: int | None = None):
        """``dsn``: ``postgresql://user:pass@host:5432/db`` or ``host=… dbname=…``.

        ``batch_size_hint_bytes`` caps the size of the driver's own batches (ADBC default
        16 MiB); ``stream`` cuts them to ``batch_size`` rows in any case."""
        self._secrets: list[str] = []
        try:
            info = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.Error:
            info = {}
            self._secrets.append(dsn)  # unparseable: never echo any of it
        password = info.get("password")
        if password:
            self._secrets += [str(password), _percent_encoded(str(password))]
        self._where = "PostgreSQL at {}:{}/{}".format(
            info.get("host") or "localhost", info.get("port") or 5432, info.get("dbname") or "?"
        )
        self._batch_size_hint_bytes = batch_size_hint_bytes
        self._dsn = dsn
        try:
            self._con = adbc_pg.connect(dsn, autocommit=True)
        except adbc_driver_manager.Error as exc:
            raise SourceError(f"cannot connect to {self._where}: {self._scrub(exc)}") from None
        try:
            with self._con.cursor() as cur:
                cur.execute("SET TimeZone = 'UTC'")
                cur.execute("SET application_name = 'reverse-etl'")
        except adbc_driver_manager.Error as exc:
            self._con.close()
            raise SourceError(
                f"{self._where} refused the session settings: {self._scrub(exc)}"
            ) from None

    def schema(self, sql: str) -> pa.Schema:
        try:
            with self._con.cursor() as cur:
                raw = cur.adbc_execute_schema(probe_sql(sql))  # prepare only
        except adbc_driver_manager.Error as exc:
            raise self._error(exc) from None
        return _plain_schema(raw)

    def stream(
        self, sql: str, params: Mapping[str, Any], batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        statement = render_pyformat(sql, params, literal)
        cur = self._con.cursor()
        reader = None
        finished = False
        try:
            if self._batch_size_hint_bytes:
                cur.adbc_statement.set_options(
                    **{"adbc.postgresql.batch_size_hint_bytes": str(self._batch_size_hint_bytes)}
                )
            try:
                cur.execute(statement)
                reader = cur.fetch_record_batch()
            except adbc_driver_manager.Error as exc:
                raise self._error(exc) from None
            target = _plain_schema(reader.schema)
            yield from rebatch(self._converted(reader, target), batch_size)
            finished = True
        finally:
            if reader is not None and not finished:
                # stop the server's COPY, or the next statement first drains the rest of it
                with contextlib.suppress(adbc_driver_manager.Error):
                    cur.adbc_cancel()
            if reader is not None:
                reader.close()
            cur.close()

    def _converted(
        self, reader: pa.RecordBatchReader, target: pa.Schema
    ) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (adbc_driver_manager.Error, pa.ArrowException, OSError) as exc:
                raise self._error(exc) from None
            yield _plain_batch(batch, target)

    def replace_table(self, name: Sequence[str], rows: pa.Table) -> None:
        """Through psycopg (``COPY``) in one transaction: the table is emptied and filled, so a
        reader sees the old rows or the new ones."""
        qualified = ".".join(DIALECT.quote(p) for p in name)
        columns = ", ".join(
            f"{DIALECT.quote(f.name)} {_PG_TYPES[column_kind(f.type)]}" for f in rows.schema
        )
        names = ", ".join(DIALECT.quote(n) for n in rows.column_names)
        try:
            with (
                psycopg.connect(self._dsn, application_name="reverse-etl") as con,
                con.transaction(),
            ):
                if len(name) == 2:
                    con.execute(f"CREATE SCHEMA IF NOT EXISTS {DIALECT.quote(name[0])}")
                con.execute(f"CREATE TABLE IF NOT EXISTS {qualified} ({columns})")
                con.execute(f"DELETE FROM {qualified}")
                with con.cursor().copy(f"COPY {qualified} ({names}) FROM STDIN") as copy:
                    for row in zip(*(c.to_pylist() for c in rows.columns), strict=True):
                        copy.write_row(row)
        except psycopg.Error as exc:
            raise SourceError(
                f"{self._where} cannot write the table {qualified}: {self._scrub(exc)}"
            ) from None

    def close(self) -> None:
        self._con.close()

    def _scrub(self, exc: BaseException) -> str:
        message = str(exc).strip()
        for secret in self._secrets:
            if secret:
                message = message.replace(secret, "***")
        return message

    def _error(self, exc: BaseException) -> SourceError:
        return SourceError(f"{self._where} could not run the sync's SQL: {self._scrub(exc)}")


def _percent_encoded(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _plain_type(field: pa.Field) -> pa.DataType:
    t = field.type
    if isinstance(t, pa.OpaqueType):
        if t.type_name == "numeric":
            return _numeric_type(field)
        return t.storage_type
    if isinstance(t, pa.UuidType | pa.JsonType):
        return pa.string()
    return t


def _numeric_type(field: pa.Field) -> pa.DataType:
    meta = field.metadata or {}
    try:
        typmod = int(meta.get(b"POSTGRESQL:typmod", b"-1"))
    except ValueError:
        typmod = -1
    if typmod < _NUMERIC_TYPMOD_OFFSET:
        return UNCONSTRAINED_NUMERIC
    precision = (typmod - _NUMERIC_TYPMOD_OFFSET) >> 16
    scale = (typmod - _NUMERIC_TYPMOD_OFFSET) & 0x7FF  # 11-bit two's complement since PG 15
    if scale & 0x400 or scale > precision:  # negative scale, or scale above precision
        return UNCONSTRAINED_NUMERIC
    if precision <= 38:
        return pa.decimal128(precision, scale)
    if precision <= 76:
        return pa.decimal256(precision, scale)
    return pa.string()


def _plain_schema(raw: pa.Schema) -> pa.Schema:
    return utc_schema(pa.schema([f.with_type(_plain_type(f)) for f in raw]))


def _plain_batch(batch: pa.RecordBatch, target: pa.Schema) -> pa.RecordBatch:
    columns = []
    for column, field in zip(batch.columns, target, strict=True):
        t = column.type
        if isinstance(t, pa.OpaqueType | pa.JsonType):
            column = column.storage
        elif isinstance(t, pa.UuidType):
            column = pa.array(
                [
                    None if b is None else str(uuid.UUID(bytes=b))
                    for b in column.storage.to_pylist()
                ],
                pa.string(),
            )
        if not column.type.equals(field.type):
            try:
                column = pc.cast(column, field.type)
            except pa.ArrowException as exc:
                hint = (
                    f"; cast it in the view, e.g. CAST({field.name} AS NUMERIC(38, 12))"
                    if pa.types.is_decimal(field.type)
                    else ""
                )
                raise SourceError(
                    f"column {field.name!r}: cannot convert PostgreSQL values to {field.type}: "
                    f"{exc}{hint}"
                ) from None
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=target)


_PG_TYPES = {"string": "text", "timestamp": "timestamptz"}

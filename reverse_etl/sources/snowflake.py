"""Snowflake through the official connector: result chunks as Arrow, cut to ``batch_size``.

Statements use pyformat (``%(name)s``), which the connector fills client-side, so every ``%`` of
the statement is significant: wrap the user's SQL with ``DIALECT.embed_sql``.

The connector's Arrow output is not stable on its own: NUMBER(p,s>0) becomes float64 unless
``arrow_number_to_decimal`` is on (forced on here), integers arrive as int8…int64 depending on
each chunk's values, timestamps as ns or us depending on each chunk's range, and aware
timestamps are labelled with the session time zone. The result's column metadata fixes one
schema per statement (``schema`` asks ``describe``, which reads no rows) and every batch is cast
to it: NUMBER(p,0) -> int64, NUMBER(p,s) -> decimal128(p,s), FLOAT -> float64, TEXT -> string,
DATE -> date32, TIME -> time64[us], TIMESTAMP_TZ/LTZ -> timestamp[us, UTC],
TIMESTAMP_NTZ -> timestamp[us], BOOLEAN -> bool, BINARY -> binary,
VARIANT/OBJECT/ARRAY/GEOGRAPHY/GEOMETRY -> string (JSON).

Column names are Snowflake's: unquoted identifiers come back upper-case (``EMAIL``). Quote them
as reported (``DIALECT.resolve_column`` maps a configured ``email`` to ``EMAIL``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import snowflake.connector
from snowflake.connector.constants import FIELD_TYPES
from snowflake.connector.errors import Error as SnowflakeError

from reverse_etl.sources.base import (
    Dialect,
    Source,
    SourceError,
    column_kind,
    conform,
    probe_sql,
    rebatch,
    render_pyformat,
)

DIALECT = Dialect(
    name="snowflake", param_style="pyformat", string_type="VARCHAR", unquoted_case="upper"
)

_SECRET_WORDS = ("password", "passcode", "token", "secret", "pwd")
_SF_TYPES = {"string": "VARCHAR", "timestamp": "TIMESTAMP_TZ"}
_INSERT_ROWS = 5000


class SnowflakeSource(Source):
    dialect = DIALECT

    def __init__(self, **connect_kwargs: Any):
        """``connect_kwargs`` go to ``snowflake.connector.connect`` (account, user, password or
        private_key_file, warehouse, database, schema, role, …)."""
        self._secrets = _secrets(connect_kwargs)
        kwargs = dict(connect_kwargs)
        kwargs["paramstyle"] = "pyformat"
        kwargs["arrow_number_to_decimal"] = True
        self._where = "Snowflake account {!r}".format(
            kwargs.get("account") or kwargs.get("host") or "?"
        )
        try:
            self._con = snowflake.connector.connect(**kwargs)
        except SnowflakeError as exc:
            raise SourceError(f"cannot connect to {self._where}: {self._scrub(exc)}") from None

    def schema(self, sql: str) -> pa.Schema:
        try:
            with self._con.cursor() as cur:
                described = cur.describe(probe_sql(sql))
        except SnowflakeError as exc:
            raise self._error(exc) from None
        return pa.schema([pa.field(m.name, _arrow_type(m)) for m in described or []])

    def stream(
        self, sql: str, params: Mapping[str, Any], batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        params = dict(params)
        if params:
            render_pyformat(sql, params, lambda _value: "")  # same errors as without params
            statement, bound = sql, params
        else:  # the connector only interpolates when given parameters: unescape %% ourselves
            statement, bound = render_pyformat(sql, {}, lambda _value: ""), None
        cur = self._con.cursor()
        try:
            try:
                cur.execute(statement, bound)
                target = pa.schema(
                    [pa.field(m.name, _arrow_type(m)) for m in cur.description or []]
                )
                tables = cur.fetch_arrow_batches(force_microsecond_precision=True)
            except SnowflakeError as exc:
                raise self._error(exc) from None
            yield from rebatch(self._conformed(tables, target), batch_size)
        finally:
            cur.close()

    def _conformed(self, tables: Iterator[pa.Table], target: pa.Schema) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                table = next(tables)
            except StopIteration:
                return
            except SnowflakeError as exc:
                raise self._error(exc) from None
            for batch in table.to_batches():
                yield conform(batch, target)

    def replace_table(self, name: Sequence[str], rows: pa.Table) -> None:
        """Created if missing (DDL commits on its own in Snowflake), then emptied and filled in
        one transaction. Names are upper-cased, as Snowflake stores unquoted ones, so a view
        can name them unquoted (``at`` is reserved: quote it, ``"AT"``). Rows go in
        multi-row ``INSERT``s of 5,000 (the connector turns a pyformat ``executemany`` into
        one statement): the opt-outs are small; a stage and ``COPY`` would pay off beyond."""
        quoted = [DIALECT.quote(p.upper()) for p in name]
        qualified = ".".join(quoted)
        columns = ", ".join(
            f"{DIALECT.quote(f.name.upper())} {_SF_TYPES[column_kind(f.type)]}" for f in rows.schema
        )
        names = ", ".join(DIALECT.quote(n.upper()) for n in rows.column_names)
        insert = (
            f"INSERT INTO {qualified} ({names}) VALUES ({', '.join(['%s'] * rows.num_columns)})"
        )
        values = list(zip(*(c.to_pylist() for c in rows.columns), strict=True))
        try:
            with self._con.cursor() as cur:
                if len(name) == 2:
                    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted[0]}")
                cur.execute(f"CREATE TABLE IF NOT EXISTS {qualified} ({columns})")
                cur.execute("BEGIN")
                try:
                    cur.execute(f"DELETE FROM {qualified}")
                    for start in range(0, len(values), _INSERT_ROWS):
                        cur.executemany(insert, values[start : start + _INSERT_ROWS])
                    cur.execute("COMMIT")
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
        except SnowflakeError as exc:
            raise SourceError(
                f"{self._where} cannot write the table {qualified}: {self._scrub(exc)}"
            ) from None

    def close(self) -> None:
        self._con.close()

    def _scrub(self, exc: BaseException) -> str:
        message = str(exc).strip()
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message

    def _error(self, exc: BaseException) -> SourceError:
        return SourceError(f"{self._where} could not run the sync's SQL: {self._scrub(exc)}")


def _secrets(kwargs: Mapping[str, Any]) -> list[str]:
    found = []
    for key, value in kwargs.items():
        key = key.lower()
        if (key == "private_key" or any(w in key for w in _SECRET_WORDS)) and value:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if isinstance(value, str) and len(value) >= 1:
                found.append(value)
    return found


def _arrow_type(meta: Any) -> pa.DataType:
    """The Arrow type of one result column, from its Snowflake metadata."""
    name = FIELD_TYPES[meta.type_code].name
    if name == "FIXED":
        scale = meta.scale or 0
        if scale == 0:
            return pa.int64()
        precision = meta.precision or 38
        return (
            pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
        )
    if name in ("TIMESTAMP_TZ", "TIMESTAMP_LTZ"):
        return pa.timestamp("us", tz="UTC")
    if name in ("TIMESTAMP_NTZ", "TIMESTAMP"):
        return pa.timestamp("us")
    simple = {
        "REAL": pa.float64(),
        "TEXT": pa.string(),
        "DATE": pa.date32(),
        "TIME": pa.time64("us"),
        "BOOLEAN": pa.bool_(),
        "BINARY": pa.binary(),
        "VARIANT": pa.string(),
        "OBJECT": pa.string(),
        "ARRAY": pa.string(),
        "MAP": pa.string(),
        "GEOGRAPHY": pa.string(),
        "GEOMETRY": pa.string(),
    }
    if name in simple:
        return simple[name]
    raise SourceError(
        f"column {meta.name!r} has Snowflake type {name}, which reverse-etl does not read; "
        "cast it in the view (e.g. ::VARCHAR)"
    )

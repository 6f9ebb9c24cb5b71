"""DuckDB, the embedded default warehouse: Arrow batches straight from the engine."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from reverse_etl.sources.base import Dialect, Source, SourceError, probe_sql, rebatch
from reverse_etl.util import memory
from reverse_etl.util.scratch import registered

DIALECT = Dialect(name="duckdb", param_style="dollar")


class DuckDBSource(Source):
    dialect = DIALECT

    def __init__(
        self,
        path: str | Path,
        *,
        memory_limit: str | None = None,
        read_only: bool = True,
        threads: int | None = None,
    ):
        path = str(path)
        if path != ":memory:" and not Path(path).exists():
            raise SourceError(
                f"DuckDB file {path!r} does not exist; run `reverse-etl demo` to create the demo "
                "warehouse or fix `path` in the connection profile"
            )
        self.path = path
        self.read_only = read_only and path != ":memory:"
        # the warehouse's share of the process's budget, unless the profile sets a limit
        limit = memory.parse_size(memory_limit) if memory_limit else memory.current().source
        try:
            self._con = duckdb.connect(
                path,
                read_only=self.read_only,
                config={
                    "memory_limit": memory.duckdb_size(limit),
                    "temp_directory": memory.spill_dir(),
                },
            )
            self._con.execute("SET TimeZone = 'UTC'")
            self._con.execute(f"SET threads = {threads or memory.threads_for(limit)}")
        except duckdb.Error as exc:
            raise SourceError(f"cannot open DuckDB file {path!r}: {exc}") from exc

    def schema(self, sql: str) -> pa.Schema:
        """The view's columns as the read sees them. Refused: columns whose names differ only
        in case, or repeat. DuckDB takes them for one name and, in the subquery every read
        wraps the SQL in, renames all but the first (``consent`` -> ``consent_1``), so a
        mapping of ``consent`` read ``Consent``: consent the user never gave."""
        try:
            schema = self._con.sql(probe_sql(sql) + " LIMIT 0").to_arrow_table().schema
            names = self._con.sql(sql).columns  # a query (the probe ran): bound, not run
        except duckdb.Error as exc:
            raise SourceError(f"DuckDB could not run the sync's SQL: {exc}") from exc
        seen: dict[str, list[str]] = {}
        for name in names:
            seen.setdefault(name.casefold(), []).append(name)
        clashes = [group for group in seen.values() if len(group) > 1]
        if clashes:
            listed = "; ".join(" and ".join(repr(n) for n in group) for group in clashes)
            raise SourceError(
                f"the sync's SQL returns columns DuckDB takes for one name: {listed} (DuckDB "
                "names are not case-sensitive, and it would rename all but the first, so a "
                "mapping could read the wrong one); give each column its own name with AS"
            )
        return schema

    def stream(
        self, sql: str, params: Mapping[str, Any], batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        try:
            reader = self._con.sql(sql, params=dict(params)).to_arrow_reader(batch_size)
        except duckdb.Error as exc:
            raise SourceError(f"DuckDB could not run the sync's SQL: {exc}") from exc
        yield from rebatch(iter(reader), batch_size)

    def execute(self, sql: str) -> None:
        """Run set-up SQL (e.g. a view over a CSV file) on this connection."""
        try:
            self._con.execute(sql)
        except duckdb.Error as exc:
            raise SourceError(f"DuckDB could not run set-up SQL: {exc}") from exc

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """Another connection to the same open database (its own transactions, usable from
        another thread): a warehouse snapshot in this file writes through it, as a second
        ``duckdb.connect`` of the file in this process would have to repeat its settings."""
        cur = self._con.cursor()
        cur.execute("SET TimeZone = 'UTC'")
        return cur

    def replace_table(self, name: Sequence[str], rows: pa.Table) -> None:
        if self.read_only:
            raise SourceError("writing a table needs the DuckDB warehouse opened for writing")
        qualified = ".".join(DIALECT.quote(p) for p in name)
        cur = self.cursor()
        try:
            with registered(cur, "retl_rows", rows):
                if len(name) == 2:
                    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {DIALECT.quote(name[0])}")
                cur.execute(f"CREATE OR REPLACE TABLE {qualified} AS SELECT * FROM retl_rows")
        except duckdb.Error as exc:
            raise SourceError(f"DuckDB cannot write the table {qualified}: {exc}") from None
        finally:
            cur.close()

    def close(self) -> None:
        self._con.close()

"""CSV debug mode: export a sync's view to CSV, and validate a view or an exported CSV.

Validation runs exactly the transform a real run uses, so the error file it writes is the
one a run would write; nothing is sent and no state moves.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from reverse_etl.config import Project, Sync
from reverse_etl.destinations import registry
from reverse_etl.engine import fit_view, make_destination, read_plan
from reverse_etl.errors import SchemaMismatchError
from reverse_etl.pipeline import preflight, transformed_batches
from reverse_etl.sources import Source, SourceError, open_source
from reverse_etl.sources.duckdb import DuckDBSource
from reverse_etl.sql import ident, literal
from reverse_etl.state import RunCounts
from reverse_etl.transform.kinds import kind_of_arrow
from reverse_etl.transform.rowerrors import ErrorFileWriter, RowError, cell_text
from reverse_etl.util import storage

if TYPE_CHECKING:
    import _csv


@dataclass
class ValidationReport:
    rows: int
    bad_rows: int
    by_reason: Counter[str]
    error_file: str


def export_csv(project: Project, sync: Sync, target: str, batch_size: int = 50_000) -> int:
    """Write the view's rows as the warehouse returns them (all rows, view order)."""
    conn = project.connections[sync.source.connection]
    rows = 0
    with open_source(conn, project) as source, storage.open_text_for_write(target) as fh:  # type: ignore[arg-type]
        writer: _csv.Writer | None = None
        schema = source.schema(project.source_sql(sync))
        with storage.open_text_for_write(schema_path(target)) as side:
            # A CSV holds only text: the column kinds the view's types imply travel beside it,
            # so validating the file checks what validating the view checks.
            side.write(orjson.dumps({f.name: kind_of_arrow(f.type) for f in schema}).decode())
        for batch in source.stream(
            source.dialect.embed_sql(project.source_sql(sync)), {}, batch_size
        ):
            if writer is None:
                writer = csv.writer(fh)
                writer.writerow(batch.schema.names)
            columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            for values in zip(*columns, strict=True):
                writer.writerow([cell_text(v) for v in values])
            rows += batch.num_rows
        if writer is None:  # empty view: still write the header
            csv.writer(fh).writerow(schema.names)
    return rows


def schema_path(csv_target: str) -> str:
    return f"{csv_target}.kinds.json"


def _exported_kinds(csv_path: str) -> dict[str, str]:
    """Column kinds written by ``export_csv`` beside the file; empty for a hand-made CSV."""
    try:
        with storage.open_text_for_read(schema_path(csv_path)) as fh:
            return dict(orjson.loads(fh.read()))
    except (OSError, ValueError):  # S3 failures are storage.StorageError, an OSError
        return {}


CURSOR_TEXT = "__retl_cursor_text"


def _csv_source(path: str, cursor: str) -> tuple[Source, str, list[RowError]]:
    """The CSV as a DuckDB source: every column text (as a user's file holds it), except the
    cursor, read back as a timestamp so rows order as they would in the view, with its text
    kept beside it (``CURSOR_TEXT``) so an unreadable value is reported as itself; ``__row`` =
    the line in the file (header = line 1).

    A line with more or fewer fields than the header is a ``malformed_csv_row`` row error
    naming its line, and the other lines are checked. Read strictly, one such line made
    DuckDB's sniffer take the whole file for a single column ("column 'phone' is not in the
    view"), with nothing to say which line was at fault. DuckDB keeps the lines it set aside
    (``store_rejects``) with their line numbers, which also number the lines it kept."""
    quoted = literal(path)
    source = DuckDBSource(":memory:")
    options = f"{quoted}, all_varchar = true, header = true"
    read = f"read_csv({options}, ignore_errors = true)"
    try:
        # a first pass has DuckDB set the malformed lines aside (the read is done twice: a
        # debug mode, and it keeps memory flat); the view's reads then only skip them
        source.execute(
            f"CREATE TEMP TABLE retl_kept AS SELECT count(*) AS n FROM read_csv({options}, "
            "store_rejects = true, rejects_table = 'retl_rejects', "
            "rejects_scan = 'retl_rejects_scan')"
        )
        source.execute(
            # one line short of three fields is three rejects: one error, the first, per line
            "CREATE TEMP TABLE retl_malformed AS SELECT line, any_value(csv_line) AS csv_line, "
            "arg_min(error_message, column_idx) AS error_message FROM retl_rejects GROUP BY line"
        )
        # (temporary tables are the source's own connection's: read through it)
        malformed_lines = source.stream("SELECT * FROM retl_malformed ORDER BY line", {}, 10_000)
        rejected_rows = [tuple(r.values()) for b in malformed_lines for r in b.to_pylist()]
    except BaseException:
        source.close()
        raise
    # the k-th line kept is the k-th line from 2 on that DuckDB did not set aside
    source.execute(
        f"CREATE VIEW csv_raw AS WITH r AS (SELECT *, row_number() OVER () AS retl_k FROM "
        f"{read}), l AS (SELECT n AS line, row_number() OVER (ORDER BY n) AS retl_k FROM "
        f"range(2, (SELECT n FROM retl_kept) + {len(rejected_rows)} + 2) AS t(n) WHERE n NOT IN "
        "(SELECT line FROM retl_malformed)) SELECT r.* EXCLUDE (retl_k), CAST(l.line AS BIGINT) "
        "AS __row FROM r JOIN l USING (retl_k)"
    )
    malformed = [
        RowError(int(line), None, "(line)", text, "malformed_csv_row", f"line {line}: {message}")
        for line, text, message in rejected_rows
    ]
    names = source.schema("SELECT * FROM csv_raw").names
    try:
        column = DuckDBSource.dialect.resolve_column(cursor, names)
    except SourceError:  # the schema check names the missing cursor
        return source, "SELECT * FROM csv_raw", malformed
    c = ident(column)
    return (
        source,
        f"SELECT * REPLACE (TRY_CAST({c} AS TIMESTAMPTZ) AS {c}), {c} AS {CURSOR_TEXT} "
        "FROM csv_raw",
        malformed,
    )


def validate(
    project: Project, sync: Sync, *, csv_path: str | None, error_file: str, batch_size: int = 10_000
) -> ValidationReport:
    """Check every row of the view (or an exported CSV) as a run would, destination's offline
    checks included, and write the error file; nothing is sent and no state moves."""
    local_csv = storage.local_copy_path(csv_path) if csv_path else None
    counts = RunCounts()
    malformed: list[RowError] = []
    try:
        if csv_path and local_csv is not None:
            source, view_sql, malformed = _csv_source(local_csv, sync.cursor_column)
            where = csv_path
        else:
            source = open_source(project.connections[sync.source.connection], project)  # type: ignore[arg-type]
            view_sql, where = project.source_sql(sync), "the view"
        with (
            source,
            storage.open_text_for_write(error_file) as fh,
            ErrorFileWriter(fh, sync.name, "validate", registry.reasons()) as writer,
        ):
            sync, spec, schema = fit_view(project, sync, source, view_sql)
            if csv_path:
                kinds = _exported_kinds(csv_path)
                fields = tuple(replace(f, kind=f.kind or kinds.get(f.column)) for f in spec.fields)
                spec = replace(spec, fields=fields, cursor_text=CURSOR_TEXT)
            problems = preflight(sync.name, spec, schema)
            if problems:
                raise SchemaMismatchError(
                    f"{where} does not fit the mapping:\n  - " + "\n  - ".join(problems)
                )
            plan = read_plan(source, view_sql, sync, spec)
            destination = make_destination(project, sync)
            try:
                for _ in transformed_batches(
                    source,
                    plan.query,
                    spec,
                    destination,
                    batch_size=batch_size,
                    errors=writer,
                    counts=counts,
                ):
                    pass
            finally:
                destination.close()
            writer.write(malformed)  # in line order with the rest (the writer merges by row)
            counts.read += len(malformed)
            counts.rejected += len(malformed)
    finally:
        if csv_path and local_csv and storage.is_s3(csv_path):
            Path(local_csv).unlink(missing_ok=True)
    return ValidationReport(counts.read, counts.rejected, writer.by_reason, error_file)

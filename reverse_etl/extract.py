"""The incremental read: which rows a run takes, in which order, and where it stops.

Rows are ordered by (cursor, identifier) and the watermark is that pair, so rows sharing one
cursor value are never skipped at a batch boundary or between runs. With a lookback window,
the lower bound is instead ``cursor >= watermark - lookback`` (inclusive), which re-reads the
recent past to catch rows committed late; upserts make re-reading harmless. Rows with no
cursor or identifier value are read every run so they are reported, never silently dropped
(a batch may end among NULL identifiers of one cursor value; re-reading them all is simpler
than a watermark that points into them). Identifiers
that occur more than once in a read are found by a separate grouping query, and all but the
latest row of each are rejected, so one run never sends two versions of a record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import pyarrow as pa

from reverse_etl.sources.base import Dialect, Source
from reverse_etl.state import Watermark


@dataclass(frozen=True)
class IncrementalQuery:
    sql: str
    params: dict[str, Any]
    where: str = "TRUE"


def build_query(
    view_sql: str,
    dialect: Dialect,
    *,
    cursor: str,
    identifier: str,
    watermark: Watermark | None,
    lookback: timedelta,
) -> IncrementalQuery:
    c, i = dialect.quote(cursor), dialect.quote(identifier)
    params: dict[str, Any] = {}
    if watermark is None:
        where = "TRUE"
    elif lookback and isinstance(watermark.cursor, datetime | date):
        params["wm_cursor"] = watermark.cursor - lookback
        where = f"v.{c} >= {dialect.param('wm_cursor')}"
    else:
        params["wm_cursor"] = watermark.cursor
        wc = dialect.param("wm_cursor")
        # NULL identifiers sort first within a cursor value, so after (c, NULL) come all (c, id).
        if watermark.id is None:
            where = f"(v.{c} > {wc} OR (v.{c} = {wc} AND v.{i} IS NOT NULL))"
        else:
            params["wm_id"] = watermark.id
            where = f"(v.{c} > {wc} OR (v.{c} = {wc} AND v.{i} > {dialect.param('wm_id')}))"
    sql = (
        f"SELECT * FROM ({view_sql}) AS v WHERE {where} OR v.{c} IS NULL OR v.{i} IS NULL "
        f"ORDER BY v.{c} ASC NULLS FIRST, v.{i} ASC NULLS FIRST"
    )
    return IncrementalQuery(sql, params, where)


def duplicates_query(
    view_sql: str,
    dialect: Dialect,
    query: IncrementalQuery,
    *,
    cursor: str,
    identifier: str,
    email: bool,
) -> IncrementalQuery:
    """Rows of the read whose identifier (trimmed, lower-cased for emails) occurs more than
    once: few, so this is the only place a whole-run set is fetched. A grouping, not a window
    over every row, so the main read stays a plain sorted stream."""
    c, i = dialect.quote(cursor), dialect.quote(identifier)
    key = f"TRIM(CAST(v.{i} AS {dialect.string_type}))"
    if email:
        key = f"LOWER({key})"
    sql = (
        f"SELECT {key} AS k, v.{i} AS id, v.{c} AS c FROM ({view_sql}) AS v "
        f"WHERE ({query.where}) AND v.{c} IS NOT NULL AND v.{i} IS NOT NULL AND {key} IN ("
        f"SELECT {key} FROM ({view_sql}) AS v WHERE ({query.where}) AND v.{c} IS NOT NULL "
        f"AND v.{i} IS NOT NULL GROUP BY {key} HAVING COUNT(*) > 1)"
    )
    return IncrementalQuery(sql, query.params, query.where)


def superseded(rows: pa.Table) -> pa.Table:
    """From the duplicates query's rows, the (id, cursor) pairs to reject as
    ``duplicate_identifier``: every row but its key's latest (greatest cursor, then greatest
    id). ``n`` counts how often a pair occurs; where the latest pair itself occurs more than
    once (an exact duplicate), ``keep_one`` tells the transformer to send only the first."""
    keys, ids, curs = rows["k"].to_pylist(), rows["id"].to_pylist(), rows["c"].to_pylist()
    latest: dict[Any, tuple[Any, Any]] = {}
    for key, ident, cur in zip(keys, ids, curs, strict=True):
        if key not in latest or (cur, ident) > latest[key]:
            latest[key] = (cur, ident)
    counts: dict[tuple[Any, Any], int] = {}
    for ident, cur in zip(ids, curs, strict=True):
        counts[(ident, cur)] = counts.get((ident, cur), 0) + 1
    out_ids, out_curs, keep_one = [], [], []
    for key, ident, cur in zip(keys, ids, curs, strict=True):
        pair = (ident, cur)
        is_latest = (cur, ident) == latest[key]
        if pair in counts and (not is_latest or counts[pair] > 1):
            out_ids.append(ident)
            out_curs.append(cur)
            keep_one.append(is_latest)
            del counts[pair]
    return pa.table(
        {
            "id": pa.array(out_ids, rows.schema.field("id").type),
            "c": pa.array(out_curs, rows.schema.field("c").type),
            "keep_one": pa.array(keep_one, pa.bool_()),
        }
    )


@dataclass(frozen=True)
class ReadPlan:
    query: IncrementalQuery
    superseded: pa.Table | None  # (id, c) rows to reject as duplicates; None when there are none


def plan_read(
    source: Source,
    view_sql: str,
    *,
    cursor: str,
    identifier: str,
    email_identifier: bool,
    watermark: Watermark | None,
    lookback: timedelta,
) -> ReadPlan:
    """The run's main query, and the duplicates it must reject (found before streaming)."""
    query = build_query(
        view_sql,
        source.dialect,
        cursor=cursor,
        identifier=identifier,
        watermark=watermark,
        lookback=lookback,
    )
    dq = duplicates_query(
        view_sql,
        source.dialect,
        query,
        cursor=cursor,
        identifier=identifier,
        email=email_identifier,
    )
    batches = list(source.stream(dq.sql, dq.params, 100_000))
    rows = pa.Table.from_batches(batches) if batches else None
    if rows is None or rows.num_rows == 0:
        return ReadPlan(query, None)
    return ReadPlan(query, superseded(rows))


def batch_watermark(batch: pa.RecordBatch, cursor: str, identifier: str) -> Watermark | None:
    """The (cursor, id) of the batch's last row that has both; None if it has none. Rows
    without either are re-read every run anyway, and must not pull the watermark back."""
    cursors, ids = batch.column(cursor), batch.column(identifier)
    for pos in range(batch.num_rows - 1, -1, -1):
        value, ident = cursors[pos].as_py(), ids[pos].as_py()
        if value is not None and ident is not None:
            return Watermark(value, ident)
    return None


def later(mark: Watermark, than: Watermark | None) -> bool:
    """Whether ``mark`` is past ``than``: a lookback re-reads rows behind the watermark, and
    their batches must not move it back."""
    if than is None:
        return True
    try:
        return (mark.cursor, mark.id) > (than.cursor, than.id)
    except TypeError:  # e.g. the view changed the identifier's type: trust the new value
        return True

"""The incremental read: which rows a run takes, in which order, and where it stops.

Rows are ordered by (cursor, identifier) and the watermark is that pair, so rows sharing one
cursor value are never skipped at a batch boundary or between runs. With a lookback window,
the lower bound is instead ``cursor >= watermark - lookback`` (inclusive), which re-reads the
recent past to catch rows committed late; upserts make re-reading harmless. Rows with no
cursor or identifier value are read every run so they are reported, never silently dropped
(a batch may end among NULL identifiers of one cursor value; re-reading them all is simpler
than a watermark that points into them). Identifiers that occur more than once in a read are
ranked by a window in the same statement, and all but the latest row of each are rejected, so
one run never sends two versions of a record and the view is executed once per run.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
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


DUP_RANK = "__retl_dup"  # column the read adds: 1 for the row to send, 2+ for the rows it replaces


def build_query(
    view_sql: str,
    dialect: Dialect,
    *,
    cursor: str,
    identifier: str,
    email_identifier: bool = False,
    watermark: Watermark | None,
    lookback: timedelta,
    annotate: Callable[[str], str] | None = None,
    retry: Sequence[str] = (),
) -> IncrementalQuery:
    """The run's one read of the view: its rows past the watermark (plus rows without a
    cursor or identifier), sorted by (cursor, identifier), each with ``DUP_RANK``: its rank
    among the read's rows sharing its identifier (trimmed, lower-cased for emails), latest
    first. A window in the same statement, so BigQuery and Snowflake scan (and bill) the view
    once; NULL where the row has no cursor or identifier.

    ``annotate`` (a warehouse snapshot's join): given the ranked SELECT, unordered, a SELECT
    over it that keeps its cursor and identifier columns and adds its own; the read is that,
    in the same order.

    ``retry``: identifiers (as the read's duplicate key spells them) read whatever their
    cursor: rows of the retry queue (``retry_queue.py``), behind the watermark."""
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
    key = f"TRIM(CAST(v.{i} AS {dialect.string_type}))"
    if email_identifier:
        key = f"LOWER({key})"
    view = dialect.embed_sql(view_sql)
    read = f"WHERE {where} OR v.{c} IS NULL OR v.{i} IS NULL"
    if retry and watermark is not None:  # without one the whole view is read anyway
        names = [f"rq_{n}" for n in range(len(retry))]
        params.update(zip(names, retry, strict=True))
        read += f" OR {key} IN ({', '.join(dialect.param(n) for n in names)})"
    order = f"ORDER BY v.{c} ASC NULLS FIRST, v.{i} ASC NULLS FIRST"
    if dialect.name == "duckdb":
        ranked = _duckdb_ranked_read(view, read, c, i, key)
    else:
        rank = (
            f"CASE WHEN v.{c} IS NULL OR v.{i} IS NULL THEN NULL ELSE ROW_NUMBER() OVER ("
            f"PARTITION BY v.{c} IS NULL, v.{i} IS NULL, {key} ORDER BY v.{c} DESC, v.{i} DESC) END"
        )
        ranked = f"SELECT v.*, {rank} AS {dialect.quote(DUP_RANK)} FROM ({view}) AS v {read}"
    if annotate is None:
        sql = f"{ranked} {order}"
    else:
        sql = f"SELECT * FROM ({annotate(ranked)}) AS v {order}"
    return IncrementalQuery(sql, params, where)


def _duckdb_ranked_read(view: str, read: str, c: str, i: str, key: str) -> str:
    """The same read for the embedded DuckDB, whose window operator must hold a whole
    partitioned input in memory (it failed on 1M rows at 64 MB): the view is executed once
    into a materialized CTE (spilled to disk as needed), identifiers occurring more than once
    are found by a grouping (which spills), and only their rows are ranked by a window."""
    both = f"v.{c} IS NOT NULL AND v.{i} IS NOT NULL"
    pos = "__retl_pos"
    return (
        f"WITH v AS MATERIALIZED (SELECT v.*, row_number() OVER () AS {pos} FROM ({view}) AS v "
        f"{read}), d AS (SELECT v.{pos}, ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY "
        f"v.{c} DESC, v.{i} DESC) AS r FROM v WHERE {both} AND {key} IN (SELECT {key} FROM v "
        f"WHERE {both} GROUP BY 1 HAVING COUNT(*) > 1)) "
        f"SELECT v.* EXCLUDE ({pos}), CASE WHEN {both} THEN COALESCE(d.r, 1) END AS "
        f'"{DUP_RANK}" FROM v LEFT JOIN d ON d.{pos} = v.{pos}'
    )


@dataclass(frozen=True)
class ReadPlan:
    query: IncrementalQuery


def plan_read(
    source: Source,
    view_sql: str,
    *,
    cursor: str,
    identifier: str,
    email_identifier: bool,
    watermark: Watermark | None,
    lookback: timedelta,
    annotate: Callable[[str], str] | None = None,
    retry: Sequence[str] = (),
) -> ReadPlan:
    """The run's single query over the view (duplicates are ranked inside it; a warehouse
    snapshot is joined inside it: ``annotate``)."""
    query = build_query(
        view_sql,
        source.dialect,
        cursor=cursor,
        identifier=identifier,
        email_identifier=email_identifier,
        watermark=watermark,
        lookback=lookback,
        annotate=annotate,
        retry=retry,
    )
    return ReadPlan(query)


def batch_watermark(
    batch: pa.RecordBatch, cursor: str, identifier: str, skip: Collection[int] = ()
) -> Watermark | None:
    """The (cursor, id) of the batch's last row that has both; None if it has none. Rows
    without either are re-read every run anyway, and must not pull the watermark back; rows
    at ``skip`` (a cursor in the future) must never move it, or every later change would
    sort before it and never be read."""
    cursors, ids = batch.column(cursor), batch.column(identifier)
    for pos in range(batch.num_rows - 1, -1, -1):
        if pos in skip:
            continue
        value, ident = cursors[pos].as_py(), ids[pos].as_py()
        if value is not None and ident is not None:
            return Watermark(value, ident, cursor)
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

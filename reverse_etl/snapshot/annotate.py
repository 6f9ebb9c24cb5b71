"""The diff as SQL around a read: the read's rows joined with a snapshot table, each row
coming back with its fingerprints and an ``unchanged`` flag as extra columns (``EXTRA``), which
``take_annotations`` takes off again into a ``Diff``. One spelling serves both stores: a
warehouse snapshot wraps the warehouse's own read in it (``warehouse.py``), and the local
snapshot runs it in its DuckDB file over the read's Arrow stream (``local.py``), so the
snapshot table is scanned once per run, not once per batch.

The rule: a row is unchanged when the snapshot holds its identifier with the same payload and
consent, it is the row the read sends for its identifier (``DUP_RANK`` 1) and its cursor is
there and not in the future (such a row goes to the transform, which reports it and keeps the
watermark behind it). An unchanged row comes back with only its identifier and cursor (the
watermark needs them; every other column is NULL), so it costs little transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.errors import SourceError
from reverse_etl.extract import DUP_RANK
from reverse_etl.snapshot.fingerprint import Fingerprint
from reverse_etl.snapshot.store import Diff
from reverse_etl.sql import ident, literal
from reverse_etl.transform.transformer import TransformSpec, cursor_checks, future_cursor_sql

# the columns the annotated read adds (and ``take_annotations`` takes off again)
SID = "__retl_snap_id"
PAYLOAD = "__retl_snap_payload"
CONSENT = "__retl_snap_consent"
UNCHANGED = "__retl_snap_unchanged"
KNOWN = "__retl_snap_known"
DOC = "__retl_snap_doc"
OLD = "__retl_snap_old"
CONSENT_SAME = "__retl_snap_consent_same"  # the destination holds this consent from us
EXTRA = (SID, PAYLOAD, CONSENT, UNCHANGED, KNOWN, CONSENT_SAME, DOC, OLD)
_PDOC, _CDOC, _FIRST, _MOLD = (
    "__retl_snap_pdoc",
    "__retl_snap_cdoc",
    "__retl_snap_first",
    "__retl_snap_mold",
)
_RANKED = "\x00ranked\x00"  # where the read's ranked SELECT goes in the template


@dataclass(frozen=True)
class Annotation:
    """How to annotate one sync's read: its fingerprint, its view's columns, the snapshot
    table to join (``id``, ``payload``, ``consent``, ``doc``) and the engine's dialect."""

    fingerprint: Fingerprint
    spec: TransformSpec
    view: pa.Schema
    table: str
    postgres: bool = False
    has_rank: bool = True  # the read carries ``DUP_RANK`` (a CSV's does not)
    # identifiers handed to the destination whose record never followed (the run died after
    # sending them), with the fingerprints sent: a row is unchanged only if every send of it
    # still pending sent what the read holds (``pending``, local.py)
    pending: str | None = None
    # the read's columns to return, as they are (None: all the view's and ``DUP_RANK``, NULL
    # where the row is unchanged but for the identifier and cursor)
    carry: tuple[str, ...] | None = None

    def sql(self, ranked: str, *, resend: bool, keep_old: bool, hashed: bool = False) -> str:
        """``ranked`` (a SELECT of the view's columns and ``DUP_RANK``) joined with the
        snapshot: the view's columns, ``DUP_RANK`` and ``EXTRA``. ``resend``: no row is
        unchanged (fingerprints are still taken). ``keep_old``: each changed row also carries
        the snapshot's doc of it (``plan``). ``hashed``: ``ranked`` is ``hashed_sql``'s
        output, fingerprinted already (the local snapshot takes them in its scratch
        database, where a batch of long values has room for their JSON)."""
        pg = self.postgres
        q = ident
        text = "text" if pg else "VARCHAR"
        # PostgreSQL would inline each level's expressions into the next, computing a row's
        # JSON and MD5 once per use: OFFSET 0 keeps the level whole, each computed once
        fence = " OFFSET 0" if pg else ""
        with_prints = f"({_RANKED})" if hashed else f"({self.hashed_sql(_RANKED)}{fence})"
        same = (
            "FALSE"
            if resend
            else (
                f"d.{q(_FIRST)} AND d.{q(SID)} IS NOT NULL AND m.id IS NOT NULL AND "
                f"m.payload = d.{q(PAYLOAD)} AND m.consent = d.{q(CONSENT)}"
                + (
                    f" AND (p.id IS NULL OR (p.sends = 1 AND p.payload = d.{q(PAYLOAD)} AND "
                    f"p.consent = d.{q(CONSENT)}))"
                    if self.pending
                    else ""
                )
            )
        )
        # a LEFT JOIN of the few pending sends, one row per identifier: the read stays the
        # probe side, streamed in its order (a NOT EXISTS was planned with the read as the
        # side built: a 1M-row first run held every row, 1.2 GB, and ran 25 % slower)
        in_flight = (
            f" LEFT JOIN (SELECT id, count(DISTINCT (payload, consent)) AS sends, "
            f"any_value(payload) AS payload, any_value(consent) AS consent FROM {self.pending} "
            f"GROUP BY id) AS p ON p.id = d.{q(SID)}"
            if self.pending and not resend
            else ""
        )
        joined = (
            f"SELECT d.*, COALESCE({same}, FALSE) AS {q(UNCHANGED)}, "
            f"m.id IS NOT NULL AS {q(KNOWN)}, "
            f"COALESCE(m.consent = d.{q(CONSENT)}, FALSE) AS {q(CONSENT_SAME)}, "
            f"{'m.doc' if keep_old else 'NULL'} AS {q(_MOLD)} "
            f"FROM {with_prints} AS d LEFT JOIN {self.table} AS m ON m.id = d.{q(SID)}"
            f"{in_flight}{fence}"
        )
        changed = f"NOT j.{q(UNCHANGED)}"
        columns, blank = self._returned(resend)
        old = f"CASE WHEN {changed} THEN j.{q(_MOLD)} END" if keep_old else "NULL"
        columns += [f"j.{q(c)}" for c in (SID, PAYLOAD, CONSENT, UNCHANGED, KNOWN, CONSENT_SAME)]
        columns += [
            f"CASE WHEN {changed} THEN '[' || j.{q(_PDOC)} || ',' || j.{q(_CDOC)} || ']' END "
            f"AS {q(DOC)}",
            f"CAST({old} AS {text}) AS {q(OLD)}",
        ]
        sql = f"SELECT {', '.join(columns)} FROM ({joined}) AS j"
        if pg and blank:
            fields = ", ".join(f"j.{q(c)}" for c in blank)
            sql += f" LEFT JOIN LATERAL (SELECT {fields}) AS x ON {changed}"
        if pg:  # every % of a pyformat statement is significant; the ranked read's are doubled
            sql = sql.replace("%", "%%")
        return sql.replace(_RANKED, ranked)

    def hashed_sql(self, ranked: str) -> str:
        """``ranked`` with each row's fingerprints: its identifier as text, the JSON of its
        payload and consent, their salted hashes, and whether it is the row the read sends
        for its identifier with a cursor that is there and not in the future."""
        fp, spec, pg = self.fingerprint, self.spec, self.postgres
        q = ident
        doc = fp.pg_doc if pg else fp.doc
        digest = fp.pg_hash if pg else fp.hash
        text = "text" if pg else "VARCHAR"
        cursor = f"r.{q(spec.cursor)}"
        first = f"{cursor} IS NOT NULL AND NOT ({self._future(cursor)})"
        if self.has_rank:
            first = f"COALESCE(r.{q(DUP_RANK)}, 1) = 1 AND {first}"
        prints = (
            f"SELECT r.*, CAST(r.{q(spec.identifier)} AS {text}) AS {q(SID)}, "
            f"{doc(fp.payload, 'r')} AS {q(_PDOC)}, "
            f"{doc(fp.consent, 'r', fp.present)} AS {q(_CDOC)}, "
            f"{first} AS {q(_FIRST)} FROM ({ranked}) AS r"
        )
        fence = " OFFSET 0" if pg else ""
        # with ``carry`` only those of the read's columns go on (the local snapshot's): its
        # fingerprinting then returns narrow rows, not a second copy of every value
        kept = "h.*"
        if self.carry is not None:
            kept = ", ".join(f"h.{q(c)}" for c in (*self.carry, SID, _PDOC, _CDOC, _FIRST))
        return (
            f"SELECT {kept}, {digest(f'h.{q(_PDOC)}')} AS {q(PAYLOAD)}, "
            f"{digest(f'h.{q(_CDOC)}')} AS {q(CONSENT)} FROM ({prints}{fence}) AS h"
        )

    def _returned(self, resend: bool) -> tuple[list[str], list[str]]:
        """The read's columns the annotated read returns, and those of them it blanks."""
        q = ident
        if self.carry is not None:
            return [f"j.{q(c)}" for c in self.carry], []
        kept = {self.spec.identifier, self.spec.cursor}
        blank = [] if resend else [c for c in self.view.names if c not in kept]
        columns = []
        for c in self.view.names:
            if c not in blank:
                columns.append(f"j.{q(c)}")
            elif self.postgres:  # a column of a lateral join keeps its type modifier
                columns.append(f"x.{q(c)}")
            else:
                columns.append(f"CASE WHEN j.{q(UNCHANGED)} THEN NULL ELSE j.{q(c)} END AS {q(c)}")
        if self.has_rank:
            columns.append(f"j.{q(DUP_RANK)}")
        return columns, blank

    def _future(self, cursor: str) -> str:
        """SQL true when the row's cursor lies beyond now + max_future_skew (as the
        transform judges it: such a row is held back, never unchanged)."""
        dtype = self.view.field(self.spec.cursor).type
        checks = cursor_checks(self.spec)
        if not self.postgres:
            return future_cursor_sql(cursor, dtype, checks)
        bound = f"CAST({literal(checks.max_timestamp)} AS timestamptz)"
        if pa.types.is_timestamp(dtype) and dtype.tz is not None:
            return f"{cursor} > {bound}"
        if pa.types.is_timestamp(dtype) or pa.types.is_date(dtype):
            zone = literal(checks.naive_timezone)
            return f"(CAST({cursor} AS timestamp) AT TIME ZONE {zone}) > {bound}"
        return "FALSE"


def take_annotations(batch: pa.RecordBatch, *, resend: bool) -> tuple[Diff, pa.Array]:
    """The annotated read's verdict on ``batch`` (with ``__row``): a ``Diff`` whose batch is
    ``batch`` without ``EXTRA``, and the identifiers read (for a mirror run's ``seen``)."""
    missing = [c for c in EXTRA if c not in batch.schema.names]
    if missing:
        raise SourceError(
            f"the read did not join the snapshot table (no {missing[0]!r} column): the "
            "read must be built with this snapshot's in_read()"
        )
    unchanged = pc.fill_null(batch.column(UNCHANGED), False)
    if resend:
        unchanged = pa.array([False] * batch.num_rows, pa.bool_())
    changed = pc.invert(unchanged)
    prints = pa.table(
        {
            "__row": batch.column("__row"),
            "id": batch.column(SID),
            "payload": batch.column(PAYLOAD),
            "consent": batch.column(CONSENT),
            "known": batch.column(KNOWN),
            "consent_same": batch.column(CONSENT_SAME),
            "doc": batch.column(DOC),
            "old": batch.column(OLD),
        }
    ).filter(changed)
    ids = batch.column(SID)
    rest = batch.drop_columns(list(EXTRA))
    return Diff(changed, prints, batch.num_rows - prints.num_rows, rest), ids.filter(
        pc.is_valid(ids)
    )

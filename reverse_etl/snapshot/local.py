"""The synced-state snapshot: what a sync last sent and the destination acknowledged, one
record per identifier, so a run sends only what changed and a mirror sync knows who left.

Each record holds the identifier, a fingerprint of the row's mapped values (``payload``), a
separate one of its consent values and their timestamps (``consent``), the value the
destination finds the record by (``key``: its email for Dotdigital), the destination's own id
where known, and when it was sent.

Fingerprints are taken from the view's values as read, before the transform, so a row that did
not change costs neither a transform nor an API call: ``md5_number_lower`` (64 bits of MD5,
stable across DuckDB releases, unlike ``hash()``) of the row's JSON, salted with the sync's
definition (mapping, consent, transform and destination options), so changing the sync's
definition makes every row "changed" once. The cursor is not part of it: a ``modified_at`` that
moved without a change does not resend. Normalising happens after the fingerprint, so a value
that changes only in ways the transform erases (``A@x.com`` -> ``a@x.com``) is sent once more;
it is never the other way round.

Where it lives (this module, the default): one DuckDB file per sync under the project's state
directory (``.reverse_etl/snapshots/<sync>.duckdb``). One file per sync because a DuckDB file
takes one writing process, and the sync's lock already guarantees one run per sync. The diff is
one DuckDB join of the batch with the snapshot, never a Python set of identifiers. With
``snapshot: {connection: ...}`` it lives in the warehouse instead (``warehouse.py``), where the
read itself joins it.

Consistency with the watermark: a batch's records are written after the destination
acknowledged it and before its watermark is committed. A crash between the two re-reads rows
the snapshot already holds: they are found unchanged and not sent again, which is right, as
they were acknowledged. A crash before the snapshot write re-sends them (idempotent upserts).
Rows the destination refused are not recorded, so they are sent again when read again.
Identifiers handed to the destination before it answered wait in ``pending`` (``reserve``),
and a member's fingerprint is cleared before its removal is sent (``unsettle``): a crash at
any point leaves a member either counted among the list's members or sent again, never lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from reverse_etl.extract import DUP_RANK
from reverse_etl.snapshot.fingerprint import Fingerprint
from reverse_etl.snapshot.store import UNSETTLED, Diff
from reverse_etl.sql import ident
from reverse_etl.transform.transformer import TransformSpec, cursor_checks, future_cursor_sql

MEMORY_LIMIT = "128MB"  # the join spills beyond it: memory stays flat as the snapshot grows


class Snapshot:
    """The snapshot of one sync: ``diff`` runs on the read-ahead thread, ``record`` on the
    thread that commits; each thread has its own cursor of the file's one connection."""

    def __init__(self, path: Path, spec: TransformSpec, salt: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.spec = spec
        self.fingerprint = Fingerprint.of(spec, salt)
        # no checkpoint in the middle of a run: DuckDB's default (at 16 MB of log) stalled the
        # batch that met it for ~0.2 s, 50 times a 1M-row first run (31 s -> 22 s without);
        # the log is folded into the file when the run closes it, or past 1 GB
        self._db = duckdb.connect(
            str(path),
            config={"threads": 1, "memory_limit": MEMORY_LIMIT, "checkpoint_threshold": "1GB"},
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS members (id VARCHAR NOT NULL, payload UBIGINT NOT NULL, "
            "consent UBIGINT NOT NULL, key VARCHAR, dest_id VARCHAR, "
            "sent_at TIMESTAMPTZ NOT NULL, doc VARCHAR)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (id VARCHAR)")
        # identifiers handed to the destination before it answered (``reserve``): a table of
        # their own, so recording the first run's batches never has to search ``members``
        self._db.execute("CREATE TABLE IF NOT EXISTS pending (id VARCHAR, key VARCHAR)")
        self.mirror = False  # note every identifier read, to find who left the view
        self.read_complete = False  # the read ran to its end (not stopped, not failed)
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self._diff_sql: str | None = None
        self.keep_old = False  # the diff also returns each changed row's remembered doc (plan)

    def in_read(self, *, resend: bool) -> Callable[[str], str] | None:
        """The local snapshot diffs each batch as it arrives: the read is left as it is."""
        return None

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cur", None)
        if cur is None:
            with self._lock:
                cur = self._db.cursor()
                self._cursors.append(cur)
            cur.execute("SET TimeZone = 'UTC'")
            self._local.cur = cur
        return cur

    def _compile(self, schema: pa.Schema) -> str:
        """A row is unchanged when the snapshot holds its identifier with the same payload and
        consent, and it is the row the read sends for its identifier (not a duplicate). A row
        whose cursor is missing or in the future never is: it goes to the transform, which
        reports it and keeps the watermark behind it."""
        fp = self.fingerprint
        first = f"COALESCE(b.{ident(DUP_RANK)}, 1) = 1" if DUP_RANK in schema.names else "TRUE"
        cursor = f"b.{ident(self.spec.cursor)}"
        dtype = schema.field(self.spec.cursor).type
        future = future_cursor_sql(cursor, dtype, cursor_checks(self.spec))
        first = f"{first} AND {cursor} IS NOT NULL AND NOT ({future})"
        key = f"CAST(b.{ident(fp.identifier)} AS VARCHAR)"
        old = "m.doc" if self.keep_old else "CAST(NULL AS VARCHAR)"
        return (
            f"WITH f AS (SELECT b.__row, b.__pos, {key} AS id, {fp.doc(fp.payload)} AS pdoc, "
            f"{fp.doc(fp.consent)} AS cdoc, {first} AS first FROM batch AS b), "
            f"h AS (SELECT f.*, {fp.hash('f.pdoc')} AS payload, {fp.hash('f.cdoc')} AS consent "
            "FROM f), "
            "d AS (SELECT h.__row, h.__pos, h.id, h.payload, h.consent, h.pdoc, h.cdoc, "
            "(h.first AND h.id IS NOT NULL AND m.id IS NOT NULL AND m.payload = h.payload "
            f"AND m.consent = h.consent) AS unchanged, m.id IS NOT NULL AS known, {old} AS old "
            "FROM h LEFT JOIN members AS m ON m.id = h.id) "
            "SELECT __row, id, payload, consent, unchanged, known, "
            "CASE WHEN NOT unchanged THEN '[' || pdoc || ',' || cdoc || ']' END AS doc, old, "
            "__pos FROM d"
        )

    def diff(self, batch: pa.RecordBatch | pa.Table, *, resend: bool = False) -> Diff:
        """Which rows of ``batch`` (with ``__row``) differ from what the destination holds.
        ``resend``: every row counts as changed (their fingerprints are still taken)."""
        if self._diff_sql is None:
            self._diff_sql = self._compile(batch.schema)
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        table = table.append_column("__pos", pa.array(range(table.num_rows), pa.int64()))
        cur = self._cursor()
        cur.register("batch", table)
        try:
            out: pa.Table = cur.execute(self._diff_sql).to_arrow_table()
        finally:
            cur.unregister("batch")
        # the join's order is not the batch's: put it back (a sort of one batch, in Arrow)
        out = out.take(pa.compute.sort_indices(out["__pos"])).drop_columns(["__pos"])
        if self.mirror:
            cur.register("seen_batch", out.select(["id"]))
            try:
                cur.execute("INSERT INTO seen SELECT id FROM seen_batch WHERE id IS NOT NULL")
            finally:
                cur.unregister("seen_batch")
        unchanged = out["unchanged"].combine_chunks()
        if resend:
            unchanged = pa.array([False] * len(unchanged), pa.bool_())
        changed = pa.compute.invert(unchanged)
        prints = out.filter(changed).drop_columns(["unchanged"])
        return Diff(changed, prints, len(unchanged) - prints.num_rows)

    def record(self, prints: pa.Table, acked: pa.Table) -> None:
        """Remember the rows of an acknowledged batch: ``prints`` from its ``Diff``, ``acked``
        the rows the destination took (``__row``, and ``key`` as text). One transaction: a
        crash leaves the snapshot as it was before the batch."""
        if acked.num_rows == 0:
            return
        known = (
            bool(pa.compute.any(prints["known"]).as_py())
            if "known" in prints.column_names
            else True
        )
        cur = self._cursor()
        cur.register("prints", prints)
        cur.register("sent", acked)
        try:
            cur.execute("BEGIN TRANSACTION")
            cur.execute(
                "CREATE OR REPLACE TEMP TABLE acked AS SELECT p.id, p.payload, p.consent, "
                "CAST(s.key AS VARCHAR) AS key, p.doc, p.known FROM prints AS p JOIN sent AS s "
                "USING (__row) WHERE p.id IS NOT NULL"
            )
            # only identifiers the snapshot held when the batch was read can be in members:
            # a run of new rows (a first run) never searches it
            if known:
                cur.execute("DELETE FROM members WHERE id IN (SELECT id FROM acked WHERE known)")
            cur.execute(
                "INSERT INTO members SELECT id, payload, consent, key, NULL, now(), doc FROM acked"
            )
            cur.execute("DELETE FROM pending WHERE id IN (SELECT id FROM acked)")
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        finally:
            cur.unregister("prints")
            cur.unregister("sent")

    def reserve(self, members: pa.Table) -> None:
        if members.num_rows == 0:
            return
        cur = self._cursor()
        cur.register("reserved", members)
        try:
            cur.execute(
                "INSERT INTO pending SELECT DISTINCT r.id, CAST(r.key AS VARCHAR) "
                "FROM reserved AS r WHERE r.id IS NOT NULL"
            )
        finally:
            cur.unregister("reserved")

    def unsettle(self, ids: Sequence[Any]) -> None:
        if not ids:
            return
        cur = self._cursor()
        cur.register("leaving", pa.table({"id": pa.array([str(i) for i in ids], pa.string())}))
        try:
            cur.execute(
                f"UPDATE members SET payload = {UNSETTLED}, consent = {UNSETTLED}, doc = NULL "
                "WHERE id IN (SELECT id FROM leaving)"
            )
        finally:
            cur.unregister("leaving")

    def begin_mirror(self) -> None:
        """Start noting the identifiers this run reads (``departed`` needs a whole read)."""
        self._cursor().execute("DELETE FROM seen")
        self.mirror = True
        self.read_complete = False

    def departed_count(self) -> int:
        row = self._cursor().execute(self._DEPARTED.format(what="count(*)")).fetchone()
        return int(row[0]) if row else 0

    def departed(self, limit: int) -> pa.Table:
        """Up to ``limit`` members the snapshot holds that this run's read did not return:
        ``__id``, ``key``, ``dest_id``."""
        what = "m.id AS __id, m.key, m.dest_id"
        sql = self._DEPARTED.format(what=what) + f" ORDER BY m.id LIMIT {int(limit)}"
        table: pa.Table = self._cursor().execute(sql).to_arrow_table()
        return table

    # members, and the identifiers sent whose answer never came (the destination may hold
    # them), that this run's read did not return
    _MEMBERS = (
        "(SELECT id, key, dest_id FROM members UNION ALL "
        "SELECT DISTINCT ON (id) id, key, NULL FROM pending "
        "WHERE id NOT IN (SELECT id FROM members))"
    )
    _DEPARTED = (
        f"SELECT {{what}} FROM {_MEMBERS} AS m "
        "WHERE NOT EXISTS (SELECT 1 FROM seen AS s WHERE s.id = m.id)"
    )

    def forget(self, ids: Sequence[Any]) -> None:
        """Drop members whose removal the destination acknowledged."""
        if not ids:
            return
        cur = self._cursor()
        cur.register("gone", pa.table({"id": pa.array([str(i) for i in ids], pa.string())}))
        try:
            cur.execute("DELETE FROM members WHERE id IN (SELECT id FROM gone)")
            cur.execute("DELETE FROM pending WHERE id IN (SELECT id FROM gone)")
        finally:
            cur.unregister("gone")

    def count(self) -> int:
        row = self._cursor().execute(f"SELECT count(*) FROM {self._MEMBERS}").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            for cur in self._cursors:
                cur.close()
            self._cursors.clear()
        self._db.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def snapshot_path(root: Path, directory: str, sync: str) -> Path:
    base = Path(directory)
    return (base if base.is_absolute() else root / base) / f"{sync}.duckdb"

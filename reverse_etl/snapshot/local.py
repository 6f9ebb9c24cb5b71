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
one DuckDB query per run over the read's Arrow stream (``annotate.py``, the same SQL a DuckDB
warehouse snapshot runs), joined with the snapshot, whose hash table is built once, never a
Python set of identifiers. The join does not keep the read's order (its operators hold small
chunks back), so each batch takes its rows' verdicts by ``__row`` and fails the run unless it
got each of them once. Two threads fingerprint the read (the
verdicts are matched by ``__row``, so the order they come in does not matter). Measured on 1M
members (``make bench``): 10.5 s -> 5.6 s for an unchanged full re-read (the diff 6.0 s ->
1.1 s: a per-batch join had scanned all of ``members`` 50 times, on one thread). With
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

import collections
import contextlib
import itertools
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.errors import ReverseEtlError
from reverse_etl.extract import DUP_RANK
from reverse_etl.snapshot.annotate import EXTRA, Annotation, take_annotations
from reverse_etl.snapshot.fingerprint import Fingerprint
from reverse_etl.snapshot.store import UNSETTLED, Diff
from reverse_etl.transform.transformer import TransformSpec
from reverse_etl.util import memory, scratch, storage
from reverse_etl.util.prefetch import close
from reverse_etl.util.scratch import registered


class Snapshot:
    """The snapshot of one sync: ``diff`` runs on the read-ahead thread, ``record`` on the
    thread that commits; each thread has its own cursor of the file's one connection."""

    def __init__(self, path: Path, spec: TransformSpec, salt: str):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # the project's snapshot path, not a bug: say which part
            raise storage.PathError(
                f"snapshot file {path} cannot be created: {storage.path_problem(path, exc)}"
            ) from exc
        self.path = path
        self.spec = spec
        self.fingerprint = Fingerprint.of(spec, salt)
        # no checkpoint in the middle of a run: DuckDB's default (at 16 MB of log) stalled the
        # batch that met it for ~0.2 s, 50 times a 1M-row first run (31 s -> 22 s without);
        # the log is folded into the file when the run closes it, or past 1 GB
        try:
            self._db = duckdb.connect(
                str(path),
                # two threads for the join with members (the JSON and MD5 of every row read are
                # taken in the scratch database, ``_Hashed``); its share of the process's budget
                # (util/memory.py): the join and the records not yet checkpointed spill past it
                config={
                    "threads": 2,
                    "memory_limit": memory.duckdb_size(memory.current().snapshot),
                    "checkpoint_threshold": "1GB",
                },
            )
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            # another process has the file open: a run of this sync still going, whose sync
            # lock was released by hand (`unlock --force`); this was "internal error"
            raise ReverseEtlError(
                f"snapshot file {path} is open in another process ({exc}): a run of this sync "
                "is still going, though its lock was released (`reverse-etl unlock --force`?); "
                "wait for that process to end, or stop it, then run again"
            ) from exc
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS members (id VARCHAR NOT NULL, payload UBIGINT NOT NULL, "
            "consent UBIGINT NOT NULL, key VARCHAR, dest_id VARCHAR, "
            "sent_at TIMESTAMPTZ NOT NULL, doc VARCHAR)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (id VARCHAR)")
        # identifiers handed to the destination before it answered (``reserve``): a table of
        # their own, so recording the first run's batches never has to search ``members``
        self._db.execute("CREATE TABLE IF NOT EXISTS pending (id VARCHAR, key VARCHAR)")
        # what was sent (a file from before these columns: NULL, never taken as the same)
        for column in ("payload", "consent"):
            self._db.execute(f"ALTER TABLE pending ADD COLUMN IF NOT EXISTS {column} UBIGINT")
        self.mirror = False  # note every identifier read, to find who left the view
        self.read_complete = False  # the read ran to its end (not stopped, not failed)
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self._annotation: Annotation | None = None
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

    def diffs(
        self, batches: Iterator[pa.RecordBatch], *, resend: bool = False, whole: bool = True
    ) -> Generator[tuple[pa.RecordBatch, Diff], None, None]:
        """Each batch of the read (with ``__row``) with its ``Diff``: which of its rows differ
        from what the destination holds. ``resend``: every row counts as changed (their
        fingerprints are still taken).

        A whole read (``whole``: no watermark, ``--full-refresh``, mirror) is one DuckDB query
        over the read's Arrow stream (``Annotation``), joined with ``members``, whose hash
        table is built once per run: a join per batch scanned all of ``members`` once per
        batch. An incremental read, a small share of the members, is joined batch by batch,
        each batch the hash table's side, so it never builds one of every member. Either
        returns only the annotations: each row's values stay in the batch they came in."""
        batches = iter(batches)
        try:
            first = next(batches, None)
            if first is None:
                return
            schema = first.schema
            if self._annotation is None or not self._annotation.view.equals(schema):
                self._annotation = Annotation(
                    self.fingerprint,
                    self.spec,
                    schema,
                    "members",
                    has_rank=DUP_RANK in schema.names,
                    carry=("__row",),
                    # a row sent by a run that died before recording it may be at the
                    # destination with values the view no longer has: sent again, unless
                    # what was sent is what the read and the snapshot hold
                    pending="pending",
                )
            annotation = self._annotation
            sql = annotation.sql(
                "SELECT * FROM retl_read", resend=resend, keep_old=self.keep_old, hashed=True
            )
            read = _conformed(itertools.chain([first], batches), schema)
            with contextlib.closing(scratch.cursor()) as work:
                hashes = annotation.hashed_sql("SELECT * FROM retl_batch")
                hashed = _Hashed(lambda b: _fingerprinted(work, hashes, b))
                if whole:
                    yield from self._streamed(read, hashed, first.num_rows, sql, resend)
                else:
                    yield from self._batch_by_batch(read, hashed, sql, resend)
        finally:
            close(batches)

    def _batch_by_batch(
        self, read: Iterator[pa.RecordBatch], hashed: _Hashed, sql: str, resend: bool
    ) -> Generator[tuple[pa.RecordBatch, Diff], None, None]:
        """Batches of an incremental read, joined with ``members`` a group at a time: the join
        scans every member once per call, so a 1 %-changed run of a 10M-member snapshot made
        that scan once per 20,000 rows. A group holds up to the read-ahead's share of the
        memory budget."""
        cur = self._cursor()
        cur.execute("SET disabled_optimizers = ''")  # the group, the smaller side, is built
        limit = memory.current().read_ahead
        group: list[pa.RecordBatch] = []
        prints: list[pa.RecordBatch] = []
        held = 0
        for batch in itertools.chain(read, [None]):
            if batch is not None:
                group.append(batch)
                prints.append(hashed(batch))
                held += batch.nbytes + prints[-1].nbytes
                if held < limit:
                    continue
            if not group:
                break
            with registered(cur, "retl_read", pa.Table.from_batches(prints)):
                notes = cur.sql(sql).to_arrow_table()
            for one in group:
                mine, notes = _rows_of(one, notes)
                yield self._verdict(one, mine, resend)
            group, prints, held = [], [], 0

    def _verdict(
        self, batch: pa.RecordBatch, notes: pa.Table | None, resend: bool
    ) -> tuple[pa.RecordBatch, Diff]:
        diff, ids = take_annotations(_annotated(batch, notes), resend=resend)
        if self.mirror and len(ids):
            self._note_seen(ids)
        assert diff.batch is not None
        return diff.batch, diff

    def _streamed(
        self,
        read: Iterator[pa.RecordBatch],
        hashed: _Hashed,
        rows: int,
        sql: str,
        resend: bool,
    ) -> Generator[tuple[pa.RecordBatch, Diff], None, None]:
        fed: collections.deque[pa.RecordBatch] = collections.deque()
        failed: list[BaseException] = []

        def feed() -> Iterator[pa.RecordBatch]:
            try:
                for batch in read:
                    fed.append(batch)
                    yield hashed(batch)
            except BaseException as exc:  # the read's own error, raised as it was below
                failed.append(exc)
                raise

        stream = feed()
        first = next(stream)  # the fingerprinted batches' schema, for the reader
        schema = first.schema

        # a cursor of its own: a streaming result holds its connection until it is drained
        with self._lock:
            cur = self._db.cursor()
        try:
            cur.execute("SET TimeZone = 'UTC'")
            # the read is the probe side, streamed in its order; members the build side
            cur.execute("SET disabled_optimizers = 'build_side_probe_side,join_order'")
            stream_in = itertools.chain([first], stream)
            with registered(cur, "retl_read", pa.RecordBatchReader.from_batches(schema, stream_in)):
                result = cur.sql(sql).to_arrow_reader(max(rows, 1))
                try:  # the result is closed before the read it streams is unregistered
                    notes = result.schema.empty_table()
                    for chunk in itertools.chain(result, [None]):
                        if chunk is not None:
                            notes = pa.concat_tables([notes, pa.Table.from_batches([chunk])])
                        # each batch goes on as it came, once the query returned all its rows
                        # (its operators hold a few rows back: the join's output is unordered)
                        while fed:
                            mine, rest = _rows_of(fed[0], notes)
                            if mine is None and chunk is not None:
                                break
                            batch, notes = fed.popleft(), rest
                            yield self._verdict(batch, mine, resend)
                finally:
                    result.close()
        except (duckdb.Error, pa.ArrowException, OSError):  # the stream's error, as DuckDB saw it
            if failed:
                raise failed[0] from None
            raise
        finally:
            cur.close()

    def _note_seen(self, ids: pa.Array) -> None:
        cur = self._cursor()
        with registered(cur, "seen_batch", pa.table({"id": ids})):
            cur.execute("INSERT INTO seen SELECT id FROM seen_batch")

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
        with registered(cur, "prints", prints), registered(cur, "sent", acked):
            self._record(cur, known)

    @staticmethod
    def _record(cur: duckdb.DuckDBPyConnection, known: bool) -> None:
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

    def reserve(self, members: pa.Table) -> None:
        if members.num_rows == 0:
            return
        cur = self._cursor()
        with registered(cur, "reserved", members):
            cur.execute(
                "INSERT INTO pending (id, key, payload, consent) SELECT DISTINCT r.id, "
                "CAST(r.key AS VARCHAR), r.payload, r.consent FROM reserved AS r "
                "WHERE r.id IS NOT NULL"
            )

    def unsettle(self, ids: Sequence[Any]) -> None:
        if not ids:
            return
        cur = self._cursor()
        with registered(cur, "leaving", _ids(ids)):
            cur.execute(
                f"UPDATE members SET payload = {UNSETTLED}, consent = {UNSETTLED}, doc = NULL "
                "WHERE id IN (SELECT id FROM leaving)"
            )

    def begin_mirror(self) -> None:
        """Start noting the identifiers this run reads (``departed`` needs a whole read)."""
        self._cursor().execute("DELETE FROM seen")
        self.mirror = True
        self.read_complete = False

    def departed_count(self) -> int:
        rows = self._cursor().execute(self._DEPARTED.format(what="count(*)")).fetchall()
        return int(rows[0][0])

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
        with registered(cur, "gone", _ids(ids)):
            cur.execute("DELETE FROM members WHERE id IN (SELECT id FROM gone)")
            cur.execute("DELETE FROM pending WHERE id IN (SELECT id FROM gone)")

    def held(self) -> int:
        """How many members the snapshot holds: a count DuckDB keeps, no scan (``count``
        also finds the identifiers pending, an anti-join over every member)."""
        rows = self._cursor().execute("SELECT count(*) FROM members").fetchall()
        return int(rows[0][0])

    def count(self) -> int:
        rows = self._cursor().execute(f"SELECT count(*) FROM {self._MEMBERS}").fetchall()
        return int(rows[0][0])  # fetchall: a result left open blocks the cursor's next query

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


class _Hashed:
    """Fingerprints a batch of the read (``Annotation.hashed_sql``) in the scratch database:
    the JSON of a batch of long values needs room that the snapshot's share of the memory
    budget does not have, and the scratch database holds one batch's work at a time. Each
    batch comes back with the first one's types."""

    def __init__(self, compute: Callable[[pa.RecordBatch], pa.RecordBatch]):
        self._compute = compute
        self._schema: pa.Schema | None = None

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        out = self._compute(batch)
        if self._schema is None:
            self._schema = out.schema
        return _like(out, self._schema)


def _fingerprinted(
    cur: duckdb.DuckDBPyConnection, sql: str, batch: pa.RecordBatch
) -> pa.RecordBatch:
    """The batch's fingerprints, its long values taken in slices (``scratch.row_slices``): the
    JSON of a vector of long values needs several times their size at once."""
    parts: list[pa.Table] = []
    for part in scratch.row_slices(pa.Table.from_batches([batch])):
        with registered(cur, "retl_batch", part):
            parts.append(cur.execute(sql).to_arrow_table())
    table: pa.Table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    if table.num_rows == 0:  # an empty batch (a source may send one)
        return pa.RecordBatch.from_arrays(
            [pa.array([], f.type) for f in table.schema], schema=table.schema
        )
    return table.combine_chunks().to_batches()[0]


def _conformed(batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The read's batches, each with the first one's schema (a source's batches share one)."""
    for batch in batches:
        yield _like(batch, schema)


def _like(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    return batch if batch.schema.equals(schema) else batch.cast(schema)


def _ids(ids: Sequence[Any]) -> pa.Table:
    return pa.table({"id": pa.array([str(i) for i in ids], pa.string())})


def _rows_of(batch: pa.RecordBatch, notes: pa.Table) -> tuple[pa.Table | None, pa.Table]:
    """The annotations of ``batch``'s rows in its order, and the others; None while some of
    its rows have not come back yet."""
    rows = batch.column("__row")
    inside = pc.is_in(notes["__row"], value_set=rows)
    if (pc.sum(inside).as_py() or 0) < batch.num_rows:
        return None, notes
    mine = notes.filter(inside)
    return mine.take(pc.index_in(rows, value_set=mine["__row"])), notes.filter(pc.invert(inside))


def _annotated(batch: pa.RecordBatch, notes: pa.Table | None) -> pa.RecordBatch:
    """``batch`` with its rows' annotations (``notes``), which must be for its rows in its
    order (the watermark relies on it: anything else fails the run rather than move the
    watermark past unsent rows)."""
    if (
        notes is None
        or notes.num_rows != batch.num_rows
        or not notes["__row"].combine_chunks().equals(batch.column("__row"))
    ):
        raise RuntimeError(
            "the snapshot's diff did not return each of the read's rows once; nothing was sent "
            "past them (please report this with your DuckDB version)"
        )
    columns = [*batch.columns, *(notes[name].combine_chunks() for name in EXTRA)]
    return pa.RecordBatch.from_arrays(columns, names=[*batch.schema.names, *EXTRA])


def snapshot_path(root: Path, directory: str, sync: str) -> Path:
    base = Path(directory)
    return (base if base.is_absolute() else root / base) / f"{sync}.duckdb"

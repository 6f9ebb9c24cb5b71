"""The synced-state snapshot in the warehouse itself (``snapshot: {connection: NAME, schema:
reverse_etl}``), for views of tens of millions of members: the warehouse computes the diff
where the data is, and unchanged rows cost neither a transform nor most of their transfer.

Tables: ``<schema>.retl_snapshot_<sync>`` (``id text, payload bigint, consent bigint, key
text, dest_id text, sent_at timestamptz, doc text``; ``payload``/``consent`` are UBIGINT in
DuckDB, whose ``md5_number_lower`` they hold) and ``<schema>.retl_seen_<sync>`` (``id``: the
identifiers a mirror run read). The sync's name is used as it is when it is lower-case
letters, digits and ``_`` (at most 40); otherwise folded to those and suffixed with a hash of
the name, so every sync has its own tables in PostgreSQL's 63 bytes and DuckDB's
case-insensitive names alike.

The diff runs in the read: the read's ranked SELECT (``extract.build_query``) is wrapped in a
join with the snapshot table that computes each row's fingerprints with the warehouse's own
functions (PostgreSQL: ``json_build_object(...)::text`` and 64 bits of ``md5``; DuckDB: as the
local snapshot) and returns them with an ``unchanged`` flag as extra columns. An unchanged row
comes back with only its identifier and cursor (the watermark needs them; every other column
is NULL), so it costs little transfer; the pipeline skips it by the flag (``diff``) and no
identifier ever makes a round trip through a Python set. The rule is the local one: the
snapshot holds the identifier with the same payload and consent, the row is the one the read
sends for its identifier (``DUP_RANK`` 1) and its cursor is there and not in the future.

Writes: ``record`` upserts the acknowledged rows of a batch in one transaction (PostgreSQL:
COPY into a temporary table, then ``INSERT ... ON CONFLICT`` through psycopg with the
connection's DSN; DuckDB: through another connection of the source's own database, the file
being open in this process already). The read sees the snapshot as it was when it started
(each warehouse's MVCC), which changes nothing: a run reads each identifier's row once.
``departed`` (mirror) is one anti-join in the warehouse of the snapshot with the identifiers
the read returned, uploaded batch by batch into the ``seen`` table (so the view runs once).

Consistency with the watermark is the local snapshot's (``local.py``): recorded after the
destination acknowledged a batch and before its watermark moves.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.config import DuckDBConnection, PostgresConnection, WarehouseConnection
from reverse_etl.errors import SourceError
from reverse_etl.secrets import scrub
from reverse_etl.snapshot.annotate import Annotation, take_annotations
from reverse_etl.snapshot.fingerprint import Fingerprint
from reverse_etl.snapshot.store import UNSETTLED, Diff, as_text
from reverse_etl.sql import ident
from reverse_etl.transform.transformer import TransformSpec
from reverse_etl.util.scratch import registered

if TYPE_CHECKING:
    import duckdb
    import psycopg

    from reverse_etl.sources import Source
    from reverse_etl.sources.duckdb import DuckDBSource

SNAPSHOT_PREFIX = "retl_snapshot_"
SEEN_PREFIX = "retl_seen_"

# pg_advisory_xact_lock key held while a snapshot's schema and tables are created: b"retl-snp"
_PG_DDL_LOCK = int.from_bytes(b"retl-snp", "big")


def table_suffix(sync: str) -> str:
    """The sync's part of its table names: the name when it is safe everywhere as it is."""
    if re.fullmatch(r"[a-z0-9_]{1,40}", sync):
        return sync
    folded = re.sub(r"[^a-z0-9_]", "_", sync.lower())[:32]
    return f"{folded}_{hashlib.sha256(sync.encode()).hexdigest()[:8]}"


class WarehouseSnapshot:
    """The snapshot of one sync in its source's warehouse (see the module's docstring).
    ``diff`` runs on the read-ahead thread, everything else on the thread that commits."""

    def __init__(
        self,
        tables: _Tables,
        spec: TransformSpec,
        salt: str,
        view: pa.Schema,
    ):
        self.tables = tables
        self.spec = spec
        self.view = view
        self.fingerprint = Fingerprint.of(spec, salt)
        self.annotation = Annotation(
            self.fingerprint, spec, view, tables.snapshot, postgres=tables.postgres
        )
        self.mirror = False
        self.read_complete = False
        self.keep_old = False

    @classmethod
    def open(
        cls,
        conn: WarehouseConnection,
        source: Source,
        spec: TransformSpec,
        salt: str,
        view: pa.Schema,
        *,
        sync: str,
        schema: str,
    ) -> WarehouseSnapshot:
        """Open (and create, the first time) ``sync``'s snapshot tables in ``schema`` of the
        warehouse ``conn``, which ``source`` reads."""
        suffix = table_suffix(sync)
        names = (schema, SNAPSHOT_PREFIX + suffix, SEEN_PREFIX + suffix)
        tables: _Tables
        if isinstance(conn, PostgresConnection):
            tables = _PostgresTables(conn, *names)
        elif isinstance(conn, DuckDBConnection):
            if not callable(getattr(source, "cursor", None)) or getattr(source, "read_only", True):
                raise SourceError(
                    f"sync {sync!r}: its snapshot lives in the DuckDB warehouse it reads, so the "
                    "file must be opened for writing too; this source was opened read-only"
                )
            tables = _DuckDBTables(source, *names)  # type: ignore[arg-type]
        else:  # the config refuses them: snapshot.connection
            raise SourceError(f"no snapshot in a {conn.type} warehouse; use the local default")
        return cls(tables, spec, salt, view)

    # ------------------------------------------------------------------ the read

    def in_read(self, *, resend: bool) -> Callable[[str], str] | None:
        return functools.partial(self._annotate, resend=resend)

    def _annotate(self, ranked: str, *, resend: bool) -> str:
        return self.annotation.sql(ranked, resend=resend, keep_old=self.keep_old)

    def diffs(
        self, batches: Iterator[pa.RecordBatch], *, resend: bool = False, whole: bool = True
    ) -> Generator[tuple[pa.RecordBatch, Diff], None, None]:
        """The read's verdict on each batch (with ``__row``): its extra columns say which
        rows are unchanged and carry the fingerprints of the others; the batch goes on without
        them. A mirror run notes the identifiers read in the ``seen`` table."""
        for batch in batches:
            diff, ids = take_annotations(batch, resend=resend)
            if self.mirror:
                self.tables.add_seen(ids)
            assert diff.batch is not None
            yield diff.batch, diff

    # ------------------------------------------------------------------ writes

    def record(self, prints: pa.Table, acked: pa.Table) -> None:
        """Remember the acknowledged rows of a batch (see ``Snapshot.record``), in one
        transaction of the warehouse."""
        if acked.num_rows == 0:
            return
        ours = prints.filter(pc.is_valid(prints["id"])).select(
            ["__row", "id", "payload", "consent", "doc"]
        )
        ours = ours.set_column(0, "__row", pc.cast(ours["__row"], pa.int64()))
        held = ours.join(acked, "__row", join_type="inner")
        if held.num_rows:
            self.tables.upsert(held.select(["id", "payload", "consent", "key", "doc"]))

    def reserve(self, members: pa.Table) -> None:
        """Before a batch is sent, its members are marked unsettled, known ones too: if the
        run dies before their answer is recorded, the destination may hold values the
        snapshot does not, and a row changed back to the snapshot's values before the next
        run would otherwise be found unchanged and never sent (a kill test found it)."""
        members = members.filter(pc.is_valid(members["id"]))
        if members.num_rows:
            self.tables.reserve(
                pa.table(
                    {
                        "id": as_text(members["id"]),
                        "key": as_text(members["key"]),
                        "payload": members["payload"],
                        "consent": members["consent"],
                    }
                )
            )

    def unsettle(self, ids: Sequence[Any]) -> None:
        if ids:
            self.tables.unsettle([str(i) for i in ids])

    def begin_mirror(self) -> None:
        self.tables.clear_seen()
        self.mirror = True
        self.read_complete = False

    def departed_count(self) -> int:
        return self.tables.scalar(self._departed("count(*)"))

    def departed(self, limit: int) -> pa.Table:
        """Up to ``limit`` members the snapshot holds that this run's read did not return:
        ``__id``, ``key``, ``dest_id``."""
        sql = (
            self._departed('m.id AS "__id", m.key, m.dest_id')
            + f" ORDER BY m.id LIMIT {int(limit)}"
        )
        return self.tables.fetch(sql, ("__id", "key", "dest_id"))

    def _departed(self, what: str) -> str:
        t = self.tables
        return (
            f"SELECT {what} FROM {t.snapshot} AS m WHERE NOT EXISTS "
            f"(SELECT 1 FROM {t.seen} AS s WHERE s.id = m.id)"
        )

    def forget(self, ids: Sequence[Any]) -> None:
        if ids:
            self.tables.forget([str(i) for i in ids])

    def count(self) -> int:
        return self.tables.scalar(f"SELECT count(*) FROM {self.tables.snapshot}")

    def close(self) -> None:
        self.tables.close()

    def __enter__(self) -> WarehouseSnapshot:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- the tables


class _Tables:
    """A sync's snapshot tables in one warehouse: the few statements the snapshot runs."""

    postgres = False

    def __init__(self, schema: str, snapshot: str, seen: str):
        self.schema = ident(schema)
        self.snapshot = f"{self.schema}.{ident(snapshot)}"
        self.seen = f"{self.schema}.{ident(seen)}"
        self.names = (schema, snapshot, seen)

    def scalar(self, sql: str) -> int:
        raise NotImplementedError

    def fetch(self, sql: str, names: Sequence[str]) -> pa.Table:
        """``sql``'s rows as a table of text columns ``names``."""
        raise NotImplementedError

    def upsert(self, acked: pa.Table) -> None:
        """Replace the records of ``acked``'s ids (``id, payload, consent, key, doc``)."""
        raise NotImplementedError

    def add_seen(self, ids: pa.Array | pa.ChunkedArray) -> None:
        raise NotImplementedError

    def reserve(self, members: pa.Table) -> None:
        """Mark ``members`` (``id``, ``key``) unsettled, adding those not held yet (read-ahead
        thread)."""
        raise NotImplementedError

    def unsettle(self, ids: list[str]) -> None:
        raise NotImplementedError

    def clear_seen(self) -> None:
        raise NotImplementedError

    def forget(self, ids: list[str]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _DuckDBTables(_Tables):
    """In the DuckDB file the source reads, through connections of the source's own database
    (a second ``duckdb.connect`` of the file in this process would have to repeat its exact
    settings): one for the read-ahead thread (``seen``), one for the committing thread."""

    def __init__(self, source: DuckDBSource, schema: str, snapshot: str, seen: str):
        super().__init__(schema, snapshot, seen)
        self._reader: duckdb.DuckDBPyConnection = source.cursor()
        self._main: duckdb.DuckDBPyConnection = source.cursor()
        with self._failing("cannot create its tables"):
            self._main.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            self._main.execute(
                f"CREATE TABLE IF NOT EXISTS {self.snapshot} (id VARCHAR NOT NULL, "
                "payload UBIGINT NOT NULL, consent UBIGINT NOT NULL, key VARCHAR, "
                "dest_id VARCHAR, sent_at TIMESTAMPTZ NOT NULL, doc VARCHAR)"
            )
            self._main.execute(f"CREATE TABLE IF NOT EXISTS {self.seen} (id VARCHAR)")

    @contextlib.contextmanager
    def _failing(self, doing: str) -> Iterator[None]:
        import duckdb

        try:
            yield
        except duckdb.Error as exc:
            raise SourceError(
                f"the sync's snapshot in the DuckDB warehouse: {doing}: {exc}"
            ) from None

    def scalar(self, sql: str) -> int:
        with self._failing("cannot read it"):
            row = self._main.execute(sql).fetchone()
        return int(row[0]) if row else 0

    def fetch(self, sql: str, names: Sequence[str]) -> pa.Table:
        with self._failing("cannot read it"):
            table: pa.Table = self._main.execute(sql).to_arrow_table()
        return table

    def upsert(self, acked: pa.Table) -> None:
        cur = self._main
        with (
            self._failing("cannot record the acknowledged rows"),
            registered(cur, "retl_acked", acked),
        ):
            cur.execute("BEGIN TRANSACTION")
            try:
                cur.execute(f"DELETE FROM {self.snapshot} WHERE id IN (SELECT id FROM retl_acked)")
                cur.execute(
                    f"INSERT INTO {self.snapshot} SELECT id, payload, consent, key, NULL, now(), "
                    "doc FROM retl_acked"
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def add_seen(self, ids: pa.Array | pa.ChunkedArray) -> None:
        if len(ids) == 0:
            return
        cur = self._reader
        with (
            self._failing("cannot note the identifiers read"),
            registered(cur, "retl_seen_batch", pa.table({"id": ids})),
        ):
            cur.execute(f"INSERT INTO {self.seen} SELECT id FROM retl_seen_batch")

    def clear_seen(self) -> None:
        with self._failing("cannot clear the identifiers read"):
            self._main.execute(f"DELETE FROM {self.seen}")

    def reserve(self, members: pa.Table) -> None:
        cur = self._reader
        with (
            self._failing("cannot note the members being sent"),
            registered(cur, "retl_reserved", members),
        ):
            # known members sent other values too: until their answer is recorded, the
            # destination may hold values the snapshot does not (WarehouseSnapshot.reserve)
            cur.execute(
                f"UPDATE {self.snapshot} AS m SET payload = {UNSETTLED}, consent = {UNSETTLED} "
                "FROM retl_reserved AS r WHERE m.id = r.id AND (m.payload <> r.payload OR "
                "m.consent <> r.consent)"
            )
            cur.execute(
                f"INSERT INTO {self.snapshot} SELECT DISTINCT r.id, {UNSETTLED}, {UNSETTLED}, "
                "r.key, NULL, now(), NULL FROM retl_reserved AS r WHERE NOT EXISTS "
                f"(SELECT 1 FROM {self.snapshot} AS m WHERE m.id = r.id)"
            )

    def unsettle(self, ids: list[str]) -> None:
        cur = self._main
        leaving = pa.table({"id": pa.array(ids, pa.string())})
        with (
            self._failing("cannot mark the members being removed"),
            registered(cur, "retl_leaving", leaving),
        ):
            cur.execute(
                f"UPDATE {self.snapshot} SET payload = {UNSETTLED}, consent = {UNSETTLED}, "
                "doc = NULL WHERE id IN (SELECT id FROM retl_leaving)"
            )

    def forget(self, ids: list[str]) -> None:
        cur = self._main
        gone = pa.table({"id": pa.array(ids, pa.string())})
        with (
            self._failing("cannot forget the removed members"),
            registered(cur, "retl_gone", gone),
        ):
            cur.execute(f"DELETE FROM {self.snapshot} WHERE id IN (SELECT id FROM retl_gone)")

    def close(self) -> None:
        self._reader.close()
        self._main.close()


class _PostgresTables(_Tables):
    """In the PostgreSQL database the source reads, through psycopg with the connection's
    DSN: one connection, each statement (or transaction) under a lock, as the read-ahead
    thread notes identifiers while the committing thread records."""

    postgres = True

    def __init__(self, conn: PostgresConnection, schema: str, snapshot: str, seen: str):
        super().__init__(schema, snapshot, seen)
        import psycopg

        self._error_types: tuple[type[BaseException], ...] = (psycopg.Error,)
        self._where = f"PostgreSQL at {conn.host}:{conn.port}/{conn.dbname}"
        self._lock = threading.Lock()
        try:
            self._con: psycopg.Connection[Any] = psycopg.connect(
                conn.dsn(), autocommit=True, application_name="reverse-etl"
            )
        except psycopg.Error as exc:
            raise self._failed("cannot connect", exc) from None
        try:
            self._create()
        except BaseException:
            self._con.close()
            raise

    def _failed(self, doing: str, exc: BaseException) -> SourceError:
        return SourceError(f"the sync's snapshot in {self._where}: {doing}: {scrub(str(exc))}")

    def _create(self) -> None:
        """The schema and tables, where missing (created under an advisory lock, so syncs
        starting at once do not race; looked up first, so a role that may create tables in
        an existing schema but not schemas in the database needs nothing more)."""
        schema, snapshot, seen = self.names
        try:
            with self._con.transaction():
                self._con.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_DDL_LOCK,))
                found = self._con.execute(
                    "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
                ).fetchone()
                if found is None:
                    self._con.execute(f"CREATE SCHEMA {self.schema}")
                if self._missing(self.snapshot):
                    self._con.execute(
                        f"CREATE TABLE {self.snapshot} (id text PRIMARY KEY, payload bigint NOT "
                        "NULL, consent bigint NOT NULL, key text, dest_id text, sent_at "
                        "timestamptz NOT NULL, doc text)"
                    )
                if self._missing(self.seen):
                    self._con.execute(f"CREATE UNLOGGED TABLE {self.seen} (id text)")
            self._con.execute(
                "CREATE TEMPORARY TABLE IF NOT EXISTS retl_acked (id text, payload bigint, "
                "consent bigint, key text, doc text) ON COMMIT DELETE ROWS"
            )
        except self._error_types as exc:
            raise self._failed(
                f"cannot create its tables in schema {schema!r} (the role needs CREATE on the "
                "database, or on an existing schema of that name)",
                exc,
            ) from None

    def _missing(self, table: str) -> bool:
        row = self._con.execute("SELECT to_regclass(%s)", (table,)).fetchone()
        return row is None or row[0] is None

    def scalar(self, sql: str) -> int:
        with self._lock:
            try:
                row = self._con.execute(sql).fetchone()
            except self._error_types as exc:
                raise self._failed("cannot read it", exc) from None
        return int(row[0]) if row else 0

    def fetch(self, sql: str, names: Sequence[str]) -> pa.Table:
        with self._lock:
            try:
                rows = self._con.execute(sql).fetchall()
            except self._error_types as exc:
                raise self._failed("cannot read it", exc) from None
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
        return pa.table(
            {n: pa.array(list(c), pa.string()) for n, c in zip(names, columns, strict=True)}
        )

    def upsert(self, acked: pa.Table) -> None:
        rows = zip(*(acked[c].to_pylist() for c in acked.column_names), strict=True)
        with self._lock:
            try:
                with self._con.transaction(), self._con.cursor() as cur:
                    with cur.copy(
                        "COPY retl_acked (id, payload, consent, key, doc) FROM STDIN"
                    ) as copy:
                        for row in rows:
                            copy.write_row(row)
                    cur.execute(
                        f"INSERT INTO {self.snapshot} AS m (id, payload, consent, key, dest_id, "
                        "sent_at, doc) SELECT DISTINCT ON (id) id, payload, consent, key, NULL, "
                        "now(), doc FROM retl_acked ORDER BY id ON CONFLICT (id) DO UPDATE SET "
                        "payload = EXCLUDED.payload, consent = EXCLUDED.consent, "
                        "key = EXCLUDED.key, sent_at = EXCLUDED.sent_at, doc = EXCLUDED.doc"
                    )
            except self._error_types as exc:
                raise self._failed("cannot record the acknowledged rows", exc) from None

    def add_seen(self, ids: pa.Array | pa.ChunkedArray) -> None:
        if len(ids) == 0:
            return
        with self._lock:
            try:
                with (
                    self._con.cursor() as cur,
                    cur.copy(f"COPY {self.seen} (id) FROM STDIN") as copy,
                ):
                    for ident_ in ids.to_pylist():
                        copy.write_row((ident_,))
            except self._error_types as exc:
                raise self._failed("cannot note the identifiers read", exc) from None

    def reserve(self, members: pa.Table) -> None:
        ids, keys = members["id"].to_pylist(), members["key"].to_pylist()
        payloads, consents = members["payload"].to_pylist(), members["consent"].to_pylist()
        with self._lock:
            try:
                # known members sent other values too (WarehouseSnapshot.reserve)
                self._con.execute(
                    f"UPDATE {self.snapshot} AS m SET payload = {UNSETTLED}, consent = "
                    f"{UNSETTLED} FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS r "
                    "(id, payload, consent) WHERE m.id = r.id AND (m.payload <> r.payload OR "
                    "m.consent <> r.consent)",
                    (ids, payloads, consents),
                )
                self._con.execute(
                    f"INSERT INTO {self.snapshot} (id, payload, consent, key, dest_id, sent_at, "
                    f"doc) SELECT DISTINCT ON (r.id) r.id, {UNSETTLED}, {UNSETTLED}, r.key, "
                    "NULL, now(), NULL FROM unnest(%s::text[], %s::text[]) AS r (id, key) "
                    "ON CONFLICT (id) DO NOTHING",
                    (ids, keys),
                )
            except self._error_types as exc:
                raise self._failed("cannot note the members being sent", exc) from None

    def unsettle(self, ids: list[str]) -> None:
        with self._lock:
            try:
                self._con.execute(
                    f"UPDATE {self.snapshot} SET payload = {UNSETTLED}, consent = {UNSETTLED}, "
                    "doc = NULL WHERE id = ANY(%s)",
                    (ids,),
                )
            except self._error_types as exc:
                raise self._failed("cannot mark the members being removed", exc) from None

    def clear_seen(self) -> None:
        with self._lock:
            try:
                self._con.execute(f"TRUNCATE {self.seen}")
            except self._error_types as exc:
                raise self._failed("cannot clear the identifiers read", exc) from None

    def forget(self, ids: list[str]) -> None:
        with self._lock:
            try:
                self._con.execute(f"DELETE FROM {self.snapshot} WHERE id = ANY(%s)", (ids,))
            except self._error_types as exc:
                raise self._failed("cannot forget the removed members", exc) from None

    def close(self) -> None:
        self._con.close()

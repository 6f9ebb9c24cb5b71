"""The synced-state snapshot in the warehouse itself (``snapshot: {connection: warehouse,
schema: ...}``), on DuckDB and PostgreSQL: the same promises as the local snapshot
(tests/test_snapshot.py), with the diff computed by the read, in the warehouse: the snapshot
table lives in the warehouse's schema, no local snapshot file is made, and an unchanged row
comes back from the warehouse flagged, with its identifier and cursor only."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from reverse_etl.config import Project, Sync, load_project
from reverse_etl.engine import RunOptions, RunResult, run_sync
from reverse_etl.errors import EXIT_FAILED, ConfigError
from reverse_etl.snapshot import WarehouseSnapshot
from reverse_etl.snapshot.annotate import UNCHANGED
from reverse_etl.snapshot.store import UNSETTLED
from reverse_etl.snapshot.warehouse import table_suffix
from reverse_etl.sources import Source, open_source
from reverse_etl.state import StateStore
from tests.helpers import (
    PEOPLE_COLUMNS,
    FakeDestination,
    at,
    people_db,
    person,
    project_data,
    sync_entry,
    write_project,
)
from tests.test_snapshot import MirrorFake, counts, email

WAREHOUSES = ["duckdb", "postgres"]
LOCAL_SNAPSHOTS = Path(".reverse_etl/snapshots")


class Recording(Source):
    """The sync's own source, keeping every batch the warehouse returned."""

    def __init__(self, inner: Source, batches: list[pa.RecordBatch]):
        self.inner = inner
        self.dialect = inner.dialect
        self.batches = batches

    def schema(self, sql: str) -> pa.Schema:
        return self.inner.schema(sql)

    def stream(
        self, sql: str, params: Mapping[str, Any], batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        for batch in self.inner.stream(sql, params, batch_size):
            self.batches.append(batch)
            yield batch

    def cursor(self) -> Any:  # a DuckDB snapshot writes through the source's database
        return self.inner.cursor()  # type: ignore[attr-defined]

    @property
    def read_only(self) -> bool:
        return bool(getattr(self.inner, "read_only", False))

    def close(self) -> None:
        self.inner.close()


class Env:
    """A profiles sync over a ``people`` table in DuckDB or PostgreSQL, whose snapshot lives in
    that warehouse (in a schema of its own on the shared PostgreSQL server)."""

    def __init__(
        self,
        root: Path,
        kind: str,
        rows: list[tuple[Any, ...]],
        dsn: str | None = None,
        **sync: Any,
    ):
        self.root, self.kind, self.dsn = root, kind, dsn
        tag = uuid.uuid4().hex[:10]
        if kind == "duckdb":
            self.db = people_db(root, rows)
            self.table = "people"
            self.schema = "reverse_etl"
            self.connection: dict[str, Any] = {"type": "duckdb", "path": str(self.db)}
        else:
            import psycopg
            import psycopg.conninfo

            assert dsn is not None
            self.table, self.schema = f"people_{tag}", f"snap_{tag}"
            info = psycopg.conninfo.conninfo_to_dict(dsn)
            self.connection = {
                "type": "postgres",
                "host": info["host"],
                "port": int(str(info["port"])),
                "user": info["user"],
                "password": info["password"],
                "dbname": info["dbname"],
            }
            types = ", ".join(
                f"{c} {t.replace('VARCHAR', 'text')}" for c, t in PEOPLE_COLUMNS.items()
            )
            with psycopg.connect(dsn, autocommit=True) as con:
                con.execute(f"CREATE TABLE {self.table} ({types})")
                with con.cursor().copy(f"COPY {self.table} FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
        self.batches: list[pa.RecordBatch] = []
        self.configure(**sync)
        self.store = StateStore(self.project.state.url, root=root)

    def configure(self, *, snapshot: dict[str, Any] | None = None, **sync: Any) -> None:
        sync.setdefault("source", {"connection": "warehouse", "table": self.table})
        data = project_data(syncs=[sync_entry(**sync)])
        data["connections"]["warehouse"] = self.connection
        data["snapshot"] = snapshot or {"connection": "warehouse", "schema": self.schema}
        write_project(self.root, data)
        self.project = load_project(None, self.root, env={})

    def sql(self, statement: str) -> None:
        """Run ``statement`` with ``{t}`` as the people table, in either warehouse."""
        statement = statement.format(t=self.table)
        if self.kind == "duckdb":
            with duckdb.connect(str(self.db)) as con:
                con.execute(statement)
        else:
            import psycopg

            assert self.dsn is not None
            with psycopg.connect(self.dsn, autocommit=True) as con:
                con.execute(statement)  # type: ignore[arg-type]

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        if self.kind == "duckdb":
            with duckdb.connect(str(self.db)) as con:
                return con.execute(statement).fetchall()
        import psycopg

        assert self.dsn is not None
        with psycopg.connect(self.dsn, autocommit=True) as con:
            return con.execute(statement).fetchall()  # type: ignore[arg-type]

    def snapshot_ids(self, sync: str = "people", *, settled: bool = True) -> list[str]:
        """The identifiers the warehouse's snapshot table holds as acknowledged (``settled``),
        or all of them, with those noted before a send whose answer never came."""
        table = f'"{self.schema}"."retl_snapshot_{table_suffix(sync)}"'
        where = f" WHERE payload <> {UNSETTLED}" if settled else ""
        return sorted(r[0] for r in self.query(f"SELECT id FROM {table}{where}"))

    def local_snapshots(self) -> list[Path]:
        return sorted((self.root / LOCAL_SNAPSHOTS).glob("*"))

    def source(self, project: Project, sync: Sync) -> Source:
        conn = project.connections[sync.source.connection]
        inner = open_source(conn, project, writable=self.kind == "duckdb")  # type: ignore[arg-type]
        return Recording(inner, self.batches)

    def run(self, fake: FakeDestination | None = None, **options: Any) -> RunResult:
        fake = fake or FakeDestination()
        self.last = fake
        self.batches.clear()
        return run_sync(
            self.project,
            "people",
            self.store,
            RunOptions(**options),
            destination_factory=lambda project, s: fake,
            source_factory=self.source,
        )

    def drop(self) -> None:
        self.store.close()
        if self.kind == "postgres":
            self.sql(f"DROP TABLE IF EXISTS {self.table}")
            self.sql(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


@pytest.fixture(params=WAREHOUSES)
def env(request: pytest.FixtureRequest, tmp_path: Path):
    kind = request.param
    dsn = request.getfixturevalue("postgres_dsn") if kind == "postgres" else None
    made: list[Env] = []

    def make(rows: list[tuple[Any, ...]], **sync: Any) -> Env:
        e = Env(tmp_path, kind, rows, dsn, **sync)
        made.append(e)
        return e

    yield make
    for e in made:
        e.drop()


def mirror_env(env, rows: list[tuple[Any, ...]], **sync: Any) -> Env:
    return env(rows, mode="mirror", destination={"connection": "klaviyo", "list": "VIP"}, **sync)


# --------------------------------------------------------------------------- the diff


def test_unchanged_rows_are_not_sent_and_a_moved_cursor_sends_nothing(env) -> None:
    e = env([person(i) for i in range(20)], batch_size=7)
    assert counts(e.run()) == (20, 20, 0, 0)
    # the snapshot is a table in the warehouse's schema, holding what was acknowledged
    assert e.snapshot_ids() == [email(i) for i in range(20)]
    assert e.local_snapshots() == []
    e.sql("UPDATE {t} SET modified_at = modified_at + INTERVAL '1 hour'")
    assert counts(e.run()) == (20, 0, 20, 0)
    assert e.last.received == []
    assert e.last.batches == [0, 0, 0]  # every batch read, none of its rows sent
    assert counts(e.run()) == (0, 0, 0, 0)  # and the watermark moved past them
    assert e.local_snapshots() == []


def test_the_warehouse_flags_unchanged_rows_and_sends_only_their_identifier_and_cursor(
    env,
) -> None:
    e = env([person(i) for i in range(6)])
    e.run()
    e.sql("UPDATE {t} SET modified_at = modified_at + INTERVAL '1 hour'")
    e.sql(f"UPDATE {{t}} SET first_name = 'New', modified_at = now() WHERE email = '{email(4)}'")
    assert counts(e.run()) == (6, 1, 5, 0)
    read = pa.Table.from_batches(e.batches)
    by_email = {r["email"]: r for r in read.to_pylist()}
    assert set(by_email) == {email(i) for i in range(6)}
    for i in range(6):
        row = by_email[email(i)]
        assert row[UNCHANGED] is (i != 4)
        assert row["modified_at"] is not None
        assert row["first_name"] == ("New" if i == 4 else None)  # blank unless it changed
        assert row["email_consent"] == ("yes" if i == 4 else None)
    # the columns the pipeline goes on with are the view's, typed as the view types them
    assert [r["first_name"] for r in e.last.received] == ["New"]


def test_one_changed_value_sends_exactly_that_row(env) -> None:
    e = env([person(i) for i in range(20)])
    e.run()
    e.sql(
        "UPDATE {t} SET first_name = 'Changed', modified_at = modified_at + INTERVAL '1 hour' "
        f"WHERE email = '{email(7)}'"
    )
    e.sql("UPDATE {t} SET modified_at = modified_at + INTERVAL '1 hour'")
    assert counts(e.run()) == (20, 1, 19, 0)
    assert [r["first_name"] for r in e.last.received] == ["Changed"]


def test_a_consent_change_alone_sends_the_row(env) -> None:
    e = env([person(i) for i in range(5)])
    e.run()
    e.sql(f"UPDATE {{t}} SET email_consent = 'no', modified_at = now() WHERE email = '{email(3)}'")
    assert counts(e.run()) == (1, 1, 0, 0)
    assert e.last.received_ids() == [email(3)]


def test_full_refresh_skips_unchanged_rows_unless_resend(env) -> None:
    e = env([person(i) for i in range(10)])
    e.run()
    assert counts(e.run(full_refresh=True)) == (10, 0, 10, 0)
    assert counts(e.run(full_refresh=True, resend=True)) == (10, 10, 0, 0)
    assert sorted(e.last.received_ids()) == [email(i) for i in range(10)]
    assert {r["first_name"] for r in e.last.received} == {f"Name{i}" for i in range(10)}


def test_a_changed_definition_sends_every_row_again(env) -> None:
    e = env([person(i) for i in range(10)])
    e.run()
    e.configure(mapping={"email": "email", "first_name": "last_name", "phone": "phone_number"})
    assert counts(e.run(full_refresh=True)) == (10, 10, 0, 0)
    assert {r["last_name"] for r in e.last.received} == {f"Name{i}" for i in range(10)}


def test_a_cursor_moved_into_the_future_is_never_unchanged(env) -> None:
    e = env([person(i) for i in range(4)])
    e.run()
    e.sql(f"UPDATE {{t}} SET modified_at = now() + INTERVAL '10 days' WHERE email = '{email(1)}'")
    result = e.run()
    assert counts(result) == (1, 0, 0, 1)  # held back and reported, as without a snapshot
    assert result.by_reason["cursor_in_future"] == 1


def test_duplicates_of_an_identifier_are_still_reported(env) -> None:
    rows = [person(i) for i in range(4)] + [person(1, first_name="Older", modified_at=at(-5))]
    e = env(rows, lookback_minutes=60 * 24 * 30)
    e.run()
    again = e.run()
    assert again.by_reason["duplicate_identifier"] == 1
    assert again.record.counts.unchanged == 4


def test_rows_the_destination_refused_are_sent_again_when_read_again(env) -> None:
    e = env([person(i) for i in range(6)], lookback_minutes=60)
    first = e.run(FakeDestination(reject_ids=[email(2)]))
    assert first.record.counts.failed == 1
    assert email(2) not in e.snapshot_ids()
    again = e.run()
    assert counts(again) == (6, 1, 5, 0)
    assert e.last.received_ids() == [email(2)]


def test_a_failed_batch_is_not_remembered(env) -> None:
    e = env([person(i) for i in range(30)], batch_size=10)
    failing = FakeDestination(fail_on_batch=2, drain_on_failure=False)
    assert e.run(failing).exit_code == EXIT_FAILED
    assert e.snapshot_ids() == [email(i) for i in range(10)]  # batch 1 only
    # batch 2 reached the destination unanswered: noted (with what was read ahead), as the
    # destination may hold them, but unsettled
    assert {email(i) for i in range(20)} <= set(e.snapshot_ids(settled=False))
    result = e.run(full_refresh=True)
    assert counts(result) == (30, 20, 10, 0)
    assert sorted(e.last.received_ids()) == [email(i) for i in range(10, 30)]


def test_a_dry_run_plans_with_old_values_and_remembers_nothing(env) -> None:
    e = env([person(i) for i in range(8)])
    assert counts(e.run(dry_run=True)) == (8, 8, 0, 0)
    assert e.snapshot_ids() == []
    e.run()
    e.sql(f"UPDATE {{t}} SET first_name = 'X', modified_at = now() WHERE email = '{email(1)}'")
    e.sql("UPDATE {t} SET modified_at = now()")
    result = e.run(dry_run=True, plan_samples=3)
    assert counts(result) == (8, 1, 7, 0)
    plan = result.plan
    assert plan is not None and (plan.adds, plan.updates) == (0, 1)
    assert plan.updated[0].identifier == email(1)
    assert plan.updated[0].fields == {"first_name": ("Name1", "X")}


# --------------------------------------------------------------------------- mirror


def test_a_member_who_leaves_the_view_leaves_the_list_and_one_who_returns_is_readded(
    env,
) -> None:
    e = mirror_env(env, [person(i) for i in range(10)])
    members: set[str] = set()
    assert counts(e.run(MirrorFake(members))) == (10, 10, 0, 0)
    e.sql(f"DELETE FROM {{t}} WHERE email IN ('{email(3)}', '{email(7)}')")
    fake = MirrorFake(members)
    result = e.run(fake)
    assert counts(result) == (8, 0, 8, 0)
    assert result.record.counts.removed == 2
    assert sorted(fake.removed) == [email(3), email(7)]
    assert e.snapshot_ids() == sorted(email(i) for i in range(10) if i not in (3, 7))
    again = MirrorFake(members)
    assert e.run(again).record.counts.removed == 0 and again.removed == []
    e.sql(f"INSERT INTO {{t}} VALUES ('{email(3)}', 'Name3', NULL, 'yes', now())")
    back = MirrorFake(members)
    result = e.run(back)
    assert (result.record.counts.sent, result.record.counts.removed) == (1, 0)
    assert email(3) in members


def test_a_stopped_mirror_read_removes_nothing_and_the_guard_holds(env) -> None:
    e = mirror_env(env, [person(i) for i in range(30)], batch_size=10)
    members: set[str] = set()
    e.run(MirrorFake(members))
    failing = MirrorFake(members, fail_on_batch=2, drain_on_failure=False)
    assert e.run(failing).exit_code == EXIT_FAILED
    assert failing.removed == [] and len(members) == 30
    e.sql("DELETE FROM {t}")
    emptied = MirrorFake(members)
    result = e.run(emptied)
    assert result.exit_code == EXIT_FAILED and emptied.removed == []
    assert "no rows" in (result.record.message or "")


def test_a_mirror_dry_run_counts_removals_without_making_them(env) -> None:
    e = mirror_env(env, [person(i) for i in range(10)], cursor=None)
    members: set[str] = set()
    e.run(MirrorFake(members))
    e.sql(f"DELETE FROM {{t}} WHERE email = '{email(4)}'")
    fake = MirrorFake(members)
    result = e.run(fake, dry_run=True)
    assert result.record.counts.removed == 1 and fake.removed == []
    assert email(4) in e.snapshot_ids()


# --------------------------------------------------------------------------- where it lives


def test_odd_sync_names_get_tables_of_their_own() -> None:
    assert table_suffix("people") == "people"
    odd = [table_suffix(n) for n in ("People", "people-eu", "people.eu", "x" * 100, "x" * 99)]
    assert len(set(odd) | {"people"}) == 6
    for name in odd:
        assert len("retl_snapshot_" + name) <= 63 and name == name.lower()
        assert all(ch.isalnum() or ch == "_" for ch in name)


@pytest.mark.parametrize("kind", WAREHOUSES)
def test_an_odd_sync_name_runs(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    dsn = request.getfixturevalue("postgres_dsn") if kind == "postgres" else None
    e = Env(tmp_path, kind, [person(i) for i in range(3)], dsn, name="People-EU.v2")
    try:
        result = run_sync(
            e.project,
            "People-EU.v2",
            e.store,
            destination_factory=lambda project, s: FakeDestination(),
        )
        assert result.record.counts.sent == 3
        assert e.snapshot_ids("People-EU.v2") == [email(i) for i in range(3)]
    finally:
        e.drop()


def test_a_sync_reading_another_connection_keeps_a_local_snapshot(tmp_path: Path) -> None:
    people_db(tmp_path, [person(i) for i in range(3)])
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()
    data = project_data()
    data["connections"]["other"] = {"type": "duckdb", "path": str(other)}
    data["snapshot"] = {"connection": "other"}
    write_project(tmp_path, data)
    project = load_project(None, tmp_path, env={})
    assert project.snapshot_connection(project.sync("people")) is None
    store = StateStore(project.state.url, root=tmp_path)
    try:
        run_sync(project, "people", store, destination_factory=lambda p, s: FakeDestination())
    finally:
        store.close()
    assert (tmp_path / LOCAL_SNAPSHOTS / "people.duckdb").exists()


def test_the_snapshot_connection_must_be_a_postgres_or_duckdb_warehouse(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["sf"] = {
        "type": "snowflake",
        "account": "a",
        "user": "u",
        "database": "d",
        "schema": "s",
    }
    data["snapshot"] = {"connection": "sf"}
    write_project(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_project(None, tmp_path, env={})
    message = str(err.value)
    assert "snapshot.connection" in message and "snowflake" in message
    assert "postgres or duckdb" in message and "local" in message
    data["snapshot"] = {"connection": "klaviyo"}
    write_project(tmp_path, data)
    with pytest.raises(ConfigError, match="snapshot.connection"):
        load_project(None, tmp_path, env={})
    data["snapshot"] = {"connection": "nope"}
    write_project(tmp_path, data)
    with pytest.raises(ConfigError, match="no connection named 'nope'"):
        load_project(None, tmp_path, env={})
    data["snapshot"] = {"schema": "elsewhere"}
    write_project(tmp_path, data)
    with pytest.raises(ConfigError, match="schema: only a snapshot in the warehouse"):
        load_project(None, tmp_path, env={})
    data["snapshot"] = {"connection": "warehouse", "schema": "no-dashes"}
    write_project(tmp_path, data)
    with pytest.raises(ConfigError, match="snapshot.schema"):
        load_project(None, tmp_path, env={})


def test_a_read_only_duckdb_source_is_refused_with_a_reason(tmp_path: Path) -> None:
    people_db(tmp_path, [person(i) for i in range(3)])
    data = project_data()
    data["snapshot"] = {"connection": "warehouse"}
    write_project(tmp_path, data)
    project = load_project(None, tmp_path, env={})
    store = StateStore(project.state.url, root=tmp_path)
    try:
        result = run_sync(
            project,
            "people",
            store,
            destination_factory=lambda p, s: FakeDestination(),
            source_factory=lambda p, s: open_source(p.connections["warehouse"], p),  # type: ignore
        )
    finally:
        store.close()
    assert result.exit_code == EXIT_FAILED
    assert "opened read-only" in (result.record.message or "")


def test_the_postgres_read_keeps_every_column_type(tmp_path: Path, postgres_dsn: str) -> None:
    """Unchanged rows' blanked columns keep their type modifiers (numeric(10,2) stays
    decimal128(10, 2), not PostgreSQL's bare numeric)."""
    import psycopg

    from reverse_etl.config import PostgresConnection
    from reverse_etl.extract import build_query
    from reverse_etl.sources.postgres import PostgresSource
    from reverse_etl.transform.transformer import FieldSpec, TransformSpec

    tag = uuid.uuid4().hex[:10]
    with psycopg.connect(postgres_dsn, autocommit=True) as con:
        con.execute(
            f"CREATE TABLE t_{tag} (id text, score numeric(10,2), big numeric(50,2), "
            "tags json, modified_at timestamp)"
        )
        con.execute(f"INSERT INTO t_{tag} VALUES ('a', 1.5, 2.25, '[1]', '2025-01-01')")
    info = psycopg.conninfo.conninfo_to_dict(postgres_dsn)
    conn = PostgresConnection(
        type="postgres",
        host=str(info["host"]),
        port=int(str(info["port"])),
        user=str(info["user"]),
        password=str(info["password"]),  # type: ignore[arg-type]
        dbname=str(info["dbname"]),
    )
    spec = TransformSpec(
        sync="t",
        identifier="id",
        cursor="modified_at",
        fields=(FieldSpec("id", "external_id"), FieldSpec("score", "properties.score")),
    )
    view = f"SELECT * FROM t_{tag}"
    with PostgresSource(postgres_dsn) as source:
        schema = source.schema(view)
        expected = pa.schema([*schema, pa.field("__retl_dup", pa.int64())])
        snap = WarehouseSnapshot.open(
            conn, source, spec, "salt", schema, sync="t", schema=f"s_{tag}"
        )
        try:
            for step, resend in (("new", False), ("unchanged", False), ("resend", True)):
                query = build_query(
                    view,
                    source.dialect,
                    cursor="modified_at",
                    identifier="id",
                    watermark=None,
                    lookback=timedelta(0),
                    annotate=snap.in_read(resend=resend),
                )
                (batch,) = list(source.stream(query.sql, query.params, 10))
                numbered = batch.append_column("__row", pa.array([1], pa.int64()))
                ((rest, diff),) = list(snap.diffs(iter([numbered])))
                got = rest.drop_columns(["__row"])
                assert got.schema.equals(expected), (step, got.schema)
                row = got.to_pylist()[0]
                assert (row["score"] is None) == (step == "unchanged"), (step, row)
                assert row["id"] == "a" and row["modified_at"] is not None
                if step == "new":
                    snap.record(
                        diff.prints, pa.table({"__row": pa.array([1], pa.int64()), "key": ["a"]})
                    )
        finally:
            snap.close()
    with psycopg.connect(postgres_dsn, autocommit=True) as con:
        con.execute(f"DROP TABLE t_{tag}")
        con.execute(f"DROP SCHEMA s_{tag} CASCADE")


def test_a_postgres_role_that_may_not_create_schemas_is_told_what_it_needs(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """A role without CREATE on the database fails with a message saying so, before anything
    is sent; once the schema exists and the role may create tables in it, the run goes on."""
    import psycopg

    e = Env(tmp_path, "postgres", [person(i) for i in range(3)], postgres_dsn)
    role, password = f"limited_{uuid.uuid4().hex[:8]}", "limited-pw"
    try:
        e.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        e.sql(f"GRANT SELECT ON {{t}} TO {role}")
        e.connection = {**e.connection, "user": role, "password": password}
        e.configure()
        fake = FakeDestination()
        result = e.run(fake)
        message = result.record.message or ""
        assert result.exit_code == EXIT_FAILED and fake.received == []
        assert f"cannot create its tables in schema '{e.schema}'" in message
        assert "CREATE on the database" in message and password not in message
        e.sql(f'CREATE SCHEMA "{e.schema}" AUTHORIZATION {role}')
        assert counts(e.run()) == (3, 3, 0, 0)
        assert e.snapshot_ids() == [email(i) for i in range(3)]
    finally:
        e.drop()
        with psycopg.connect(postgres_dsn, autocommit=True) as con:
            con.execute(f"DROP OWNED BY {role}")  # type: ignore[arg-type]
            con.execute(f"DROP ROLE IF EXISTS {role}")  # type: ignore[arg-type]


def test_a_change_sent_unanswered_and_then_undone_is_sent_again(env) -> None:
    """Rows changed, handed to the destination, the run dying before their answer (the
    destination may hold the change), then changed back before the next run: the snapshot
    still holds their old values, but they must be sent again, or the destination keeps
    values the view no longer has (tests/test_commit_group_kill.py, the local snapshot's)."""
    e = env([person(i) for i in range(30)], batch_size=10)
    assert counts(e.run()) == (30, 30, 0, 0)
    e.sql(
        "UPDATE {t} SET first_name = first_name || ' v2', modified_at = modified_at + "
        "INTERVAL '1 hour'"
    )
    failing = FakeDestination(fail_on_batch=2, drain_on_failure=False)
    assert e.run(failing).exit_code == EXIT_FAILED
    second = {r["__id"] if "__id" in r else r["email"] for r in failing.received[10:20]}
    assert len(second) == 10  # batch 2 reached the destination, unanswered
    e.sql(  # changed back to the values the snapshot holds, the cursor moved on
        "UPDATE {t} SET first_name = replace(first_name, ' v2', ''), modified_at = "
        "modified_at + INTERVAL '1 hour'"
    )
    e.run()
    assert second <= set(e.last.received_ids())

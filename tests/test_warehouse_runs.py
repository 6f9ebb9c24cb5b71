"""The product's own incremental read against every warehouse: ``run_sync`` and
``debug.validate`` over a profiles view in DuckDB, PostgreSQL, fakesnow (Snowflake) and
bqemulator (BigQuery), with a recording destination instead of an API.

The view is what an analyst writes: a ``LIKE '%@%'`` filter (every ``%`` is significant in a
pyformat statement), a comment on its last line, lower-case names in the sync even where the
warehouse reports upper-case ones (Snowflake), emails spelled with mixed case and whitespace so one person has several rows,
and a naive ``modified_at`` (BigQuery's TIMESTAMP is UTC) whose ties fall across batch
boundaries. The warehouses are the session fixtures of ``tests/warehouses.py``; each test loads
a table of its own, so they run in any order.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
import yaml

from reverse_etl import controls
from reverse_etl.config import Project, Sync, load_project
from reverse_etl.csv_debug import export_csv, validate
from reverse_etl.destinations.base import Destination, LoadBatch, LoadResult, Request
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.destinations.klaviyo.profiles import STANDARD_FIELDS
from reverse_etl.engine import RunResult, run_sync
from reverse_etl.errors import EXIT_OK, EXIT_ROW_ERRORS
from reverse_etl.state import StateStore, Watermark
from tests.helpers import read_csv_rows

pytest_plugins = ["tests.warehouses"]
pytestmark = pytest.mark.filterwarnings(
    "ignore:Arrow output on a DB-API result makes an extra copy:UserWarning"  # fakesnow's own
)

T0 = datetime(2025, 3, 1, 12, 0)  # naive: the warehouses' plain TIMESTAMP
T1 = T0 + timedelta(hours=1)
BATCH = 4  # the view's timestamps come in groups of 3: most batch boundaries split a group
SYNC = "profiles"
WAREHOUSES = ["duckdb", "postgres", "snowflake", "bigquery"]


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Profile:
    email: str | None
    first_name: str  # doubles as the row's version: "P5v2" is person 5's second version
    modified_at: datetime
    phone: str | None = None
    country: str | None = None
    email_consent: str | None = None
    consent_at: datetime | None = None

    @property
    def key(self) -> str:
        """The identifier as the transform normalises an email (and as ``__id`` carries it)."""
        assert self.email is not None
        return self.email.strip().lower()


COLUMNS = ["email", "first_name", "phone", "country", "email_consent", "consent_at", "modified_at"]


def person(n: int, email: str | None = None, version: str = "v1", **changes: Any) -> Profile:
    """Person ``n`` as first loaded: the email spelled four ways, a national phone number for
    some (read with the row's country), consent for every other one."""
    spellings = [
        f"person{n:02d}@example.com",
        f"  Person{n:02d}@Example.com ",
        f"PERSON{n:02d}@EXAMPLE.COM",
        f"person{n:02d}@EXAMPLE.com ",
    ]
    country = "GB" if n % 5 == 1 else "US"
    phone = {0: f"415 555 {n:04d}", 1: f"020 7946 {n:04d}"}.get(n % 5)
    consent = "yes" if n % 2 == 0 else "no"
    row = Profile(
        email=email if email is not None else spellings[n % 4],
        first_name=f"P{n}{version}",
        modified_at=T0 + timedelta(minutes=n // 3),
        phone=phone,
        country=country,
        email_consent=consent,
        consent_at=T0 - timedelta(days=1, minutes=n) if consent == "yes" else None,
    )
    return replace(row, **changes)


def first_load() -> list[Profile]:
    """40 people (timestamps in groups of 3), four more rows for three of them, and three rows
    the view's ``LIKE '%@%'`` filters out."""
    rows = [person(n) for n in range(40)]
    rows += [
        # person 5 again, later, tying with person 39: this one is sent
        person(5, " PERSON05@example.com", "v1-late", modified_at=T0 + timedelta(minutes=13)),
        # person 10 again, earlier: the first row is sent
        person(10, "person10@EXAMPLE.com ", "v0-early", modified_at=T0 - timedelta(minutes=5)),
        # person 20 three times: the latest, at minute 14, is sent
        person(20, " person20@example.com", "v2", modified_at=T0 + timedelta(minutes=12)),
        person(20, "PERSON20@EXAMPLE.COM", "v3", modified_at=T0 + timedelta(minutes=14)),
    ]
    rows += [
        Profile("no-at-sign.example.com", "X1", T0 + timedelta(minutes=2)),
        Profile(None, "X2", T0 + timedelta(minutes=3)),
        Profile("", "X3", T0 + timedelta(minutes=4)),
    ]
    return rows


FIRST_SENT = {person(n).key: f"P{n}v1" for n in range(40)} | {
    person(5).key: "P5v1-late",
    person(20).key: "P20v3",
}
FIRST_REJECTED = 4  # person 5's first row, person 10's early row, person 20's first two
FIRST_WATERMARK = (T0 + timedelta(minutes=14), "PERSON20@EXAMPLE.COM")


def second_load(rows: list[Profile]) -> list[Profile]:
    """Changes between the runs: three people change (one respelling their email), two are
    new, one of them twice; person 7 gets a second row; person 42 arrives with the watermark's
    own timestamp but an email sorting after the watermark's; a filtered row changes too."""
    t2, t3 = T1 + timedelta(minutes=1), T1 + timedelta(minutes=2)
    changed = {
        "P3v1": person(3, version="v2", modified_at=T1),
        "P15v1": person(15, "Person15@Example.com", "v2", modified_at=T1),
        "P25v1": person(25, version="v2", modified_at=t2),
        "P26v1": person(26, version="v2", modified_at=t2),
        "X1": replace(next(r for r in rows if r.first_name == "X1"), modified_at=T1),
    }
    out = [changed.get(row.first_name, row) for row in rows]
    out += [
        person(40, modified_at=T1),
        person(7, " Person07@example.com", "v2", modified_at=T1),
        person(41, "person41@example.com", "v1", modified_at=t2),
        person(41, " PERSON41@example.com ", "v2", modified_at=t3),
        person(42, "zzz.person42@example.com", modified_at=FIRST_WATERMARK[0]),
    ]
    return out


SECOND_SENT = {person(n).key: f"P{n}v2" for n in (3, 7, 15, 25, 26, 41)}
SECOND_SENT |= {person(40).key: "P40v1", "zzz.person42@example.com": "P42v1"}
SECOND_REJECTED = 1  # person 41's first row
SECOND_READ = 9
SECOND_WATERMARK = (T1 + timedelta(minutes=2), " PERSON41@example.com ")


def view_sql(table: str) -> str:
    return (
        "SELECT email, first_name, phone, country, email_consent, consent_at, modified_at\n"
        f"FROM {table}\n"
        "WHERE email LIKE '%@%' -- 100% of the rows worth sending\n"
    )


def sync_entry() -> dict[str, Any]:
    """Every column named in lower case, as the README writes a sync."""
    return {
        "name": SYNC,
        "source": {"connection": "warehouse", "sql": "sql/profiles.sql"},
        "object": "profiles",
        "identifier": "email",
        "cursor": "modified_at",
        "batch_size": BATCH,
        "destination": {"connection": "klaviyo"},
        "mapping": {"email": "email", "first_name": "first_name", "phone": "phone_number"},
        "consent": {"email": {"column": "email_consent", "consented_at": "consent_at"}},
        "default_phone_region": "US",
        "phone_region_column": "country",
    }


# --------------------------------------------------------------------------- the warehouses


def _sql_type(column: str, timestamp: str, text: str) -> str:
    return timestamp if column.endswith("_at") else text


def _json_rows(rows: list[Profile]) -> list[dict[str, Any]]:
    """Rows as JSON values, timestamps as ISO text without an offset."""
    return [
        {c: (v.isoformat() if isinstance(v, datetime) else v) for c, v in vars(r).items()}
        for r in rows
    ]


@dataclass
class Target:
    """One warehouse: its connection entry for the project file, how a view names a table
    there, and how to (re)load a table with profiles."""

    name: str
    connection: dict[str, Any]
    table_ref: Callable[[str], str]
    load: Callable[[str, list[Profile]], None]
    aware: bool = False  # its TIMESTAMP is UTC-aware (BigQuery), not naive

    def ts(self, value: datetime) -> datetime:
        """``value`` as the warehouse's TIMESTAMP hands it back."""
        return value.replace(tzinfo=UTC) if self.aware else value


def _duckdb(path: Path) -> Target:
    import duckdb

    def load(table: str, rows: list[Profile]) -> None:
        data = pa.Table.from_pylist(
            [{c: getattr(r, c) for c in COLUMNS} for r in rows],
            schema=pa.schema([(c, _sql_type(c, pa.timestamp("us"), pa.string())) for c in COLUMNS]),
        )
        with duckdb.connect(str(path)) as con:  # closed before a read-only source opens it
            con.register("rows_in", data)
            con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM rows_in")

    return Target("duckdb", {"type": "duckdb", "path": str(path)}, lambda t: t, load)


def _postgres(dsn: str) -> Target:
    import psycopg
    import psycopg.conninfo

    def load(table: str, rows: list[Profile]) -> None:
        types = ", ".join(f"{c} {_sql_type(c, 'timestamp', 'text')}" for c in COLUMNS)
        with psycopg.connect(dsn, autocommit=True) as con:
            con.execute(f"DROP TABLE IF EXISTS {table}")
            con.execute(f"CREATE TABLE {table} ({types})")
            with con.cursor().copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row([getattr(r, c) for c in COLUMNS])

    info = psycopg.conninfo.conninfo_to_dict(dsn)
    connection = {
        "type": "postgres",
        "host": info["host"],
        "port": int(info["port"]),
        "user": info["user"],
        "password": info["password"],
        "dbname": info["dbname"],
    }
    return Target("postgres", connection, lambda t: t, load)


def _snowflake(kwargs: dict[str, Any]) -> Target:
    import snowflake.connector

    def load(table: str, rows: list[Profile]) -> None:
        doc = json.dumps(_json_rows(rows))
        types = ", ".join(f"{c} {_sql_type(c, 'TIMESTAMP_NTZ', 'VARCHAR')}" for c in COLUMNS)
        values = ", ".join(
            f"f.value:{c}::{_sql_type(c, 'TIMESTAMP_NTZ', 'VARCHAR')}" for c in COLUMNS
        )
        # unquoted names: Snowflake stores and reports them upper-case (EMAIL, MODIFIED_AT)
        with snowflake.connector.connect(**kwargs) as con, con.cursor() as cur:
            cur.execute(f"CREATE OR REPLACE TABLE {table} ({types})")
            cur.execute(
                f"INSERT INTO {table} SELECT {values} "
                "FROM TABLE(FLATTEN(INPUT => PARSE_JSON(%(doc)s))) AS f",
                {"doc": doc},
            )

    connection = {
        "type": "snowflake",
        "account": kwargs["account"],
        "user": kwargs["user"],
        "password": kwargs["password"],
        "database": kwargs["database"],
        "schema": kwargs["schema"],
        "host": kwargs["host"],
        "port": kwargs["port"],
        "protocol": kwargs["protocol"],
    }
    return Target("snowflake", connection, lambda t: t, load)


def _bigquery(project: str, endpoint: str) -> Target:
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    def load(table: str, rows: list[Profile]) -> None:
        client = bigquery.Client(
            project=project,
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=endpoint),
        )
        try:
            client.create_dataset("retl", exists_ok=True)
            ref = f"{project}.retl.{table}"
            client.delete_table(ref, not_found_ok=True)
            schema = [bigquery.SchemaField(c, _sql_type(c, "TIMESTAMP", "STRING")) for c in COLUMNS]
            client.create_table(bigquery.Table(ref, schema=schema))
            errors = client.insert_rows_json(ref, _json_rows(rows))
            assert not errors, errors[:3]
        finally:
            client.close()

    connection = {"type": "bigquery", "project": project, "api_endpoint": endpoint}
    return Target("bigquery", connection, lambda t: f"`retl.{t}`", load, aware=True)


@pytest.fixture(params=WAREHOUSES)
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Target:
    name = request.param
    if name == "duckdb":
        return _duckdb(tmp_path_factory.mktemp("duckdb") / "warehouse.duckdb")
    if name == "postgres":
        return _postgres(request.getfixturevalue("postgres_dsn"))
    if name == "snowflake":
        return _snowflake(request.getfixturevalue("snowflake_kwargs"))
    return _bigquery(*request.getfixturevalue("bigquery_endpoint"))


# --------------------------------------------------------------------------- the destination


@dataclass
class Delivery:
    table: pa.Table
    token: Any  # the engine's watermark for the batch, handed back on acknowledgement

    def rows(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()


class RecordingDestination(Destination):
    """Acknowledges every batch it is given, at once and in full, and keeps it."""

    type = "klaviyo"
    capabilities = Capabilities(label="recorded profiles", standard_fields=STANDARD_FIELDS)
    submit = complete = None  # type: ignore[assignment]  # load is replaced whole

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.seen: set[Any] = set()

    def requests(self, table: pa.Table) -> Iterator[Request]:
        rows = [{k: v for k, v in r.items() if k != "__row"} for r in table.to_pylist()]
        if rows:
            yield Request("POST", "/recorded", orjson.dumps(rows, default=str), len(rows))

    def load(self, batches: Iterator[LoadBatch]) -> Iterator[LoadResult]:  # type: ignore[misc]
        for batch in batches:
            self.deliveries.append(Delivery(batch.table, batch.token))
            ids = batch.table["__id"].to_pylist() if batch.table.num_rows else []
            created = len(set(ids) - self.seen)
            self.seen.update(ids)
            yield LoadResult(token=batch.token, created=created, updated=len(ids) - created)

    def rows(self) -> list[dict[str, Any]]:
        return [r for d in self.deliveries for r in d.rows()]


# --------------------------------------------------------------------------- the project


@dataclass
class Env:
    """A project directory whose one sync reads ``target``'s table through a .sql file."""

    target: Target
    root: Path
    table: str = field(default_factory=lambda: f"retl_runs_{uuid.uuid4().hex[:8]}")
    runs: list[RecordingDestination] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.root / "sql").mkdir(parents=True)
        (self.root / "sql" / "profiles.sql").write_text(view_sql(self.target.table_ref(self.table)))
        (self.root / "profiles").mkdir()
        data = {
            "connections": {
                "warehouse": self.target.connection,
                "klaviyo": {"type": "klaviyo", "api_key": "pk_test_warehouse_runs"},
            },
            "state": {"url": "sqlite:///state/state.db"},
            "error_dir": "errors",
            "syncs": [sync_entry()],
        }
        (self.root / "profiles" / "profiles.yml").write_text(yaml.safe_dump(data))
        self.project: Project = load_project(None, self.root, env={})
        self.store = StateStore(self.project.state.url, root=self.root)

    @property
    def sync(self) -> Sync:
        return self.project.sync(SYNC)

    def load(self, rows: list[Profile]) -> None:
        self.target.load(self.table, rows)

    def run(self) -> RunResult:
        def factory(project: Project, sync: Sync) -> Destination:
            self.runs.append(RecordingDestination())
            return self.runs[-1]

        return run_sync(self.project, SYNC, self.store, destination_factory=factory)

    def watermark(self) -> Watermark | None:
        return self.store.watermark(SYNC)

    def expect(self, result: RunResult, *, read: int, sent: int, rejected: int) -> None:
        """The run finished (its message says why not) with these counts."""
        rec = result.record
        assert rec.status != "failed", f"{self.target.name}: {rec.message}"
        c = rec.counts
        assert (c.read, c.sent, c.rejected, c.failed) == (read, sent, rejected, 0), c
        assert c.sent == c.created + c.updated
        assert result.exit_code == (EXIT_ROW_ERRORS if rejected else EXIT_OK)


@pytest.fixture
def env(target: Target, tmp_path: Path) -> Iterator[Env]:
    made = Env(target, tmp_path)
    yield made
    made.store.close()


def sent_versions(dest: RecordingDestination) -> dict[str, list[str]]:
    """Identifier -> the versions (first names) the destination received for it."""
    out: dict[str, list[str]] = {}
    for row in dest.rows():
        out.setdefault(row["__id"], []).append(row["first_name"])
    return out


def assert_ties_cross_batches(dest: RecordingDestination, rows: list[Profile]) -> None:
    """The batches came in cursor order, and at least one batch boundary fell inside a group
    of rows sharing one timestamp (else the run did not check what it is meant to)."""
    cursor_of = {(r.key, r.first_name): r.modified_at for r in rows if r.email}
    batches = [
        sorted(cursor_of[r["__id"], r["first_name"]] for r in d.rows())
        for d in dest.deliveries
        if d.table.num_rows
    ]
    assert len(batches) > 1
    pairs = list(zip(batches, batches[1:], strict=False))
    assert all(before[-1] <= after[0] for before, after in pairs)
    assert any(before[-1] == after[0] for before, after in pairs)


# --------------------------------------------------------------------------- the runs


def test_incremental_runs_send_each_change_once(env: Env) -> None:
    target = env.target
    rows = first_load()
    env.load(rows)

    first = env.run()
    env.expect(first, read=len(rows) - 3, sent=len(FIRST_SENT), rejected=FIRST_REJECTED)
    dest = env.runs[-1]
    # each person exactly once, in their latest version; the filtered rows never read
    assert sent_versions(dest) == {k: [v] for k, v in FIRST_SENT.items()}
    assert first.by_reason == {"duplicate_identifier": FIRST_REJECTED}
    assert_ties_cross_batches(dest, rows)
    cursor, ident = FIRST_WATERMARK
    assert env.watermark() == Watermark(target.ts(cursor), ident)
    # the definition the run accepted is the one written (Snowflake spells the view's columns
    # in upper case): `status` must not call it changed, nor a run re-read the whole view
    assert controls.pending_changes(env.project, env.store, [SYNC]) == {}
    # values went through the transform with the sync's other columns
    by_id = {r["__id"]: r for r in dest.rows()}
    one, two = by_id["person01@example.com"], by_id["person00@example.com"]
    assert one["email"] == "person01@example.com"
    assert one["phone_number"] == "+442079460001"  # a national number read with `country`
    assert two["phone_number"] == "+14155550000"
    assert (one["consent.email"], two["consent.email"]) == ("unsubscribed", "subscribed")
    assert two["consent.email.consented_at"] == (T0 - timedelta(days=1)).replace(tzinfo=UTC)
    assert one["consent.email.consented_at"] is None
    errors = read_csv_rows(first.record.error_file)
    assert Counter(e["reason"] for e in errors) == {"duplicate_identifier": FIRST_REJECTED}
    assert Counter(e["identifier"].strip().lower() for e in errors) == {
        "person05@example.com": 1,
        "person10@example.com": 1,
        "person20@example.com": 2,
    }

    rows = second_load(rows)
    env.load(rows)
    second = env.run()
    env.expect(second, read=SECOND_READ, sent=len(SECOND_SENT), rejected=SECOND_REJECTED)
    dest = env.runs[-1]
    assert sent_versions(dest) == {k: [v] for k, v in SECOND_SENT.items()}
    assert second.by_reason == {"duplicate_identifier": SECOND_REJECTED}
    assert_ties_cross_batches(dest, rows)
    cursor, ident = SECOND_WATERMARK
    assert env.watermark() == Watermark(target.ts(cursor), ident)

    third = env.run()
    env.expect(third, read=0, sent=0, rejected=0)
    assert env.runs[-1].rows() == []
    assert env.watermark() == Watermark(target.ts(cursor), ident)
    assert [r.status for r in env.store.last_runs(SYNC)] == ["success", "partial", "partial"]


def test_validate_reads_the_live_view_like_a_run(env: Env, tmp_path: Path) -> None:
    rows = first_load()
    env.load(rows)
    error_file = tmp_path / "validate.csv"
    report = validate(env.project, env.sync, csv_path=None, error_file=str(error_file))
    assert (report.rows, report.bad_rows) == (len(rows) - 3, FIRST_REJECTED)
    assert report.by_reason == {"duplicate_identifier": FIRST_REJECTED}
    errors = read_csv_rows(error_file)
    assert sorted(e["identifier"].strip().lower() for e in errors) == [
        "person05@example.com",
        "person10@example.com",
        "person20@example.com",
        "person20@example.com",
    ]
    assert env.watermark() is None  # validating moves nothing


def test_export_then_validate_the_csv_finds_what_the_view_does(env: Env, tmp_path: Path) -> None:
    """``reverse-etl export`` runs the view as written (its ``%`` included) and ``validate
    --csv`` on the file reports the rows that validating the live view reports."""
    rows = first_load()
    env.load(rows)
    exported = tmp_path / "export.csv"
    assert export_csv(env.project, env.sync, str(exported)) == len(rows) - 3
    lines = read_csv_rows(exported)
    assert sorted(lines[0]) == sorted(
        c.upper() if env.target.name == "snowflake" else c for c in COLUMNS
    )
    assert sorted(r["EMAIL" if "EMAIL" in r else "email"] for r in lines) == sorted(
        r.email for r in rows if r.email and "@" in r.email
    )
    report = validate(
        env.project, env.sync, csv_path=str(exported), error_file=str(tmp_path / "errors.csv")
    )
    assert (report.rows, report.bad_rows) == (len(rows) - 3, FIRST_REJECTED)
    assert report.by_reason == {"duplicate_identifier": FIRST_REJECTED}

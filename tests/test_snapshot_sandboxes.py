"""The synced-state snapshot against the real sandboxes: Klaviyo profiles and Dotdigital
contacts over loopback HTTP, read from a DuckDB and a PostgreSQL source.

A row the destination holds as it is costs no write call, whatever re-reads it (a second run
over the whole view, a lookback, a moved ``modified_at``); a changed row is sent alone, with its
new value. A mirror sync takes members who left the view out of the list and nothing else (the
profile or contact stays, with its consent), re-adds one who returns, and its guard stops an
emptied view or a large drop before removing anything. The engine-level cases with a fake
destination are in tests/test_snapshot.py; here the sandbox's own request log and state say
what reached the API. Every request is on spec (no sandbox violation)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from reverse_etl.config import Project, load_project
from reverse_etl.engine import RunOptions, RunResult, run_sync
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, EXIT_ROW_ERRORS
from reverse_etl.sandbox import DotdigitalSandbox, KlaviyoSandbox, SandboxServer, SandboxSettings
from reverse_etl.state import StateStore
from tests.helpers import at, create_table, write_project
from tests.sandboxes import PROFILE_COLUMNS, email_of, fast_clients, profile_row
from tests.test_klaviyo_support import klaviyo_speed

SYNC = "people"
LIST = "Mirror Members"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
EMAIL_RE = re.compile(rb"customer\d{5}@example\.com")

# --------------------------------------------------------------------------- the sources

PG_TYPES = {
    "VARCHAR": "text",
    "DOUBLE": "double precision",
    "INTEGER": "integer",
    "DECIMAL(12,2)": "numeric(12,2)",
    "BOOLEAN": "boolean",
    "DATE": "date",
    "TIMESTAMPTZ": "timestamptz",
}


@dataclass
class Warehouse:
    """A source holding one table of ``PROFILE_COLUMNS`` rows, replaced by ``load``."""

    name: str
    connection: dict[str, Any]
    table: str
    load: Callable[[Sequence[Sequence[Any]]], None]


def duckdb_warehouse(root: Path) -> Warehouse:
    path = root / "warehouse.duckdb"

    def load(rows: Sequence[Sequence[Any]]) -> None:
        create_table(path, "people", PROFILE_COLUMNS, rows)

    return Warehouse("duckdb", {"type": "duckdb", "path": str(path)}, "people", load)


def postgres_warehouse(dsn: str) -> Warehouse:
    import psycopg
    import psycopg.conninfo

    table = f"people_{uuid.uuid4().hex[:10]}"
    columns = ", ".join(f"{c} {PG_TYPES[t]}" for c, t in PROFILE_COLUMNS.items())

    def load(rows: Sequence[Sequence[Any]]) -> None:
        with psycopg.connect(dsn, autocommit=True) as con:
            con.execute(f"DROP TABLE IF EXISTS {table}")
            con.execute(f"CREATE TABLE {table} ({columns})")
            with con.cursor().copy(f"COPY {table} ({', '.join(PROFILE_COLUMNS)}) FROM STDIN") as cp:
                for row in rows:
                    cp.write_row(row)

    info = psycopg.conninfo.conninfo_to_dict(dsn)
    connection = {
        "type": "postgres",
        "host": info["host"],
        "port": int(info["port"]),
        "user": info["user"],
        "password": info["password"],
        "dbname": info["dbname"],
    }
    return Warehouse("postgres", connection, table, load)


def make_warehouse(kind: str, request: pytest.FixtureRequest, root: Path) -> Warehouse:
    if kind == "duckdb":
        return duckdb_warehouse(root)
    return postgres_warehouse(request.getfixturevalue("postgres_dsn"))


# --------------------------------------------------------------------------- the destinations


@dataclass(frozen=True)
class Kind:
    """What differs between the two destinations, for the tests below."""

    name: str
    sandbox: type[KlaviyoSandbox] | type[DotdigitalSandbox]
    mapping: dict[str, str]
    first_name: str  # the field first_name lands in
    import_path: str

    def connection(self, sandbox: Any, base_url: str) -> dict[str, Any]:
        s = sandbox.settings
        if self.name == "klaviyo":
            return {"type": "klaviyo", "api_key": s.api_key, "base_url": base_url}
        return {
            "type": "dotdigital",
            "username": s.username,
            "password": s.password,
            "base_url": base_url,
        }

    def records(self, body: bytes) -> list[dict[str, Any]]:
        """The profiles or contacts one import body carries."""
        doc = orjson.loads(body)
        if self.name == "klaviyo":
            return [p["attributes"] for p in doc["data"]["attributes"]["profiles"]["data"]]
        return list(doc["contacts"])

    def first_name_of(self, record: dict[str, Any]) -> Any:
        if self.name == "klaviyo":
            return record.get("first_name")
        return (record.get("dataFields") or {}).get("FIRSTNAME")

    def held(self, sandbox: Any, email: str) -> dict[str, Any] | None:
        """The profile or contact as the destination holds it."""
        if self.name == "klaviyo":
            return sandbox.profile_by_email(email)
        return sandbox.contact(email)

    def members(self, sandbox: Any) -> set[str]:
        if self.name == "klaviyo":
            return {p["email"] for p in sandbox.list_members(LIST)}
        return {c["identifiers"]["email"] for c in sandbox.address_book_members(LIST)}

    def standing(self, sandbox: Any, email: str) -> Any:
        """Everything about the person but their list memberships: the profile or contact
        (consent, status, suppression, data) and Klaviyo's subscription records."""
        held = self.held(sandbox, email)
        assert held is not None, f"{email} is gone from {self.name}"
        if self.name == "klaviyo":
            subs = sorted(
                (s for s in sandbox.subscriptions() if s["email"] == email),
                key=lambda s: (s["channel"], s["type"]),
            )
            return held, subs
        return {k: v for k, v in held.items() if k not in ("lists", "updated")}

    def consent(self, sandbox: Any, email: str) -> Any:
        """The consent the destination holds for ``email``, without timestamps."""
        if self.name == "klaviyo":
            return {
                (s["channel"], s["type"]): s["consent"]
                for s in sandbox.subscriptions()
                if s["email"] == email
            }
        held = self.held(sandbox, email)
        assert held is not None
        return held["status"], held["channelProperties"]


KINDS = {
    "klaviyo": Kind(
        "klaviyo",
        KlaviyoSandbox,
        {
            "email": "email",
            "first_name": "first_name",
            "last_name": "last_name",
            "phone": "phone_number",
            "city": "location.city",
            "latitude": "location.latitude",
            "tier": "properties.Tier",
            "points": "properties.Points",
            "lifetime_value": "properties.Lifetime_Value",
            "is_vip": "properties.VIP",
            "birthday": "properties.Birthday",
            "last_order_at": "properties.Last_Order_At",
        },
        "first_name",
        "/api/profile-bulk-import-jobs",
    ),
    "dotdigital": Kind(
        "dotdigital",
        DotdigitalSandbox,
        {
            "email": "email",
            "first_name": "FIRSTNAME",
            "last_name": "LASTNAME",
            "tier": "LOYALTY_TIER",
            "points": "LOYALTY_POINTS",
            "lifetime_value": "LIFETIME_VALUE",
            "is_vip": "IS_VIP",
            "birthday": "BIRTHDAY",
            "last_order_at": "LAST_ORDER_AT",
        },
        "FIRSTNAME",
        "/contacts/v3/import",
    ),
}


# --------------------------------------------------------------------------- the rig


@dataclass
class Logged:
    method: str
    path: str
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class Recorder:
    """ASGI in front of a sandbox that keeps every request's method, path and body (the
    sandbox's own log has no bodies)."""

    def __init__(self, app: Any):
        self.app = app
        self.log: list[Logged] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entry = Logged(scope["method"], scope["path"])
        self.log.append(entry)

        async def recv() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                entry.chunks.append(message.get("body", b""))
            return message

        await self.app(scope, recv, send)


@dataclass
class Rig:
    root: Path
    kind: Kind
    warehouse: Warehouse
    sandbox: Any
    base_url: str
    recorder: Recorder
    project: Project | None = None
    store: StateStore | None = None

    def configure(self, **sync: Any) -> Project:
        entry: dict[str, Any] = {
            "name": SYNC,
            "source": {"connection": "warehouse", "table": self.warehouse.table},
            "object": "profiles",
            "identifier": "email",
            "cursor": "modified_at",
            "destination": {"connection": self.kind.name, "list": LIST},
            "mapping": dict(self.kind.mapping),
            "consent": {"email": "email_consent"},
            "default_phone_region": "US",
            "batch_size": 7,
            **sync,
        }
        write_project(
            self.root,
            {
                "connections": {
                    "warehouse": self.warehouse.connection,
                    self.kind.name: self.kind.connection(self.sandbox, self.base_url),
                },
                "state": {"url": "sqlite:///state/state.db"},
                "error_dir": "errors",
                "syncs": [entry],
            },
        )
        self.project = load_project(None, self.root, env={})
        if self.store is None:
            self.store = StateStore(self.project.state.url, root=self.root)
        return self.project

    def run(self, **options: Any) -> Run:
        assert self.project is not None and self.store is not None, "configure() first"
        mark = len(self.recorder.log)
        result = run_sync(self.project, SYNC, self.store, RunOptions(**options))
        assert self.sandbox.wait_idle(30), "sandbox jobs did not finish"
        return Run(result, self.recorder.log[mark:])

    def held(self, email: str) -> dict[str, Any] | None:
        return self.kind.held(self.sandbox, email)

    def members(self) -> set[str]:
        return self.kind.members(self.sandbox)


@dataclass
class Run:
    result: RunResult
    requests: list[Logged]

    @property
    def writes(self) -> list[Logged]:
        return [r for r in self.requests if r.method in WRITES]

    @property
    def code(self) -> int:
        return self.result.exit_code

    def counts(self) -> tuple[int, int, int, int]:
        """(read, sent, unchanged, rejected), which must add up."""
        c = self.result.record.counts
        assert c.read == c.sent + c.unchanged + c.rejected, c
        return c.read, c.sent, c.unchanged, c.rejected


WAREHOUSES = ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=WAREHOUSES)
def source(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(KINDS))
def rig(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> Iterator[Rig]:
    """A project reading ``source`` and a sandbox of the destination, served for the test; it
    must end with no spec violation and no sandbox error."""
    fast_clients(monkeypatch)
    klaviyo_speed(monkeypatch)
    kind = KINDS[request.param]
    sandbox = kind.sandbox(SandboxSettings(speedup=50.0))
    recorder = Recorder(sandbox)
    warehouse = make_warehouse(source, request, tmp_path)
    with SandboxServer(recorder) as server:
        rig = Rig(tmp_path, kind, warehouse, sandbox, server.base_url, recorder)
        try:
            yield rig
        finally:
            if rig.store is not None:
                rig.store.close()
    assert sandbox.internal_errors == [], sandbox.internal_errors
    assert sandbox.violations == [], sandbox.violations


N = 20


def view(changes: dict[int, dict[str, Any]] | None = None, *, later: int = 0) -> list[Any]:
    """Rows 0..N-1 with ``changes`` by row number, and a row the transform refuses on every
    read (an invalid email); ``later``: every ``modified_at`` that many seconds later."""
    rows = [
        profile_row(n, **{"modified_at": at(later + n), **(changes or {}).get(n, {})})
        for n in range(N)
    ]
    return [*rows, profile_row(100, email="not-an-email", modified_at=at(later + 100))]


def assert_no_writes(run: Run) -> None:
    assert run.writes == [], [(r.method, r.path) for r in run.writes]


# --------------------------------------------------------------------------- upsert


def test_a_second_run_over_an_unchanged_view_writes_nothing(rig: Rig) -> None:
    rig.warehouse.load(view())
    rig.configure()
    first = rig.run()
    assert first.code == EXIT_ROW_ERRORS, first.result.record.message  # the bad row
    assert first.counts() == (N + 1, N, 0, 1)
    assert {r.path for r in first.writes} >= {rig.kind.import_path}  # the baseline did write
    assert rig.members() == {email_of(n) for n in range(N)}

    again = rig.run()  # past the watermark: nothing read
    assert again.counts() == (0, 0, 0, 0)
    assert_no_writes(again)

    whole = rig.run(full_refresh=True)  # the whole view again: every row held as it is
    assert whole.counts() == (N + 1, 0, N, 1)
    assert whole.result.by_reason["invalid_email"] == 1
    assert_no_writes(whole)
    assert whole.requests, "the refresh asked the destination nothing at all"


def test_a_lookback_reread_of_unchanged_rows_writes_nothing(rig: Rig) -> None:
    rig.warehouse.load(view())
    rig.configure(lookback_minutes=60)
    assert rig.run().counts() == (N + 1, N, 0, 1)
    again = rig.run()  # the 60-minute window reaches back over every row
    assert again.counts() == (N + 1, 0, N, 1)
    assert_no_writes(again)


def test_a_moved_modified_at_without_a_change_writes_nothing(rig: Rig) -> None:
    rig.warehouse.load(view())
    rig.configure()
    assert rig.run().counts() == (N + 1, N, 0, 1)
    rig.warehouse.load(view(later=86_400))  # a day later, the same values
    again = rig.run()
    assert again.counts() == (N + 1, 0, N, 1)
    assert_no_writes(again)
    assert rig.run().counts() == (0, 0, 0, 0)  # and the watermark moved past them


def test_one_changed_column_sends_exactly_that_row(rig: Rig) -> None:
    rig.warehouse.load(view())
    rig.configure()
    assert rig.run().counts() == (N + 1, N, 0, 1)
    changed = email_of(7)
    # every row's modified_at moves, one row's first_name changes
    rig.warehouse.load(view({7: {"first_name": "Renamed"}}, later=86_400))
    again = rig.run()
    assert again.counts() == (N + 1, 1, N - 1, 1)
    imports = [r for r in again.writes if r.path == rig.kind.import_path]
    assert len(imports) == 1, [(r.method, r.path) for r in again.writes]
    [record] = rig.kind.records(imports[0].body)
    assert rig.kind.first_name_of(record) == "Renamed"
    # no write call names anyone else (consent calls for that row included)
    named = {m.decode() for r in again.writes for m in EMAIL_RE.findall(r.body)}
    assert named == {changed}
    held = rig.held(changed)
    assert held is not None and rig.kind.first_name_of(held) == "Renamed"
    other = rig.held(email_of(8))
    assert other is not None and rig.kind.first_name_of(other) == "First8"


CONSENT_PATHS = (
    "/api/profile-subscription-bulk-create-jobs",
    "/api/profile-subscription-bulk-delete-jobs",
)


def consent_written(kind: Kind, run: Run) -> set[str]:
    """The addresses whose consent a run wrote: Klaviyo's subscription calls, Dotdigital's
    import documents carrying an email status."""
    if kind.name == "klaviyo":
        return {
            m.decode()
            for r in run.writes
            if r.path in CONSENT_PATHS
            for m in EMAIL_RE.findall(r.body)
        }
    return {
        c["identifiers"]["email"]
        for r in run.writes
        if r.path == kind.import_path
        for c in kind.records(r.body)
        if ((c.get("channelProperties") or {}).get("email") or {}).get("status")
    }


def test_consent_is_written_only_when_it_changed(rig: Rig) -> None:
    """A row sent again because another column changed, a lookback, ``--full-refresh`` or
    ``--resend`` leaves the destination's consent alone: re-sending an unchanged "yes" would
    resubscribe a person who unsubscribed inside the vendor since."""
    rig.warehouse.load(view())
    rig.configure(lookback_minutes=60 * 24 * 3)
    first = rig.run()
    with_consent = {email_of(n) for n in range(N) if n % 3 != 2}  # "yes" and "no" rows
    assert consent_written(rig.kind, first) == with_consent
    # row 0 ("yes") gets a new first name, row 1's consent turns from "no" to "yes"
    rig.warehouse.load(view({0: {"first_name": "Renamed"}, 1: {"email_consent": "yes"}}, later=60))
    again = rig.run()
    assert again.counts() == (N + 1, 2, N - 2, 1)
    assert consent_written(rig.kind, again) == {email_of(1)}
    assert rig.kind.first_name_of(rig.held(email_of(0)) or {}) == "Renamed"
    resent = rig.run(full_refresh=True, resend=True)  # every profile again, no consent
    assert resent.counts() == (N + 1, N, 0, 1)
    assert consent_written(rig.kind, resent) == set()
    if rig.kind.name == "dotdigital":  # a kept consent's contact stays in its books
        held = rig.held(email_of(0))
        assert held is not None and held["channelProperties"]["email"]["status"] == "subscribed"


def test_consent_that_waited_for_its_address_is_sent_when_the_address_comes(rig: Rig) -> None:
    """SMS consent without a phone number cannot be sent (a row note); it counts as changed
    once the number comes, not before, and not again after."""
    if rig.kind.name != "klaviyo":
        pytest.skip("SMS consent is Klaviyo's")
    rig.warehouse.load(view({0: {"phone": None}}))
    rig.configure(
        consent={"email": "email_consent", "sms": "email_consent"},
        destination={"connection": "klaviyo", "list": LIST, "sms_without_consent_time": True},
    )
    first = rig.run()
    assert first.result.by_reason.get("missing_consent_address") == 1
    rig.warehouse.load(view({0: {"phone": None, "first_name": "Renamed"}}, later=1_000))
    renamed = rig.run()
    assert renamed.counts()[1] == 1, (renamed.counts(), renamed.result.by_reason)
    assert consent_written(rig.kind, renamed) == set()
    assert "missing_consent_address" not in renamed.result.by_reason  # not sent: not tried
    rig.warehouse.load(view({0: {"phone": "(415) 555-0100", "first_name": "Renamed"}}, later=2_000))
    numbered = rig.run()
    assert consent_written(rig.kind, numbered) == {email_of(0)}
    sms = [
        s
        for s in rig.sandbox.subscriptions()
        if s["email"] == email_of(0) and s["channel"] == "sms"
    ]
    assert sms and all(s["consent"] == "SUBSCRIBED" for s in sms), sms
    rig.warehouse.load(view({0: {"phone": "(415) 555-0199", "first_name": "Renamed"}}, later=3_000))
    assert consent_written(rig.kind, rig.run()) == set()  # a new number: consent as it was


# --------------------------------------------------------------------------- mirror

REMOVAL_PATHS = ("/relationships/profiles", "/contacts/delete")  # Klaviyo, Dotdigital


def is_removal(request: Logged) -> bool:
    return request.path.endswith(REMOVAL_PATHS)


def test_a_member_who_leaves_the_view_leaves_the_list_and_keeps_their_consent(rig: Rig) -> None:
    rig.warehouse.load(view())
    rig.configure(mode="mirror")
    first = rig.run()
    assert first.counts() == (N + 1, N, 0, 1)
    everyone = {email_of(n) for n in range(N)}
    assert rig.members() == everyone

    again = rig.run()  # a mirror run reads the whole view: all of it held as it is
    assert again.counts() == (N + 1, 0, N, 1)
    assert again.result.record.counts.removed == 0
    assert_no_writes(again)

    # two leave: one who consented (3: yes) and one who refused (7: no)
    leavers = {email_of(3), email_of(7)}
    before = {e: rig.kind.standing(rig.sandbox, e) for e in leavers}
    consent_3 = rig.kind.consent(rig.sandbox, email_of(3))
    assert consent_3  # there is consent to keep
    rig.warehouse.load([r for r in view() if r[0] not in leavers])
    gone = rig.run()
    assert gone.code == EXIT_OK, gone.result.record.message  # the bad row only, known by now
    assert gone.counts() == (N - 1, 0, N - 2, 1)
    assert gone.result.record.counts.removed == 2
    assert rig.members() == everyone - leavers
    assert gone.writes and all(is_removal(r) for r in gone.writes), [
        (r.method, r.path) for r in gone.writes
    ]  # removal calls only: nothing unsubscribed, suppressed or deleted
    for e in leavers:  # the profile or contact stays, consent and all
        assert rig.kind.standing(rig.sandbox, e) == before[e]

    stays = rig.run()  # removed once: nothing more to remove
    assert stays.result.record.counts.removed == 0
    assert_no_writes(stays)

    rig.warehouse.load([r for r in view() if r[0] != email_of(7)])  # 3 returns, 7 does not
    back = rig.run()
    assert back.counts() == (N, 1, N - 2, 1)
    assert back.result.record.counts.removed == 0
    assert rig.members() == everyone - {email_of(7)}
    assert not any(is_removal(r) for r in back.writes)
    # sent again as it is in the view: its consent is what it was
    assert rig.kind.consent(rig.sandbox, email_of(3)) == consent_3
    assert rig.sandbox.violations == []


def test_the_guard_stops_an_emptied_view_and_a_half_drop_before_removing(rig: Rig) -> None:
    rows = view()[:N]  # no refused row: a clean run
    rig.warehouse.load(rows)
    rig.configure(mode="mirror")
    assert rig.run().code == EXIT_OK
    everyone = {email_of(n) for n in range(N)}

    rig.warehouse.load([])  # a broken view: no rows at all
    empty = rig.run()
    assert empty.code == EXIT_FAILED
    message = empty.result.record.message or ""
    assert "no rows" in message and "--allow-mass-removal" in message, message
    assert empty.result.record.counts.removed == 0
    assert_no_writes(empty)
    assert rig.members() == everyone

    rig.warehouse.load(rows[: N // 2])  # half of them left: 50 %, over the default 20 %
    half = rig.run()
    assert half.code == EXIT_FAILED
    message = half.result.record.message or ""
    assert f"{N // 2} of the list's {N} members (50%)" in message, message
    assert "--allow-mass-removal" in message
    assert half.result.record.counts.removed == 0
    assert not any(is_removal(r) for r in half.requests)
    assert rig.members() == everyone

    allowed = rig.run(allow_mass_removal=True)
    assert allowed.code == EXIT_OK, allowed.result.record.message
    assert allowed.result.record.counts.removed == N // 2
    assert rig.members() == {email_of(n) for n in range(N // 2)}
    assert all(rig.held(email_of(n)) is not None for n in range(N))  # removed, not deleted

    # the override was for that run only: the next large drop stops again
    rig.warehouse.load(rows[: N // 4])
    next_drop = rig.run()
    assert next_drop.code == EXIT_FAILED and next_drop.result.record.counts.removed == 0
    assert rig.members() == {email_of(n) for n in range(N // 2)}
    assert rig.sandbox.violations == []

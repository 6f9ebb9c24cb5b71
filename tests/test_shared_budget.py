"""Rate budgets that belong to the destination account (``destinations/budget.py``).

In one process on an injected clock: two limiters of one account are one bucket, so the calls
granted over a simulated minute stay within the account's limit; another account keeps its own.
Leases (with a stub store): spent without round trips, expired tokens not spent, a failing
store paced alone. Across processes (SQLite file and PostgreSQL): three processes taking
tokens of one (account, operation) together never exceed capacity + rate x elapsed (grants are
counted; elapsed only widens the bound). The migration that adds the table. Against the
Klaviyo sandbox with its limits on: three syncs at once meet no 429 loop, in threads of one
process and in three processes sharing a PostgreSQL store.

No test asserts a duration or a rate: figures are in ``tests/bench/shared_budget.py``.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reverse_etl import state
from reverse_etl.destinations import budget
from reverse_etl.destinations.budget import (
    LEASE_SECONDS,
    Budgets,
    BudgetStore,
    SharedLimiter,
    Window,
    shared_through,
)
from reverse_etl.destinations.klaviyo.client import LIMITS, KlaviyoClient
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.secrets import register_secret
from reverse_etl.state import StateStore, latest_schema_version, migrate, rate_budget
from tests.bench.shared_budget import run as bench_run
from tests.sandbox.sandbox_helpers import FakeTime

SPAWN = mp.get_context("spawn")
ACCOUNT = "klaviyo:https://a.klaviyo.com:0123456789ab"


def conn(key: str = "pk_one", url: str = "https://a.klaviyo.com") -> KlaviyoConnection:
    return KlaviyoConnection(type="klaviyo", api_key=key, base_url=url)


# --------------------------------------------------------------------------- in one process


def test_two_limiters_of_one_account_share_the_minute() -> None:
    t = FakeTime(1000.0)
    budgets = Budgets(clock=t.clock, sleep=t.sleep)
    burst, steady = LIMITS["bulk_import_profiles"]  # 10/s, 150/m
    profiles = budgets.limiter(ACCOUNT, "bulk_import_profiles", burst, steady)
    orders = budgets.limiter(ACCOUNT, "bulk_import_profiles", burst, steady)
    other = budgets.limiter(ACCOUNT.replace("0123", "9999"), "bulk_import_profiles", burst, steady)
    assert profiles is orders and other is not profiles

    granted = 0
    for lim in itertools.cycle((profiles, orders)):  # two syncs, as fast as allowed
        lim.acquire()
        if t.now > 1060.0:
            break
        granted += 1
    # the account's steady window over the minute: at most its 150, shared (each sync alone
    # would have been granted as much again); the small bucket costs 2 % (``ratelimit.shape``)
    assert 145 <= granted <= 150
    before = t.now
    other.acquire()  # another account's bucket is untouched: no wait
    assert t.now == before


def test_klaviyo_clients_of_one_account_share_limiters_and_never_hold_the_key() -> None:
    first, second = KlaviyoClient(conn()), KlaviyoClient(conn())
    elsewhere = KlaviyoClient(conn(url="http://127.0.0.1:9"))
    other_key = KlaviyoClient(conn(key="pk_two"))
    faster = KlaviyoClient(conn(), speedup=50)
    try:
        for op in LIMITS:
            assert first.limiters[op] is second.limiters[op]
            for client in (elsewhere, other_key, faster):
                assert client.limiters[op] is not first.limiters[op]
        assert first.limiters["get_lists"] is not first.limiters["get_profiles"]
        keys = [str(k) for k in budget.BUDGETS._limiters]
        assert not any("pk_one" in k or "pk_two" in k for k in keys)
    finally:
        for client in (first, second, elsewhere, other_key, faster):
            client.close()


# --------------------------------------------------------------------------- leases


class StubStore:
    """A ``BudgetStore`` that grants what the test scripts, or fails."""

    key = where = "stub"

    def __init__(self, answers: list[tuple[int, float] | Exception]):
        self.answers = answers
        self.asked: list[int] = []

    def take(
        self, account: str, op: str, buckets: Any, want: int, held: float
    ) -> tuple[int, float]:
        self.asked.append(want)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def shared(t: FakeTime, store: Any, burst: float = 350, steady: float = 3500) -> SharedLimiter:
    return SharedLimiter(store, ACCOUNT, "op", burst, steady, clock=t.clock, sleep=t.sleep)


def test_a_lease_is_spent_without_round_trips_and_not_after_it_expires() -> None:
    t = FakeTime(0.0)
    store = StubStore([(3, 0.0), (5, 0.0)])
    lim = shared(t, store)
    # a lease holds what the slowest window earns in its life: 3500/m for 0.25 s
    assert lim.lease_size == math.floor(3500 / 60 * LEASE_SECONDS) == 14
    for _ in range(3):
        assert lim.acquire() == 0.0
    assert store.asked == [14] and lim.round_trips == 1
    lim.acquire()  # the lease is used up: ask again
    assert lim.round_trips == 2
    t.now += LEASE_SECONDS + 0.01  # four tokens left, expired: not spent
    with pytest.raises(IndexError):  # proves it asked the store again
        lim.acquire()


def test_a_reserved_token_is_slept_for_once_without_asking_again() -> None:
    t = FakeTime(0.0)
    store = StubStore([(1, 0.4)])
    lim = shared(t, store, burst=10, steady=150)
    assert lim.lease_size == 1  # 150/m earns 0.6 of a call in a lease's life
    assert lim.acquire() == pytest.approx(0.4)
    assert t.slept == [pytest.approx(0.4)] and lim.round_trips == 1 and lim.waits == 1


def test_a_failing_store_paces_the_process_alone_for_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = FakeTime(0.0)
    register_secret("hunter2-secret")
    boom = sa.exc.OperationalError("SELECT", {}, Exception("refused: hunter2-secret"))
    store = StubStore([boom, (1, 0.0)])
    lim = shared(t, store, burst=10, steady=150)
    for _ in range(10):  # the local limiter paces: no second ask of the store
        lim.acquire()
    assert t.now > 0.0 and len(store.asked) == 1
    assert "pacing klaviyo op in this process alone for 60s" in caplog.text
    assert "hunter2-secret" not in caplog.text and "refused: ***" in caplog.text
    t.now = budget.FALLBACK_SECONDS + 1  # later: the store is asked again
    lim.acquire()
    assert len(store.asked) == 2


# --------------------------------------------------------------------------- across processes


BURST = 20.0  # per second
STEADY = 6000.0  # per minute: the burst bucket binds (capacity 20, 20/s)
RUN_SECONDS = 1.0


def _taker(url: str, ready: Any, go: Any, out: Any) -> None:
    """One process: take tokens one at a time for ``RUN_SECONDS``; report how many."""
    engine = sa.create_engine(url)
    with shared_through(engine) as store:
        assert store is not None
        lim = budget.BUDGETS.limiter(ACCOUNT, "bulk_import_profiles", BURST, STEADY, store=store)
        ready.put(1)
        go.wait()
        end = time.monotonic() + RUN_SECONDS
        granted = 0
        while time.monotonic() < end:
            lim.acquire()
            granted += 1
        out.put(granted)
    engine.dispose()


def _three_processes(url: str) -> tuple[int, float]:
    ready, go, out = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_taker, args=(url, ready, go, out)) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        started = time.monotonic()  # no token is taken before this: the bucket starts later
        go.set()
        counts = [out.get(timeout=60) for _ in procs]
        elapsed = time.monotonic() - started  # after the last grant: only widens the bound
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sum(counts), elapsed


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        dsn: str = request.getfixturevalue("postgres_dsn")
        url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    store = StateStore(url)
    with store.engine.begin() as con:  # each test starts with no buckets
        con.execute(sa.delete(rate_budget))
    store.close()
    return url


def test_three_processes_never_exceed_the_buckets_capacity_plus_refill(store_url: str) -> None:
    granted, elapsed = _three_processes(store_url)
    limit = BURST + BURST * elapsed
    # alone, each process would take about as much as the limit: together ~3x
    assert 0 < granted <= limit, (granted, limit, elapsed)


def test_the_budget_store_reserves_the_next_token_when_none_is_left(store_url: str) -> None:
    engine = sa.create_engine(store_url)
    store = BudgetStore(engine)
    slow = [Window("steady", 20, 0.001)]  # one token per 1000 s: nothing refills meanwhile
    assert store.take(ACCOUNT, "op", slow, 100, 0.25) == (19, 0.0)  # 20 - 0.00025, floored
    granted, due = store.take(ACCOUNT, "op", slow, 100, 0.25)
    assert granted == 1 and 0 < due <= 1000
    granted, later = store.take(ACCOUNT, "op", slow, 100, 0.25)
    assert granted == 1 and later == pytest.approx(due + 1000, abs=5)  # queued behind it
    store.close()
    engine.dispose()


def test_an_in_memory_store_shares_in_process_only() -> None:
    assert budget.budget_store(sa.create_engine("sqlite://")) is None
    with shared_through(None) as found:
        assert found is None


# --------------------------------------------------------------------------- migration


def test_migration_4_adds_the_budget_table_to_a_version_3_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = sa.create_engine(url)
    assert migrate(engine, state.MIGRATIONS[:3]) == 3
    assert "retl_rate_budget" not in sa.inspect(engine).get_table_names()
    engine.dispose()
    store = StateStore(url)
    assert store.schema_version() == latest_schema_version() >= 4
    columns = {c["name"] for c in sa.inspect(store.engine).get_columns("retl_rate_budget")}
    assert columns == {"account", "operation", "bucket", "tokens", "stamp"}
    store.close()


# --------------------------------------------------------------------------- against the sandbox


def test_three_syncs_in_threads_meet_no_429_loop() -> None:
    from reverse_etl.sandbox import KlaviyoSandbox, SandboxServer, SandboxSettings
    from tests.bench.shared_budget import OPERATION, PATH

    speedup = 10.0  # higher, thread jitter is a large part of a vendor second: a stray 429
    sandbox = KlaviyoSandbox(SandboxSettings(speedup=speedup, job_seconds=0.01))
    body = (
        b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":'
        b'[{"type":"profile","attributes":{"email":"t@example.com"}}]}}}}'
    )
    with SandboxServer(sandbox) as server:
        c = conn(sandbox.settings.api_key, server.base_url)
        clients = [KlaviyoClient(c, speedup=speedup) for _ in range(3)]

        def sync(client: KlaviyoClient) -> None:
            for _ in range(60):  # 180 calls: past the steady bucket's 150
                client.call(OPERATION, "POST", PATH, body)

        threads = [threading.Thread(target=sync, args=(cl,)) for cl in clients]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        for cl in clients:
            cl.close()
    statuses = [r[2] for r in sandbox.request_log if r[1] == PATH]
    assert statuses.count(202) == 180
    assert statuses.count(429) <= 3 and sandbox.violations == []
    assert clients[0].limiters[OPERATION] is clients[2].limiters[OPERATION]


@pytest.mark.postgres
def test_three_syncs_in_processes_sharing_postgres_meet_no_429_loop(postgres_dsn: str) -> None:
    url = postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    StateStore(url).close()  # at the latest schema
    outcome = bench_run(url, processes=3, seconds=1.5, speedup=20.0)
    assert outcome.accepted > 0
    assert outcome.throttled <= 3, outcome.line()


def test_a_run_shares_its_klaviyo_budget_through_its_state_store(klaviyo: Any) -> None:
    from tests.sandboxes import profile_rows, sync_entry

    rig = klaviyo()
    rig.table(profile_rows(range(5)))
    rig.configure([sync_entry("profiles", "klaviyo", {"email": "email"})])
    rig.run("profiles")
    assert rig.store is not None
    with rig.store.engine.connect() as con:
        rows = con.execute(sa.select(rate_budget.c.account, rate_budget.c.operation)).all()
    assert {op for _, op in rows} >= {"bulk_import_profiles"}
    assert all(account.startswith(f"klaviyo:{rig.base_url}:") for account, _ in rows)
    assert not any(rig.sandbox.settings.api_key in account for account, _ in rows)

"""Rate budgets that belong to the destination account, shared by every sync that calls it.

A vendor counts calls per account (Klaviyo: per API key and operation), not per sync. Two syncs
to one account at once (profiles and orders started by one cron minute, parallel Airflow tasks
on several machines) that each paced themselves at 97 % of the limit would together overrun it
and meet a 429 loop. So limiters come from here, keyed by account and operation:

* **In one process** (the default): a registry hands every client of one (account, operation)
  the same ``RateLimiter``, so concurrent syncs in threads draw from one bucket.
* **Across processes and hosts**: while a run has put its state store in force
  (``shared_through(store)``), the buckets live in the store's ``retl_rate_budget`` table, one
  row per account, operation and window (burst, steady). A process *leases* tokens: one
  transaction locks the rows (``SELECT ... FOR UPDATE``), refills them up to the database's
  clock (``clock_timestamp()`` on PostgreSQL: one clock for every host) and takes up to a
  lease's worth; the process then spends them without asking again until they expire.

Leases and why the bucket is a little smaller. A token is granted at one moment and spent a
little later, so calls could bunch up beyond what the bucket allows (one process spends an old
lease while another takes freshly refilled tokens). A leased token is only valid for
``LEASE_SECONDS`` (vendor time) and each bucket in the table holds ``rate × LEASE_SECONDS``
fewer tokens than the vendor's: the calls in any interval then never exceed the vendor's
``capacity + rate × interval`` (grants in the interval widened by the lease's life). That costs
a quarter of Klaviyo's one-second burst and nothing of the steady rate, which is what a long
sync lives on. A lease holds at most what the account earns at its slowest window in
``LEASE_SECONDS`` (one token for a bulk profile import at 150/m, 14 for catalog reads at
3,500/m), so a process at full speed uses its lease before it expires and the database round
trip (~1 ms) is paid once per such batch of calls, not per call, on the fast operations.

Which stores share across processes. PostgreSQL, the store a team or a fleet shares. A SQLite
file works the same between processes on one host (SQLite serialises writers; each lease is a
``BEGIN IMMEDIATE`` transaction with ``synchronous=NORMAL`` on its own connection). An
in-memory SQLite store is in-process only. A budget store that cannot be reached does not stop
a sync: its limiters pace the process alone for ``FALLBACK_SECONDS`` (logged), as before
sharing existed, and 429s are still honoured by the HTTP client.

The registry never holds credentials: accounts are named as in ``consent.memory.account_key``
(type, base URL and a digest of the key).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from reverse_etl.destinations.ratelimit import Clock, RateLimiter, Sleep, paced_sleep, shape
from reverse_etl.secrets import scrub
from reverse_etl.state import StateStore, rate_budget

log = logging.getLogger(__name__)

LEASE_SECONDS = 0.25  # vendor seconds a leased token stays valid (see the module docstring)
FALLBACK_SECONDS = 60.0  # how long limiters pace alone after the budget store failed
_EPSILON = 1e-9  # float refill slack, as in ratelimit.Bucket


@dataclass(frozen=True)
class Window:
    """One bucket of a limit, in real time: ``capacity`` tokens refilled at ``per_second``."""

    name: str
    capacity: float
    per_second: float


def windows(burst_per_second: float, steady_per_minute: float, speedup: float) -> list[Window]:
    """Klaviyo's two buckets (``x-klaviyo-ratelimit`` burst and steady), as ``RateLimiter``
    builds them (``ratelimit.shape``): ``speedup`` scales the refill rates, not the
    capacities."""
    out = []
    for name, limit, period in (
        ("burst", burst_per_second, 1.0),
        ("steady", steady_per_minute, 60.0),
    ):
        capacity, rate = shape(limit, period)
        out.append(Window(name, capacity, rate * speedup))
    return out


class BudgetStore:
    """The shared buckets in a state store's ``retl_rate_budget`` table."""

    def __init__(self, engine: sa.Engine):
        url = engine.url
        self.key = url.render_as_string(hide_password=False)  # in memory only, never logged
        self.where = url.render_as_string(hide_password=True)
        self.dialect = url.get_backend_name()
        if self.dialect == "postgresql":
            self.engine = engine
        elif self.dialect == "sqlite" and not _in_memory(url):
            # its own engine: BEGIN IMMEDIATE takes the write lock before the read, so two
            # processes never both read a bucket and then fail to upgrade to writing
            self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(
                self.engine, "begin", lambda con: con.exec_driver_sql("BEGIN IMMEDIATE")
            )
        else:
            raise ValueError(
                f"rate budgets are shared through a PostgreSQL or SQLite-file state store, not "
                f"{self.where}"
            )

    def take(
        self, account: str, operation: str, buckets: Sequence[Window], want: int, held: float
    ) -> tuple[int, float]:
        """Take up to ``want`` tokens from every bucket of (account, operation) at once; return
        (tokens granted, 0.0). When none is there, reserve the next one: return (1, seconds
        until it is due); the buckets go below zero, so the next caller's token is due one
        interval later (callers queue in the database, nobody polls). Each bucket holds
        ``per_second × held`` fewer tokens than its capacity (the lease margin)."""
        t = rate_budget.c
        where = (t.account == account, t.operation == operation)
        with self.engine.begin() as con:
            rows, now = self._locked(con, where)
            missing = [b for b in buckets if b.name not in rows]
            if missing:
                insert = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(
                    rate_budget
                )
                values = [
                    dict(
                        account=account,
                        operation=operation,
                        bucket=b.name,
                        tokens=_capacity(b, held),
                        stamp=now,
                    )
                    for b in missing
                ]
                con.execute(insert.on_conflict_do_nothing(), values)
                rows, now = self._locked(con, where)
            # never step back: another host's grant may carry a later stamp than our clock read
            now = max([now, *(rows[b.name][1] for b in buckets)])
            tokens = {
                b.name: min(
                    _capacity(b, held), rows[b.name][0] + (now - rows[b.name][1]) * b.per_second
                )
                for b in buckets
            }
            granted = min(want, min(math.floor(v + _EPSILON) for v in tokens.values()))
            due = 0.0
            if granted < 1:  # reserve the next token: the buckets go below zero
                granted = 1
                due = max(0.0, *((1 - tokens[b.name]) / b.per_second for b in buckets))
            con.execute(
                sa.update(rate_budget)
                .where(*where, t.bucket == sa.bindparam("b_name"))
                .values(tokens=sa.bindparam("b_tokens"), stamp=now),
                [{"b_name": name, "b_tokens": v - granted} for name, v in tokens.items()],
            )
            return granted, due

    def _locked(
        self, con: sa.Connection, where: tuple[Any, ...]
    ) -> tuple[dict[str, tuple[float, float]], float]:
        """The buckets' rows, locked for this transaction, and the database's clock."""
        t = rate_budget.c
        if self.dialect == "postgresql":
            clock: Any = sa.func.extract("epoch", sa.func.clock_timestamp())
            found = con.execute(
                sa.select(t.bucket, t.tokens, t.stamp, clock).where(*where).with_for_update()
            ).all()
            now = float(found[0][3]) if found else float(con.execute(sa.select(clock)).scalar_one())
        else:  # a SQLite file is on this host: its clock is ours (BEGIN IMMEDIATE holds the lock)
            found = con.execute(
                sa.select(t.bucket, t.tokens, t.stamp, sa.null()).where(*where)
            ).all()
            now = time.time()
        return {r[0]: (float(r[1]), float(r[2])) for r in found}, now

    def close(self) -> None:
        if self.dialect == "sqlite":
            self.engine.dispose()


class SharedLimiter(RateLimiter):
    """A ``RateLimiter`` whose buckets are rows of a ``BudgetStore``, spent through leases.

    ``clock`` (local, monotonic) only times the leases; the buckets run on the database's
    clock. ``round_trips`` counts the database transactions, ``leased`` the tokens granted.
    """

    def __init__(  # noqa: D107 - see the class docstring
        self,
        store: BudgetStore,
        account: str,
        operation: str,
        burst_per_second: float,
        steady_per_minute: float,
        *,
        speedup: float = 1.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ):
        self.store = store
        self.account = account
        self.operation = operation
        self._clock = clock
        self._sleep = sleep
        self._windows = windows(burst_per_second, steady_per_minute, speedup)
        self.lease_life = LEASE_SECONDS / speedup  # real seconds
        slowest = min(w.per_second for w in self._windows)
        self.lease_size = max(1, math.floor(slowest * self.lease_life + _EPSILON))
        self._alone = RateLimiter(
            burst_per_second, steady_per_minute, speedup=speedup, clock=clock, sleep=sleep
        )
        self._alone_until = -math.inf
        self._tokens = 0
        self._expires = -math.inf
        self._lock = threading.Lock()
        self.waited = 0.0
        self.waits = 0
        self.round_trips = 0
        self.leased = 0

    def acquire(self) -> float:
        """Block until a call is allowed; return the seconds waited. A token of the lease
        costs nothing; else one database round trip leases more, or reserves the next token
        and sleeps until it is due (outside the lock: other threads reserve their own)."""
        with self._lock:
            now = self._clock()
            if now < self._alone_until:
                due = None
            elif self._tokens >= 1 and now < self._expires:
                self._tokens -= 1
                return 0.0
            else:
                due = self._lease(now)
                if due == 0.0:
                    return 0.0
        if due is None:  # the store failed: pace this process alone for a while
            return self._alone.acquire()
        paced_sleep(self._sleep, due)  # a reserved token: ours once due, no second round trip
        return due

    def _lease(self, now: float) -> float | None:
        """Ask the store (under the lock): 0.0 with a fresh lease, the seconds until a reserved
        token is due, or None when the store failed (then pace alone for a while)."""
        try:
            granted, due = self.store.take(
                self.account, self.operation, self._windows, self.lease_size, self.lease_life
            )
        except DBAPIError as exc:
            log.warning(
                "rate budget store %s failed (%s); pacing %s %s in this process alone for %.0fs",
                self.store.where,
                scrub(f"{type(exc).__name__}: {exc.orig or exc}"),
                self.account.split(":", 1)[0],
                self.operation,
                FALLBACK_SECONDS,
            )
            self._alone_until = now + FALLBACK_SECONDS
            return None
        self.round_trips += 1
        self.leased += granted
        if due > 0:
            self.waited += due
            self.waits += 1
            return due
        self._tokens = granted - 1
        # timed from before the round trip: it expires no later than LEASE_SECONDS after
        # the database granted it
        self._expires = now + self.lease_life
        return 0.0


class Budgets:
    """The process's limiters, one per (store, account, operation, limits, speedup).

    The limits and the speedup are part of the key: a client built with other numbers (a test's
    sandbox at another speed that reused a port) gets buckets of its own rather than someone
    else's. Limiters live as long as the process: a bucket's state is what the vendor's bucket
    holds, and it outlives the client that last used it.
    """

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = time.sleep):
        self._clock = clock
        self._sleep = sleep
        self._limiters: dict[tuple[object, ...], RateLimiter] = {}
        self._lock = threading.Lock()

    def limiter(
        self,
        account: str,
        operation: str,
        burst_per_second: float,
        steady_per_minute: float,
        *,
        speedup: float = 1.0,
        store: BudgetStore | None = None,
    ) -> RateLimiter:
        key = (
            store.key if store else None,
            account,
            operation,
            burst_per_second,
            steady_per_minute,
            speedup,
        )
        with self._lock:
            found = self._limiters.get(key)
            if found is None:
                args = (burst_per_second, steady_per_minute)
                timing = {"speedup": speedup, "clock": self._clock, "sleep": self._sleep}
                found = (
                    SharedLimiter(store, account, operation, *args, **timing)  # type: ignore[arg-type]
                    if store
                    else RateLimiter(*args, **timing)  # type: ignore[arg-type]
                )
                self._limiters[key] = found
            return found


BUDGETS = Budgets()
_STORES: dict[str, BudgetStore] = {}
_STORES_LOCK = threading.Lock()
# The budget store in force for clients built in this context (a run, see ``shared_through``);
# a context variable, so concurrent runs in threads with different state stores never mix.
_CURRENT: ContextVar[BudgetStore | None] = ContextVar("retl_budget_store", default=None)


def budget_store(store: StateStore | sa.Engine) -> BudgetStore | None:
    """The ``BudgetStore`` of a state store (one per database, reused), or None where budgets
    are not shared across processes (an in-memory SQLite store)."""
    engine = store.engine if isinstance(store, StateStore) else store
    if engine.url.get_backend_name() not in ("postgresql", "sqlite") or _in_memory(engine.url):
        return None
    key = engine.url.render_as_string(hide_password=False)
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = BudgetStore(engine)
        return _STORES[key]


@contextmanager
def shared_through(store: StateStore | sa.Engine | None) -> Iterator[BudgetStore | None]:
    """Within the block, destination clients built here share their rate budgets through
    ``store`` with every process using the same database (see the module docstring)."""
    found = budget_store(store) if store is not None else None
    token = _CURRENT.set(found)
    try:
        yield found
    finally:
        _CURRENT.reset(token)


def limiter(
    account: str,
    operation: str,
    burst_per_second: float,
    steady_per_minute: float,
    *,
    speedup: float = 1.0,
) -> RateLimiter:
    """The limiter of (account, operation) for a client built now: shared with the process's
    other clients of that account, and with other processes when a store is in force."""
    return BUDGETS.limiter(
        account,
        operation,
        burst_per_second,
        steady_per_minute,
        speedup=speedup,
        store=_CURRENT.get(),
    )


def _capacity(bucket: Window, held: float) -> float:
    """The bucket's size in the table: the lease margin held back, never below one call."""
    return max(1.0, bucket.capacity - bucket.per_second * held)


def _in_memory(url: sa.URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _sqlite_connect(dbapi_con: Any, _record: Any) -> None:
    dbapi_con.isolation_level = None  # BEGIN and COMMIT are ours (BEGIN IMMEDIATE above)
    cur = dbapi_con.cursor()
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # a budget lost to a power cut is harmless
    cur.close()

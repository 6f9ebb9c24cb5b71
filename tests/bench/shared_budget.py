"""Bench: three syncs to one Klaviyo account in three processes, sharing one rate budget.

Three processes each send bulk profile imports (one profile each, so the rate limit is the
bottleneck, not the work) as fast as their limiter allows, for ``seconds``, against one
``KlaviyoSandbox`` served over loopback with its limits on and a ``speedup``. Two modes:

* ``shared``: the processes share the account's budget through a PostgreSQL state store
  (``reverse_etl/destinations/budget.py``);
* ``alone``: each process paces itself at 97 % of the limit, as before the shared budget.

Printed per mode: calls the sandbox accepted, the account's limit over the run (its steady
limit a minute × the run's vendor minutes), the achieved share, the 429s, and the
database round trips per call; then one process sharing through the store alone (what the
store costs a single sync). Done for the issue means ``shared`` reaches >= 90 % with no 429 loop.

Run: ``.venv/bin/python -m pytest -q -s -p no:cacheprovider tests/bench/shared_budget.py``
(the ``postgres_dsn`` fixture of ``tests/warehouses.py`` starts a throw-away PostgreSQL).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Any

import orjson

SPAWN = mp.get_context("spawn")
OPERATION = "bulk_import_profiles"
PATH = "/api/profile-bulk-import-jobs"


@dataclass
class Outcome:
    mode: str
    processes: int
    seconds: float  # real seconds from the start signal to the last process's end
    accepted: int  # imports the sandbox accepted (202)
    allowed: float  # the account's steady limit over the run (a minute's limit a minute)
    throttled: int  # 429s the sandbox answered
    round_trips: int  # budget-store transactions, all processes
    calls: int  # calls the processes made (including retried ones once)

    @property
    def share(self) -> float:
        return self.accepted / self.allowed

    def line(self) -> str:
        per_call = self.round_trips / self.calls if self.calls else 0.0
        return (
            f"{self.mode:>6}: {self.processes} processes, {self.seconds:.2f}s real: "
            f"{self.accepted} accepted of {self.allowed:.0f} allowed = {self.share:.1%} of the "
            f"limit; {self.throttled} x 429; {per_call:.2f} budget round trips a call"
        )


def _worker(
    base_url: str,
    api_key: str,
    url: str | None,
    speedup: float,
    seconds: float,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """One sync's process: build a client (sharing through ``url`` when given), wait for the
    start signal, send imports until ``seconds`` have passed."""
    import sqlalchemy as sa

    from reverse_etl.destinations import budget
    from reverse_etl.destinations.http import RetryPolicy
    from reverse_etl.destinations.klaviyo.client import KlaviyoClient
    from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection

    conn = KlaviyoConnection(type="klaviyo", api_key=api_key, base_url=base_url)
    engine = sa.create_engine(url) if url else None
    with budget.shared_through(engine):
        client = KlaviyoClient(conn, speedup=speedup, retry=RetryPolicy(max_attempts=20))
    body = orjson.dumps(
        {
            "data": {
                "type": "profile-bulk-import-job",
                "attributes": {
                    "profiles": {
                        "data": [{"type": "profile", "attributes": {"email": "b@example.com"}}]
                    }
                },
            }
        }
    )
    limiter = client.limiters[OPERATION]
    ready.put(1)
    go.wait()
    calls = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        client.call(OPERATION, "POST", PATH, body)
        calls += 1
    client.close()
    out.put({"calls": calls, "round_trips": getattr(limiter, "round_trips", 0)})
    if engine is not None:
        engine.dispose()


def run(
    url: str | None,
    *,
    processes: int = 3,
    seconds: float = 9.0,
    speedup: float = 20.0,
) -> Outcome:
    """One mode: ``url`` a state store URL (shared) or None (each process alone)."""
    from reverse_etl.destinations.klaviyo.client import LIMITS
    from reverse_etl.sandbox import KlaviyoSandbox, SandboxServer, SandboxSettings

    sandbox = KlaviyoSandbox(SandboxSettings(speedup=speedup, job_seconds=0.01))
    with SandboxServer(sandbox) as server:
        ready, out, go = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
        args = (server.base_url, sandbox.settings.api_key, url, speedup, seconds, ready, go, out)
        procs = [SPAWN.Process(target=_worker, args=args) for _ in range(processes)]
        for p in procs:
            p.start()
        try:
            for _ in procs:
                ready.get(timeout=120)
            sandbox.reset_log()
            started = time.monotonic()
            go.set()
            results = [out.get(timeout=seconds + 120) for _ in procs]
            elapsed = time.monotonic() - started
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        log = list(sandbox.request_log)
        throttled = sum(1 for r in log if r[1] == PATH and r[2] == 429)
        accepted = sum(1 for r in log if r[1] == PATH and r[2] == 202)
    _, steady = LIMITS[OPERATION]
    # Klaviyo's steady limit over the run (fixed one-minute windows: the limit a minute)
    allowed = steady / 60.0 * speedup * elapsed
    return Outcome(
        mode="shared" if url else "alone",
        processes=processes,
        seconds=elapsed,
        accepted=accepted,
        allowed=allowed,
        throttled=throttled,
        round_trips=sum(r["round_trips"] for r in results),
        calls=sum(r["calls"] for r in results),
    )


def pg_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+psycopg://", 1)


def test_bench_shared_budget(postgres_dsn: str) -> None:
    from reverse_etl.state import StateStore

    url = pg_url(postgres_dsn)
    StateStore(url).close()  # the store at the latest schema: the budget table is there
    for mode_url, processes in ((url, 3), (None, 3), (url, 1)):
        print("\n" + run(mode_url, processes=processes).line(), flush=True)

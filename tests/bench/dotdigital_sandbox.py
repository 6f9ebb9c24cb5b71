"""`make bench` (Dotdigital): a real contact sync of 100,000 generated profiles (DuckDB) against
the Dotdigital sandbox over loopback HTTP, (a) with no limits and (b) under the call budget.

Both runs are the engine as the CLI runs it (extract → transform → v3 contact imports of
5,000, polled, into an address book, data fields created first); nothing is shortened on the
client side. The sandbox runs in this process (uvicorn in a thread) at a speedup.

(a) measures throughput: contacts/s from the start of the run until every contact is in
    the account.

(b) measures how well the client uses Dotdigital's budget: a fixed window of ``L`` calls an
    hour, counted per API user, refused calls included. The budget is scaled down (``L`` a
    few dozen, not the default 2,000) so a 100,000-contact sync, which needs only ~60 calls
    at 5,000 contacts an import, spans several windows; the hour lasts ``3600 / speedup``
    real seconds. The sandbox stamps every call it counts. Windows are rebuilt from the
    stamps as the sandbox keeps them (a window starts with the first call after the previous
    one expired). While the budget binds, what the limit allows is ``L`` calls per window
    length, so

        share = calls made before the last window / (L * span / window)

    where ``span`` runs from the first call to the first call of the last window (the last
    window is left out: there the work ran out, not the budget). A client that spends each
    window's budget and calls again the moment the window resets scores 100 %; every second
    it sits idle after a reset, or every call refused, lowers it. The client paces on
    ``X-RateLimit-Remaining`` / ``X-RateLimit-Reset``; Reset is whole epoch seconds, so up to
    a second per window is lost to rounding, which is why the window is kept long (18 s).

Run: ``python tests/bench/dotdigital_sandbox.py`` (about 1.5 minutes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from reverse_etl.config import load_project  # noqa: E402
from reverse_etl.engine import run_sync  # noqa: E402
from reverse_etl.sandbox import DotdigitalSandbox, SandboxServer, SandboxSettings  # noqa: E402
from reverse_etl.state import StateStore  # noqa: E402

MAPPING = {
    "email": "email",
    "phone": "mobileNumber",
    "first_name": "FIRSTNAME",
    "last_name": "LASTNAME",
    "zip": "POSTCODE",
    "city": "CITY",
    "tier": "LOYALTY_TIER",
    "points": "LOYALTY_POINTS",
    "lifetime_value": "LIFETIME_VALUE",
    "is_vip": "IS_VIP",
    "birthday": "BIRTHDAY",
}


class StampedSandbox(DotdigitalSandbox):
    """The Dotdigital sandbox, noting when each call it counts against the budget arrived."""

    def __init__(self, settings: SandboxSettings):
        super().__init__(settings)
        self.stamps: list[float] = []

    def throttle(self, principal: str, endpoint: Any, request: Any) -> Any:
        self.stamps.append(time.monotonic())
        return super().throttle(principal, endpoint, request)


@dataclass
class Outcome:
    contacts: int
    seconds: float
    calls: int
    throttled: int
    windows: list[int] = field(default_factory=list)  # calls in each budget window
    share: float | None = None

    @property
    def per_second(self) -> float:
        return self.contacts / self.seconds


def generate(db: Path, n: int) -> None:
    import duckdb

    con = duckdb.connect(str(db))
    con.execute("SET TimeZone = 'UTC'")
    con.execute(
        f"""CREATE TABLE people AS SELECT
            'customer' || lpad(i::VARCHAR, 6, '0') || '@example.com' AS email,
            'First' || i AS first_name, 'Last' || i AS last_name,
            '+1415' || lpad(i::VARCHAR, 7, '0') AS phone,
            ['Springfield', 'Shelbyville', 'Ogdenville'][i % 3 + 1] AS city,
            (10000 + i % 90000)::VARCHAR AS zip,
            ['bronze', 'silver', 'gold'][i % 3 + 1] AS tier,
            (i * 10)::INTEGER AS points, (i % 5000 + 0.25)::DECIMAL(12, 2) AS lifetime_value,
            i % 2 = 0 AS is_vip, DATE '1970-01-01' + (i % 15000)::INTEGER AS birthday,
            ['yes', 'no', NULL][i % 3 + 1] AS email_consent,
            TIMESTAMPTZ '2025-03-01 12:00:00+00' + i * INTERVAL 1 SECOND AS modified_at
        FROM range({n}) t(i)"""
    )
    con.close()


def run_case(work: Path, db: Path, n: int, settings: SandboxSettings) -> Outcome:
    work.mkdir()
    sandbox = StampedSandbox(settings)
    with SandboxServer(sandbox) as server:
        project_file = work / "profiles.yml"
        project_file.write_text(
            yaml.safe_dump(
                {
                    "connections": {
                        "warehouse": {"type": "duckdb", "path": str(db)},
                        "dotdigital": {
                            "type": "dotdigital",
                            "username": settings.username,
                            "password": settings.password,
                            "base_url": server.base_url,
                        },
                    },
                    "state": {"url": f"sqlite:///{work}/state.db"},
                    "error_dir": str(work / "errors"),
                    "syncs": [
                        {
                            "name": "contacts",
                            "source": {"connection": "warehouse", "table": "people"},
                            "object": "profiles",
                            "identifier": "email",
                            "destination": {
                                "connection": "dotdigital",
                                "list": "Newsletter",
                                "unsubscribed_list": "Customers",
                            },
                            "default_phone_region": "US",
                            "mapping": MAPPING,
                            "consent": {"email": "email_consent"},
                        }
                    ],
                },
                sort_keys=False,
            )
        )
        project = load_project(project_file, work, env={})
        store = StateStore(project.state.url, root=work)
        start = time.perf_counter()
        result = run_sync(project, "contacts", store)
        if not sandbox.wait_idle(120):
            raise SystemExit("the sandbox did not finish its imports")
        seconds = time.perf_counter() - start
        store.close()
    if result.record.status != "success":
        raise SystemExit(f"bench run ended {result.record.status}: {result.record.message}")
    landed = len(sandbox.contacts())
    if landed != n:
        raise SystemExit(f"{landed:,} of {n:,} contacts landed")
    outcome = Outcome(landed, seconds, len(sandbox.stamps), sandbox.counters["throttled"])
    if settings.enforce_limits:
        window = settings.real_seconds(3600.0)
        starts: list[float] = []
        for t in sandbox.stamps:  # windows as the sandbox's FixedWindow keeps them
            if not starts or t - starts[-1] >= window:
                starts.append(t)
                outcome.windows.append(0)
            outcome.windows[-1] += 1
        if len(starts) > 1:
            bound = sum(outcome.windows[:-1])
            allowed = settings.dotdigital_calls_per_hour * (starts[-1] - starts[0]) / window
            outcome.share = bound / allowed
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--budget", type=int, default=15, help="calls an hour in run (b)")
    parser.add_argument(
        "--speedup", type=float, default=200.0, help="run (b): the hour lasts 3600/speedup s"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        db = work / "profiles.duckdb"
        t = time.perf_counter()
        generate(db, args.contacts)
        print(f"generated {args.contacts:,} profiles in {time.perf_counter() - t:.1f}s")

        a = run_case(
            work / "a", db, args.contacts, SandboxSettings(enforce_limits=False, speedup=1000.0)
        )
        print(
            f"(a) no limits:    {a.contacts:,} contacts in {a.seconds:.1f}s = "
            f"{a.per_second:,.0f} contacts/s, {a.calls} calls ({a.contacts / a.calls:,.0f} contacts a call)"
        )

        limited = SandboxSettings(
            enforce_limits=True, speedup=args.speedup, dotdigital_calls_per_hour=args.budget
        )
        b = run_case(work / "b", db, args.contacts, limited)
        window = limited.real_seconds(3600.0)
        print(
            f"(b) {args.budget} calls/hour, an hour = {window:.1f}s: {b.contacts:,} contacts in "
            f"{b.seconds:.1f}s = {b.per_second:,.0f} contacts/s, {b.calls} calls in "
            f"{len(b.windows)} windows {b.windows}, {b.throttled} refused (429)"
        )
        if b.share is None:
            print("    the budget never bound: raise --contacts or lower --budget")
        else:
            print(
                f"    calls made while the budget bound: {b.share:.1%} of what it allowed "
                f"(target >= 90%); {b.contacts / b.calls:,.0f} contacts a call, so "
                f"{b.contacts / b.calls * args.budget * b.share:,.0f} contacts per vendor hour"
            )
        ok = b.share is not None and b.share >= 0.9 and b.throttled == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

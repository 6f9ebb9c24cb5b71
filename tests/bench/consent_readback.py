"""`make bench`, consent read-back: what reading people's opt-outs back costs, per run.

For each destination a sandbox holds 100,000 people, served over loopback with its published
rate limits on; 1 % of them (1,000) then opt out inside the vendor (``act_as_person``). Three
read-backs follow, as three runs would make them: the first (every opt-out since the epoch),
one when nothing changed at the vendor, and one after another 1 % opted out. Then the same for
opt-ins (1 % subscribe through the vendor's form), as a run with unsubscribes to weigh asks for
them: Klaviyo a lookup of 1,000 people (its ``changed``: those subscribed), Dotdigital the
contacts modified since the last read (the first: all 100,000). Each reports the calls it made
(the sandbox's request log), its wall time and the people whose standing changed. The state store is a SQLite file, as by default. Nothing is asserted: figures only.

Run with ``PYTHONPATH=.`` from the repository root (the Makefile does); well under a minute.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PEOPLE = 100_000
SHARE = 0.01
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def email(n: int) -> str:
    return f"person{n:06d}@example.com"


def klaviyo() -> tuple[Any, Any, Any, Any]:
    from reverse_etl.destinations.klaviyo import readback
    from reverse_etl.destinations.klaviyo.client import KlaviyoClient
    from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
    from reverse_etl.sandbox import KlaviyoSandbox, SandboxSettings

    sandbox = KlaviyoSandbox(SandboxSettings())
    with sandbox.lock:
        for n in range(PEOPLE):
            sandbox.state.upsert({"email": email(n)})

    def client(base_url: str) -> Any:
        conn = KlaviyoConnection(
            type="klaviyo", api_key=sandbox.settings.api_key, base_url=base_url
        )
        return KlaviyoClient(conn)

    def opt_ins(client: Any, memory: Any) -> int:  # what a run with 1 % unsubscribes asks
        return readback.subscribed(client, [email(n) for n in range(2, PEOPLE, 100)]).num_rows

    return sandbox, client, readback.read_back, opt_ins


def dotdigital() -> tuple[Any, Any, Any, Any]:
    from reverse_etl.destinations.dotdigital import readback
    from reverse_etl.destinations.dotdigital.client import DotdigitalClient
    from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
    from reverse_etl.sandbox import DotdigitalSandbox, SandboxSettings

    sandbox = DotdigitalSandbox(SandboxSettings())
    stamp = T0.isoformat()
    with sandbox.lock:
        seen: set[tuple[str, str]] = set()
        for n in range(PEOPLE):
            row = {"matchIdentifier": "email", "identifiers": {"email": email(n)}}
            sandbox.state.import_contact(row, "overwrite", seen, stamp)

    def client(base_url: str) -> Any:
        s = sandbox.settings
        conn = DotdigitalConnection(
            type="dotdigital", username=s.username, password=s.password, base_url=base_url
        )
        return DotdigitalClient(conn)

    return sandbox, client, readback.read_back, readback.read_opt_ins


def measure(name: str, make: Any) -> None:
    from reverse_etl.consent.memory import ConsentMemory
    from reverse_etl.sandbox import SandboxServer
    from reverse_etl.state import StateStore

    sandbox, make_client, read_back, opt_ins = make()
    step = int(1 / SHARE)
    with tempfile.TemporaryDirectory() as tmp, SandboxServer(sandbox) as server:
        store = StateStore("sqlite:///state.db", root=Path(tmp))
        memory = ConsentMemory(store, f"{name}:bench")
        client = make_client(server.base_url)
        try:
            # (label, what people do at the vendor, who, what the run reads): opt-outs as
            # every run reads them, then opt-ins as a run with unsubscribes to weigh asks
            # (Klaviyo: a lookup of those 1,000 people; Dotdigital: the contacts modified since)
            stages = (
                ("first read (1 % opted out)", "unsubscribe", range(0, PEOPLE, step), read_back),
                ("nothing changed", "unsubscribe", range(0), read_back),
                ("another 1 % opted out", "unsubscribe", range(1, PEOPLE, step), read_back),
                ("opt-ins, first (1 % by form)", "subscribe", range(2, PEOPLE, step), opt_ins),
                ("opt-ins, nothing changed", "subscribe", range(0), opt_ins),
                ("opt-ins, another 1 %", "subscribe", range(3, PEOPLE, step), opt_ins),
            )
            for day, (label, action, people, read) in enumerate(stages):
                when = T0 + timedelta(days=day)  # each day's acts after the last read
                for i, n in enumerate(people):
                    sandbox.act_as_person(email(n), action, at=when + timedelta(seconds=i))
                before = len(sandbox.request_log)
                started = time.perf_counter()
                changed = read(client, memory)
                seconds = time.perf_counter() - started
                calls = len(sandbox.request_log) - before
                print(
                    f"{name:<11} {label:<28} {calls:>6} {seconds:>9.2f} {changed:>8,}",
                    flush=True,
                )
        finally:
            client.close()
            store.close()
    assert sandbox.violations == [], sandbox.violations


def main() -> int:
    print(
        f"Consent read-back: {PEOPLE:,} people a destination, {SHARE:.0%} opting out inside it "
        "between runs; sandbox with its rate limits, over loopback, SQLite state store"
    )
    print(f"{'destination':<11} {'read-back':<28} {'calls':>6} {'seconds':>9} {'changed':>8}")
    measure("klaviyo", klaviyo)
    measure("dotdigital", dotdigital)
    return 0


if __name__ == "__main__":
    sys.exit(main())

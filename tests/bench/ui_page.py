"""The run page's syncs list at scale: 200 syncs and 10,000 runs in a SQLite state store.

A generated project file (200 Klaviyo profile syncs over one view, every 4th scheduled, a
few disabled) and a store filled directly: 50 runs a sync with counts, some failed or
partial, a few syncs running (locked), a few retry queues. ``reverse-etl ui`` is started as
a user starts it, on a free loopback port, and ``GET /`` is timed over HTTP (after a warm-up);
the median, min and max are printed. The list reads in a fixed number of queries whatever the
number of syncs (``reverse_etl/ui/views.py``). Target: median under 300 ms.

    PYTHONPATH=. .venv/bin/python tests/bench/ui_page.py [--syncs 200] [--runs 10000] [--n 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa
import yaml

from reverse_etl import controls
from reverse_etl.state import StateStore, locks, now, retry_queue, runs

STATUSES = ("success",) * 7 + ("partial", "failed", "success")


def write_project(root: Path, syncs: int) -> list[str]:
    names = [f"sync_{i:03d}" for i in range(syncs)]
    entries = [
        {
            "name": name,
            "source": {"connection": "warehouse", "table": "people"},
            "object": "profiles",
            "identifier": "email",
            "cursor": "modified_at",
            "destination": {"connection": "klaviyo", "list": f"List {i % 17}"},
            "mapping": {"email": "email", "first_name": "first_name", "phone": "phone_number"},
            "default_phone_region": "US",
            **({"schedule": "hourly"} if i % 4 == 0 else {}),
        }
        for i, name in enumerate(names)
    ]
    project = {
        "connections": {
            "warehouse": {"type": "duckdb", "path": "warehouse.duckdb"},
            "klaviyo": {
                "type": "klaviyo",
                "api_key": "{{ env_var('BENCH_KLAVIYO', 'pk_bench_0000') }}",
            },
        },
        "state": {"url": "sqlite:///state/state.db"},
        "syncs": entries,
    }
    (root / "profiles").mkdir(parents=True)
    (root / "profiles" / "profiles.yml").write_text(yaml.safe_dump(project, sort_keys=False))
    return names


def fill(store: StateStore, names: list[str], total: int) -> None:
    t0 = now() - timedelta(days=60)
    per = max(total // len(names), 1)
    rows = []
    for i, name in enumerate(names):
        for k in range(per):
            started = t0 + timedelta(hours=k, minutes=i % 60)
            status = STATUSES[(i + k) % len(STATUSES)]
            rows.append(
                {
                    "run_id": f"{started:%Y%m%dT%H%M%S}-{i:03d}{k:04d}",
                    "sync": name,
                    "started_at": started,
                    "ended_at": started + timedelta(seconds=30 + k % 50),
                    "status": status,
                    "full_refresh": False,
                    "read": 1000 + k,
                    "sent": 990 + k if status != "failed" else 0,
                    "created": 10,
                    "updated": 980 + k if status != "failed" else 0,
                    "rejected": 10 if status != "failed" else 0,
                    "failed": 0,
                    "unchanged": 0,
                    "removed": 0,
                    "consent_held": 0,
                    "known_problems": 8,
                    "new_problems": 2 if status == "partial" else 0,
                    "error_file": f"/tmp/errors/{name}/{k}.csv",
                    "message": "fail_on crossed" if status != "success" else None,
                }
            )
    with store.engine.begin() as con:
        con.execute(sa.insert(runs), rows)
        con.execute(
            sa.insert(locks),
            [
                {
                    "sync": n,
                    "run_id": "live",
                    "owner": "bench:1",
                    "acquired_at": now(),
                    "heartbeat_at": now(),
                }
                for n in names[::40]
            ],
        )
        con.execute(
            sa.insert(retry_queue),
            [
                {"sync": n, "identifier": f"id{j}", "reason": "contact_missing", "attempts": 1,
                 "first_queued_at": now(), "last_run": "x"}
                for n in names[::25] for j in range(30)
            ],
        )  # fmt: skip
    for name in names[::10]:
        controls.set_enabled(store, name, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syncs", type=int, default=200)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=30, help="timed requests")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="retl-ui-bench-") as tmp:
        root = Path(tmp)
        names = write_project(root, args.syncs)
        store = StateStore("sqlite:///state/state.db", root=root)
        fill(store, names, args.runs)
        store.close()
        proc = subprocess.Popen(
            [sys.executable, "-c", "from reverse_etl.cli import main; main()",
             "--project-dir", str(root), "ui", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=root,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().split()[2]
            with httpx.Client(timeout=60) as client:
                for _ in range(3):  # warm-up: project parsed, store opened, templates compiled
                    first = client.get(url)
                    assert first.status_code == 200, first.text[:500]
                assert first.text.count("<tr data-sync=") == args.syncs
                times = []
                for _ in range(args.n):
                    start = time.perf_counter()
                    client.get(url).raise_for_status()
                    times.append((time.perf_counter() - start) * 1000)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(
        f"ui syncs list, {args.syncs} syncs, {args.runs:,} runs (SQLite), {args.n} requests over "
        f"HTTP: median {statistics.median(times):.1f} ms, min {min(times):.1f}, "
        f"max {max(times):.1f}, page {len(first.content) / 1024:.0f} KiB (target < 300 ms)"
    )


if __name__ == "__main__":
    main()

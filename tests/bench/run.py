"""`make bench`: extract + transform throughput and peak memory on a generated profile view.

Each size runs in a fresh subprocess so its peak RSS is its own. The pipeline is the one a
run uses (DuckDB source → incremental query → Transformer → Klaviyo payload building), with
nothing sent: the figure is what the engine can feed an API.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THREADS = int(os.environ.get("BENCH_DUCKDB_THREADS", "1"))
sys.path.insert(0, str(ROOT))

from tests.bench.common import PROFILE_MAPPING, unsent  # noqa: E402

PROJECT = """
connections:
  wh: {{type: duckdb, path: {db}, memory_limit: {mem}, threads: {threads}}}
  klaviyo: {{type: klaviyo, api_key: bench-key, base_url: "http://127.0.0.1:9"}}
syncs:
  - name: bench
    source: {{connection: wh, sql: view.sql}}
    object: profiles
    identifier: email
    destination: {{connection: klaviyo, list: Bench}}
    batch_size: {batch}
{mapping}"""


def measure(db: str, rows: int, batch: int, mem: str) -> dict[str, float]:
    """Runs in the child: a real run of the engine over the first ``rows`` rows, with the
    Klaviyo destination's payloads built and counted but not sent."""
    from reverse_etl.config import load_project
    from reverse_etl.engine import run_sync
    from reverse_etl.state import StateStore
    from reverse_etl.util.runtime import tune_memory

    tune_memory()  # as the CLI does
    work = Path(tempfile.mkdtemp())
    (work / "view.sql").write_text(f"SELECT * FROM bench.profiles WHERE row_id < {rows}")
    (work / "p.yml").write_text(
        PROJECT.format(db=db, batch=batch, mem=mem, threads=THREADS, mapping=PROFILE_MAPPING)
    )
    project = load_project(work / "p.yml", work)
    totals = {"requests": 0, "bytes": 0}
    store = StateStore(f"sqlite:///{work}/state.db")
    start = time.perf_counter()
    result = run_sync(project, "bench", store, destination_factory=unsent(totals))
    seconds = time.perf_counter() - start
    if result.record.status == "failed":
        raise SystemExit(f"bench run failed: {result.record.message}")
    counts = result.record.counts
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": counts.read,
        "valid": counts.sent,
        "requests": totals["requests"],
        "payload_mb": totals["bytes"] / 1e6,
        "seconds": seconds,
        "rows_per_s": counts.read / seconds,
        "peak_rss_mb": peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--memory-limit", default="64MB", help="DuckDB memory_limit of the source")
    parser.add_argument("--child", nargs=2, metavar=("DB", "ROWS"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.batch, args.memory_limit)))
        return
    import duckdb

    from reverse_etl.demo.generate import generate_profile_rows

    sizes = [int(s) for s in args.sizes.split(",")]
    cache = ROOT / ".reverse_etl" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    db = cache / f"profiles_{max(sizes)}.duckdb"
    if not db.exists():
        t = time.perf_counter()
        con = duckdb.connect(str(db))
        generate_profile_rows(con, "bench.profiles_raw", max(sizes))
        con.execute(
            "CREATE TABLE bench.profiles AS SELECT row_number() OVER () - 1 AS row_id, * FROM bench.profiles_raw"
        )
        con.execute("DROP TABLE bench.profiles_raw")
        con.close()
        print(f"generated {max(sizes):,} rows in {time.perf_counter() - t:.1f}s -> {db}")
    print(
        f"extract + transform + Klaviyo payloads (nothing sent), batch {args.batch:,}, "
        f"DuckDB memory_limit {args.memory_limit}"
    )
    print(
        f"{'rows':>10} {'valid':>10} {'seconds':>8} {'rows/s':>10} {'peak RSS MB':>12} {'payload MB':>11}"
    )
    for size in sizes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(db),
                str(size),
                "--batch",
                str(args.batch),
                "--memory-limit",
                args.memory_limit,
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['rows']:>10,} {r['valid']:>10,} {r['seconds']:>8.2f} {r['rows_per_s']:>10,.0f} "
            f"{r['peak_rss_mb']:>12.0f} {r['payload_mb']:>11.1f}"
        )


if __name__ == "__main__":
    main()

"""Issue 18, measure first: what a user gets from ``reverse-etl run`` on a large profile view.

The CLI itself (``.venv/bin/reverse-etl run bench``), default settings, a separate process in a
temporary project: a Klaviyo profiles sync (the benchmarks' mapping, ``common.PROFILE_MAPPING``)
of the generated profile view (``bench.profiles``, the demo generator's dirty rows, one cached
DuckDB file per size under ``.reverse_etl/bench/``, made by ``snapshot_diff.warehouse``: 10M is
generated once and kept) to ``klaviyo_sink.py`` served on 127.0.0.1 by this process (list
lookup, bulk import, job poll answered at once; the few other calls a run makes, such as a
consent read-back, get an empty answer). Nothing in the connection profiles sets
``memory_limit``, ``threads`` or ``batch_size``: the defaults a user gets.

Per size: the child's wall time (process start to exit, imports included) and the run's own
duration (the run record's), rows/s on each, and the child's peak RSS (``os.wait4``'s
``ru_maxrss``). Then an incremental run after the first, over a copy of the view where 1 % of
the rows changed (``snapshot_diff.change_sql``: a value and ``modified_at`` moved past the
watermark), as a share of the first run's time; then the next such run over another 1 % (the
steady state of an hourly schedule: the first incremental also forgets the full run's
problems of rows it did not read again, once).

Last, Klaviyo's ceiling per bulk endpoint at its published steady rate (``api_ceilings``):
a real run goes no faster than that, so the engine's rows/s is judged against it.

``--py-spy SIZE`` records one first run of that size under ``py-spy record -f raw --threads
--subprocesses`` and prints, per thread (main, read-ahead), the share of its samples per stage
(read, snapshot diff, transform, request bodies, HTTP, state store, other; a sample goes to the
stage of the innermost frame a rule matches, see ``STAGES``) and its 15 hottest frames by
inclusive samples. py-spy counts only samples where the thread was running (not idle).

``--explain SIZE`` prints DuckDB's ``EXPLAIN ANALYZE`` of the first run's read query
(``extract.build_query``, as the engine builds it for this sync with no watermark).

Run: ``PYTHONPATH=. .venv/bin/python tests/bench/cli_end_to_end.py --sizes 100000,1000000
--py-spy 1000000 --explain 1000000`` (about five minutes on 2 cores; 10M takes longer).
Nothing is asserted: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.common import PROFILE_MAPPING  # noqa: E402
from tests.bench.snapshot_diff import change_sql, variant, warehouse  # noqa: E402

BIN = ROOT / ".venv" / "bin"
SYNC = "bench"
PROJECT = """
connections:
  wh: {{type: duckdb, path: "{db}"}}
  klaviyo: {{type: klaviyo, api_key: "{{{{ env_var('BENCH_KLAVIYO_KEY') }}}}", base_url: "{url}"}}
syncs:
  - name: bench
    source: {{connection: wh, sql: sql/view.sql}}
    object: profiles
    identifier: email
    cursor: modified_at
    destination: {{connection: klaviyo, list: Bench}}
{mapping}"""
VIEW = "SELECT * FROM bench.profiles\n"

# (stage, regex over a py-spy frame "function (file:line)"): the innermost frame of a sample
# that a rule matches names its stage; rules are tried in this order at each frame.
STAGES: list[tuple[str, re.Pattern[str]]] = [
    ("HTTP", re.compile(r"[(/](httpx|httpcore|h11|anyio|ssl|socket|selectors)[/.]")),
    ("state store", re.compile(r"reverse_etl/state\.py|/sqlalchemy/|/sqlite3/")),
    ("snapshot diff", re.compile(r"reverse_etl/snapshot/")),
    ("transform", re.compile(r"reverse_etl/transform/")),
    ("read", re.compile(r"reverse_etl/sources/|reverse_etl/extract\.py")),
    ("request bodies", re.compile(r"reverse_etl/destinations/")),
]


# --------------------------------------------------------------------------- the sink


def sink_app() -> Any:
    """``klaviyo_sink.sink_app`` plus an empty JSON:API answer to any other call (a consent
    read-back, a lookup), so the run does not fail on a call the sink does not model."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.bench.klaviyo_sink import JSONAPI
    from tests.bench.klaviyo_sink import sink_app as base

    app = base()
    other: Counter[str] = Counter()

    async def anything(request: Request) -> Response:
        other[f"{request.method} {request.url.path}"] += 1
        return Response(b'{"data":[],"links":{"next":null}}', media_type=JSONAPI)

    app.router.routes.append(
        Route("/{path:path}", anything, methods=["GET", "POST", "PATCH", "DELETE"])
    )
    app.state.other = other
    return app


@contextmanager
def serving() -> Iterator[tuple[str, Any]]:
    """The sink in a thread of this process (which only waits for the child meanwhile)."""
    from reverse_etl.sandbox import SandboxServer

    app = sink_app()
    with SandboxServer(app) as server:
        yield server.base_url, app.state.other


# --------------------------------------------------------------------------- one CLI run


@dataclass
class Run:
    wall: float  # process start to exit
    duration: float  # the run record's (run start to finish)
    read: int
    sent: int
    peak_mb: float
    status: str


def project(work: Path, db: Path, url: str, *, consent: bool = True) -> Path:
    """``consent=False``: the mapping without its ``consent:`` block, to tell the engine's
    cost from the consent calls' (read-back lookups, subscription jobs)."""
    (work / "sql").mkdir(parents=True, exist_ok=True)
    (work / "profiles").mkdir(exist_ok=True)
    (work / "sql" / "view.sql").write_text(VIEW)
    mapping = PROFILE_MAPPING if consent else PROFILE_MAPPING.split("    consent:")[0]
    (work / "profiles" / "profiles.yml").write_text(PROJECT.format(db=db, url=url, mapping=mapping))
    return work


def point_at(work: Path, db: Path) -> None:
    """The project's warehouse swapped for another file (the 1 %-changed copy)."""
    yml = work / "profiles" / "profiles.yml"
    yml.write_text(re.sub(r'path: "[^"]*"', f'path: "{db}"', yml.read_text(), count=1))


def last_run(work: Path) -> dict[str, Any]:
    """The newest run record of the sync, from the project's SQLite state store."""
    con = sqlite3.connect(work / ".reverse_etl" / "state.db")
    try:
        con.row_factory = sqlite3.Row
        row = con.execute("SELECT * FROM retl_runs ORDER BY started_at DESC LIMIT 1").fetchone()
        return dict(row)
    finally:
        con.close()


VENDOR_SPEEDUP = 1000.0  # vendor time (Klaviyo's rate limits, job polls) compressed this much


def launch() -> int:
    """``--cli ARGS``: the CLI's own ``main`` in this process, with Klaviyo's vendor time
    compressed: the client's rate limiters refill ``VENDOR_SPEEDUP`` times faster and jobs are
    first polled that much sooner (what ``klaviyo_sandbox.py`` does in-process). The engine,
    its settings and the CLI are untouched; without this the run measures Klaviyo's published
    limits (bulk imports at 150/min steady), not the engine."""
    from reverse_etl.cli import main as cli_main
    from reverse_etl.destinations.klaviyo.destination import KlaviyoBase

    KlaviyoBase.client_speedup = VENDOR_SPEEDUP
    KlaviyoBase.poll_interval = KlaviyoBase.poll_interval / VENDOR_SPEEDUP
    sys.argv = ["reverse-etl", *sys.argv[sys.argv.index("--cli") + 1 :]]
    cli_main()
    return 0


def cli_run(
    work: Path,
    *,
    prefix: list[str] | None = None,
    args: tuple[str, ...] = (),
    real_vendor_time: bool = False,
) -> Run:
    if real_vendor_time:
        cli = [str(BIN / "reverse-etl")]
    else:
        cli = [str(BIN / "python"), str(Path(__file__).resolve()), "--cli"]
    cmd = [*(prefix or []), *cli, "run", SYNC, *args]
    env = {**os.environ, "BENCH_KLAVIYO_KEY": "pk_bench", "PYTHONPATH": str(ROOT)}
    out, err = work / "cli.out", work / "cli.err"
    with open(out, "w") as o, open(err, "w") as e:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=work)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    rec = last_run(work) if (work / ".reverse_etl" / "state.db").exists() else {}
    # exit 1 with a "partial" run: the generated rows are dirty on purpose, so the default
    # fail_on policy flags the run; every row was still read, sent or rejected
    if code != 0 and not (code == 1 and rec.get("status") == "partial"):
        raise SystemExit(f"`{' '.join(cmd)}` exited {code}:\n{err.read_text()[-3000:]}")
    return Run(
        wall=wall,
        duration=_duration(rec),
        read=_count(rec, "read"),
        sent=_count(rec, "sent"),
        peak_mb=usage.ru_maxrss / 1024,
        status=str(rec.get("status")),
    )


def _duration(rec: dict[str, Any]) -> float:
    from datetime import datetime

    start, end = rec.get("started_at"), rec.get("ended_at")
    if not start or not end:
        return float("nan")
    return (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()


def _count(rec: dict[str, Any], name: str) -> int:
    if name in rec and rec[name] is not None:
        return int(rec[name])
    counts = rec.get("counts")
    if isinstance(counts, str):
        return int(json.loads(counts).get(name, 0))
    return -1


# --------------------------------------------------------------------------- py-spy


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for name, rule in STAGES:
            if rule.search(frame):
                return name
    return "other"


def profile(work: Path, size: int) -> None:
    """A first run under py-spy; per thread, the stage shares and the hottest frames."""
    raw = work / f"pyspy_{size}.txt"
    prefix = [str(BIN / "py-spy"), "record", "-r", "200", "--threads", "--subprocesses"]
    prefix += ["-f", "raw", "-o", str(raw), "--"]
    run = cli_run(work, prefix=prefix)
    print(f"\npy-spy, first run of {size:,} rows (200 Hz, {run.wall:.1f}s wall under py-spy)")
    report_stacks(raw)


def report_stacks(raw: Path) -> None:
    """Per thread of a py-spy raw file: the share of its samples per stage, the hottest frames."""
    print(raw)
    threads: dict[str, Counter[str]] = {}
    inclusive: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        # the first frame is the process, the second the thread: "thread (0x...): name"
        head = [f for f in frames[:3] if f.startswith("thread ")]
        thread = head[0].partition(": ")[2] if head else "?"
        body = frames[frames.index(head[0]) + 1 :] if head else frames
        n = int(count)
        totals[thread] += n
        threads.setdefault(thread, Counter())[stage_of(body)] += n
        seen = set()
        for f in body:
            if f not in seen:
                seen.add(f)
                inclusive.setdefault(thread, Counter())[f] += n
    for thread, n in totals.most_common():
        if n < totals.most_common(1)[0][1] * 0.02:
            continue  # a thread that barely ran (heartbeat, the sink's pool)
        print(f"\n[{thread}] {n:,} samples ({n / 200:.1f}s running); share per stage:")
        for stage, k in threads[thread].most_common():
            print(f"  {k / n:>6.1%}  {stage}")
        print("  top 15 frames by inclusive samples:")
        for frame, k in inclusive[thread].most_common(15):
            print(f"  {k / n:>6.1%}  {frame[:150]}")


# --------------------------------------------------------------------------- EXPLAIN ANALYZE


def explain(db: Path) -> None:
    """The first run's read query as ``extract.build_query`` makes it, under EXPLAIN ANALYZE,
    with the DuckDB source's default settings."""
    import duckdb

    from reverse_etl.extract import build_query
    from reverse_etl.sources.duckdb import DIALECT, DuckDBSource

    src = DuckDBSource(db)  # the connection a default profile opens
    q = build_query(
        VIEW,
        DIALECT,
        cursor="modified_at",
        identifier="email",
        email_identifier=True,
        watermark=None,
        lookback=__import__("datetime").timedelta(0),
    )
    con: duckdb.DuckDBPyConnection = src._con
    print(f"\nthe read query (no watermark):\n{q.sql}\n")
    con.execute("PRAGMA enable_profiling = 'no_output'")
    t = time.perf_counter()
    plan = con.execute("EXPLAIN ANALYZE " + q.sql, q.params).fetchall()
    print(f"EXPLAIN ANALYZE ({time.perf_counter() - t:.2f}s):")
    print(plan[0][1])
    src.close()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--py-spy", type=int, metavar="SIZE", help="profile a first run")
    parser.add_argument("--explain", type=int, metavar="SIZE", help="EXPLAIN ANALYZE the read")
    parser.add_argument("--no-incremental", action="store_true")
    parser.add_argument(
        "--no-consent", action="store_true", help="the mapping without consent: the engine alone"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--real-vendor-time",
        action="store_true",
        help="run .venv/bin/reverse-etl as is: Klaviyo's published rate limits and poll waits",
    )
    parser.add_argument("--stacks", type=Path, help="only report an earlier py-spy raw file")
    parser.add_argument("--cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cli is not None:
        return launch()
    if args.stacks:
        report_stacks(args.stacks)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="cli_bench_"))
    print(
        "CLI end to end: `reverse-etl run` (default settings, own process) of a Klaviyo "
        "profiles sync, DuckDB view -> klaviyo_sink on 127.0.0.1. wall: process start to "
        "exit; run: the run record's duration; peak MB: the child's ru_maxrss"
    )
    head = (
        f"{'run':<28} {'read':>10} {'sent':>10} {'wall s':>7} {'run s':>7} "
        f"{'rows/s wall':>11} {'rows/s run':>10} {'peak MB':>8} {'vs 1st':>7}"
    )
    try:
        with serving() as (url, other):
            print(head)
            for size in sizes:
                db = warehouse(size)
                work = project(tmp / f"r{size}", db, url, consent=not args.no_consent)
                first = cli_run(work, real_vendor_time=args.real_vendor_time)
                _row(f"{size:,} first run", first, None)
                if not args.no_incremental:
                    changed = variant(db, tmp / f"changed_{size}.duckdb", change_sql(100))
                    point_at(work, changed)
                    again = cli_run(work, real_vendor_time=args.real_vendor_time)
                    _row(f"{size:,} 1% changed, incr.", again, first)
                    # the next hour's run: the first incremental also forgot the problems of
                    # the full run's rows it did not read again (a one-off cost)
                    later = variant(changed, tmp / f"later_{size}.duckdb", change_sql(100, 13))
                    point_at(work, later)
                    steady = cli_run(work, real_vendor_time=args.real_vendor_time)
                    _row(f"{size:,} 1% more, next incr.", steady, first)
                    changed.unlink()
                    later.unlink()
                if args.py_spy == size:
                    shutil.rmtree(work / ".reverse_etl")
                    point_at(work, db)
                    profile(work, size)
                    print(head)
            if other:
                print(f"other calls answered empty by the sink: {dict(other)}")
        print(api_ceilings())
        if args.explain:
            explain(warehouse(args.explain))
    finally:
        if args.keep:
            print(f"work folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def api_ceilings() -> str:
    """What Klaviyo's published rate limits let any client send, from the client's own table
    (``LIMITS``, ``PACE``, the per-call maxima): the figure the engine's rows/s must stay
    above for the API, not the engine, to set a real run's pace."""
    from reverse_etl.destinations.klaviyo import client as k

    per_call = {
        "bulk_import_profiles": k.MAX_PROFILES_PER_JOB,
        "bulk_subscribe_profiles": k.MAX_SUBSCRIBE,
        "bulk_unsubscribe_profiles": k.MAX_UNSUBSCRIBE,
        "bulk_create_events": k.MAX_EVENTS,
    }
    lines = ["Klaviyo's ceilings at its published steady rates (x PACE), rows/s:"]
    for op, rows in per_call.items():
        calls_per_minute = k.LIMITS[op][1] * k.PACE
        lines.append(f"  {op:<28} {calls_per_minute * rows / 60:>10,.0f}")
    return "\n".join(lines)


def _row(label: str, r: Run, first: Run | None) -> None:
    share = f"{r.wall / first.wall:>7.1%}" if first else f"{'':>7}"
    print(
        f"{label:<28} {r.read:>10,} {r.sent:>10,} {r.wall:>7.2f} {r.duration:>7.2f} "
        f"{r.read / r.wall:>11,.0f} {r.read / r.duration:>10,.0f} {r.peak_mb:>8.0f} {share}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())

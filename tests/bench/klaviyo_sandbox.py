"""`make bench`, Klaviyo part: real profile syncs (engine, client, destination) over loopback,
the server in its own process so it does not share the client's GIL. The view is 200,000
profiles from the demo generator (dirty on purpose: some rows are rejected, some phone numbers
shared) with the demo's mapping, email consent with its time and SMS consent.

Reference: the same run with every request body built and none sent (extract + transform +
JSON), after one warm-up run. The issue's target compares sync throughput with it.

(a) Throughput, limits off (no limits served; client limiters at speedup 1000), profiles/s =
    rows read / wall time of the run, from the first read to the last batch acknowledged (its
    import jobs complete and its consent sent):

    * against a sink (``klaviyo_sink.py``: answers list lookup, import and poll, keeps
      nothing): what the client sustains, the figure the 80 % target is about;
    * against the sandbox, which checks every request against the spec and applies every
      profile (~15 µs of Python a profile, more than the engine spends producing it): on two
      cores the sandbox then sets the pace, so its CPU per profile is printed beside the rate;
    * the same with consent (subscribe calls of 1,000 and unsubscribes of 100 profiles,
      costlier still for the sandbox).

(b) Pacing, published limits enforced: sandbox and client at the same speedup (default 30:
    a vendor minute lasts two real seconds), import jobs of 100 profiles so that the run
    makes 2,000 import requests (at 10,000 a job it would be 20, all inside the initial
    burst) and is bound by the limits, not by the data. The share printed is

        import requests sent / import requests the limits allow over the same span
        allowed(V) = min(10 + 10·V, 150 + 2.5·V)      V = vendor seconds = real seconds × speedup

    with the span from the first to the last import request: ``bulk_import_profiles`` is
    published at 10/s burst and 150/min steady, each a token bucket that starts full (10 and
    150 calls) and refills at its rate, and a call needs a token from both. The client paces
    at 97 % of the published rates (``client.PACE``), so 97 % is the most it aims for; a 429
    would cost a whole ``Retry-After`` second. At speedup 60 (150 imports/s real) this 2-core
    machine cannot feed the client: the share then measures CPU, not pacing (about 55 %);
    ``--speedup 60`` shows it.

Run: ``.venv/bin/python tests/bench/klaviyo_sandbox.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.common import PROFILE_MAPPING, unsent  # noqa: E402

PROFILES = 200_000
FAST_SPEEDUP = 1000.0
BURST, BURST_RATE = 10.0, 10.0  # bulk_import_profiles: 10/s ...
STEADY, STEADY_RATE = 150.0, 150.0 / 60.0  # ... and 150/min

PROJECT = """
connections:
  wh: {{type: duckdb, path: "{db}"}}
  klaviyo: {{type: klaviyo, api_key: "{key}", base_url: "{url}"}}
state: {{url: "sqlite:///{work}/state.db"}}
error_dir: "{work}/errors"
syncs:
  - name: bench
    source: {{connection: wh, table: bench.profiles}}
    object: profiles
    identifier: email
    destination: {{connection: klaviyo, list: Bench}}
    batch_size: {batch}
{mapping}"""


# --------------------------------------------------------------------------- the sandbox process


def _serve(settings: dict[str, Any], pipe: Connection) -> None:
    from reverse_etl.sandbox import KlaviyoSandbox, SandboxServer, SandboxSettings
    from reverse_etl.sandbox.server import tune_gc

    if settings.pop("sink", False):
        from tests.bench.klaviyo_sink import sink_app

        with SandboxServer(sink_app()) as server:
            cpu = time.process_time()
            pipe.send((server.base_url, "sink-key"))
            pipe.recv()
            pipe.send({"cpu_seconds": time.process_time() - cpu})
        return
    sandbox = KlaviyoSandbox(SandboxSettings(**settings))
    tune_gc()  # as ``python -m reverse_etl.sandbox`` does
    with SandboxServer(sandbox) as server:
        cpu = time.process_time()
        pipe.send((server.base_url, sandbox.settings.api_key))
        pipe.recv()  # the run is over
        idle = sandbox.wait_idle(120)
        cpu = time.process_time() - cpu
        pipe.send(
            {
                "idle": idle,
                "profiles": len(sandbox.profiles()),
                "subscriptions": len(sandbox.subscriptions()),
                "violations": len(sandbox.violations),
                "internal_errors": len(sandbox.internal_errors),
                "status_429": sandbox.counters["status_429"],
                "cpu_seconds": cpu,
            }
        )


@dataclass
class Served:
    url: str
    key: str
    stats: dict[str, Any] = field(default_factory=dict)


@contextmanager
def sandbox_process(**settings: Any) -> Iterator[Served]:
    """A Klaviyo sandbox (or, with ``sink=True``, the sink) in a child process; its figures
    land in ``stats`` on exit."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(settings, theirs), daemon=True)
    proc.start()
    served = Served(*ours.recv())
    try:
        yield served
    finally:
        ours.send("stop")
        if ours.poll(180):
            served.stats = ours.recv()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    seconds: float
    cpu_seconds: float  # this process: engine, client, HTTP
    counts: Any
    imports: list[float]  # monotonic time each import request was sent
    client_429: int


def run(
    db: Path,
    served: Served | None,
    *,
    batch: int,
    speedup: float,
    job: int | None = None,
    consent: bool = True,
) -> Run:
    """One real sync run (``run_sync``) against ``served``, import requests timed; with no
    ``served``, the same run with every request built and none sent (the reference)."""
    from reverse_etl.config import load_project
    from reverse_etl.destinations.klaviyo.profiles import KlaviyoProfiles
    from reverse_etl.engine import run_sync
    from reverse_etl.state import StateStore

    work = Path(tempfile.mkdtemp(prefix="klaviyo-bench-"))
    key, url = (served.key, served.url) if served else ("unsent", "http://127.0.0.1:9")
    text = PROJECT.format(db=db, key=key, url=url, work=work, batch=batch, mapping=PROFILE_MAPPING)
    if not consent:
        text = re.sub(r"\n    consent:\n(      .*\n)+", "\n", text)
    (work / "p.yml").write_text(text)
    project = load_project(work / "p.yml", work)
    imports: list[float] = []
    made: list[KlaviyoProfiles] = []

    def destination(project: Any, sync: Any) -> KlaviyoProfiles:
        dest = KlaviyoProfiles(project.connections["klaviyo"], sync, speedup=speedup)
        dest.poll_interval = KlaviyoProfiles.poll_interval / speedup  # vendor time too
        if job:
            dest.profiles_per_job = job
        call = dest.client.call

        def timed(op: str, *args: Any, **kwargs: Any) -> Any:
            if op == "bulk_import_profiles":
                imports.append(time.monotonic())
            return call(op, *args, **kwargs)

        dest.client.call = timed  # type: ignore[method-assign]
        made.append(dest)
        return dest

    store = StateStore(project.state.url, root=work)
    start, cpu = time.perf_counter(), time.process_time()
    factory = destination if served else unsent({})
    result = run_sync(project, "bench", store, destination_factory=factory)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    store.close()
    if result.record.status == "failed":
        raise SystemExit(f"bench run failed: {result.record.message}")
    throttled = made[0].client.api.throttled if made else 0
    return Run(seconds, cpu, result.record.counts, imports, throttled)


def allowed(vendor_seconds: float) -> float:
    """Import calls the published limits allow in ``vendor_seconds``, from full buckets."""
    return min(BURST + BURST_RATE * vendor_seconds, STEADY + STEADY_RATE * vendor_seconds)


def warehouse(profiles: int = PROFILES) -> Path:
    import duckdb

    from reverse_etl.demo.generate import generate_profile_rows

    cache = ROOT / ".reverse_etl" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    db = cache / f"klaviyo_profiles_{profiles}.duckdb"
    if not db.exists():
        con = duckdb.connect(str(db))
        generate_profile_rows(con, "bench.profiles", profiles)
        con.close()
    return db


# --------------------------------------------------------------------------- main


def reference(db: Path) -> float:
    run(db, None, batch=20_000, speedup=FAST_SPEEDUP, consent=False)  # warm: imports, page cache
    r = run(db, None, batch=20_000, speedup=FAST_SPEEDUP, consent=False)
    rate = r.counts.read / r.seconds
    print(
        f"reference, nothing sent: {rate:>7,.0f} rows/s ({r.counts.read:,} rows in "
        f"{r.seconds:.2f} s, {r.cpu_seconds:.1f} s CPU): extract + transform + request bodies"
    )
    return rate


def client_only(db: Path, ref: float) -> float:
    with sandbox_process(sink=True) as served:
        r = run(db, served, batch=20_000, speedup=FAST_SPEEDUP, consent=False)
    rate = r.counts.read / r.seconds
    print(
        f"(a) limits off, a sink    : {rate:>7,.0f} profiles/s = {rate / ref:.0%} of the "
        f"reference (target >= 80%); client {r.cpu_seconds:.1f} s CPU, sink "
        f"{served.stats.get('cpu_seconds', 0):.1f} s CPU"
    )
    return rate / ref


def throughput(db: Path, consent: bool, ref: float) -> None:
    with sandbox_process(enforce_limits=False, speedup=FAST_SPEEDUP, validate=True) as served:
        r = run(db, served, batch=20_000, speedup=FAST_SPEEDUP, consent=consent)
    c, s = r.counts, served.stats
    what = "with consent" if consent else "profiles    "
    cpu = s.get("cpu_seconds", 0)
    share = "" if consent else f" = {c.read / r.seconds / ref:.0%} of the reference"
    print(
        f"(a) limits off, {what}: {c.read / r.seconds:>7,.0f} profiles/s{share} "
        f"({c.read:,} rows in {r.seconds:.1f} s; "
        f"{c.sent:,} sent: {c.updated:,} landed, {c.failed:,} failed; {c.rejected:,} rejected); "
        f"client {r.cpu_seconds:.1f} s CPU, sandbox {cpu:.1f} s CPU "
        f"({cpu / max(c.sent, 1) * 1e6:.1f} µs a profile); sandbox holds {s.get('profiles', 0):,} "
        f"profiles, {s.get('subscriptions', 0):,} subscriptions; {s.get('violations', '?')} "
        "violations"
    )


def pacing(db: Path, speedup: float) -> float:
    with sandbox_process(enforce_limits=True, speedup=speedup, validate=True) as served:
        r = run(db, served, batch=2_000, speedup=speedup, job=100)
    s = served.stats
    n = len(r.imports)
    span = r.imports[-1] - r.imports[0] if n > 1 else 0.0
    vendor = span * speedup
    share = n / allowed(vendor) if vendor else 0.0
    print(
        f"(b) limits on, speedup {speedup:g}: {n:,} import requests over {span:.1f} s real = "
        f"{vendor:,.0f} s vendor ({n / vendor * 60 if vendor else 0:.1f}/min); the limits allow "
        f"{allowed(vendor):,.0f}: share {share:.1%}; 429 answers {s.get('status_429', '?')}, "
        f"{s.get('violations', '?')} violations; run {r.seconds:.1f} s"
    )
    return share


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speedup", type=float, default=30.0, help="for (b), default 30")
    args = parser.parse_args(argv)
    db = warehouse()
    print(f"Klaviyo: {PROFILES:,} generated profiles (DuckDB), batches of 20,000")
    ref = reference(db)
    client_only(db, ref)
    throughput(db, consent=False, ref=ref)
    throughput(db, consent=True, ref=ref)
    pacing(db, args.speedup)


if __name__ == "__main__":
    main()

"""`make bench`, Klaviyo part: real profile syncs (engine, client, destination) against the
Klaviyo sandbox over loopback, the sandbox in its own process so it does not share the
client's GIL. The view is 200,000 profiles from the demo generator (dirty on purpose: some
rows are rejected, some phone numbers shared) with the demo's mapping, email consent with
its time and SMS consent; the sandbox checks every request against the spec.

(a) Throughput, limits off (sandbox limits not enforced; client limiters at speedup 1000):
    profiles/s = rows read / wall time of the run, from the first read to the last batch
    acknowledged (its import jobs completed and its consent sent). Run once with consent and
    once without, as the consent calls (100 profiles an unsubscribe) cost the sandbox more
    than the imports.

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

from tests.bench.profile_mapping import PROFILE_MAPPING  # noqa: E402

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

    sandbox = KlaviyoSandbox(SandboxSettings(**settings))
    cpu = time.process_time()
    with SandboxServer(sandbox) as server:
        pipe.send((server.base_url, sandbox.settings.api_key))
        pipe.recv()  # the run is over
        idle = sandbox.wait_idle(120)
        pipe.send(
            {
                "idle": idle,
                "profiles": len(sandbox.profiles()),
                "subscriptions": len(sandbox.subscriptions()),
                "violations": len(sandbox.violations),
                "internal_errors": len(sandbox.internal_errors),
                "status_429": sandbox.counters["status_429"],
                "cpu_seconds": time.process_time() - cpu,
            }
        )


@dataclass
class Served:
    url: str
    key: str
    stats: dict[str, Any] = field(default_factory=dict)


@contextmanager
def sandbox_process(**settings: Any) -> Iterator[Served]:
    """A Klaviyo sandbox in a child process; its figures land in ``stats`` on exit."""
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
    counts: Any
    imports: list[float]  # monotonic time each import request was sent
    client_429: int


def run(
    db: Path,
    served: Served,
    *,
    batch: int,
    speedup: float,
    job: int | None = None,
    consent: bool = True,
) -> Run:
    """One real sync run (``run_sync``) against ``served``, import requests timed."""
    from reverse_etl.config import load_project
    from reverse_etl.destinations.klaviyo.profiles import KlaviyoDestination
    from reverse_etl.engine import run_sync
    from reverse_etl.state import StateStore

    work = Path(tempfile.mkdtemp(prefix="klaviyo-bench-"))
    text = PROJECT.format(
        db=db, key=served.key, url=served.url, work=work, batch=batch, mapping=PROFILE_MAPPING
    )
    if not consent:
        text = re.sub(r"\n    consent:\n(      .*\n)+", "\n", text)
    (work / "p.yml").write_text(text)
    project = load_project(work / "p.yml", work)
    imports: list[float] = []
    made: list[KlaviyoDestination] = []

    def destination(project: Any, sync: Any) -> KlaviyoDestination:
        dest = KlaviyoDestination(project.connections["klaviyo"], sync, speedup=speedup)
        dest.poll_interval = KlaviyoDestination.poll_interval / speedup  # vendor time too
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
    start = time.perf_counter()
    result = run_sync(project, "bench", store, destination_factory=destination)
    seconds = time.perf_counter() - start
    store.close()
    if result.record.status == "failed":
        raise SystemExit(f"bench run failed: {result.record.message}")
    return Run(seconds, result.record.counts, imports, made[0].client.api.throttled)


def allowed(vendor_seconds: float) -> float:
    """Import calls the published limits allow in ``vendor_seconds``, from full buckets."""
    return min(BURST + BURST_RATE * vendor_seconds, STEADY + STEADY_RATE * vendor_seconds)


def warehouse() -> Path:
    import duckdb

    from reverse_etl.demo.generate import generate_profile_rows

    cache = ROOT / ".reverse_etl" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    db = cache / f"klaviyo_profiles_{PROFILES}.duckdb"
    if not db.exists():
        con = duckdb.connect(str(db))
        generate_profile_rows(con, "bench.profiles", PROFILES)
        con.close()
    return db


# --------------------------------------------------------------------------- main


def throughput(db: Path, consent: bool) -> None:
    with sandbox_process(enforce_limits=False, speedup=FAST_SPEEDUP, validate=True) as served:
        r = run(db, served, batch=20_000, speedup=FAST_SPEEDUP, consent=consent)
    c, s = r.counts, served.stats
    what = "with consent   " if consent else "profiles only  "
    print(
        f"(a) limits off, {what}: {c.read / r.seconds:>7,.0f} profiles/s ({c.read:,} rows in "
        f"{r.seconds:.1f} s; {c.sent:,} sent: {c.updated:,} landed, {c.failed:,} failed; "
        f"{c.rejected:,} rejected); sandbox: {s.get('profiles', 0):,} profiles, "
        f"{s.get('subscriptions', 0):,} subscriptions, {s.get('violations', '?')} violations, "
        f"{s.get('cpu_seconds', 0):.1f} s CPU"
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
    print(f"Klaviyo sandbox: {PROFILES:,} generated profiles (DuckDB), spec validation on")
    throughput(db, consent=True)
    throughput(db, consent=False)
    pacing(db, args.speedup)


if __name__ == "__main__":
    main()

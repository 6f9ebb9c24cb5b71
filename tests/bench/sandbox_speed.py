"""`make bench`: the wall-clock figures that used to be assertions in `make test`.

A test that asserts "under a second" fails on a loaded machine and proves nothing on an idle
one, so the suite now asserts the behaviour that makes these fast (a validator compiled once,
a server ready when ``start()`` returns, pacing computed on an injected clock) and this script
prints how fast they are. It asserts nothing; compare the figures with the notes:

* sandbox server: ``SandboxServer`` construction to the first answer (was ``< 1.0`` s in
  tests/sandbox/test_sandbox_server.py), median and worst of ``--starts``;
* body validation: one check of a 10,000-profile Klaviyo bulk import with the compiled
  validator (was ``< 0.3`` s in tests/sandbox/test_sandbox_validation.py), and, for scale,
  Python's jsonschema on the same body;
* demo warehouse: ``generate_demo_warehouse`` at its default size (was ``< 5`` s in
  tests/test_demo_data.py);
* client pacing in real time: how far ``RateLimiter``'s real sleeps overshoot the schedule
  its arithmetic promises (the tests check the arithmetic on a fake clock).

Run with ``PYTHONPATH=.`` from the repository root (the Makefile does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn``."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(samples: list[float], unit: float = 1000.0, suffix: str = "ms") -> str:
    return (
        f"median {statistics.median(samples) * unit:,.1f} {suffix}, "
        f"worst {max(samples) * unit:,.1f} {suffix} ({len(samples)} runs)"
    )


def sandbox_start(runs: int) -> None:
    from reverse_etl.sandbox import DotdigitalSandbox, KlaviyoSandbox, SandboxServer

    for name, make in (("Klaviyo", KlaviyoSandbox), ("Dotdigital", DotdigitalSandbox)):
        app = make()  # the app's own set-up (spec loading) is not the server's start
        starts, stops = [], []
        for i in range(runs + 1):  # the first is a warm-up: imports, first event loop
            t0 = time.perf_counter()
            server = SandboxServer(app).start()
            httpx.get(server.base_url + "/nowhere")
            t1 = time.perf_counter()
            server.stop()
            t2 = time.perf_counter()
            if i:
                starts.append(t1 - t0)
                stops.append(t2 - t1)
        print(f"sandbox server {name:<10} start to first answer: {summary(starts)}")
        print(f"sandbox server {name:<10} stop:                  {summary(stops)}")


def validation(repeat: int) -> None:
    from jsonschema import Draft4Validator

    from reverse_etl.sandbox.bodyschema import FORMAT_CHECKER
    from reverse_etl.sandbox.spec import load_spec

    profiles = [
        {
            "type": "profile",
            "attributes": {
                "email": f"user{i}@example.com",
                "phone_number": "+15005550006",
                "first_name": "Ann",
                "location": {"city": "Leeds", "latitude": 53.8},
                "properties": {"points": i, "tier": "gold"},
            },
        }
        for i in range(10_000)
    ]
    document = {
        "data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": profiles}}}
    }
    body = orjson.dumps(document)
    op = load_spec("klaviyo/profiles").operation("post", "/api/profile-bulk-import-jobs")

    def check() -> None:
        op.check(
            path_params={},
            query=[],
            headers={"revision": "2026-07-15"},
            content_type="application/vnd.api+json",
            body=body,
        )

    check()  # compiles the validator
    samples = timed(check, repeat)
    per_profile = statistics.median(samples) / len(profiles) * 1e6
    print(
        f"10,000-profile body, parse + check (jsonschema-rs): {summary(samples)}; "
        f"{per_profile:.2f} µs a profile"
    )
    reference = Draft4Validator(op.body_validator().schema, format_checker=FORMAT_CHECKER)
    seconds = timed(lambda: reference.is_valid(document), 1)
    print(f"    the same body with Python's jsonschema, for scale: {seconds[0] * 1000:,.0f} ms")


def demo_generation(repeat: int) -> None:
    from reverse_etl.demo.generate import generate_demo_warehouse

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.duckdb"
        samples = timed(lambda: generate_demo_warehouse(path), repeat)
    print(f"demo warehouse, default size: {summary(samples, 1.0, 's')}")


def pacing(calls: int) -> None:
    from reverse_etl.destinations.ratelimit import RateLimiter

    # 10/s and 150/min at speedup 60: the burst bucket (600/s) binds until ~0.31 s, then the
    # steady one: call n at (n - 150) / 150 s
    limiter = RateLimiter(10, 150, speedup=60.0)
    ideal = max(0.0, (calls - 150) / 150.0)
    start = time.perf_counter()
    for _ in range(calls):
        limiter.acquire()
    real = time.perf_counter() - start
    print(
        f"RateLimiter 10/s + 150/min at speedup 60, {calls} calls: {real:.3f} s real for "
        f"{ideal:.3f} s of schedule ({limiter.waits} sleeps, {real - ideal:+.3f} s overshoot)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=20, help="sandbox server starts")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the other measures")
    parser.add_argument("--calls", type=int, default=450, help="paced calls (>= 200)")
    args = parser.parse_args(argv)
    sandbox_start(args.starts)
    validation(args.repeat)
    demo_generation(max(1, args.repeat // 2))
    pacing(args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Starts ``reverse-etl`` processes for tests/test_mirror_kill.py, quickly: this script imports
the CLI once and then forks a process per run, which runs ``reverse-etl ARGS...`` (the real
``cli.main``) and is the process the test kills. A fresh interpreter per run would spend more
than a second importing before the run even starts.

Protocol, one line each way: the test writes ``{"args": [...], "log": PATH, "kill_at": ...}``
as JSON on stdin; this script answers ``PID n`` once the run's process exists, then
``EXIT n code`` when it ended (``code`` negative for a signal, as subprocess has it). The run's
stdout and stderr go to ``log``. It prints ``READY`` first and stops at the end of stdin.

Each run is paced for a sandbox at speedup 50, as ``tests.sandboxes.fast_clients`` and
``klaviyo_speed`` pace the runs made in the test process. ``kill_at: "POINT:N"`` makes the
run SIGKILL itself at an injected point, the N-th time it is reached:

* ``ack``: the destination acknowledged a batch, the engine has not committed it yet;
* ``committed``: the engine committed that batch (snapshot and watermark);
* ``removing``: the engine hands the destination a chunk of members to remove;
* ``removed``: the destination acknowledged that removal, the engine has not forgotten them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import reverse_etl.destinations.dotdigital.profiles
import reverse_etl.destinations.klaviyo.profiles
import reverse_etl.sources.duckdb  # noqa: F401  (imported once, before the forks)
from reverse_etl import cli, engine
from reverse_etl.destinations import http
from reverse_etl.destinations.base import Destination
from reverse_etl.destinations.klaviyo.destination import KlaviyoBase

with contextlib.suppress(ImportError):  # without the postgres extra: DuckDB runs only
    import reverse_etl.sources.postgres  # noqa: F401


def fast_pacing() -> None:
    original = http.RetryPolicy

    def policy() -> http.RetryPolicy:
        return original(
            max_attempts=8,
            base_delay=0.01,
            max_delay=0.1,
            max_retry_after=0.1,
            settle_margin=2.0,
            settle_first=0.05,
            settle_max=0.4,
        )

    http.RetryPolicy = policy  # type: ignore[misc, assignment]
    Destination.poll_interval = 0.02  # type: ignore[misc]
    KlaviyoBase.client_speedup = 50.0


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def inject(point: str, nth: int) -> None:
    """Wrap the destination the engine makes so that the run dies at ``point`` the ``nth``
    time it is reached."""
    if point not in ("ack", "committed", "removing", "removed"):
        raise ValueError(f"no injected point {point!r}")
    made = engine.destination_for
    seen = {"load": 0, "remove": 0}

    def destination_for(type_: str, obj: str) -> Any:
        base = made(type_, obj)

        class Killing(base):  # type: ignore[valid-type, misc]
            def load(self, batches: Any) -> Iterator[Any]:
                for result in super().load(batches):
                    seen["load"] += 1
                    mine = seen["load"] == nth
                    if mine and point == "ack":
                        die()
                    yield result
                    if mine and point == "committed":
                        die()

            def remove(self, members: Any) -> Any:
                seen["remove"] += 1
                mine = seen["remove"] == nth
                if mine and point == "removing":
                    die()
                done = super().remove(members)
                if mine and point == "removed":
                    die()
                return done

        Killing.__name__ = base.__name__
        return Killing

    engine.destination_for = destination_for


def run(order: dict[str, Any]) -> None:
    """In the forked process: the CLI with ``order["args"]``; never returns."""
    code = 70
    try:
        fd = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdin.close()
        if order.get("kill_at"):
            point, nth = str(order["kill_at"]).split(":")
            inject(point, int(nth))
        cli.main(args=list(order["args"]), prog_name="reverse-etl")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    fast_pacing()
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        order = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run(order)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()

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
* ``committed``: the engine committed that batch (snapshot and watermark; in a commit group,
  only added it to the group);
* ``removing``: the engine hands the destination a chunk of members to remove;
* ``removed``: the destination acknowledged that removal, the engine has not forgotten them;
* ``recording``: the engine is about to record acknowledged rows in the local snapshot (the
  N-th record of a run that has rows: one a batch, or one a group of batches);
* ``recorded``: the snapshot recorded them, the watermark has not moved past them yet.

Two optional keys more (tests/test_commit_group_kill.py): ``"commit_group": {"from": F,
"rows": R}`` sets ``CommitGroup.GROUP_FROM`` and ``GROUP_ROWS`` in the run's process, so a
small snapshot has its acknowledged batches recorded R rows at a time; ``"trace": PATH``
appends a JSON line to PATH each time the engine took a batch's acknowledgement and
returned for the next (the batch went through ``_commit``): ``{"n": N, "rows": SENT, "mark":
[cursor, id]}``, the batch's watermark as ``state.encode_value`` writes it (null: none). Each
line is written at once, so what a killed run got through is in the file; and
``{"recorded": ROWS}`` each time the local snapshot recorded acknowledged rows.
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
from reverse_etl.snapshot.local import Snapshot
from reverse_etl.state import encode_value

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


def inject(point: str | None, nth: int = 0, trace: str | None = None) -> None:
    """Wrap the destination the engine makes so that the run dies at ``point`` the ``nth``
    time it is reached (None: never), and each batch the engine committed is written to
    ``trace`` (see the module's docstring)."""
    if point not in (None, "ack", "committed", "removing", "removed", "recording", "recorded"):
        raise ValueError(f"no injected point {point!r}")
    made = engine.destination_for
    seen = {"load": 0, "remove": 0, "record": 0}

    def note(entry: dict[str, Any]) -> None:
        if trace is None:
            return
        fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, json.dumps(entry).encode() + b"\n")
        finally:
            os.close(fd)

    def committed(n: int, result: Any) -> None:
        mark = getattr(result.token, "mark", None)
        value = None if mark is None else [encode_value(mark.cursor), encode_value(mark.id)]
        note({"n": n, "rows": result.sent, "mark": value})

    if trace is not None or point in ("recording", "recorded"):
        record = Snapshot.record

        def recording(self: Snapshot, prints: Any, acked: Any) -> None:
            if acked.num_rows:
                seen["record"] += 1
            mine = bool(acked.num_rows) and seen["record"] == nth
            if mine and point == "recording":
                die()
            record(self, prints, acked)
            if acked.num_rows:
                note({"recorded": acked.num_rows})
            if mine and point == "recorded":
                die()

        Snapshot.record = recording  # type: ignore[method-assign]

    def destination_for(type_: str, obj: str) -> Any:
        base = made(type_, obj)

        class Killing(base):  # type: ignore[valid-type, misc]
            def load(self, batches: Any) -> Iterator[Any]:
                for result in super().load(batches):
                    seen["load"] += 1
                    n = seen["load"]
                    mine = n == nth
                    if mine and point == "ack":
                        die()
                    yield result
                    committed(n, result)
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


def commit_group(settings: dict[str, int]) -> None:
    """``CommitGroup``'s thresholds for this run: ``from`` members, ``rows`` a group."""
    engine.CommitGroup.GROUP_FROM = int(settings["from"])
    engine.CommitGroup.GROUP_ROWS = int(settings["rows"])


def run(order: dict[str, Any]) -> None:
    """In the forked process: the CLI with ``order["args"]``; never returns."""
    code = 70
    try:
        fd = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdin.close()
        if order.get("commit_group"):
            commit_group(order["commit_group"])
        if order.get("kill_at"):
            point, nth = str(order["kill_at"]).split(":")
            inject(point, int(nth), order.get("trace"))
        elif order.get("trace"):
            inject(None, trace=order["trace"])
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

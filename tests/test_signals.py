"""SIGTERM and Ctrl-C sent to a real ``reverse-etl run`` process: the batches in flight are
acknowledged and committed, the run is recorded ``interrupted``, the lock released, and the
exit code is 143 (SIGTERM) or 130 (SIGINT). A destination stuck past the grace period is
interrupted too, and the run still never stays ``running`` with its lock held.

The process is the CLI itself; only its destination is a stand-in (a script replaces
``engine.destination_for``) that acknowledges slowly, or never, so the signal lands mid-run:
the slow one waits for the signal before its fifth batch, so a test slow to send it on a loaded
machine does not find the run finished.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reverse_etl.config import load_project
from reverse_etl.state import StateStore
from tests.helpers import at, people_db, person, project_data, sync_entry, write_project

SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from reverse_etl import cli, engine, interrupt
    from tests.helpers import FakeDestination

    MODE = sys.argv.pop(1)
    signalled = threading.Event()  # the run's own handler got the signal
    request = interrupt.Interrupt.request

    def noted(self, signum):
        signalled.set()
        request(self, signum)

    interrupt.Interrupt.request = noted

    class Slow(FakeDestination):
        def __init__(self, conn, sync):
            super().__init__(lag=1)

        def _accept(self, batches):
            for n, result in enumerate(super()._accept(batches), start=1):
                if MODE == "stuck" and n == 4:
                    print("STUCK", flush=True)  # batch 4 taken, batch 3 not acknowledged
                    threading.Event().wait()  # a rate-limit wait that never ends
                if MODE == "slow" and n == 5:  # ACK 3 is out: the test sends the signal
                    signalled.wait(60)  # it lands mid-run, however late (a hang guard)
                time.sleep(0.05)
                yield result

        def load(self, batches):
            for n, result in enumerate(super().load(batches), start=1):
                yield result
                print(f"ACK {n}", flush=True)  # the engine has committed batch n

    engine.destination_for = lambda type_, obj: Slow
    cli.main()
    """
)


def start(tmp_path: Path, mode: str, rows: int = 400) -> subprocess.Popen[str]:
    people_db(tmp_path, [person(i) for i in range(rows)])
    write_project(tmp_path, project_data(syncs=[sync_entry(batch_size=10)]))
    script = tmp_path / "run_slow.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        # stuck: the grace runs out; slow: never, however loaded the machine (the batches in
        # flight are committed, not cut off by the grace's interrupt)
        "REVERSE_ETL_STOP_GRACE_SECONDS": "1" if mode == "stuck" else "60",
    }
    return subprocess.Popen(
        [sys.executable, str(script), mode, "--project-dir", str(tmp_path), "run", "people"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_ack(proc: subprocess.Popen[str], n: int) -> None:
    wait_for_line(proc, f"ACK {n}")


def wait_for_line(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == text:
            return
    raise AssertionError(f"the run ended before printing {text!r}: {proc.stderr.read()}")  # type: ignore[union-attr]


def state(tmp_path: Path) -> StateStore:
    return StateStore(load_project(None, tmp_path, env={}).state.url, root=tmp_path)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_commits_what_is_in_flight_and_exits_with_its_code(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    proc = start(tmp_path, "slow")
    try:
        wait_for_ack(proc, 3)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    acked = max(int(line.split()[1]) for line in out.splitlines() if line.startswith("ACK"))
    assert acked < 40  # it stopped reading: the 400-row view was not finished
    store = state(tmp_path)
    try:
        run = store.last_runs("people", limit=1)[0]
        assert run.status == "interrupted" and sig.name in (run.message or "")
        assert run.counts.sent == acked * 10
        mark = store.watermark("people")
        assert mark is not None and mark.cursor == at(acked * 10 - 1)  # every acknowledged row
        with store.engine.connect() as con:
            assert con.exec_driver_sql("SELECT COUNT(*) FROM retl_locks").scalar() == 0
    finally:
        store.close()
    assert "internal error" not in err


def test_a_stuck_destination_is_interrupted_after_the_grace_period(tmp_path: Path) -> None:
    proc = start(tmp_path, "stuck")
    try:
        # the signal lands once the destination is stuck: before, a run asked to stop hands
        # it no more batches, and ends on the clean path with batch 3 acknowledged
        wait_for_line(proc, "STUCK")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    store = state(tmp_path)
    try:
        run = store.last_runs("people", limit=1)[0]
        assert run.status == "interrupted"
        mark = store.watermark("people")
        assert mark is not None and mark.cursor == at(19)  # batches 1 and 2, nothing after
        with store.engine.connect() as con:
            assert con.exec_driver_sql("SELECT COUNT(*) FROM retl_locks").scalar() == 0
    finally:
        store.close()
    assert "internal error" not in err

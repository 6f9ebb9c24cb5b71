"""A mirror run killed at any point loses nothing: ``reverse-etl run`` in a process of its own
(forked by tests/mirror_kill_runner.py, which has the CLI imported already) against a sandbox
served by this test process, which keeps its state across the killed runs, is killed with
SIGKILL again and again while the view changes between the runs (members join, change and
leave); a run to completion then leaves the list holding exactly the view's members, every
one with its current values, and a further run has nothing left to send or remove (the
snapshot agrees with the destination).

The kills land after a random delay (a seeded RNG, spread over a run's duration) and at
injected points: after the destination acknowledged a batch the engine has not committed,
after the commit, before a removal and after a removal the engine has not yet forgotten.
After each kill the sync's lock is released, as ``reverse-etl unlock`` would.

Two crash windows once lost a member when the view changed before the next run (the tests at
the end: a member the destination took in, or out, whose acknowledgement the snapshot never
recorded); the snapshot now notes members before they are sent (``reserve``) and clears a
member's fingerprint before its removal (``unsettle``). Both sandboxes are covered, each on one source (Klaviyo on DuckDB, Dotdigital on
PostgreSQL), to keep the slow combinations few."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reverse_etl.config import load_project
from reverse_etl.engine import RunOptions, run_sync
from reverse_etl.errors import EXIT_OK
from reverse_etl.sandbox import SandboxServer, SandboxSettings
from reverse_etl.state import StateStore
from tests.helpers import at, write_project
from tests.sandboxes import assert_sandbox_clean, email_of, fast_clients, profile_row
from tests.test_klaviyo_support import klaviyo_speed
from tests.test_snapshot_sandboxes import KINDS, LIST, Kind, Warehouse, make_warehouse

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("mirror_kill_runner.py")
SYNC = "members"
BASELINE = 100  # members of the first view
KILLS = 10  # random kills that must land while a run is under way

COMBOS = [
    pytest.param(("klaviyo", "duckdb"), id="klaviyo-duckdb"),
    pytest.param(("dotdigital", "postgres"), marks=pytest.mark.postgres, id="dotdigital-postgres"),
]


@dataclass
class View:
    """The view's members: number -> version of their values (first_name ``FirstNvV``)."""

    version: dict[int, int] = field(default_factory=dict)
    left: set[int] = field(default_factory=set)  # members who left the view
    next_new: int = BASELINE

    def rows(self) -> list[tuple[Any, ...]]:
        return [
            profile_row(n, first_name=f"First{n}v{v}", modified_at=at(n + 100_000 * v))
            for n, v in sorted(self.version.items())
        ]

    def change(self, rng: random.Random) -> None:
        """Some members leave, some join, some change. Who leaves was in the first view
        (which a run completed) and never returns, and who joins never leaves: a kill between
        the destination's acknowledgement and the snapshot loses such a member (the tests at
        the end of the file)."""
        stable = sorted(n for n in self.version if n < BASELINE)
        for n in rng.sample(stable, rng.randint(2, 4)):
            del self.version[n]
            self.left.add(n)
        for _ in range(rng.randint(3, 6)):
            self.version[self.next_new] = 1
            self.next_new += 1
        for n in rng.sample(sorted(self.version), rng.randint(5, 20)):
            self.version[n] += 1


class Launcher:
    """tests/mirror_kill_runner.py: forks a ``reverse-etl`` process per run, with the CLI
    already imported (see there)."""

    def __init__(self, log: Path):
        self._err = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self._buf = b""
        self.log = log
        ready = self._line(60)
        assert ready == "READY", f"{ready!r}: {log.read_text()}"

    def _line(self, timeout: float | None) -> str | None:
        """The next line the launcher writes, or None if none comes within ``timeout``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 4096)
            if not data:
                raise AssertionError(f"the launcher ended: {self.log.read_text()}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode().strip()

    def start(self, order: dict[str, Any]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(order).encode() + b"\n")
        self.proc.stdin.flush()
        line = self._line(60) or ""
        assert line.startswith("PID "), line
        return int(line.split()[1])

    def wait(self, pid: int, timeout: float | None) -> int | None:
        """The run's exit code, or None if it is still running after ``timeout`` seconds."""
        line = self._line(60 if timeout is None else timeout)
        if line is None:
            return None
        word, got, code = line.split()
        assert (word, int(got)) == ("EXIT", pid), line
        return int(code)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._err.close()


@dataclass
class Rig:
    root: Path
    kind: Kind
    warehouse: Warehouse
    sandbox: Any
    launcher: Launcher
    view: View = field(default_factory=View)
    killed: int = 0
    logs: int = 0
    runs: list[str] = field(default_factory=list)  # how each run ended, for failure messages

    def configure(self, base_url: str) -> None:
        write_project(
            self.root,
            {
                "connections": {
                    "warehouse": self.warehouse.connection,
                    self.kind.name: self.kind.connection(self.sandbox, base_url),
                },
                "state": {"url": "sqlite:///state/state.db"},
                "error_dir": "errors",
                "syncs": [
                    {
                        "name": SYNC,
                        "source": {"connection": "warehouse", "table": self.warehouse.table},
                        "object": "profiles",
                        "identifier": "email",
                        "mode": "mirror",
                        # the guard is tested elsewhere: here removals lost to a kill pile up
                        "max_removal_share": 0.6,
                        "batch_size": 10,
                        "destination": {"connection": self.kind.name, "list": LIST},
                        "mapping": dict(self.kind.mapping),
                        "consent": {"email": "email_consent"},
                        "default_phone_region": "US",
                    }
                ],
            },
        )

    def load(self) -> None:
        self.warehouse.load(self.view.rows())

    def run(self, kill_at: str | None = None, kill_after: float | None = None) -> int:
        """One ``reverse-etl run``; SIGKILLed ``kill_after`` seconds after it started if it
        is still running then. Its exit code (-9: killed); a killed run's lock is released."""
        self.logs += 1
        log = self.root / f"run{self.logs}.log"
        order = {"args": ["--project-dir", str(self.root), "run", SYNC], "log": str(log)}
        began = time.monotonic()
        pid = self.launcher.start({**order, "kill_at": kill_at})
        code = self.launcher.wait(pid, kill_after)
        if code is None:  # still running: kill it (unless it ended and was reaped meanwhile)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            code = self.launcher.wait(pid, 60)
        assert code is not None, f"run {pid} did not end"
        text = log.read_text()
        assert "internal error" not in text.lower() and "Traceback" not in text, text
        took = time.monotonic() - began
        what = kill_at or ("to completion" if kill_after is None else f"after {kill_after:.2f}s")
        self.runs.append(f"{what}: {code} ({took:.2f}s)")
        if code == -signal.SIGKILL:
            self.unlock()
        return code

    def kill_after(self, delay: float) -> bool:
        """True if the run was still under way when killed; a run that ended first must have
        succeeded."""
        code = self.run(kill_after=delay)
        if code == -signal.SIGKILL:
            self.killed += 1
            return True
        assert code == EXIT_OK, self.runs
        return False

    def complete(self) -> None:
        code = self.run(kill_after=None)
        assert code == EXIT_OK, (self.root / f"run{self.logs}.log").read_text()

    def unlock(self) -> None:
        """What ``reverse-etl unlock`` does after a dead run."""
        project = load_project(None, self.root, env={})
        store = StateStore(project.state.url, root=self.root)
        try:
            store.unlock(SYNC)
        finally:
            store.close()

    def assert_list_is_the_view(self) -> None:
        """The list holds exactly the view's members, each with its current values; who left
        keeps their profile or contact."""
        want = {email_of(n) for n in self.view.version}
        got = self.kind.members(self.sandbox)
        assert got == want, (
            f"missing: {sorted(want - got)}; left the view but still in the list: "
            f"{sorted(got - want)}; runs: {self.runs}"
        )
        for n, v in self.view.version.items():
            held = self.kind.held(self.sandbox, email_of(n))
            assert held is not None, email_of(n)
            assert self.kind.first_name_of(held) == f"First{n}v{v}", (email_of(n), held)
        for n in self.view.left:
            assert self.kind.held(self.sandbox, email_of(n)) is not None, email_of(n)

    def assert_nothing_left_to_do(self) -> None:
        """Another run, in this process: everything is held as it is and nobody is left to
        remove, so the snapshot agrees with the destination."""
        project = load_project(None, self.root, env={})
        store = StateStore(project.state.url, root=self.root)
        try:
            result = run_sync(project, SYNC, store, RunOptions())
        finally:
            store.close()
        c = result.record.counts
        assert result.exit_code == EXIT_OK, result.record.message
        assert (c.read, c.sent, c.unchanged, c.removed) == (
            len(self.view.version),
            0,
            len(self.view.version),
            0,
        ), c


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    started = Launcher(tmp_path_factory.mktemp("launcher") / "launcher.log")
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def rig(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    launcher: Launcher,
) -> Iterator[Rig]:
    kind_name, source = request.param
    fast_clients(monkeypatch)  # for the runs made in this process
    klaviyo_speed(monkeypatch)
    kind = KINDS[kind_name]
    # jobs take 0.1 s, so a run of the first view takes a while and a kill can land in it
    sandbox = kind.sandbox(SandboxSettings(speedup=50.0, job_seconds=5.0))
    warehouse = make_warehouse(source, request, tmp_path)
    rig = Rig(tmp_path, kind, warehouse, sandbox, launcher)
    rig.view.version = dict.fromkeys(range(BASELINE), 1)
    with SandboxServer(sandbox) as server:
        rig.configure(server.base_url)
        yield rig
    assert_sandbox_clean(sandbox)


@pytest.mark.parametrize("rig", COMBOS, indirect=True)
def test_random_and_injected_kills_during_mirror_runs_lose_nothing(rig: Rig) -> None:
    rng = random.Random(f"mirror-kill-{rig.kind.name}")
    # the first view's load (10 batches; a run lasts about a second), killed three times
    rig.load()
    for _ in range(3):
        rig.kill_after(rng.uniform(0.1, 1.0))
    rig.complete()
    rig.assert_list_is_the_view()

    # the view changes before every run: a run to completion first, to time one
    rig.view.change(rng)
    rig.load()
    began = time.monotonic()
    rig.complete()
    window = time.monotonic() - began
    rig.assert_list_is_the_view()

    # then at each injected point once ...
    for point in ("ack:1", "committed:1", "removing:1", "removed:1"):
        rig.view.change(rng)
        rig.load()
        assert rig.run(kill_at=point) == -signal.SIGKILL, rig.runs
    # ... and after random delays, spread over a run, until enough landed in one
    rounds = 0
    while rig.killed < KILLS:
        rounds += 1
        assert rounds <= 3 * KILLS, f"only {rig.killed} kills landed in a run: {rig.runs}"
        rig.view.change(rng)
        rig.load()
        rig.kill_after(rng.uniform(0.0, window))
    rig.complete()
    rig.assert_list_is_the_view()
    rig.assert_nothing_left_to_do()


# --------------------------------------------------------------------------- lost members


@pytest.mark.parametrize("rig", COMBOS[:1], indirect=True)
def test_a_member_added_by_a_killed_run_who_then_leaves_is_removed(rig: Rig) -> None:
    # the run dies after the destination acknowledged the first batch (members 0-9 are in
    # the list), before the engine recorded it in the snapshot
    rig.view.version = dict.fromkeys(range(30), 1)
    rig.load()
    assert rig.run(kill_at="ack:1") == -signal.SIGKILL
    assert rig.kind.members(rig.sandbox) >= {email_of(n) for n in range(10)}
    # they leave the view before the next run
    for n in range(10):
        del rig.view.version[n]
        rig.view.left.add(n)
    rig.load()
    rig.complete()
    rig.assert_list_is_the_view()  # 0-9 left: the snapshot knew them from before the send


@pytest.mark.parametrize("rig", COMBOS[1:], indirect=True)
def test_a_member_removed_by_a_killed_run_who_then_returns_is_readded(rig: Rig) -> None:
    rig.view.version = dict.fromkeys(range(30), 1)
    rig.load()
    rig.complete()
    # member 3 leaves; the run dies after the destination acknowledged the removal, before
    # the engine forgot member 3 in the snapshot
    del rig.view.version[3]
    rig.load()
    assert rig.run(kill_at="removed:1") == -signal.SIGKILL
    assert email_of(3) not in rig.kind.members(rig.sandbox)
    # member 3 returns, exactly as before
    rig.view.version[3] = 1
    rig.load()
    rig.complete()
    rig.assert_list_is_the_view()  # fails: 3 is "unchanged" in the snapshot, never re-added

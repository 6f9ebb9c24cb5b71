"""Runs and plans started from the page: ``reverse-etl run``/``plan`` in child processes.

A child is the CLI itself (same project file, project dir and environment), so it takes the
sync's lock, writes its run record and error file exactly as a run from a terminal or cron
does; the page learns the outcome from the state store, and the child's log for progress.
Finished children are reaped whenever the page asks about jobs; the server's shutdown stops the
ones still running with SIGTERM, which commits what the destination acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from reverse_etl.state import now

KINDS = ("run", "accept", "plan")


class JobBusy(Exception):
    """The page already started a run or plan of this sync that has not ended."""


@dataclass
class Job:
    kind: str  # run | accept (run --accept-changes) | plan
    sync: str
    proc: subprocess.Popen[bytes]
    log: Path  # the child's stderr (and a run's stdout)
    out: Path | None  # plan --json's stdout
    started_at: datetime = field(default_factory=now)
    exit_code: int | None = None

    @property
    def alive(self) -> bool:
        return self.exit_code is None

    def log_tail(self, lines: int = 12) -> list[str]:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]


class Jobs:
    """The children of one server: at most one live job per sync (a run and a plan would
    contend for the same lock), and the latest run and plan of each sync kept for the page."""

    def __init__(self, config: Path | None, project_dir: Path) -> None:
        self.config = config
        self.project_dir = project_dir
        self._dir = Path(tempfile.mkdtemp(prefix="reverse-etl-ui-"))
        self._jobs: dict[tuple[str, str], Job] = {}  # (sync, "run" | "plan") -> latest
        self._lock = threading.Lock()

    def argv(self, kind: str, sync: str) -> list[str]:
        """The CLI's command line for a job: what a person would type."""
        base = [sys.executable, "-m", "reverse_etl.cli", "--project-dir", str(self.project_dir)]
        if self.config is not None:
            base += ["--config", str(self.config)]
        if kind == "plan":
            return [*base, "plan", sync, "--json"]
        extra = ["--accept-changes"] if kind == "accept" else []
        # "Run now" is the Sync Now of controls.py: it runs a paused sync too, once
        return [*base, "run", sync, "--even-if-disabled", *extra]

    def start(self, kind: str, sync: str) -> Job:
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        with self._lock:
            self._reap()
            if any(j.alive for (name, _), j in self._jobs.items() if name == sync):
                raise JobBusy(sync)
            stamp = f"{sync}-{kind}-{now():%Y%m%dT%H%M%S%f}"
            log = self._dir / f"{stamp}.log"
            out = self._dir / f"{stamp}.json" if kind == "plan" else None
            plan_out = out.open("wb") if out is not None else contextlib.nullcontext(None)
            with log.open("wb") as err, plan_out as stdout:
                proc = subprocess.Popen(
                    self.argv(kind, sync),
                    stdin=subprocess.DEVNULL,
                    stdout=stdout if stdout is not None else err,
                    stderr=err,
                    cwd=self.project_dir,
                    env={**os.environ, "REVERSE_ETL_LOG_FORMAT": "text"},
                )
            job = Job(kind, sync, proc, log, out)
            self._jobs[(sync, "plan" if kind == "plan" else "run")] = job
            return job

    def latest(self, sync: str, what: str) -> Job | None:
        """The sync's latest job of ``what`` ("run" or "plan"), reaped."""
        with self._lock:
            self._reap()
            return self._jobs.get((sync, what))

    def any_alive(self) -> bool:
        with self._lock:
            self._reap()
            return any(j.alive for j in self._jobs.values())

    def _reap(self) -> None:
        for job in self._jobs.values():
            if job.exit_code is None:
                job.exit_code = job.proc.poll()

    def stop_all(self, grace: float = 30.0) -> None:
        """SIGTERM each live child, wait ``grace`` seconds for it to commit and end, then
        kill it; remove the logs."""
        with self._lock:
            live = [j for j in self._jobs.values() if j.proc.poll() is None]
            for job in live:
                job.proc.terminate()
            for job in live:
                try:
                    job.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    job.proc.kill()
                    job.proc.wait()
            shutil.rmtree(self._dir, ignore_errors=True)

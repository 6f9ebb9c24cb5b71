"""Asynchronous jobs: bulk imports that are accepted at once and finish later, as at the vendors.

A client must poll, and must cope with a job that is still queued, still processing, or that
failed; so a job's phase follows elapsed vendor time (``job_seconds``, scaled by ``speedup``):
queued for the first quarter, then processing, then done (or failed under fault injection).

The work itself runs on the server's event loop in small chunks, FIFO across all jobs, so jobs
apply in the order they were accepted and a 10,000-profile import never blocks other requests.
A job never reports done before its work is applied. Chunks run under the sandbox's state lock,
which the Python inspection API takes too, so tests read a consistent state from their thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

QUEUED, PROCESSING, DONE, FAILED = "queued", "processing", "done", "failed"


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 with microseconds and offset, as both vendors print timestamps."""
    return None if moment is None else moment.isoformat(timespec="microseconds")


@dataclass
class Job:
    """One accepted job. ``data`` holds what the vendor module needs to answer about it."""

    kind: str
    total: int
    fail: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: datetime = field(default_factory=utcnow)
    created: float = field(default_factory=time.monotonic)
    started: bool = False
    applied: bool = False  # its work has run (a failing job's work never runs)
    data: dict[str, Any] = field(default_factory=dict)


class JobRunner:
    """Runs jobs' work in order on the event loop, and tells each job's phase."""

    def __init__(self, job_seconds: float, lock: threading.RLock):
        self.duration = job_seconds  # real seconds
        self.lock = lock
        self.jobs: dict[str, Job] = {}
        self._queue: deque[tuple[Job, Iterator[None]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = threading.Event()
        self._idle.set()

    def submit(self, job: Job, work: Iterator[None] | None) -> Job:
        """Accept ``job``; ``work`` yields once per chunk done (None: nothing to apply).

        Must be called on the event loop; a failing job's work is never run.
        """
        with self.lock:
            self.jobs[job.id] = job
        if job.fail or work is None:  # nothing to apply: a failing job applies nothing
            job.started = job.applied = True
            return job
        self._idle.clear()
        self._queue.append((job, work))
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._task = loop.create_task(self._run())
        return job

    async def _run(self) -> None:
        while self._queue:
            job, work = self._queue[0]
            job.started = True
            while True:
                with self.lock:
                    more = next(work, StopIteration) is not StopIteration
                if not more:
                    break
                await asyncio.sleep(0)
            job.applied = True
            self._queue.popleft()
        self._idle.set()

    def phase(self, job: Job, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - job.created
        if elapsed < self.duration / 4 or not job.started:
            return QUEUED
        if elapsed < self.duration or not job.applied:
            return PROCESSING
        return FAILED if job.fail else DONE

    def started_at(self, job: Job) -> datetime | None:
        if self.phase(job) == QUEUED:
            return None
        return job.created_at + timedelta(seconds=self.duration / 4)

    def finished_at(self, job: Job) -> datetime | None:
        if self.phase(job) not in (DONE, FAILED):
            return None
        return job.created_at + timedelta(seconds=self.duration)

    def active(self, kind: str) -> int:
        """Jobs of ``kind`` not yet done or failed."""
        now = time.monotonic()
        with self.lock:
            jobs = [j for j in self.jobs.values() if j.kind == kind]
        return sum(1 for j in jobs if self.phase(j, now) in (QUEUED, PROCESSING))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block (from a test's thread) until all accepted work is applied."""
        return self._idle.wait(timeout)

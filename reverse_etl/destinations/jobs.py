"""Asynchronous work, written once for every destination: keep batches in flight and yield
their results in order (``in_order``), and run one background job to its end (``wait``):
poll it with back-off and submit it again when it failed as a whole.

Jobs of later batches are submitted while earlier ones are still processing (the APIs allow
several at once), and results come back in batch order, so the engine's watermark only ever
moves past batches whose every job finished.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from reverse_etl import progress
from reverse_etl.errors import DestinationError

log = logging.getLogger(__name__)

B = TypeVar("B")
F = TypeVar("F")
R = TypeVar("R")
State = Literal["running", "done", "failed"]
# A job still running is logged (INFO) after this many seconds of waiting, then as often again,
# so an import queued for an hour shows it is being waited for.
STILL_RUNNING_EVERY = 60.0


def in_order(
    batches: Iterator[B], submit: Callable[[B], F], finish: Callable[[F], R], depth: int
) -> Iterator[R]:
    """Keep up to ``depth`` submitted batches in flight; yield their results in order."""
    flight: deque[F] = deque()
    for batch in batches:
        flight.append(submit(batch))
        while len(flight) >= depth:
            yield finish(flight.popleft())
    while flight:
        yield finish(flight.popleft())


@dataclass(frozen=True)
class Patience:
    """How a job is waited for. Vendor jobs take seconds to hours (an import queued behind
    others of the account), so the waits between polls grow from ``first`` by ``growth`` up to
    ``ceiling``, and never pass ``share`` of the time waited so far (None: no such cap), so a
    job that finishes soon is seen soon and one that takes hours costs a poll every few
    minutes. ``timeout`` (seconds; None: wait for ever) ends the wait with ``JobTimeout``.
    ``clock`` and ``sleep`` are injected by tests, which count polls instead of waiting."""

    first: float = 0.2
    ceiling: float = 5.0
    growth: float = 1.5
    share: float | None = None
    timeout: float | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


class JobTimeout(DestinationError):
    """A job still running when its ``Patience.timeout`` ran out; ``doc`` is its last answer."""

    def __init__(self, message: str, waited: float, doc: Any):
        super().__init__(message)
        self.waited = waited
        self.doc = doc


def poll(
    fetch: Callable[[], Any],
    done: Callable[[Any], bool],
    *,
    first: float = 0.2,
    ceiling: float = 5.0,
    patience: Patience | None = None,
) -> Any:
    """Call ``fetch`` until ``done`` says so, backing off from ``first`` to ``ceiling`` seconds
    (or as ``patience`` says, which may end the wait with ``JobTimeout``)."""
    p = patience or Patience(first=first, ceiling=ceiling)
    start = p.clock()
    delay = p.first
    while True:
        answer = fetch()
        if done(answer):
            return answer
        waited = p.clock() - start
        pause = min(delay, p.ceiling)
        if p.share is not None:
            pause = min(pause, max(p.first, p.share * waited))
        if p.timeout is not None:
            if waited >= p.timeout:
                raise JobTimeout(f"still running after {waited:.0f} s", waited, answer)
            pause = min(pause, p.timeout - waited)  # one last look at the deadline
        p.sleep(pause)
        delay = min(delay * p.growth, p.ceiling)


class AsyncJob(Protocol):
    """One background job of a destination's API (a Klaviyo bulk job, a Dotdigital import)."""

    @property
    def what(self) -> str:
        """For messages: "Klaviyo profile import job (10000 records)"."""

    @property
    def id(self) -> str | None: ...

    @property
    def attempts(self) -> int:
        """Submissions so far."""

    def start(self) -> None:
        """Submit the job (again), counting the attempt and taking its new id."""

    def status(self) -> tuple[State, dict[str, Any]]:
        """Ask once how the job stands: its state and the API's document."""


def wait(
    job: AsyncJob, *, attempts: int, poll_interval: float, patience: Patience | None = None
) -> dict[str, Any]:
    """Poll a started ``job`` to its end and return its final document. A job that failed as a
    whole is not its records' fault: it is submitted again, up to ``attempts`` submissions,
    before the run gives up with its rows behind the watermark. ``patience`` (default: polls
    from ``poll_interval`` to 5 s, no deadline) bounds the whole wait, resubmissions included:
    a job still running at its ``timeout`` raises ``JobTimeout``, its rows not done."""
    p = patience or Patience(first=poll_interval)
    with progress.phase(f"waiting for {job.what}"):
        return _wait(job, attempts, p)


def _wait(job: AsyncJob, attempts: int, p: Patience) -> dict[str, Any]:
    start = p.clock()
    told = [start]  # when the wait was last logged

    def status() -> tuple[State, dict[str, Any]]:
        if p.clock() - told[0] >= STILL_RUNNING_EVERY:
            told[0] = p.clock()
            log.info("%s %s: still running after %s", job.what, job.id, _duration(told[0] - start))
        return job.status()

    while True:
        left = None if p.timeout is None else max(p.timeout - (p.clock() - start), 0.0)
        try:
            state, doc = poll(
                status,
                lambda answer: answer[0] != "running",
                patience=dataclasses.replace(p, timeout=left),
            )
        except JobTimeout as late:
            waited = p.clock() - start
            raise JobTimeout(
                f"{job.what} {job.id} was still running ({_describe(late.doc[1])}) after "
                f"{_duration(waited)}; nothing it carried is counted as done, so the next run "
                "sends it again",
                waited,
                late.doc[1],
            ) from None
        if state == "done":
            return doc
        if job.attempts >= attempts:
            raise DestinationError(
                f"{job.what} {job.id} failed as a whole {job.attempts} times "
                f"({_describe(doc)}); nothing it carried is counted as done, so the next run "
                "does it again"
            )
        log.warning(
            "%s %s failed as a whole (%s); submitting it again (submission %d of %d)",
            job.what,
            job.id,
            _describe(doc),
            job.attempts + 1,
            attempts,
            extra={"attempt": job.attempts + 1},
        )
        job.start()


def _duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.1f} s"


def _describe(doc: dict[str, Any]) -> str:
    status = doc.get("status") or (doc.get("data") or {}).get("attributes", {}).get("status")
    return f"status {status!r}"

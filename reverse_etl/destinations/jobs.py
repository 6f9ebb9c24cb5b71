"""Asynchronous work, written once for every destination: keep batches in flight and yield
their results in order (``in_order``), and run one background job to its end (``wait``):
poll it with back-off and submit it again when it failed as a whole.

Jobs of later batches are submitted while earlier ones are still processing (the APIs allow
several at once), and results come back in batch order, so the engine's watermark only ever
moves past batches whose every job finished.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol, TypeVar

from reverse_etl.errors import DestinationError

B = TypeVar("B")
F = TypeVar("F")
R = TypeVar("R")
State = Literal["running", "done", "failed"]


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


def poll(
    fetch: Callable[[], Any],
    done: Callable[[Any], bool],
    *,
    first: float = 0.2,
    ceiling: float = 5.0,
) -> Any:
    """Call ``fetch`` until ``done`` says so, backing off from ``first`` to ``ceiling`` seconds."""
    delay = first
    while True:
        answer = fetch()
        if done(answer):
            return answer
        time.sleep(delay)
        delay = min(delay * 1.5, ceiling)


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


def wait(job: AsyncJob, *, attempts: int, poll_interval: float) -> dict[str, Any]:
    """Poll a started ``job`` to its end and return its final document. A job that failed as a
    whole is not its records' fault: it is submitted again, up to ``attempts`` submissions,
    before the run gives up with its rows behind the watermark."""
    while True:
        state, doc = poll(job.status, lambda answer: answer[0] != "running", first=poll_interval)
        if state == "done":
            return doc
        if job.attempts >= attempts:
            raise DestinationError(
                f"{job.what} {job.id} failed as a whole {job.attempts} times "
                f"({_describe(doc)}); nothing it carried is counted as done, so the next run "
                "does it again"
            )
        job.start()


def _describe(doc: dict[str, Any]) -> str:
    status = doc.get("status") or (doc.get("data") or {}).get("attributes", {}).get("status")
    return f"status {status!r}"

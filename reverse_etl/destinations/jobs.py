"""Async-job plumbing shared by destinations whose APIs import in the background.

Jobs of later batches are submitted while earlier ones are still processing (the APIs allow
several at once), and results come back in batch order, so the engine's watermark only ever
moves past batches whose every job finished.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from reverse_etl.destinations.base import LoadBatch, LoadResult

F = TypeVar("F")


def in_order(
    batches: Iterator[LoadBatch],
    submit: Callable[[LoadBatch], F],
    finish: Callable[[F], LoadResult],
    depth: int,
) -> Iterator[LoadResult]:
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

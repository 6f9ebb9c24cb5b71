"""Pacing on Dotdigital's call budget, as its ``X-RateLimit-*`` headers report it.

Dotdigital counts every call of an API user in a fixed window (an hour) and says on each
answer how many calls are left (``X-RateLimit-Remaining``) and when the window resets
(``X-RateLimit-Reset``). Calls over the budget are refused with 429 *and still counted*, and
the ``Retry-After`` of that 429 is whole seconds; so rather than spend the window's last calls
on refusals, the client stops when the budget is spent and resumes when the window resets.
Until the first answer arrives nothing is known, and nothing is held back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from reverse_etl.destinations.ratelimit import RateLimiter

log = logging.getLogger(__name__)

# A reset value below this is read as seconds from now rather than as an epoch timestamp.
_EPOCH_FLOOR = 1_000_000_000


class CallBudget(RateLimiter):
    """A limiter for ``ApiClient.request``: ``acquire`` before each attempt, ``observe`` each
    answer's headers. (No token buckets: the vendor's own count is the state.)

    ``clock`` is the wall clock (``time.time``), not a monotonic one, because
    ``X-RateLimit-Reset`` is an epoch timestamp; it and ``sleep`` are parameters so that tests
    step a fake clock through whole windows instead of waiting for them.
    """

    def __init__(  # noqa: D107 - the parent's buckets are not used
        self,
        *,
        reserve: int = 0,
        margin: float = 0.05,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.reserve = reserve  # calls left for other clients of the same API user
        self.margin = margin  # seconds past the announced reset, against clock skew
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self.limit: int | None = None
        self.remaining: int | None = None
        self.reset_at: float | None = None  # epoch seconds
        self.waited = 0.0  # total seconds spent waiting for a reset
        self.waits = 0

    def acquire(self) -> float:
        """Block until the budget has a call left; count the call against it."""
        with self._lock:  # callers queue here while one waits for the reset
            waited = 0.0
            if self.remaining is not None and self.remaining <= self.reserve and self.reset_at:
                wait = self.reset_at + self.margin - self._clock()
                if wait > 0:
                    log.info(
                        "Dotdigital call budget spent; waiting %.1fs for the window to reset", wait
                    )
                    self._sleep(wait)
                    waited = wait
                    self.waited += wait
                    self.waits += 1
                self.remaining = None  # unknown until the next answer says so
            if self.remaining is not None:
                self.remaining -= 1
            return waited

    def observe(self, headers: Mapping[str, str]) -> None:
        """Take the window's state from an answer (any answer: a 429 carries it too)."""
        remaining = _int(headers.get("X-RateLimit-Remaining"))
        if remaining is None:
            return
        reset = _float(headers.get("X-RateLimit-Reset"))
        now = self._clock()
        with self._lock:
            self.limit = _int(headers.get("X-RateLimit-Limit")) or self.limit
            self.remaining = remaining
            if reset is not None:
                self.reset_at = reset if reset >= _EPOCH_FLOOR else now + reset


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None

"""Pacing on Dotdigital's call budget, as its ``X-RateLimit-*`` headers report it.

Dotdigital has two schemes (https://developer.dotdigital.com/docs/call-rate-limits), chosen
per API user: the deprecated flat one (calls an hour, one budget for every call) and the
tiered one, now the default for new API users (each call is in a tier, low, medium, high or
unlimited, with its own per-minute limit). ``Budgets`` paces on whichever the answers
describe: an answer naming its tier (``X-RateLimit-Scope``) feeds that tier's budget, and
later calls of the same route wait on it; an answer without one feeds the one hourly budget.

Dotdigital counts every call of an API user in a fixed window (an hour) and says on each
answer how many calls are left (``X-RateLimit-Remaining``) and when the window resets
(``X-RateLimit-Reset``). Calls over the budget are refused with 429 *and still counted*, and
the ``Retry-After`` of that 429 is whole seconds; so rather than spend the window's last calls
on refusals, the client stops when the budget is spent and resumes when the window resets.
Until the first answer arrives nothing is known, and nothing is held back.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping

from reverse_etl.destinations.ratelimit import RateLimiter, Unlimited

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
        """Take the window's state from an answer (any answer: a 429 carries it too).
        ``RateLimit-*`` (the IETF draft's names, its reset in seconds from now) are read
        where ``X-RateLimit-*`` are absent."""
        remaining = _int(_header(headers, "Remaining"))
        if remaining is None:
            return
        reset = _float(_header(headers, "Reset"))
        now = self._clock()
        with self._lock:
            self.limit = _int(_header(headers, "Limit")) or self.limit
            self.remaining = remaining
            if reset is not None:
                self.reset_at = reset if reset >= _EPOCH_FLOOR else now + reset


# ids in a path (numbers, uuids, emails ...) -> one route per endpoint
_ID = re.compile(r"/(?:\d+|[0-9a-f]{8}-[0-9a-f-]{27}|[^/]*@[^/]*|[0-9a-f]{32})(?=/|$)", re.I)


def route(method: str, path: str) -> str:
    """``GET /contacts/v3/import/{id}`` for ``GET /contacts/v3/import/3f2a...``."""
    return f"{method} {_ID.sub('/{id}', path)}"


class Budgets:
    """One ``CallBudget`` per window the answers describe (module doc): ``limiter`` before a
    call, ``observe`` after its answer. The tier of a route is learnt from its answers; a route
    not answered yet waits on nothing (nothing is known of its window)."""

    HOURLY = "hourly"

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self.windows: dict[str, CallBudget] = {self.HOURLY: self._new()}
        self.tier_of: dict[str, str] = {}  # route -> tier, as its answers named it
        self.tiered = False  # an answer named a tier: the API user is on the tiered scheme

    def _new(self) -> CallBudget:
        return CallBudget(clock=self._clock, sleep=self._sleep)

    @property
    def hourly(self) -> CallBudget:
        return self.windows[self.HOURLY]

    def limiter(self, method: str, path: str) -> RateLimiter:
        if not self.tiered:
            return self.hourly
        tier = self.tier_of.get(route(method, path))
        return Unlimited() if tier is None else self.windows[tier]

    def observe(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        scope = headers.get("X-RateLimit-Scope") or headers.get("RateLimit-Scope")
        if not scope:
            self.hourly.observe(headers)
            return
        tier = scope.strip().lower()
        with self._lock:
            self.tiered = True
            self.tier_of[route(method, path)] = tier
            budget = self.windows.setdefault(tier, self._new())
        budget.observe(headers)

    @property
    def waited(self) -> float:
        return sum(b.waited for b in self.windows.values())


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(f"X-RateLimit-{name}")
    return value if value is not None else headers.get(f"RateLimit-{name}")


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

"""Rate limits as the vendors publish them, so a client's limiter is tested against the real
numbers rather than against whatever a sandbox happens to tolerate.

Klaviyo gives each operation a burst (per second), a steady (per minute) and sometimes a daily
budget (``x-klaviyo-ratelimit``); each is a token bucket per API key and operation, and a call
must find a token in every bucket. Dotdigital counts all calls of an API user in a fixed
hourly window and reports it in ``X-RateLimit-*`` headers on every answer.

Windows are in vendor time: with ``speedup=60`` a minute lasts one real second. ``Retry-After``
must be a whole number of seconds (RFC 9110), so it is the real wait rounded up, and at least
1; the exact real wait is also sent as ``X-Sandbox-Retry-After-Ms`` for clients and tests that
want to honour sub-second waits at high speedups.

Every limiter takes its clock as a constructor parameter (``time.monotonic`` by default; the
fixed window also the wall clock its ``X-RateLimit-Reset`` is stamped with), so tests step a
fake clock instead of sleeping and racing a loaded machine.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

# Refill arithmetic in floats can leave a bucket at 0.999999999 tokens when a client waited
# exactly the announced time; that is a token, not a 429 with a whole-second Retry-After.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Window:
    """``limit`` calls per ``period`` vendor seconds."""

    limit: int
    period: float
    name: str = ""


def klaviyo_windows(ratelimit: Mapping[str, str]) -> tuple[Window, ...]:
    """Parse ``{"burst": "10/s", "steady": "150/m", "daily": "150/d"}``."""
    windows = []
    for name, text in ratelimit.items():
        count, unit = str(text).split("/")
        windows.append(Window(int(count), _UNITS[unit.strip()], name))
    return tuple(windows)


def retry_after_headers(wait_seconds: float) -> dict[str, str]:
    """``Retry-After`` (integer seconds, >= 1) plus the exact wait in milliseconds."""
    return {
        "Retry-After": str(max(1, math.ceil(wait_seconds))),
        "X-Sandbox-Retry-After-Ms": str(max(1, math.ceil(wait_seconds * 1000))),
    }


class _Bucket:
    __slots__ = ("capacity", "rate", "tokens", "stamp")

    def __init__(self, capacity: int, rate: float, now: float):
        self.capacity = float(capacity)
        self.rate = rate  # tokens per real second
        self.tokens = float(capacity)
        self.stamp = now

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)  # a clock that steps back refills nothing
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.stamp = now

    def wait(self) -> float:
        return 0.0 if self.tokens >= 1.0 - _EPSILON else (1.0 - self.tokens) / self.rate


class _PerKey:
    """Limits counted per key (API key and operation) and window, on an injectable clock."""

    def __init__(
        self,
        *,
        speedup: float = 1.0,
        enforce: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.speedup = speedup
        self.enforce = enforce
        self._clock = clock
        self._lock = threading.Lock()


class TokenBuckets(_PerKey):
    """Token buckets: one per (key, window); a call needs a token from each. (Klaviyo counts
    fixed windows, ``KlaviyoWindows``; kept for tests of bucket-shaped limits.)"""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._buckets: dict[tuple[object, ...], _Bucket] = {}

    def acquire(self, key: tuple[object, ...], windows: Sequence[Window]) -> float:
        """Take one call; return 0.0 if allowed, else the real seconds until it would be."""
        if not self.enforce or not windows:
            return 0.0
        with self._lock:
            now = self._clock()
            buckets = []
            for w in windows:
                bucket = self._buckets.get((*key, w.name, w.period))
                if bucket is None:
                    rate = w.limit / (w.period / self.speedup)
                    bucket = self._buckets[(*key, w.name, w.period)] = _Bucket(w.limit, rate, now)
                bucket.refill(now)
                buckets.append(bucket)
            wait = max(b.wait() for b in buckets)
            if wait > 0:
                return wait
            for b in buckets:
                b.tokens -= 1.0
            return 0.0


class KlaviyoWindows(_PerKey):
    """Klaviyo's limits as it documents them: "a fixed-window rate limiting algorithm with two
    distinct windows: burst (1-second window) and steady (1-minute window)", per account
    (https://developers.klaviyo.com/en/docs/rate_limits_and_error_handling). Each window counts
    the calls of one key and operation from its start, a multiple of its length on the
    sandbox's clock; a call over either window's limit is refused until that window ends
    (refused calls are not counted: UNCONFIRMED). A client whose buckets let a window's limit
    through at once after an idle spell sends up to twice it in one clock-minute and meets
    429s here, as it would at Klaviyo (``TokenBuckets`` would have let it pass)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._counts: dict[tuple[object, ...], tuple[int, int]] = {}  # -> (window no., calls)

    def acquire(self, key: tuple[object, ...], windows: Sequence[Window]) -> float:
        """Count one call; return 0.0 if allowed, else the real seconds until it would be."""
        if not self.enforce or not windows:
            return 0.0
        with self._lock:
            now = self._clock()
            current = []
            wait = 0.0
            for w in windows:
                length = w.period / self.speedup
                number = math.floor(now / length)
                seen, used = self._counts.get((*key, w.name, w.period), (number, 0))
                used = used if seen == number else 0
                current.append(((*key, w.name, w.period), number, used))
                if used >= w.limit:
                    wait = max(wait, (number + 1) * length - now)
            if wait > 0:
                return wait
            for name, number, used in current:
                self._counts[name] = (number, used + 1)
            return 0.0


@dataclass(frozen=True)
class WindowState:
    """What the ``X-RateLimit-*`` headers say after one call."""

    allowed: bool
    limit: int
    remaining: int
    reset_epoch: int
    wait: float

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_epoch),
        }


class FixedWindow:
    """Dotdigital-style limit: ``limit`` calls per key in each fixed window of ``period``."""

    def __init__(
        self,
        limit: int,
        period: float,
        *,
        speedup: float = 1.0,
        enforce: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.limit = limit
        self.real_period = period / speedup
        self.enforce = enforce
        self._clock = clock
        self._wall = wall
        self._windows: dict[object, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def peek(self, key: object) -> WindowState:
        """The window as it stands for ``key``, without counting a call."""
        with self._lock:
            now = self._clock()
            start, used = self._windows.get(key, (now, 0))
            if now - start >= self.real_period:
                start, used = now, 0
        return self._state(start, used, now)

    def _state(self, start: float, used: int, now: float) -> WindowState:
        left = start + self.real_period - now
        allowed = not self.enforce or used <= self.limit
        return WindowState(
            allowed=allowed,
            limit=self.limit,
            remaining=max(0, self.limit - used),
            reset_epoch=math.ceil(self._wall() + left),
            wait=0.0 if allowed else left,
        )

    def hit(self, key: object) -> WindowState:
        """Count one call for ``key`` (refused calls count too, as at the vendor)."""
        with self._lock:
            now = self._clock()
            start, used = self._windows.get(key, (now, 0))
            if now - start >= self.real_period:
                start, used = now, 0
            used += 1
            self._windows[key] = (start, used)
        return self._state(start, used, now)


class TieredWindows:
    """Dotdigital's tiered scheme: each call is in a tier (low, medium, high, unlimited) and
    each tier has its own per-minute limit per API user, tracked independently
    (https://developer.dotdigital.com/docs/call-rate-limits; the support article
    https://support.dotdigital.com/en/articles/8592585-api-rate-limits: "API call rates are
    measured over one minute with various tiers"). A tier without a limit is unlimited.

    The answer's headers name the tier's window: ``X-RateLimit-Limit/Remaining/Reset`` as in
    the hourly scheme plus ``X-RateLimit-Scope`` (the tier). The scope header is UNCONFIRMED
    (from a summary of the call-rate-limits page; the page itself was not readable past its
    table): a client that reads it knows which budget an answer speaks of."""

    def __init__(
        self,
        limits: Mapping[str, int],
        *,
        speedup: float = 1.0,
        enforce: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.windows = {
            tier: FixedWindow(limit, 60.0, speedup=speedup, enforce=enforce, clock=clock, wall=wall)
            for tier, limit in limits.items()
        }

    def hit(self, key: object, tier: str) -> WindowState | None:
        """Count one call of ``tier``; None for an unlimited tier."""
        window = self.windows.get(tier)
        return None if window is None else window.hit(key)

    def peek(self, key: object, tier: str) -> WindowState | None:
        window = self.windows.get(tier)
        return None if window is None else window.peek(key)

"""Client-side rate limiting: token buckets that follow the vendor's published limits.

Waiting here costs nothing; a 429 costs a round trip and a Retry-After pause, so the client
paces itself to the published burst and steady rates and treats 429 as the exception.

The clock and the sleep are constructor parameters (``time.monotonic`` and ``time.sleep`` by
default) so that the pacing can be tested on a fake clock: how long N calls wait is then an
exact figure rather than a wall-clock measurement that a loaded machine makes unreliable.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]
Sleep = Callable[[float], None]

# Refill arithmetic in floats can leave a bucket at 0.999999999 tokens right after sleeping for
# exactly the computed wait; without this slack the caller would sleep a second, tiny time.
_EPSILON = 1e-9


@dataclass
class Bucket:
    """``capacity`` tokens, refilled at ``per_second``; starts full at ``stamp``.

    ``tokens`` and ``stamp`` default to "full, now on the monotonic clock"; a limiter with its
    own clock passes ``stamp`` so that the bucket's time and the limiter's time are one.
    """

    capacity: float
    per_second: float
    tokens: float = -1.0  # negative: start full
    stamp: float = math.nan  # NaN: start now, on the monotonic clock

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity
        if math.isnan(self.stamp):
            self.stamp = time.monotonic()

    def wait_time(self, now: float) -> float:
        """Refill up to ``now``; return 0.0 if a token is there, else the seconds until one is."""
        elapsed = max(0.0, now - self.stamp)  # a clock that steps back refills nothing
        self.tokens = min(self.capacity, self.tokens + elapsed * self.per_second)
        self.stamp = now
        if self.tokens >= 1 - _EPSILON:
            return 0.0
        return (1 - self.tokens) / self.per_second

    def take(self) -> None:
        """Spend one token (after ``wait_time`` said one is there)."""
        self.tokens -= 1


# share of a window's limit a bucket may let through at once (at least one call): the rest is
# spread over the window, so no span of the window's length ever holds more than its limit
WINDOW_BURST = 0.02


def shape(limit: float, period: float) -> tuple[float, float]:
    """(capacity, tokens per vendor second) of a bucket that lets at most ``limit`` calls
    through in any span of ``period`` vendor seconds.

    Klaviyo counts calls in fixed windows ("a fixed-window rate limiting algorithm with two
    distinct windows: burst (1-second window) and steady (1-minute window)",
    https://developers.klaviyo.com/en/docs/rate_limits_and_error_handling). A bucket of
    ``limit`` tokens refilled at ``limit / period`` lets ``capacity + rate × period`` = twice
    the limit through in a span of ``period`` after an idle spell, so a clock-minute can see
    twice the steady limit and 429s. A small bucket (``WINDOW_BURST`` of the limit) refilled
    at ``(limit - capacity) / period`` never passes ``limit`` in any span, so in no window the
    vendor counts, wherever its edges lie; it costs 2 % of the throughput."""
    capacity = max(1.0, limit * WINDOW_BURST)
    return capacity, max(limit - capacity, min(limit, 1.0)) / period


NOTABLE_WAIT = 3.0  # seconds: a pacing wait this long is shown as the run's phase while it lasts


def paced_sleep(sleep: Sleep, seconds: float) -> None:
    """Sleep a pacing wait; one of ``NOTABLE_WAIT`` or more is the run's phase ("rate limited,
    resuming in 12 s") while it lasts, so an unattended run says why it is quiet."""
    if seconds < NOTABLE_WAIT:
        sleep(seconds)
        return
    from reverse_etl.progress import phase  # the engine's, imported late: no import cycle

    with phase(f"rate limited, resuming in {seconds:.0f} s"):
        sleep(seconds)


class RateLimiter:
    """Burst per second and steady per minute, as in ``x-klaviyo-ratelimit``, each a bucket
    that never lets more than its limit through in any second or minute (``shape``).

    ``speedup`` scales the refill rates (a sandbox whose minute lasts a second needs a client
    that refills 60 times as fast); ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        burst_per_second: float,
        steady_per_minute: float,
        *,
        speedup: float = 1.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ):
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._buckets = []
        for limit, period in ((burst_per_second, 1.0), (steady_per_minute, 60.0)):
            capacity, rate = shape(limit, period)
            self._buckets.append(Bucket(capacity, rate * speedup, stamp=now))
        self._lock = threading.Lock()
        self.waited = 0.0  # total seconds callers of acquire() spent asleep
        self.waits = 0  # how many of those sleeps there were

    def acquire(self) -> float:
        """Block until a call is allowed; return the seconds waited.

        The sleep happens outside the lock so that other threads can compute their own wait;
        after it the buckets are checked again, since another thread may have taken the token.
        """
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                delay = max(b.wait_time(now) for b in self._buckets)
                if delay <= 0:
                    for b in self._buckets:
                        b.take()
                    return waited
                self.waited += delay
                self.waits += 1
            paced_sleep(self._sleep, delay)
            waited += delay


class Unlimited(RateLimiter):
    """A limiter that never waits: for calls the vendor does not rate-limit."""

    def __init__(self) -> None:  # noqa: D107 - no buckets, nothing to pace
        self.waited = 0.0
        self.waits = 0

    def acquire(self) -> float:
        return 0.0


def parse_rate(text: str) -> float:
    """``'10/s'`` → 10, ``'150/m'`` → 150."""
    return float(text.split("/")[0])

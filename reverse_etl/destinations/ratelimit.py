"""Client-side rate limiting: token buckets that follow the vendor's published limits.

Waiting here costs nothing; a 429 costs a round trip and a Retry-After pause, so the client
paces itself to the published burst and steady rates and treats 429 as the exception.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class Bucket:
    capacity: float
    per_second: float
    tokens: float = -1.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def wait_time(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.per_second


class RateLimiter:
    """Burst per second and steady per minute, as in ``x-klaviyo-ratelimit``."""

    def __init__(self, burst_per_second: float, steady_per_minute: float, *, speedup: float = 1.0):
        self._buckets = [
            Bucket(burst_per_second, burst_per_second * speedup),
            Bucket(steady_per_minute, steady_per_minute / 60.0 * speedup),
        ]
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block until a call is allowed; return the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = time.monotonic()
                delay = max(b.wait_time(now) for b in self._buckets)
                if delay <= 0:
                    for b in self._buckets:
                        b.tokens -= 1
                    return waited
            time.sleep(delay)
            waited += delay


class Unlimited(RateLimiter):
    def __init__(self) -> None:  # noqa: D107 - nothing to track
        pass

    def acquire(self) -> float:
        return 0.0


def parse_rate(text: str) -> float:
    """``'10/s'`` → 10, ``'150/m'`` → 150."""
    return float(text.split("/")[0])

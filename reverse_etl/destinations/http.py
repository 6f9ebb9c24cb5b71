"""The HTTP layer shared by destinations: pacing, retries, and errors without secrets.

Retried: 429 (after ``Retry-After``), 5xx, timeouts and dropped connections, with
exponential backoff and jitter, up to ``max_attempts``; then a DestinationError says what
failed. Other 4xx answers are the caller's to read (a refused record is data, not an outage).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson

from reverse_etl.destinations.ratelimit import RateLimiter, Unlimited
from reverse_etl.errors import DestinationError
from reverse_etl.secrets import scrub

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_STATUS = {429, 500, 502, 503, 504}
NOT_APPLIED = {429, 503}  # the request was refused before it did anything


class Unsure(DestinationError):
    """A create may or may not have been applied (timeout, dropped connection, 5xx): the
    caller looks the object up before trying again, so a retry never makes a duplicate."""


@dataclass
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0


class ApiClient:
    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        auth: httpx.Auth | tuple[str, str] | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        name: str = "API",
    ):
        self.name = name
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            auth=auth,
            timeout=timeout,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
        )
        self.retries = 0
        self.throttled = 0

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        limiter: RateLimiter | None = None,
        content_type: str | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        """Send with retries. ``idempotent=False`` (creates): only answers that say nothing
        was done (429, 503) are retried here; any other failure raises ``Unsure``."""
        limiter = limiter or Unlimited()
        headers = {"Content-Type": content_type} if content_type and content is not None else None
        last = ""
        for attempt in range(1, self.retry.max_attempts + 1):
            limiter.acquire()
            try:
                response = self._http.request(
                    method, path, content=content, params=params, headers=headers
                )
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}"
                if not idempotent:
                    raise Unsure(
                        f"{self.name} {method} {path}: {last}; it may have been applied"
                    ) from None
                self._backoff(attempt, None, last, method, path)
                continue
            if response.status_code not in RETRY_STATUS:
                return response
            last = f"HTTP {response.status_code}"
            if not idempotent and response.status_code not in NOT_APPLIED:
                raise Unsure(f"{self.name} {method} {path}: {last}; it may have been applied")
            retry_after = None
            if response.status_code == 429:
                self.throttled += 1
                retry_after = _retry_after(response, self.retry.max_retry_after)
            self._backoff(attempt, retry_after, last, method, path)
        raise DestinationError(
            scrub(
                f"{self.name} {method} {path} failed after {self.retry.max_attempts} attempts "
                f"(last: {last}); rows not acknowledged stay behind the watermark and are sent "
                "again next run"
            )
        )

    def _backoff(
        self, attempt: int, retry_after: float | None, what: str, method: str, path: str
    ) -> None:
        if attempt >= self.retry.max_attempts:
            return
        self.retries += 1
        if retry_after is not None:
            delay = retry_after
        else:
            delay = min(self.retry.max_delay, self.retry.base_delay * 2 ** (attempt - 1))
            delay *= 0.5 + random.random() / 2
        log.debug("%s %s %s: %s, retry %d in %.2fs", self.name, method, path, what, attempt, delay)
        time.sleep(delay)

    def close(self) -> None:
        self._http.close()


def _retry_after(response: httpx.Response, cap: float) -> float:
    value = response.headers.get("Retry-After", "1")
    try:
        return min(cap, max(0.0, float(value)))
    except ValueError:
        return 1.0


def decoded(response: httpx.Response, what: str) -> Any:
    """The JSON body of a successful answer; an error answer raises, naming ``what`` failed."""
    if response.status_code >= 400:
        raise DestinationError(f"{what}: {error_detail(response)}")
    return orjson.loads(response.content) if response.content else None


def error_detail(response: httpx.Response) -> str:
    """A short, secret-free description of an error answer, for messages."""
    text = response.text[:500]
    return scrub(f"HTTP {response.status_code}: {text}")


SETTLE_SECONDS = (0.5, 1.0, 2.0)  # how long a timed-out create may take to show up


def find_or_create(
    find: Callable[[], T | None], create: Callable[[], T], what: str, attempts: int = 3
) -> T:
    """Create unless it exists. A create whose answer was lost (``Unsure``: a timeout, a
    dropped connection, a 5xx) may still be applied later, so the look-up is repeated for a
    while before creating again; a refused create (perhaps another writer just made it) is
    looked up again too. Lists and fields are named: a duplicate is worse than a wait."""
    last: DestinationError | None = None
    for _ in range(attempts):
        found = find()
        if found is not None:
            return found
        try:
            return create()
        except Unsure as exc:
            last = exc
            for delay in SETTLE_SECONDS:
                time.sleep(delay)
                found = find()
                if found is not None:
                    return found
        except DestinationError as exc:
            last = exc
    raise DestinationError(f"creating {what} failed after {attempts} attempts (last: {last})")

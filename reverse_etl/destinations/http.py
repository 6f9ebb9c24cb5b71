"""The HTTP layer shared by destinations: pacing, retries, creates that never happen twice, and
errors without secrets.

Retried: 429 (after ``Retry-After``), 5xx, timeouts and dropped connections, with
exponential backoff and jitter, up to ``max_attempts``; then a DestinationError says what
failed. Other 4xx answers are the caller's to read (a refused record is data, not an outage).
Never retried: a request the HTTP library refuses to build (``NOT_BUILT``: a header value
HTTP cannot carry, a URL without http(s)); it fails the same way every time, so it raises at
once, saying it is not a network error.

Creates (a list, a data field, an address book, a catalog item job) are not idempotent: sent
twice, they make two objects or meet a "duplicate" refusal. ``ApiClient.create_once`` is the
one path every such create takes; see its docstring.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson

from reverse_etl import progress
from reverse_etl.destinations.ratelimit import NOTABLE_WAIT, RateLimiter, Unlimited
from reverse_etl.errors import DestinationError
from reverse_etl.secrets import scrub

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_STATUS = {429, 500, 502, 503, 504}
NOT_APPLIED = {429, 503}  # the request was refused before it did anything
STILL_RUNNING = {502, 504}  # a gateway gave up waiting: the vendor may still be working on it
# Failures before the request left: nothing can have been applied, so even a create is retried.
NOT_SENT: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
# The request was never built: httpx/h11 refused it (an illegal header value, such as an API
# key ending in a newline; a URL whose scheme is not http or https). A local error, not a
# network fault: sending it again fails identically, so it is raised at once, never retried.
# These are TransportErrors to httpx, hence caught before them.
NOT_BUILT: tuple[type[Exception], ...] = (httpx.LocalProtocolError, httpx.UnsupportedProtocol)
# what h11 refuses in a header value: NUL, CR, LF, other whitespace but space and tab, and
# space or tab at either end
_ILLEGAL_HEADER_VALUE = re.compile(rb"[\x00\n\r\x0b\x0c]|\A[ \t]|[ \t]\Z")


class Unsure(DestinationError):
    """A create may or may not have been applied (timeout, dropped connection, 5xx): the
    caller looks the object up before trying again, so a retry never makes a duplicate.
    ``pending`` is how many seconds from now the lost request may still be applied."""

    def __init__(self, message: str, *, pending: float):
        super().__init__(message)
        self.pending = pending


class Exists(DestinationError):
    """A create refused because the object is already there (409 Conflict, or the vendor's
    duplicate code: Dotdigital's ``ERROR_NON_UNIQUE_DATAFIELD``): look it up, it is ours to use
    (our own earlier create whose answer was lost, or another writer's)."""


@dataclass
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0
    # A create whose answer was lost may still be under way at the vendor: it is looked up
    # until the client's timeout (as long again as the client waited) plus this margin have
    # passed since the loss, ``settle_first`` seconds apart at first, backing off to
    # ``settle_max``.
    settle_margin: float = 10.0
    settle_first: float = 0.25
    settle_max: float = 5.0


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
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ):
        self.name = name
        # injectable so backoff and look-up windows can be tested without waiting
        self._clock = clock or time.monotonic
        self._sleep = sleep or time.sleep
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        try:
            self._http = httpx.Client(
                base_url=base_url.rstrip("/"),
                headers=headers,
                auth=auth,
                timeout=timeout,
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
            )
        except UnicodeEncodeError:  # its text quotes the header's value: never shown
            bad = ", ".join(k for k, v in headers.items() if not v.isascii()) or "a header"
            raise DestinationError(
                f"{name}: the value of {bad} holds a character that is not ASCII, which an "
                "HTTP header cannot carry; check the connection's credentials and settings "
                "(not a network error)"
            ) from None
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
        """Send with retries. ``idempotent=False`` (creates): only failures that say nothing
        was done (429, 503, no connection) are retried here; any other raises ``Unsure``."""
        limiter = limiter or Unlimited()
        headers = {"Content-Type": content_type} if content_type and content is not None else None
        last = ""
        for attempt in range(1, self.retry.max_attempts + 1):
            paced = limiter.acquire()
            if paced > 0 and paced >= NOTABLE_WAIT:
                # the limiter showed it as the run's phase while it slept (ratelimit.paced_sleep)
                log.info(
                    "%s %s %s: rate limited (client-side pacing to the published limits), "
                    "waited %.0f s",
                    self.name,
                    method,
                    scrub(path),
                    paced,
                    extra={"wait_s": round(paced, 3)},
                )
            sent_at = self._clock()
            try:
                response = self._http.request(
                    method, path, content=content, params=params, headers=headers
                )
            except NOT_BUILT as exc:
                self._trace(method, path, type(exc).__name__, sent_at)
                raise self._not_built(method, path, exc, headers) from None
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}"
                self._trace(method, path, last, sent_at)
                if not idempotent and not isinstance(exc, NOT_SENT):
                    raise self._unsure(method, path, last, self.timeout) from None
                self._backoff(attempt, None, last, method, path)
                continue
            self._trace(method, path, response.status_code, sent_at)
            if response.status_code not in RETRY_STATUS:
                return response
            last = f"HTTP {response.status_code}"
            if not idempotent and response.status_code not in NOT_APPLIED:
                # a 500 was answered once the work had stopped: if it was applied, it shows at
                # once; behind a 502/504 the vendor may still be working on it
                running = self.timeout if response.status_code in STILL_RUNNING else 0.0
                raise self._unsure(method, path, last, running)
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

    def _trace(self, method: str, path: str, status: int | str, sent_at: float) -> None:
        """With -v (DEBUG): one line per HTTP exchange, never its headers or body."""
        if not log.isEnabledFor(logging.DEBUG):
            return
        ms = (self._clock() - sent_at) * 1000
        path = scrub(path)
        fields: dict[str, Any] = {"method": method, "path": path, "duration_ms": round(ms, 1)}
        fields["status" if isinstance(status, int) else "error"] = status
        log.debug("%s %s %s -> %s in %.0f ms", self.name, method, path, status, ms, extra=fields)

    def _not_built(
        self, method: str, path: str, exc: Exception, headers: dict[str, str] | None
    ) -> DestinationError:
        """The error for a request the HTTP library would not build (``NOT_BUILT``). It names
        the operation and the offending header, never the exception's text or a header's
        value: h11 quotes the refused value, and the Authorization header holds the key."""
        kind = type(exc).__name__
        if isinstance(exc, httpx.UnsupportedProtocol):
            why = "its URL does not start with http:// or https://; check the base_url"
        else:
            sent = list(self._http.headers.raw)
            sent += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
            bad = [k.decode() for k, v in sent if _ILLEGAL_HEADER_VALUE.search(v)]
            where = f"the value of header {', '.join(bad)}" if bad else "a header value"
            why = (
                f"{where} holds a character HTTP does not allow (a newline or other control "
                "character, or whitespace at either end); check the connection's credentials"
            )
        return DestinationError(
            scrub(
                f"{self.name} {method} {path}: the HTTP client refused to build the request "
                f"({kind}): {why}. Not a network error, so not retried"
            )
        )

    def _unsure(self, method: str, path: str, what: str, running: float) -> Unsure:
        return Unsure(
            f"{self.name} {method} {path}: {what}; it may have been applied",
            pending=running + self.retry.settle_margin,
        )

    def create_once(
        self,
        find: Callable[[], T | None],
        create: Callable[[], T],
        what: str,
        *,
        look_first: bool = True,
        attempts: int = 3,
    ) -> T:
        """Find the object, else create it, never twice.

        A create whose outcome is unknown (``Unsure``: a timeout or a connection dropped after
        the request left, a 5xx) may be applied late: the sandbox's ``timeout`` fault holds the
        answer past the client's timeout and then applies it, as a vendor under load does. So
        the object is looked up again, with backoff, for as long as the lost request can still
        land (``Unsure.pending``: the client's timeout plus ``settle_margin``), and created again
        only if it never shows. A create the vendor refuses as a duplicate (``Exists``) is
        looked up the same way. Lookups are the only protection where names may repeat
        (Klaviyo lists: a second "Create List" with the same name makes a second list).

        ``find`` returns the object or None; ``look_first=False`` when the caller has just
        looked. Other refusals of the create propagate at once: sending it again changes
        nothing."""
        if look_first:
            found = find()
            if found is not None:
                return found
        last: DestinationError | None = None
        for _ in range(attempts):
            try:
                return create()
            except Unsure as exc:
                last, window = exc, exc.pending
            except Exists as exc:
                last, window = exc, self.retry.settle_margin
            log.info(
                "%s: %s; looking it up for up to %.1fs before creating again", what, last, window
            )
            found = self._settle(find, window)
            if found is not None:
                return found
        raise DestinationError(
            scrub(f"creating {what} failed after {attempts} attempts (last: {last})")
        )

    def _settle(self, find: Callable[[], T | None], seconds: float) -> T | None:
        """``find`` until it finds, or until ``seconds`` have passed (one look at the end)."""
        deadline = self._clock() + seconds
        delay = self.retry.settle_first
        while True:
            self._sleep(max(0.0, min(delay, deadline - self._clock())))
            found = find()
            if found is not None or self._clock() >= deadline:
                return found
            delay = min(delay * 2, self.retry.settle_max)

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
        # logged as it happens, so a long retry loop is never silent
        log.warning(
            "%s %s %s: %s; retry %d of %d in %.1f s",
            self.name,
            method,
            scrub(path),
            what,
            attempt,
            self.retry.max_attempts - 1,
            delay,
            extra={"attempt": attempt, "wait_s": round(delay, 3)},
        )
        if delay < NOTABLE_WAIT:
            self._sleep(delay)
            return
        limited = "rate limited" if retry_after is not None else f"{self.name} answered {what}"
        with progress.phase(f"{limited}, resuming in {delay:.0f} s"):
            self._sleep(delay)

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


def created(response: httpx.Response, what: str, *, duplicate: Collection[str] = ()) -> Any:
    """The JSON body of a create's answer. A refusal saying the object exists (409 Conflict,
    or a 4xx whose body names one of the vendor's ``duplicate`` codes) raises ``Exists`` for
    ``create_once`` to look it up; any other refusal a DestinationError."""
    if response.status_code >= 400:
        exists = response.status_code == 409 or (
            response.status_code < 500 and any(code in response.text for code in duplicate)
        )
        raise (Exists if exists else DestinationError)(f"{what}: {error_detail(response)}")
    return orjson.loads(response.content) if response.content else None


def error_detail(response: httpx.Response) -> str:
    """A short, secret-free description of an error answer, for messages."""
    text = response.text[:500]
    return scrub(f"HTTP {response.status_code}: {text}")

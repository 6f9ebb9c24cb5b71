"""The HTTP layer shared by destinations: pacing, retries, creates that never happen twice, and
errors without secrets.

Retried: 429 (after ``Retry-After``), 5xx, timeouts and dropped connections, with
exponential backoff and jitter, up to ``max_attempts``; then a DestinationError says what
failed. Other 4xx answers are the caller's to read (a refused record is data, not an outage).
Never retried: a request the HTTP library refuses to build (``NOT_BUILT``: a header value
HTTP cannot carry, a URL without http(s)); it fails the same way every time, so it raises at
once, saying it is not a network error. A host that does not resolve or a TLS handshake that
fails is tried ``DETERMINISTIC_ATTEMPTS`` times, not ``max_attempts``: it fails the same way
again; the error names the host and port and the cause (``ApiClient._failure``).

The timeout is each attempt's whole budget, not httpx's per-read limit (``deadline``); a 3xx
or a 2xx whose body is not JSON is an error naming the call, never an internal error.

Creates (a list, a data field, an address book, a catalog item job) are not idempotent: sent
twice, they make two objects or meet a "duplicate" refusal. ``ApiClient.create_once`` is the
one path every such create takes; see its docstring.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import ssl
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpcore
import httpx
import orjson

from reverse_etl import progress
from reverse_etl.destinations.ratelimit import NOTABLE_WAIT, RateLimiter, Unlimited
from reverse_etl.errors import DestinationError
from reverse_etl.secrets import register_basic_auth, scrub

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
# A host that does not resolve, a TLS handshake that fails: the same answer every time, so
# tried this many times (a second attempt rides out a resolver or network blip), not 8.
DETERMINISTIC_ATTEMPTS = 2
CHECK_BASE_URL = "check base_url in the connection profile"
# Retry-After when absent, unreadable, negative or a date already past (RFC 9110 10.2.3: "either
# an HTTP-date or a number of seconds", https://www.rfc-editor.org/rfc/rfc9110#name-retry-after)
RETRY_AFTER_DEFAULT = 1.0
_DELAY_SECONDS = re.compile(r"-?\d+(?:\.\d+)?")

# The real clocks, bound here: tests swap this module's ``time`` for a fake one (the backoff's
# sleep), while a deadline is measured against real sockets.
_monotonic = time.monotonic
_epoch = time.time


# ------------------------------------------------------------------ a deadline per attempt

# httpx's timeout limits each socket read, so an answer that drips a byte a second never times
# out (a fault proxy held GET /api/lists for 400 s). The attempt's deadline, on the monotonic
# clock; every read, write and connect of the connection pool's sockets is bounded by it.
_DEADLINE: ContextVar[float | None] = ContextVar("reverse_etl_http_deadline", default=None)
_WRITE_PIECE = 65536  # a large body is written in pieces, so its deadline is checked between


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Let the requests made inside (in this thread, through a client that ``with_deadline``
    prepared) take ``seconds`` in all, connecting, sending and reading the answer; past it
    they raise httpx's ``ConnectTimeout``, ``WriteTimeout`` or ``ReadTimeout``, as the
    per-read timeout does."""
    token = _DEADLINE.set(_monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` shortened to what is left of the deadline; raises ``error`` once it passed."""
    end = _DEADLINE.get()
    if end is None:
        return timeout
    left = end - _monotonic()
    if left <= 0:
        raise error("no complete answer before the request's deadline")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection's socket, each operation bounded by the current ``deadline``."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), _WRITE_PIECE):
            piece = buffer[start : start + _WRITE_PIECE]
            self._inner.write(piece, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend, its streams bounded by the current ``deadline``."""

    def __init__(self, inner: httpcore.NetworkBackend):
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.connect_tcp(host, port, bounded, local_address, socket_options)
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def with_deadline(client: httpx.Client) -> httpx.Client:
    """``client``, its connection pools (the direct one and each proxy's) made to honour
    ``deadline``. httpx exposes no network backend, so the pools' (httpcore's public
    ``network_backend``, held as ``_network_backend``) is wrapped in place; a transport that
    has no pool (a test's ``MockTransport``) is left as it is."""
    for transport in [
        getattr(client, "_transport", None),
        *getattr(client, "_mounts", {}).values(),
    ]:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, httpcore.NetworkBackend) and not isinstance(
            backend, _DeadlineBackend
        ):
            pool._network_backend = _DeadlineBackend(backend)  # type: ignore[union-attr]
    return client


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
        wall_clock: Callable[[], float] | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        """``timeout``: each attempt's whole budget in seconds (``deadline``). ``clock`` and
        ``sleep`` (backoff, look-up windows) and ``wall_clock`` (seconds since the epoch, what
        a ``Retry-After`` date is read against) are injectable so tests need not wait;
        ``transport`` replaces httpx's (tests count attempts with it)."""
        self.name = name
        # injectable so backoff and look-up windows can be tested without waiting
        self._clock = clock or time.monotonic
        self._sleep = sleep or time.sleep
        self._wall_clock = wall_clock or _epoch
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        if isinstance(auth, tuple):  # Basic: its header is base64, which scrub() must know
            register_basic_auth(*auth)
        try:
            self._http = with_deadline(
                httpx.Client(
                    base_url=base_url.rstrip("/"),
                    headers=headers,
                    auth=auth,
                    timeout=timeout,
                    limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
                    # a POST is never replayed to wherever a 3xx points; a 3xx is an error
                    follow_redirects=False,
                    transport=transport,
                )
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
        was done (429, 503, no connection) are retried here; any other raises ``Unsure``.
        Each attempt has ``timeout`` seconds in all (``deadline``); a 3xx raises at once
        (``redirect_error``)."""
        limiter = limiter or Unlimited()
        headers = {"Content-Type": content_type} if content_type and content is not None else None
        last = ""
        hint = ""  # what the user can check, when the last failure says
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
                with deadline(self.timeout):
                    response = self._http.request(
                        method, path, content=content, params=params, headers=headers
                    )
            except NOT_BUILT as exc:
                self._trace(method, path, type(exc).__name__, sent_at)
                raise self._not_built(method, path, exc, headers) from None
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                self._trace(method, path, type(exc).__name__, sent_at)
                last, deterministic = self._failure(exc)
                connecting = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                hint = f"; {CHECK_BASE_URL}" if connecting else ""
                if deterministic and attempt >= min(
                    DETERMINISTIC_ATTEMPTS, self.retry.max_attempts
                ):
                    raise DestinationError(
                        scrub(
                            f"{self.name} {method} {path}: {last}, on each of {attempt} "
                            f"attempt(s){hint}. Not retried further: it fails the same way "
                            "every time"
                        )
                    ) from None
                if not idempotent and not isinstance(exc, NOT_SENT):
                    raise self._unsure(method, path, last, self.timeout) from None
                self._backoff(attempt, None, last, method, path)
                continue
            self._trace(method, path, response.status_code, sent_at)
            if 300 <= response.status_code < 400:
                raise redirect_error(response, f"{self.name} {method} {path}")
            if response.status_code not in RETRY_STATUS:
                return response
            last, hint = f"HTTP {response.status_code}", ""
            if not idempotent and response.status_code not in NOT_APPLIED:
                # a 500 was answered once the work had stopped: if it was applied, it shows at
                # once; behind a 502/504 the vendor may still be working on it
                running = self.timeout if response.status_code in STILL_RUNNING else 0.0
                raise self._unsure(method, path, last, running)
            retry_after = None
            if response.status_code == 429:
                self.throttled += 1
                retry_after, asked = _retry_after(
                    response.headers.get("Retry-After"),
                    self.retry.max_retry_after,
                    self._wall_clock(),
                )
                if asked is not None and asked > retry_after:
                    # said, so a run that gives up after waiting less than asked says why
                    last += (
                        f" (Retry-After asked {asked:.0f} s; this client waits at most "
                        f"{retry_after:g} s, then tries again)"
                    )
            self._backoff(attempt, retry_after, last, method, path)
        raise DestinationError(
            scrub(
                f"{self.name} {method} {path} failed after {self.retry.max_attempts} attempts "
                f"(last: {last}){hint}; rows not acknowledged stay behind the watermark and "
                "are sent again next run"
            )
        )

    def _failure(self, exc: Exception) -> tuple[str, bool]:
        """(what went wrong, whether trying again fails the same way) for a transport error.
        A connection failure names the host and port of base_url and the cause; httpx's own
        text says neither ("ConnectError" after 8 attempts was all a user saw)."""
        kind = type(exc).__name__
        url = self._http.base_url
        port = url.port or (443 if url.scheme == "https" else 80)
        where = f"{url.host}:{port}"
        if isinstance(exc, httpx.ConnectTimeout):
            return f"connecting to {where} timed out ({kind})", False
        if isinstance(exc, httpx.TimeoutException):
            return f"{kind}: no complete answer within {self.timeout:g} s", False
        if not isinstance(exc, httpx.ConnectError):
            return kind, False
        cause = _root_cause(exc)
        if isinstance(cause, socket.gaierror):
            why = cause.strerror or str(cause)
            return f"the host {url.host} ({where}) does not resolve (DNS: {why})", True
        if isinstance(cause, ssl.SSLError):
            why = str(cause) or type(cause).__name__
            return (
                f"the TLS handshake with {where} failed ({why}); if that port speaks plain "
                "HTTP, base_url must start with http://, not https://",
                True,
            )
        if isinstance(cause, ConnectionRefusedError):
            return (
                f"{where} refused the connection (nothing listens there, or it is restarting)",
                False,
            )
        why = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        return f"could not connect to {where} ({why})", False

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


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception behind ``exc`` (httpx wraps httpcore's, which wraps the OS's)."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


def _retry_after(value: str | None, cap: float, now: float) -> tuple[float, float | None]:
    """(seconds to wait, seconds the server asked or None) for a 429's ``Retry-After``.

    RFC 9110 section 10.2.3: "either an HTTP-date or a number of seconds"; a date is read
    against ``now`` (seconds since the epoch). Absent, unreadable, negative, or a date already
    past: ``RETRY_AFTER_DEFAULT`` (a negative number used to mean back-to-back retries, a date
    a 1 s guess). The wait is capped at ``cap`` (``RetryPolicy.max_retry_after``)."""
    asked = retry_after_asked(value, now)
    wait = RETRY_AFTER_DEFAULT if asked is None or asked < 0 else asked
    return min(cap, wait), asked


def retry_after_asked(value: str | None, now: float) -> float | None:
    """The seconds a ``Retry-After`` asks for (RFC 9110 section 10.2.3: delay-seconds, or an
    HTTP-date read against ``now``, seconds since the epoch; negative for a date already
    past), or None when absent or unreadable. Each caller decides what it waits on that."""
    text = (value or "").strip()
    if _DELAY_SECONDS.fullmatch(text):
        return float(text)
    if not text:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now


def _call(what: str) -> str:
    """``what`` without a query string (it may carry a key), scrubbed."""
    return scrub(re.sub(r"\?[^\s)]*", "", what))


def redirect_error(response: httpx.Response, what: str) -> DestinationError:
    """The error for a 3xx. Neither vendor's API redirects, so something else answered: a
    base_url that is not the API's (http:// where the API is https://, a web page's address),
    or a proxy. Not followed: a redirected POST would be sent to another host."""
    location = response.headers.get("Location", "")
    where = f"redirected to {_call(location)}" if location else "redirected (no Location)"
    return DestinationError(
        f"{_call(what)}: HTTP {response.status_code}, {where}; the API does not redirect, so "
        f"something other than the API answered: {CHECK_BASE_URL}, or a proxy in between"
    )


def _json_body(response: httpx.Response, what: str, expect: type | None) -> Any:
    """The JSON body of a 2xx (None when empty): one that is not JSON, or not the ``expect``
    type at its top, raises a DestinationError naming the call, its status and content type
    (an HTML login page of a proxy, a web server at base_url), not a JSONDecodeError."""
    if not response.content:
        return None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        problem = "a body that is not JSON"
    else:
        if expect is None or isinstance(body, expect):
            return body
        problem = f"JSON of another shape (a {type(body).__name__}, not a {expect.__name__})"
    raise DestinationError(
        scrub(
            f"{_call(what)}: HTTP {response.status_code} with {problem} ({_glimpse(response)}); "
            f"the API answers JSON, so something else answered: {CHECK_BASE_URL}, or a proxy in "
            "between"
        )
    )


def _glimpse(response: httpx.Response) -> str:
    """The content type and start of an answer that is not the API's (an HTML page)."""
    ctype = response.headers.get("Content-Type") or "none"
    return f"Content-Type: {ctype}; it starts {' '.join(response.text[:100].split())!r}"


def unacknowledged(
    response: httpx.Response, what: str, expected: str, then: str
) -> DestinationError:
    """The error for an answer below 400 that is not the call's documented acknowledgement
    (``expected``, e.g. "202 Accepted"): a proxy's 200 HTML page is not the API taking the
    call, so nothing in it counts as done; ``then`` says what happens to its rows."""
    return DestinationError(
        scrub(
            f"{_call(what)} was not acknowledged: it answered HTTP {response.status_code} "
            f"({_glimpse(response)}) instead of {expected}; {CHECK_BASE_URL}, or a proxy in "
            f"between; {then}"
        )
    )


def decoded(response: httpx.Response, what: str, *, expect: type | None = None) -> Any:
    """The JSON body of a successful answer; an error answer raises, naming ``what`` failed,
    and so does a redirect or a body that is not JSON (``expect``: the type the caller needs
    at its top, when it knows)."""
    if response.status_code >= 400:
        raise DestinationError(f"{what}: {error_detail(response)}")
    if 300 <= response.status_code < 400:
        raise redirect_error(response, what)
    return _json_body(response, what, expect)


def objects(items: Any, what: str, *, keys: Collection[str]) -> list[dict[str, Any]]:
    """``items`` (a decoded answer's list) as objects that each hold ``keys``; anything else
    is not the answer the call documents (a proxy's page, a vendor's change) and raises,
    naming the call. Read as "none found", a Klaviyo list lookup answered without its
    ``data`` made a run create a second list of the same name and fill it."""
    if not isinstance(items, list):
        raise DestinationError(
            f"{what}: the answer holds no list where one was expected (got "
            f"{type(items).__name__}); check base_url, or a proxy between here and the API"
        )
    for item in items:
        missing = (
            sorted(keys) if not isinstance(item, dict) else [k for k in keys if item.get(k) is None]
        )
        if missing:
            raise DestinationError(
                f"{what}: an item of the answer lacks {', '.join(missing)}; check base_url, or "
                "a proxy between here and the API"
            )
    return items


def created(
    response: httpx.Response,
    what: str,
    *,
    duplicate: Collection[str] = (),
    expect: type | None = None,
) -> Any:
    """The JSON body of a create's answer. A refusal saying the object exists (409 Conflict,
    or a 4xx whose body names one of the vendor's ``duplicate`` codes) raises ``Exists`` for
    ``create_once`` to look it up; any other refusal a DestinationError, and so does a
    redirect or a body that is not JSON (as ``decoded``)."""
    if response.status_code >= 400:
        exists = response.status_code == 409 or (
            response.status_code < 500 and any(code in response.text for code in duplicate)
        )
        raise (Exists if exists else DestinationError)(f"{what}: {error_detail(response)}")
    if 300 <= response.status_code < 400:
        raise redirect_error(response, what)
    return _json_body(response, what, expect)


def error_detail(response: httpx.Response) -> str:
    """A short, secret-free description of an error answer, for messages."""
    text = response.text[:500]
    return scrub(f"HTTP {response.status_code}: {text}")

"""Faults of the wire that the shared HTTP layer (``destinations/http.py``) must name rather
than hang on, leak, or crash at: an error body echoing the Basic credentials, an answer that
drips a byte at a time, a redirect or a 2xx that is not JSON, a ``Retry-After`` date or a
negative one, and connections refused, unresolvable or spoken to in the wrong protocol.

Found by a fault-injection proxy between the CLI and the sandboxes. Servers here listen on
127.0.0.1 only and are stopped by the test; attempts are counted by an injected transport or by
the server, never timed.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from email.utils import formatdate

import httpx
import pytest

from reverse_etl.destinations import http
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.destinations.klaviyo.client import KlaviyoClient
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.errors import DestinationError
from reverse_etl.secrets import scrub

NOW = 1_750_000_000.0  # the injected wall clock (seconds since the epoch)


# --------------------------------------------------------------------------- helpers


class LocalServer:
    """A TCP server on 127.0.0.1 whose ``handler(socket, stop)`` serves each connection;
    ``connections`` counts them (one per attempt: every failure here closes the connection)."""

    def __init__(self, handler: Callable[[socket.socket, threading.Event], None]):
        self.stop = threading.Event()
        self.connections = 0
        lock = threading.Lock()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with lock:
                    outer.connections += 1
                with contextlib.suppress(OSError):  # the client gave up: what tests provoke
                    handler(self.request, outer.stop)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket, threading.Event], None]], LocalServer]]:
    servers: list[LocalServer] = []

    def start(handler: Callable[[socket.socket, threading.Event], None]) -> LocalServer:
        servers.append(LocalServer(handler))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def read_request(sock: socket.socket) -> bytes:
    """The request's head, and its body as Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def drip(sock: socket.socket, stop: threading.Event) -> None:
    """Answer a complete, valid 200 a byte every 20 ms: each read gets a byte long before the
    per-read timeout, so only a deadline on the whole request ends it (about 15 s in all)."""
    read_request(sock)
    body = b'{"data": [], "pad": "' + b"x" * 600 + b'"}'
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    for byte in head.encode() + b"\r\n" + body:
        if stop.wait(0.02):
            return
        sock.sendall(bytes([byte]))


class Counting(httpx.BaseTransport):
    """A transport that counts the attempts it is given, passing each to ``inner``."""

    def __init__(self, inner: httpx.BaseTransport):
        self.inner = inner
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def mock(answer: Callable[[httpx.Request], httpx.Response]) -> Counting:
    return Counting(httpx.MockTransport(answer))


def client(
    base_url: str, transport: httpx.BaseTransport | None = None, **kwargs: object
) -> tuple[http.ApiClient, list[float]]:
    """An ApiClient that sleeps on a list (backoff and Retry-After waits are recorded, not
    waited) and reads Retry-After dates against ``NOW``."""
    slept: list[float] = []
    retry = kwargs.pop("retry", None) or http.RetryPolicy(max_attempts=3)
    api = http.ApiClient(
        base_url,
        headers={},
        retry=retry,  # type: ignore[arg-type]
        name="Vendor",
        sleep=slept.append,
        wall_clock=lambda: NOW,
        transport=transport,
        **kwargs,  # type: ignore[arg-type]
    )
    return api, slept


def dotdigital_conn(base_url: str, **kwargs: object) -> DotdigitalConnection:
    return DotdigitalConnection(
        type="dotdigital",
        username="apiuser-faults@apiconnector.com",
        password="Fault-Pässwörd-7731",  # type: ignore[arg-type]
        base_url=base_url,
        **kwargs,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- 1. secrets


def echo_headers(request: httpx.Request) -> httpx.Response:
    """A 400 whose body echoes the request's headers, as some proxies and gateways do."""
    lines = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
    return httpx.Response(400, text=f"Bad request. You sent:\n{lines}")


def test_an_error_body_echoing_the_basic_header_is_scrubbed() -> None:
    """HTTP Basic sends base64("user:password") (RFC 7617 section 2), which decodes to the
    password: an echo of it must not reach stderr or the run record."""
    conn = dotdigital_conn("http://dotdigital.test")
    password = conn.password.get_secret_value()
    basic = base64.b64encode(f"{conn.username}:{password}".encode()).decode()
    dd = DotdigitalClient(conn, transport=httpx.MockTransport(echo_headers))
    try:
        with pytest.raises(DestinationError) as info:
            dd.json("GET", "/v2/address-books")
    finally:
        dd.close()
    message = str(info.value)
    assert "HTTP 400" in message and "authorization: basic ***" in message.lower()
    assert basic not in message and basic[:12] not in message
    assert password not in message
    # registered as a secret, so scrubbed wherever it shows, not only after "Authorization:"
    assert scrub(f'{{"echo": "{basic}"}}') == '{"echo": "***"}'


def test_any_quoted_authorization_value_is_scrubbed() -> None:
    """A credential nobody registered, or one cut short with the text it was in."""
    assert scrub('{"authorization": "Klaviyo-API-Key pk_live_unregistered"}') == (
        '{"authorization": "Klaviyo-API-Key ***"}'
    )
    assert scrub("authorization: Bearer abc.def.ghi\nAccept: x") == (
        "authorization: Bearer ***\nAccept: x"
    )
    cut = base64.b64encode(b"someone:their-password").decode()[:14]
    assert scrub(f"...Basic {cut}") == "...Basic ***"
    assert scrub("Authorization required") == "Authorization required"


# --------------------------------------------------------------------------- 2. dripping answers


def test_an_answer_that_drips_times_out_on_the_whole_request_and_is_retried(serve) -> None:
    server = serve(drip)
    api, _ = client(
        f"http://127.0.0.1:{server.port}", timeout=0.5, retry=http.RetryPolicy(max_attempts=2)
    )
    with pytest.raises(DestinationError) as info:
        api.request("GET", "/api/lists")
    api.close()
    message = str(info.value)
    assert "failed after 2 attempts" in message
    assert "ReadTimeout: no complete answer within 0.5 s" in message
    assert server.connections == 2  # a timeout is retried as before


def test_a_create_whose_answer_drips_is_unsure_not_retried(serve) -> None:
    """Past the deadline a create may have been applied: the same rule as any timeout."""
    server = serve(drip)
    api, _ = client(f"http://127.0.0.1:{server.port}", timeout=0.5)
    with pytest.raises(http.Unsure) as info:
        api.request("POST", "/api/lists", content=b"{}", idempotent=False)
    api.close()
    assert "may have been applied" in str(info.value)
    assert server.connections == 1


def test_a_dotdigital_import_submit_that_drips_ends_at_call_timeout_seconds(serve) -> None:
    """``call_timeout_seconds`` bounds the whole submit, as Dotdigital's own "call duration"
    limit does; ``imports.ImportQueue`` handles the timeout as before."""
    server = serve(drip)
    dd = DotdigitalClient(
        dotdigital_conn(f"http://127.0.0.1:{server.port}", call_timeout_seconds=1)
    )
    try:
        with pytest.raises(httpx.ReadTimeout):
            dd.submit_once("PUT", "/contacts/v3/import", b"[]")
    finally:
        dd.close()
    assert server.connections == 1


def test_a_klaviyo_call_that_drips_ends_at_its_connections_call_timeout_seconds(serve) -> None:
    """Klaviyo's timeout was a fixed 60 s: a call that never answered cost about 8.5 minutes
    of retries. It is the connection's ``call_timeout_seconds``, each attempt's whole budget."""
    server = serve(drip)
    conn = KlaviyoConnection(
        type="klaviyo",
        api_key="pk_test",
        base_url=f"http://127.0.0.1:{server.port}",
        call_timeout_seconds=1,
    )
    kl = KlaviyoClient(conn, retry=http.RetryPolicy(max_attempts=2))
    try:
        with pytest.raises(DestinationError, match="no complete answer within 1"):
            kl.call("get_lists", "GET", "/api/lists")
    finally:
        kl.close()
    assert server.connections == 2
    with pytest.raises(ValueError, match="call_timeout_seconds"):
        KlaviyoConnection(type="klaviyo", api_key="pk_test", call_timeout_seconds=0)


def test_the_deadline_is_only_in_force_inside_its_block() -> None:
    assert http._bounded(5.0, TimeoutError) == 5.0
    with http.deadline(0.0), pytest.raises(TimeoutError):
        http._bounded(5.0, TimeoutError)
    with http.deadline(100.0):
        left = http._bounded(5.0, TimeoutError)
        assert left == 5.0
        assert http._bounded(None, TimeoutError) is not None


# --------------------------------------------------------------------------- 3. malformed answers


def test_a_redirect_is_an_error_naming_where_and_is_not_followed() -> None:
    transport = mock(
        lambda r: httpx.Response(307, headers={"Location": "https://elsewhere.test/x?key=k1"})
    )
    api, slept = client("http://vendor.test", transport)
    assert api._http.follow_redirects is False
    with pytest.raises(DestinationError) as info:
        api.request("POST", "/api/lists", content=b"{}", idempotent=False)
    message = str(info.value)
    assert "Vendor POST /api/lists: HTTP 307, redirected to https://elsewhere.test/x;" in message
    assert "the API does not redirect" in message and "check base_url" in message
    assert "key=k1" not in message
    assert len(transport.requests) == 1 and slept == []  # neither followed nor retried


def test_decoded_and_created_refuse_a_redirect() -> None:
    request = httpx.Request("GET", "http://vendor.test/v2/account-info")
    response = httpx.Response(302, headers={"Location": "http://login.test/"}, request=request)
    for read in (http.decoded, http.created):
        with pytest.raises(DestinationError, match="HTTP 302, redirected to http://login.test/"):
            read(response, "Dotdigital GET /v2/account-info")


def test_a_2xx_that_is_not_json_names_the_call_status_and_content_type() -> None:
    page = httpx.Response(200, html="<html><body>Proxy login</body></html>")
    with pytest.raises(DestinationError) as info:
        http.decoded(page, "Klaviyo GET /api/lists?api_key=pk_in_the_query")
    message = str(info.value)
    assert message.startswith("Klaviyo GET /api/lists: HTTP 200 with a body that is not JSON")
    assert "Content-Type: text/html; charset=utf-8" in message
    assert "Proxy login" in message and "check base_url" in message
    assert "pk_in_the_query" not in message
    with pytest.raises(DestinationError, match="HTTP 201 with a body that is not JSON"):
        http.created(httpx.Response(201, text="OK"), "Dotdigital POST /v2/data-fields")


def test_json_of_the_wrong_shape_is_an_error_when_the_caller_says_what_it_needs() -> None:
    listed = httpx.Response(200, json=[1, 2])
    with pytest.raises(DestinationError, match=r"JSON of another shape \(a list, not a dict\)"):
        http.created(listed, "Klaviyo POST /api/lists", expect=dict)
    assert http.decoded(listed, "Dotdigital GET /v2/data-fields") == [1, 2]
    assert http.decoded(httpx.Response(202), "Klaviyo POST /api/x", expect=dict) is None


# --------------------------------------------------------------------------- 4. Retry-After


def throttled(*values: str) -> Counting:
    answers = iter([httpx.Response(429, headers={"Retry-After": v}) for v in values])
    return mock(lambda r: next(answers, httpx.Response(200, json={})))


def test_a_retry_after_date_is_waited_until_on_the_wall_clock() -> None:
    """RFC 9110 section 10.2.3: Retry-After is an HTTP-date or delay-seconds."""
    api, slept = client("http://vendor.test", throttled(formatdate(NOW + 30, usegmt=True)))
    assert api.request("GET", "/things").status_code == 200
    assert slept == [30.0]


def test_a_negative_retry_after_or_a_past_date_waits_the_default_not_zero() -> None:
    past = formatdate(NOW - 600, usegmt=True)
    api, slept = client("http://vendor.test", throttled("-5", past, "soon"))
    api.retry.max_attempts = 4
    assert api.request("GET", "/things").status_code == 200
    assert slept == [1.0, 1.0, 1.0]


def test_an_absurd_retry_after_is_capped_and_the_error_says_so() -> None:
    api, slept = client(
        "http://vendor.test",
        throttled("86400", "86400"),
        retry=http.RetryPolicy(max_attempts=2, max_retry_after=120.0),
    )
    with pytest.raises(DestinationError) as info:
        api.request("GET", "/things")
    assert slept == [120.0]
    assert "Retry-After asked 86400 s; this client waits at most 120 s" in str(info.value)


@pytest.mark.parametrize("value", ["inf", "nan", "1e9", "", "Tue, 99 Foo 2025"])
def test_unreadable_retry_after_values_wait_the_default(value: str) -> None:
    assert http._retry_after(value, 120.0, NOW) == (1.0, None)


# --------------------------------------------------------------------------- 5. connections


def test_connection_refused_names_the_host_and_is_retried() -> None:
    """A server that is restarting refuses for a while: retried, then named."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    transport = Counting(httpx.HTTPTransport())
    api, _ = client(f"http://127.0.0.1:{port}", transport)
    with pytest.raises(DestinationError) as info:
        api.request("GET", "/api/lists")
    api.close()
    message = str(info.value)
    assert f"127.0.0.1:{port} refused the connection" in message
    assert "failed after 3 attempts" in message and "check base_url in the connection" in message
    assert len(transport.requests) == 3


def test_a_host_that_does_not_resolve_is_named_and_not_retried_eight_times() -> None:
    transport = Counting(httpx.HTTPTransport())
    api, _ = client(
        "https://nonexistent-host.invalid", transport, retry=http.RetryPolicy(max_attempts=8)
    )
    with pytest.raises(DestinationError) as info:
        api.request("GET", "/api/lists")
    api.close()
    message = str(info.value)
    assert "the host nonexistent-host.invalid (nonexistent-host.invalid:443) does not resolve" in (
        message
    )
    assert "check base_url in the connection profile" in message
    assert len(transport.requests) == http.DETERMINISTIC_ATTEMPTS == 2


def test_https_spoken_to_a_plain_http_port_is_named_and_not_retried_eight_times(serve) -> None:
    def plain_http(sock: socket.socket, stop: threading.Event) -> None:
        sock.recv(65536)  # a TLS ClientHello, read as a request
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    server = serve(plain_http)
    api, _ = client(f"https://127.0.0.1:{server.port}", retry=http.RetryPolicy(max_attempts=8))
    with pytest.raises(DestinationError) as info:
        api.request("GET", "/api/lists")
    api.close()
    message = str(info.value)
    assert f"the TLS handshake with 127.0.0.1:{server.port} failed" in message
    assert "base_url must start with http://, not https://" in message
    assert "check base_url in the connection profile" in message
    assert server.connections == http.DETERMINISTIC_ATTEMPTS

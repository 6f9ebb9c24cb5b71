"""Hostile credentials: a key HTTP cannot carry (a trailing newline, a control character,
whitespace) is refused where it is resolved, naming the connection and the variable but never
the value; and a request the HTTP library refuses to build is not retried as if the network
had failed."""

from __future__ import annotations

import socket
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from reverse_etl.config import load_project
from reverse_etl.destinations import http
from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.destinations.klaviyo.client import KlaviyoClient
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.errors import ConfigError, DestinationError
from tests.helpers import API_KEY_ENV, project_data, write_project

# recognisable pieces: none may show in any message, whole or in part
KEY = "pk_live_H0STILE_8812"
PASSWORD = "Hunter2-Pa55phrase"
USERNAME = "apiuser-hostile@apiconnector.com"


def load_error(root: Path, data: dict[str, Any], env: dict[str, str], **kwargs: Any) -> str:
    path = write_project(root, data)
    with pytest.raises(ConfigError) as info:
        load_project(path, root, env=env, **kwargs)
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message


def assert_no_part_of(secret: str, message: str) -> None:
    """Neither the secret nor any 6-character piece of it is in ``message``."""
    pieces = {secret[i : i + 6] for i in range(len(secret) - 5)}
    shown = [p for p in pieces if p in message]
    assert not shown, f"{shown} of the secret in: {message}"


# --------------------------------------------------------------------------- config loading


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (KEY + "\n", "ends with a newline; remove it"),
        (KEY + "\r\n", "ends with a newline; remove it"),
        (KEY + "\r", "ends with a carriage return; remove it"),
        (KEY + " ", "ends with a space; remove it"),
        (KEY + "\t", "ends with a tab; remove it"),
        ("\n" + KEY, "starts with a newline; remove it"),
        (" " + KEY, "starts with a space; remove it"),
        ("\ufeff" + KEY, "starts with a byte order mark (U+FEFF); remove it"),
        (KEY + "\u200b", "ends with an invisible character (U+200B); remove it"),
        (KEY[:8] + " " + KEY[8:], "contains a space; remove it"),
        (KEY[:8] + "\t" + KEY[8:], "contains a tab; remove it"),
        (KEY[:8] + "\n" + KEY[8:], "contains a newline; remove it"),
        (KEY[:8] + "\x00" + KEY[8:], "contains a NUL character; remove it"),
        (KEY[:8] + "\x07" + KEY[8:], "contains a control character (U+0007); remove it"),
        (KEY[:8] + "\x7f" + KEY[8:], "contains a control character (U+007F); remove it"),
        (KEY[:8] + "\u00a0" + KEY[8:], "contains whitespace (U+00A0); remove it"),
        (KEY[:8] + "\u201d" + KEY[8:], "contains a character that is not ASCII"),
    ],
)
@pytest.mark.parametrize("defer_secrets", [False, True])
def test_a_klaviyo_key_http_cannot_carry_is_refused_naming_connection_and_variable(
    tmp_path: Path, value: str, problem: str, defer_secrets: bool
) -> None:
    message = load_error(
        tmp_path, project_data(), {API_KEY_ENV: value}, defer_secrets=defer_secrets
    )
    assert f"connection klaviyo: api_key (from env var {API_KEY_ENV}) {problem}" in message
    assert_no_part_of(KEY, message)


def test_a_literal_key_in_the_file_is_checked_too(tmp_path: Path) -> None:
    data = project_data()
    data["connections"]["klaviyo"]["api_key"] = KEY + " \t"
    message = load_error(tmp_path, data, {})
    assert "connection klaviyo: api_key (as written in the project file) ends with a tab" in (
        message
    )
    assert_no_part_of(KEY, message)


def dotdigital_project() -> dict[str, Any]:
    data = project_data()
    data["connections"]["dd"] = {
        "type": "dotdigital",
        "username": "{{ env_var('RETL_TEST_DD_USER') }}",
        "password": "{{ env_var('RETL_TEST_DD_PASSWORD') }}",
    }
    return data


def test_dotdigital_credentials_are_refused_at_the_ends_but_a_password_may_hold_a_space(
    tmp_path: Path,
) -> None:
    env = {API_KEY_ENV: KEY, "RETL_TEST_DD_USER": USERNAME}
    message = load_error(
        tmp_path, dotdigital_project(), {**env, "RETL_TEST_DD_PASSWORD": PASSWORD + "\n"}
    )
    assert (
        "connection dd: password (from env var RETL_TEST_DD_PASSWORD) ends with a newline; "
        "remove it"
    ) in message
    assert_no_part_of(PASSWORD, message)

    message = load_error(
        tmp_path,
        dotdigital_project(),
        {**env, "RETL_TEST_DD_USER": " " + USERNAME, "RETL_TEST_DD_PASSWORD": PASSWORD},
    )
    assert "connection dd: username (from env var RETL_TEST_DD_USER) starts with a space" in (
        message
    )
    assert_no_part_of(PASSWORD, message)

    message = load_error(
        tmp_path,
        dotdigital_project(),
        {**env, "RETL_TEST_DD_PASSWORD": PASSWORD[:6] + "\x1b" + PASSWORD[6:]},
    )
    assert "password (from env var RETL_TEST_DD_PASSWORD) contains a control character" in (message)
    assert_no_part_of(PASSWORD, message)

    # Basic auth encodes the password: a space inside it is legal and kept as it is
    spaced = PASSWORD[:6] + " " + PASSWORD[6:]
    path = write_project(tmp_path, dotdigital_project())
    project = load_project(path, tmp_path, env={**env, "RETL_TEST_DD_PASSWORD": spaced})
    conn = project.connections["dd"]
    assert isinstance(conn, DotdigitalConnection)
    assert conn.password.get_secret_value() == spaced


def test_a_connection_built_in_code_is_checked_and_its_error_does_not_quote_the_key() -> None:
    with pytest.raises(ValidationError) as info:
        KlaviyoConnection(type="klaviyo", api_key=SecretStr(KEY + "\n"))
    assert "api_key ends with a newline; remove it" in str(info.value)
    assert_no_part_of(KEY, str(info.value))
    with pytest.raises(ValidationError) as info:
        DotdigitalConnection.model_validate(
            {"type": "dotdigital", "username": USERNAME, "password": PASSWORD + "\r\n"}
        )
    assert "password ends with a newline; remove it" in str(info.value)
    assert_no_part_of(PASSWORD, str(info.value))


# --------------------------------------------------------------------------- the HTTP client


class Counting(httpx.BaseTransport):
    """Counts the requests handed to the transport, then passes them on (or raises)."""

    def __init__(self, inner: httpx.BaseTransport | None = None, raises: Exception | None = None):
        self.inner, self.raises, self.attempts = inner, raises, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        if self.raises is not None:
            raise self.raises
        assert self.inner is not None
        return self.inner.handle_request(request)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def counted(api: http.ApiClient, transport: Counting) -> list[float]:
    """``api`` sending through ``transport`` with its headers, sleeping on a list."""
    headers = api._http.headers
    base_url = api._http.base_url
    api._http.close()
    api._http = httpx.Client(base_url=base_url, headers=headers, transport=transport)
    slept: list[float] = []
    api._sleep = slept.append
    return slept


@pytest.mark.parametrize("idempotent", [True, False])
def test_a_request_the_library_refuses_to_build_is_not_retried(idempotent: bool) -> None:
    header = f"Klaviyo-API-Key {KEY}\n"
    api = http.ApiClient("http://vendor.test", headers={"Authorization": header}, name="Klaviyo")
    # h11 quotes the refused header value in its message, as here
    transport = Counting(raises=httpx.LocalProtocolError(f"Illegal header value {header!r}"))
    slept = counted(api, transport)
    with pytest.raises(DestinationError) as info:
        api.request("POST", "/api/lists", content=b"{}", idempotent=idempotent)
    assert transport.attempts == 1 and slept == [] and api.retries == 0
    assert not isinstance(info.value, http.Unsure)  # nothing was sent: no look-up for a create
    message = str(info.value)
    assert message.startswith("Klaviyo POST /api/lists: ")
    assert "LocalProtocolError" in message and "header Authorization" in message
    assert "Not a network error, so not retried" in message
    assert_no_part_of(KEY, "".join(traceback.format_exception(info.value)))


def test_a_url_without_http_is_not_retried() -> None:
    api = http.ApiClient("ftp://vendor.test", headers={}, name="Vendor")
    slept: list[float] = []
    api._sleep = slept.append
    with pytest.raises(DestinationError, match="UnsupportedProtocol.*Not a network error"):
        api.request("GET", "/things")
    assert slept == [] and api.retries == 0


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback port that accepts connections (the backlog) and never answers: enough for
    the client to connect and then build the request."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_klaviyo_key_ending_in_a_newline_fails_once_in_h11_without_quoting_it(
    silent_server: str,
) -> None:
    # a key that got past the config check (model_construct skips validation): the real
    # transport, whose h11 refuses the header, is asked exactly once
    conn = KlaviyoConnection.model_construct(
        type="klaviyo",
        api_key=SecretStr(KEY + "\n"),
        base_url=silent_server,
        revision="2026-07-15",
    )
    client = KlaviyoClient(conn, retry=http.RetryPolicy(max_attempts=3, base_delay=0.0))
    transport = Counting(inner=httpx.HTTPTransport())
    slept = counted(client.api, transport)
    try:
        with pytest.raises(DestinationError) as info:
            client.call("get_lists", "GET", "/api/lists")
    finally:
        client.api.close()
    assert transport.attempts == 1 and slept == []
    message = str(info.value)
    assert "Klaviyo GET /api/lists" in message and "LocalProtocolError" in message
    assert "header Authorization" in message and "not a network error" in message.lower()
    assert_no_part_of(KEY, "".join(traceback.format_exception(info.value)))

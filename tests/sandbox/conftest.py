"""Fixtures for the sandbox tests: every sandbox is served over real loopback HTTP and stopped
when its test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from reverse_etl.sandbox import DotdigitalSandbox, KlaviyoSandbox, SandboxServer, SandboxSettings
from tests.sandbox.sandbox_helpers import klaviyo_headers

Serve = Callable[..., httpx.Client]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(sandbox, **client_kwargs)`` starts a server and returns a client for it.

    At teardown the servers stop, and no sandbox may have hit an internal error.
    """
    served: list[Any] = []
    with ExitStack() as stack:

        def start(sandbox: Any, **client_kwargs: Any) -> httpx.Client:
            served.append(sandbox)
            server = stack.enter_context(SandboxServer(sandbox))
            client_kwargs.setdefault("timeout", 10.0)
            return stack.enter_context(httpx.Client(base_url=server.base_url, **client_kwargs))

        yield start
    for sandbox in served:
        assert sandbox.internal_errors == []


@pytest.fixture
def klaviyo_factory(serve: Serve) -> Callable[..., tuple[KlaviyoSandbox, httpx.Client]]:
    def make(**settings: Any) -> tuple[KlaviyoSandbox, httpx.Client]:
        sandbox = KlaviyoSandbox(SandboxSettings(**settings))
        return sandbox, serve(sandbox, headers=klaviyo_headers(sandbox))

    return make


@pytest.fixture
def klaviyo(
    klaviyo_factory: Callable[..., tuple[KlaviyoSandbox, httpx.Client]],
) -> tuple[KlaviyoSandbox, httpx.Client]:
    return klaviyo_factory()


@pytest.fixture
def dotdigital_factory(serve: Serve) -> Callable[..., tuple[DotdigitalSandbox, httpx.Client]]:
    def make(**settings: Any) -> tuple[DotdigitalSandbox, httpx.Client]:
        sandbox = DotdigitalSandbox(SandboxSettings(**settings))
        auth = (sandbox.settings.username, sandbox.settings.password)
        return sandbox, serve(sandbox, auth=auth)

    return make


@pytest.fixture
def dotdigital(
    dotdigital_factory: Callable[..., tuple[DotdigitalSandbox, httpx.Client]],
) -> tuple[DotdigitalSandbox, httpx.Client]:
    return dotdigital_factory()

"""SandboxServer: loopback only, a free port, ready when start() returns, clean stop."""

from __future__ import annotations

import httpx
import pytest

from reverse_etl.sandbox import DotdigitalSandbox, KlaviyoSandbox, SandboxServer, SandboxSettings
from reverse_etl.sandbox.__main__ import main


def test_free_loopback_port_known_before_start_answers_once_started_and_stops():
    # How fast it starts is a figure for `make bench` (tests/bench/sandbox_speed.py); what a
    # test can rely on is that the port is bound before the thread starts (so base_url can be
    # handed out at once) and that start() returns only when the first request is answered.
    server = SandboxServer(KlaviyoSandbox())
    assert server.base_url.startswith("http://127.0.0.1:") and server.port > 0
    with server:
        assert httpx.get(server.base_url + "/api/lists").status_code == 401
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.base_url + "/api/lists", timeout=1)


def test_two_sandboxes_side_by_side():
    with SandboxServer(KlaviyoSandbox()) as k, SandboxServer(DotdigitalSandbox()) as d:
        assert k.port != d.port
        assert httpx.get(k.base_url + "/nowhere").status_code == 404
        assert httpx.get(d.base_url + "/nowhere").status_code == 404


def test_settings_are_checked():
    with pytest.raises(ValueError):
        SandboxSettings(fault_kinds=("meteor",))
    with pytest.raises(ValueError):
        SandboxSettings(speedup=0)


def test_cli_rejects_unknown_vendor(capsys):
    with pytest.raises(SystemExit):
        main(["mailchimp"])

"""Shared by the Klaviyo destination tests (no tests here): client pacing for every Klaviyo
object and the sync entry builder."""

from __future__ import annotations

from typing import Any

import pytest

from reverse_etl.destinations.base import Destination
from reverse_etl.destinations.klaviyo.destination import KlaviyoBase
from tests.sandboxes import sync_entry

# The sandbox runs at speedup 50 in these tests; the client's limiters keep pace with it.
CLIENT_SPEEDUP = 50.0


def klaviyo_speed(monkeypatch: pytest.MonkeyPatch, *, poll_interval: float = 0.02) -> None:
    """Quick job polls for every Klaviyo object (``fast_clients`` covers profiles) and rate
    limiters as fast as the sandbox's clock."""
    monkeypatch.setattr(Destination, "poll_interval", poll_interval)
    monkeypatch.setattr(KlaviyoBase, "client_speedup", CLIENT_SPEEDUP)


def klaviyo_sync(name: str, *, mapping: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return sync_entry(name, "klaviyo", dict(mapping), **extra)

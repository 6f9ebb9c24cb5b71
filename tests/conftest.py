"""Shared fixtures: warehouse emulators (tests/warehouses.py) are loaded as a plugin; the
destination tests' sandbox rigs are defined here once.

The sandbox tests (tests/sandbox/conftest.py) and the scale tests define their own
``klaviyo``/``dotdigital`` fixtures, which take precedence there."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reverse_etl.sandbox import DotdigitalSandbox, KlaviyoSandbox
from tests.sandboxes import Rig, fast_clients, rig_fixture
from tests.test_klaviyo_support import klaviyo_speed

pytest_plugins = ["tests.warehouses"]


@pytest.fixture
def klaviyo(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    """``klaviyo(**settings)`` serves a Klaviyo sandbox, with clients paced for every object."""
    fast_clients(monkeypatch)
    klaviyo_speed(monkeypatch)
    yield from rig_fixture(request, tmp_path, KlaviyoSandbox)


@pytest.fixture
def dotdigital(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    """``dotdigital(**settings)`` serves a Dotdigital sandbox; contacts and insight imports are
    polled every 20 ms."""
    fast_clients(monkeypatch)
    yield from rig_fixture(request, tmp_path, DotdigitalSandbox)

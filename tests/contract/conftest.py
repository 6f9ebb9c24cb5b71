"""Fixtures of the destination contract suite: every test taking ``case`` runs once for each
(destination type, object) the registry lists, and ``start(**settings)`` serves that
destination's sandbox with the clients paced for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reverse_etl.destinations import registry
from tests.contract.cases import CASES, PACING, Case, registered
from tests.sandboxes import Rig, fast_clients, rig_fixture


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    pairs = registered()
    if "fault_seed" in metafunc.fixturenames:
        params = [
            pytest.param((t, o), seed, id=f"{t}-{o}-{seed}")
            for t, o in pairs
            for seed in (CASES[(t, o)].fault_seeds if (t, o) in CASES else (0,))
        ]
        metafunc.parametrize(("case", "fault_seed"), params, indirect=["case"])
    elif "case" in metafunc.fixturenames:
        metafunc.parametrize("case", pairs, ids=[f"{t}-{o}" for t, o in pairs], indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A contract test a case lists in ``known_issues`` is a strict xfail for that case."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        pair = callspec.params.get("case") if callspec is not None else None
        found = CASES.get(pair) if pair is not None else None
        name = getattr(item, "originalname", item.name)
        if found is not None and name in found.known_issues:
            item.add_marker(pytest.mark.xfail(reason=found.known_issues[name], strict=True))


@pytest.fixture
def case(request: pytest.FixtureRequest) -> Case:
    found = CASES.get(request.param)
    if found is None:
        pytest.skip(f"no contract case for {request.param} (see test_every_..._has_a_case)")
    return found


@pytest.fixture
def start(
    case: Case, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    """``start(**settings)`` serves the case's sandbox (speedup 50) with quick clients; at the
    end no sandbox may hold a violation or an internal error."""
    plugin = registry.plugin_for(case.type)
    if plugin.sandbox is None:
        pytest.skip(f"{plugin.title} has no sandbox")
    fast_clients(monkeypatch)
    pace = PACING.get(case.type)
    if pace is not None:
        pace(monkeypatch)
    yield from rig_fixture(request, tmp_path, plugin.sandbox_class())

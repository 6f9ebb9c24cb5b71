"""A Klaviyo profile sync at scale through injected faults: 50,000 profiles with consent,
10 % of write and poll requests failing (429 with Retry-After, 500, 503, dropped connections,
answers held past the client's timeout and applied later, cancelled import jobs), and
afterwards every row is in the sandbox, none was lost and the list exists once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reverse_etl.errors import EXIT_OK
from reverse_etl.sandbox import KlaviyoSandbox
from reverse_etl.state import Watermark
from tests.helpers import at, execute
from tests.sandboxes import (
    FAULT_SEEDS,
    Rig,
    assert_counts_add_up,
    assert_created_once,
    every_fault,
    fast_faulty_clients,
    faults_met,
    rig_fixture,
)
from tests.test_klaviyo_support import klaviyo_sync

PROFILES = 50_000
SPEEDUP = 1000.0  # sandbox clock and client limiters: the run is bound by work, not pacing
# two of the seeds: each run takes seconds, and the destination tests cover all four
SEEDS = FAULT_SEEDS[:2]


@pytest.fixture
def klaviyo(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    from reverse_etl.destinations.klaviyo.destination import KlaviyoBase

    # a longer timeout than the destination tests' (bodies here are 2,500 profiles), still
    # outlasted by the held answers
    fast_faulty_clients(monkeypatch, max_attempts=12, timeout=2.0)
    monkeypatch.setattr(KlaviyoBase, "client_speedup", SPEEDUP)
    yield from rig_fixture(request, tmp_path, KlaviyoSandbox)


@pytest.mark.parametrize("seed", SEEDS)
def test_50000_profiles_through_faults_none_lost(klaviyo, seed):
    rig = klaviyo(**every_fault(seed, held=2.5), speedup=SPEEDUP)
    execute(
        rig.db,
        f"""
        CREATE TABLE people AS
        SELECT
            'customer' || lpad(CAST(n AS VARCHAR), 5, '0') || '@example.com' AS email,
            'First' || n AS first_name,
            '+1415' || CAST(2000000 + n AS VARCHAR) AS phone,  -- exchanges 200+: valid numbers
            n * 10 AS points,
            ['yes', 'no', NULL][n % 3 + 1] AS email_consent,
            TIMESTAMPTZ '2024-05-01 10:00:00+00' + to_seconds(n) AS consent_at,
            TIMESTAMPTZ '2025-03-01 12:00:00+00' + to_seconds(n) AS modified_at
        FROM range({PROFILES}) AS r(n)
        """,
    )
    mapping = {
        "email": "email",
        "first_name": "first_name",
        "phone": "phone_number",
        "points": "properties.Points",
    }
    consent = {"email": {"column": "email_consent", "consented_at": "consent_at"}}
    rig.configure(
        [
            klaviyo_sync(
                "profiles",
                mapping=mapping,
                consent=consent,
                batch_size=2500,
                destination={"list": "Everyone"},
            )
        ]
    )

    result = rig.run("profiles")

    assert result.exit_code == EXIT_OK, result.record.message
    assert_counts_add_up(result)
    c = result.record.counts
    assert (c.read, c.rejected, c.failed) == (PROFILES, 0, 0)
    everyone = {f"customer{n:05d}@example.com" for n in range(PROFILES)}
    profiles = rig.sandbox.profiles()
    assert {p["email"] for p in profiles} == everyone and len(profiles) == PROFILES
    assert {p["email"] for p in rig.sandbox.list_members("Everyone")} == everyone
    consent = {s["email"]: s["consent"] for s in rig.sandbox.subscriptions()}
    assert consent == {
        f"customer{n:05d}@example.com": ("SUBSCRIBED", "UNSUBSCRIBED")[n % 3]
        for n in range(PROFILES)
        if n % 3 < 2
    }
    last = PROFILES - 1
    assert rig.watermark("profiles") == Watermark(at(last), f"customer{last:05d}@example.com")
    assert_created_once(rig.sandbox)
    injected = faults_met(rig.sandbox)
    assert len(injected) >= 4, injected  # most kinds met, not one lucky kind

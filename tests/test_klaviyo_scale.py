"""A Klaviyo profile sync at scale through injected faults: 50,000 profiles with consent,
10 % of write and poll requests failing (429 with Retry-After, 500, 503, dropped connections,
cancelled import jobs), and afterwards every row is in the sandbox and none was lost."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reverse_etl.errors import EXIT_OK
from reverse_etl.sandbox import KlaviyoSandbox
from reverse_etl.state import Watermark
from tests.helpers import at, execute
from tests.sandboxes import Rig, assert_counts_add_up, fast_clients, faults_met, rig_fixture
from tests.test_klaviyo_support import klaviyo_sync

PROFILES = 50_000
FAULTS = ("429", "500", "503", "reset", "failed_job")
SPEEDUP = 1000.0  # sandbox clock and client limiters: the run is bound by work, not pacing


@pytest.fixture
def klaviyo(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    from reverse_etl.destinations.klaviyo.base import KlaviyoBase

    fast_clients(monkeypatch, max_attempts=10)
    monkeypatch.setattr(KlaviyoBase, "client_speedup", SPEEDUP)
    yield from rig_fixture(request, tmp_path, KlaviyoSandbox)


def test_50000_profiles_through_faults_none_lost(klaviyo):
    rig = klaviyo(fault_rate=0.1, fault_kinds=FAULTS, seed=0, speedup=SPEEDUP)  # seed 0: every kind
    execute(
        rig.db,
        f"""
        CREATE TABLE people AS
        SELECT
            'customer' || lpad(CAST(n AS VARCHAR), 5, '0') || '@example.com' AS email,
            'First' || n AS first_name,
            '+1415' || lpad(CAST(n AS VARCHAR), 7, '0') AS phone,
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
    injected = faults_met(rig.sandbox)
    assert injected.get("fault_failed_job", 0) >= 1 and len(injected) == len(FAULTS), injected

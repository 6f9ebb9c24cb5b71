"""Dotdigital at scale through faults: 50,000 contacts against a sandbox that answers one in ten
write and poll requests (the address book and data field creates included) with a fault (429,
500, 503, dropped connection, timeout, failed import). The real engine, client and destination
run unchanged; only retries, polls and the client timeout are shortened (``fast_clients``) and
the sandbox runs at a high speedup."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reverse_etl.errors import EXIT_OK
from reverse_etl.sandbox import DotdigitalSandbox
from reverse_etl.state import Watermark
from tests.helpers import at, execute
from tests.sandboxes import (
    FAULT_SEEDS,
    Rig,
    assert_counts_add_up,
    assert_created_once,
    email_of,
    every_fault,
    fast_faulty_clients,
    faults_met,
    rig_fixture,
    sync_entry,
)
from tests.test_destination_dotdigital import CUSTOM_TYPES, MAPPING

CONTACTS = 50_000
# two of the seeds: each run takes seconds, and the destination tests cover all four
SEEDS = FAULT_SEEDS[:2]


@pytest.fixture
def dotdigital(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    # a longer timeout than the destination tests' (imports here are 1,000 contacts), still
    # outlasted by the held answers
    fast_faulty_clients(monkeypatch, max_attempts=12, timeout=2.0)
    yield from rig_fixture(request, tmp_path, DotdigitalSandbox)


def people(rig: Rig, n: int) -> None:
    """``n`` clean profiles in PROFILE_COLUMNS' shape, generated in DuckDB (unique mobiles)."""
    execute(
        rig.db,
        f"""CREATE OR REPLACE TABLE people AS SELECT
            'customer' || lpad(i::VARCHAR, 5, '0') || '@example.com' AS email,
            'First' || i AS first_name, 'Last' || i AS last_name,
            '+1415' || lpad(i::VARCHAR, 7, '0') AS phone,
            'Springfield' AS city, 'US' AS country, (10000 + i)::VARCHAR AS zip,
            40.0 + i / 1000 AS latitude, ['bronze', 'silver', 'gold'][i % 3 + 1] AS tier,
            (i * 10)::INTEGER AS points, (i + 0.25)::DECIMAL(12, 2) AS lifetime_value,
            i % 2 = 0 AS is_vip, DATE '1980-01-01' + (i % 28)::INTEGER AS birthday,
            TIMESTAMPTZ '2025-03-01 13:00:00+00' + i * INTERVAL 1 SECOND AS last_order_at,
            ['yes', 'no', NULL][i % 3 + 1] AS email_consent, NULL::VARCHAR AS notes,
            TIMESTAMPTZ '2025-03-01 12:00:00+00' + i * INTERVAL 1 SECOND AS modified_at
        FROM range({n}) t(i)""",
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_fifty_thousand_contacts_through_ten_percent_faults_none_lost(dotdigital, seed):
    rig = dotdigital(**every_fault(seed, held=2.5), speedup=1000.0)  # 5 ms an import
    people(rig, CONTACTS)
    rig.configure(
        [
            sync_entry(
                "contacts",
                "dotdigital",
                dict(MAPPING),
                destination={"list": "Customers", "import_size": 1000},
                batch_size=10_000,
            )
        ]
    )

    result = rig.run("contacts")

    assert result.exit_code == EXIT_OK, result.record.message
    assert_counts_add_up(result)
    c = result.record.counts
    assert (c.read, c.sent, c.rejected, c.failed) == (CONTACTS, CONTACTS, 0, 0)
    everyone = {email_of(n) for n in range(CONTACTS)}
    assert {x["identifiers"]["email"] for x in rig.sandbox.contacts()} == everyone
    assert {
        x["identifiers"]["email"] for x in rig.sandbox.address_book_members("Customers")
    } == everyone
    last = rig.sandbox.contact(email_of(CONTACTS - 1))
    assert last["dataFields"]["LOYALTY_POINTS"] == (CONTACTS - 1) * 10
    assert last["identifiers"]["mobileNumber"] == f"1415{CONTACTS - 1:07d}"
    assert rig.watermark("contacts") == Watermark(at(CONTACTS - 1), email_of(CONTACTS - 1))
    assert_created_once(rig.sandbox)
    assert {f["name"] for f in rig.sandbox.data_fields()} >= set(CUSTOM_TYPES)
    injected = faults_met(rig.sandbox)
    assert sum(injected.values()) >= 0.05 * rig.sandbox.counters["requests"], injected
    assert len(injected) >= 4, injected  # most kinds met, not one lucky kind

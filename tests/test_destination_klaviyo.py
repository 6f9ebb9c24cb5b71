"""Klaviyo end to end: the real engine, client and destination against the Klaviyo sandbox over
loopback HTTP. Every test ends with the sandbox holding no violation (nothing off-spec sent).
What every destination object must do (incremental runs, dry run, resume, faults,
size limits, config checks) is in tests/contract/; here is what is particular to
Klaviyo profiles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from reverse_etl.engine import make_destination
from reverse_etl.errors import EXIT_OK, EXIT_ROW_ERRORS, DestinationError
from reverse_etl.sandbox import KlaviyoSandbox
from tests.helpers import at
from tests.sandboxes import (
    Rig,
    assert_counts,
    email_of,
    error_rows,
    fast_clients,
    profile_row,
    profile_rows,
    rig_fixture,
    set_faults,
    sync_entry,
)

MAPPING: dict[str, Any] = {
    "email": "email",
    "first_name": "first_name",
    "last_name": "last_name",
    "phone": "phone_number",
    "city": "location.city",
    "country": "location.country",
    "zip": "location.zip",
    "latitude": "location.latitude",
    "tier": "properties.Tier",
    "points": "properties.Points",
    "lifetime_value": "properties.Lifetime_Value",
    "is_vip": "properties.VIP",
    "birthday": "properties.Birthday",
    "last_order_at": "properties.Last_Order_At",
}


def klaviyo_sync(
    name: str = "profiles", *, list_name: str | None = "VIP Club", **extra: Any
) -> dict[str, Any]:
    destination = {"list": list_name} if list_name else {}
    return sync_entry(
        name, "klaviyo", dict(extra.pop("mapping", MAPPING)), destination=destination, **extra
    )


@pytest.fixture
def klaviyo(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    fast_clients(monkeypatch)
    yield from rig_fixture(request, tmp_path, KlaviyoSandbox)


def emails(profiles: list[dict[str, Any]]) -> set[str]:
    return {p["email"] for p in profiles}


# --------------------------------------------------------------------------- values


def test_standard_location_and_typed_custom_fields_land(klaviyo):
    rig = klaviyo()
    rows = profile_rows(range(12))
    rows[7] = profile_row(7, email="  Customer00007@Example.COM ")  # normalised, not refused
    rows += [
        profile_row(100, email="not-an-email"),
        profile_row(101, email=None),
        profile_row(102, phone="12"),
    ]
    rig.table(rows)
    rig.configure([klaviyo_sync()])

    result = rig.run("profiles")

    assert_counts(
        result, EXIT_ROW_ERRORS, read=15, rejected=3, sent=12, updated=12, failed=0
    )  # three rows refused, every other one landed
    assert emails(rig.sandbox.profiles()) == {email_of(n) for n in range(12)}

    p = rig.sandbox.profile_by_email(email_of(4))
    assert p is not None
    assert (p["email"], p["first_name"], p["last_name"], p["phone_number"]) == (
        "customer00004@example.com",
        "First4",
        "Last4",
        "+14155550004",
    )
    assert p["location"] == {
        "city": "Springfield",
        "country": "US",
        "zip": "10004",
        "latitude": 40.004,
    }
    assert p["properties"] == {
        "Tier": "silver",  # string
        "Points": 40,  # integer
        "Lifetime_Value": 4.25,  # DECIMAL(12,2) as a JSON number
        "VIP": True,  # boolean
        "Birthday": "1980-01-05",  # date
        "Last_Order_At": "2025-03-01T13:00:04Z",  # timestamp, ISO 8601 UTC
    }
    odd = rig.sandbox.profile_by_email(email_of(3))
    assert (
        odd is not None and odd["properties"]["VIP"] is False and odd["properties"]["Points"] == 30
    )
    assert rig.sandbox.profile_by_email(email_of(7))["email"] == "customer00007@example.com"

    errors = error_rows(result)
    assert {(e["row_number"], e["identifier"], e["reason"]) for e in errors} == {
        ("13", "not-an-email", "invalid_email"),
        ("14", "", "missing_identifier"),
        ("15", email_of(102), "invalid_phone"),
    }
    assert rig.sandbox.counters["profiles_received"] == 12  # bad rows never reached the API


def test_timestamps_in_other_zones_arrive_in_utc(klaviyo):
    rig = klaviyo()
    rig.table(profile_rows(range(3)))
    rig.configure([klaviyo_sync(mapping={"email": "email", "modified_at": "properties.Changed"})])
    rig.run("profiles")
    assert rig.sandbox.profile_by_email(email_of(2))["properties"] == {
        "Changed": "2025-03-01T12:00:02Z"
    }


def test_profile_refused_by_klaviyo_is_a_row_error(klaviyo):
    rig = klaviyo()
    rows = profile_rows(range(6))
    rig.table(rows)
    rig.configure([klaviyo_sync()])
    assert rig.run("profiles").exit_code == EXIT_OK

    rows[5] = profile_row(5, phone="(415) 555-0001", first_name="Moved", modified_at=at(100))
    rows[4] = profile_row(4, first_name="Fine", modified_at=at(101))
    rig.table(rows)  # customer 5 now claims customer 1's phone number: Klaviyo refuses it
    result = rig.run("profiles")

    assert_counts(result, EXIT_ROW_ERRORS, read=2, sent=2, updated=1, failed=1)
    [error] = error_rows(result)
    assert (error["row_number"], error["identifier"], error["reason"]) == (
        "1",
        email_of(5),
        "destination_rejected",
    )
    # the warehouse column mapped to the field Klaviyo's pointer names (phone_number)
    assert error["column"] == "phone" and "already belongs" in error["message"]
    assert rig.sandbox.profile_by_email(email_of(5))["first_name"] == "First5"
    assert rig.sandbox.profile_by_email(email_of(4))["first_name"] == "Fine"


# --------------------------------------------------------------------------- lists


def test_list_is_created_once_and_holds_exactly_the_synced_profiles(klaviyo):
    rig = klaviyo()
    rig.table(profile_rows(range(0, 30)))
    rig.table(profile_rows(range(500, 510)), name="people_b")
    rig.table(profile_rows(range(900, 905)), name="not_in_list")
    rig.configure(
        [
            klaviyo_sync("members"),
            klaviyo_sync("more_members", table="people_b"),
            klaviyo_sync("others", table="not_in_list", list_name="Someone else's list"),
        ]
    )

    assert rig.run("members").exit_code == EXIT_OK
    rig.table(profile_rows(range(0, 31)))  # one new member for the second run
    assert rig.run("members").exit_code == EXIT_OK
    assert rig.run("more_members").exit_code == EXIT_OK
    assert rig.run("others").exit_code == EXIT_OK

    assert [lst["name"] for lst in rig.sandbox.lists()] == ["VIP Club", "Someone else's list"]
    assert len(rig.requests("POST", "/api/lists")) == 2  # one create per list name, ever
    assert len(rig.requests("GET", "/api/lists")) == 4  # every run looks its list up first
    synced = {email_of(n) for n in [*range(0, 31), *range(500, 510)]}
    assert emails(rig.sandbox.list_members("VIP Club")) == synced
    assert emails(rig.sandbox.list_members("Someone else's list")) == {
        email_of(n) for n in range(900, 905)
    }


# --------------------------------------------------------------------------- null values


def test_null_values_skip_leaves_properties_and_clear_unsets_custom_ones(klaviyo):
    rig = klaviyo()
    rows = profile_rows(range(4))
    rig.table(rows)
    rig.configure(
        [klaviyo_sync("skip", null_values="skip"), klaviyo_sync("clear", null_values="clear")]
    )
    assert rig.run("skip").exit_code == EXIT_OK

    rows[1] = profile_row(1, tier=None, city=None, is_vip=None, last_name=None, modified_at=at(100))
    rig.table(rows)
    assert rig.run("skip").record.counts.sent == 1
    kept = rig.sandbox.profile_by_email(email_of(1))
    assert kept["properties"]["Tier"] == "silver" and kept["properties"]["VIP"] is False
    assert kept["location"]["city"] == "Springfield" and kept["last_name"] == "Last1"

    planned = rig.run("clear", dry_run=True)  # the requests it will send, nothing sent
    lines = Path(planned.dry_run_file).read_text().splitlines()
    sent = [
        p
        for line in lines
        for p in orjson.loads(line)["body"]["data"]["attributes"]["profiles"]["data"]
    ]
    assert len(sent) == 4 and all(None not in p["attributes"].values() for p in sent)
    meta = {p["attributes"]["email"]: p.get("meta") for p in sent}
    assert meta[email_of(1)] == {"patch_properties": {"unset": ["Tier", "VIP"]}}
    assert meta[email_of(2)] is None  # nothing to clear, no meta

    assert rig.run("clear").record.counts.sent == 4
    cleared = rig.sandbox.profile_by_email(email_of(1))
    assert "Tier" not in cleared["properties"] and "VIP" not in cleared["properties"]
    assert cleared["properties"]["Points"] == 10  # values that are there are still written
    # the bulk import cannot clear standard fields (it ignores nulls): they keep their value
    assert cleared["location"]["city"] == "Springfield" and cleared["last_name"] == "Last1"
    assert cleared["location"]["zip"] == "10001"
    untouched = rig.sandbox.profile_by_email(email_of(2))
    assert (
        untouched["properties"]["Tier"] == "gold" and untouched["location"]["city"] == "Springfield"
    )


# --------------------------------------------------------------------------- known bugs


def test_sync_without_a_list(klaviyo):
    rig = klaviyo()
    rig.table(profile_rows(range(5)))
    rig.configure([klaviyo_sync(list_name=None)])
    result = rig.run("profiles")
    assert rig.sandbox.violations == []
    assert result.exit_code == EXIT_OK
    assert emails(rig.sandbox.profiles()) == {email_of(n) for n in range(5)}


def test_email_consent_reaches_klaviyo(klaviyo):
    rig = klaviyo()
    rig.table(profile_rows(range(3)))  # email_consent: yes, no, NULL
    rig.configure([klaviyo_sync(consent={"email": "email_consent"})])
    assert rig.run("profiles").exit_code == EXIT_OK
    consent = {
        s["email"]: s["consent"] for s in rig.sandbox.subscriptions() if s["channel"] == "email"
    }
    assert consent == {email_of(0): "SUBSCRIBED", email_of(1): "UNSUBSCRIBED"}  # NULL: no change
    assert rig.sandbox.violations == []


@pytest.mark.parametrize("kind", ["timeout", "reset", "500"])
def test_list_created_once_when_the_create_answer_is_lost(klaviyo, monkeypatch, kind):
    # Every create meets the fault; a held one (timeout) is applied after the client gave up.
    # The client looks the list up until the lost create can no longer land, and creates again
    # only when it did not: one list either way, though Klaviyo lets list names repeat.
    # nothing lands after a reset or a 500: a short margin keeps the futile look-ups short
    fast_clients(monkeypatch, timeout=0.5, settle_margin=10.0 if kind == "timeout" else 0.2)
    rig = klaviyo(fault_rate=1.0, fault_kinds=(kind,), fault_timeout_seconds=1.0)
    rig.table(profile_rows(range(5)))
    project = rig.configure([klaviyo_sync()])
    destination = make_destination(project, project.sync("profiles"))
    try:
        if kind == "timeout":
            destination.prepare()  # the held create lands within the look-ups' window
        else:
            with pytest.raises(DestinationError, match="creating Klaviyo list 'VIP Club' failed"):
                destination.prepare()  # nothing landed: created again, faulted each time
    finally:
        destination.close()
    set_faults(rig.sandbox, 0.0)

    assert rig.run("profiles").exit_code == EXIT_OK
    assert [lst["name"] for lst in rig.sandbox.lists()] == ["VIP Club"]
    assert len(rig.requests("POST", "/api/lists")) == (1 if kind == "timeout" else 4)
    assert emails(rig.sandbox.list_members("VIP Club")) == {email_of(n) for n in range(5)}

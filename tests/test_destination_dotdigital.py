"""Dotdigital end to end: the real engine, client and destination against the Dotdigital
sandbox over loopback HTTP. Every test ends with the sandbox holding no violation.
What every destination object must do (incremental runs, dry run, resume, faults,
size limits, config checks) is in tests/contract/; here is what is particular to
Dotdigital contacts."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, EXIT_ROW_ERRORS, DestinationError
from reverse_etl.state import Watermark
from tests.helpers import at, execute
from tests.sandboxes import (
    Rig,
    assert_counts,
    assert_counts_add_up,
    assert_created_once,
    dotdigital_config_error,
    email_of,
    error_rows,
    fast_clients,
    profile_row,
    profile_rows,
    set_faults,
    sync_entry,
)

IMPORT = "/contacts/v3/import"
FIELDS = "/v2/data-fields"

MAPPING: dict[str, Any] = {
    "email": "email",
    "phone": "mobileNumber",
    "first_name": "FIRSTNAME",
    "last_name": "LASTNAME",
    "zip": "POSTCODE",
    "city": "CITY",
    "tier": "LOYALTY_TIER",
    "points": "LOYALTY_POINTS",
    "lifetime_value": "LIFETIME_VALUE",
    "is_vip": "IS_VIP",
    "birthday": "BIRTHDAY",
    "last_order_at": "LAST_ORDER_AT",
}
CUSTOM_TYPES = {
    "CITY": "String",
    "LOYALTY_TIER": "String",
    "LOYALTY_POINTS": "Numeric",
    "LIFETIME_VALUE": "Numeric",
    "IS_VIP": "Boolean",
    "BIRTHDAY": "Date",
    "LAST_ORDER_AT": "Date",
}
STANDARD = ("FIRSTNAME", "LASTNAME", "FULLNAME", "GENDER", "POSTCODE")


def dd_sync(
    name: str = "contacts",
    *,
    book: str | None = "Customers",
    options: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    destination = {**({"list": book} if book else {}), **(options or {})}
    return sync_entry(
        name, "dotdigital", dict(extra.pop("mapping", MAPPING)), destination=destination, **extra
    )


def members(rig: Rig, book: str) -> set[str]:
    return {c["identifiers"]["email"] for c in rig.sandbox.address_book_members(book)}


def field_types(rig: Rig) -> dict[str, str]:
    return {f["name"]: f["type"] for f in rig.sandbox.data_fields()}


# --------------------------------------------------------------------------- contacts and fields


def test_contacts_land_with_typed_data_fields_created_once(dotdigital):
    rig = dotdigital()
    rows = profile_rows(range(20)) + [profile_row(99, email="no-at-sign.example.com")]
    rig.table(rows)
    rig.configure([dd_sync()])

    first = rig.run("contacts")

    assert_counts(
        first, EXIT_ROW_ERRORS, read=21, rejected=1, sent=20, created=20, updated=0, failed=0
    )  # the bad email
    assert members(rig, "Customers") == {email_of(n) for n in range(20)}
    assert len(rig.sandbox.contacts()) == 20
    [error] = error_rows(first)
    assert (error["row_number"], error["reason"]) == ("21", "invalid_email")

    contact = rig.sandbox.contact(email_of(4))
    assert contact["identifiers"] == {"email": email_of(4), "mobileNumber": "14155550004"}
    assert contact["dataFields"] == {
        "FIRSTNAME": "First4",
        "LASTNAME": "Last4",
        "POSTCODE": "10004",
        "CITY": "Springfield",
        "LOYALTY_TIER": "silver",
        "LOYALTY_POINTS": 40,
        "LIFETIME_VALUE": 4.25,
        "IS_VIP": True,
        "BIRTHDAY": "1980-01-05",
        "LAST_ORDER_AT": "2025-03-01T13:00:04+00:00",
    }
    assert rig.sandbox.contact(email_of(3))["dataFields"]["IS_VIP"] is False

    types = field_types(rig)
    assert {k: types[k] for k in CUSTOM_TYPES} == CUSTOM_TYPES
    assert set(types) == set(CUSTOM_TYPES) | set(STANDARD)
    # one create per custom field; the standard fields exist already and are never created
    assert len(rig.requests("POST", FIELDS)) == len(CUSTOM_TYPES)
    assert {
        f["name"]: f["visibility"] for f in rig.sandbox.data_fields() if f["name"] in STANDARD
    } == dict.fromkeys(STANDARD, "Public")
    assert len(rig.requests("POST", "/v2/address-books")) == 1

    # second run: three changed contacts and one new one; nothing is created but the contact
    for k, n in enumerate((2, 7, 15)):
        rows[n] = profile_row(n, points=1000 + n, city="Shelbyville", modified_at=at(500 + k))
    rows.append(profile_row(20, modified_at=at(600)))
    rig.table(rows)
    rig.sandbox.reset_log()

    second = rig.run("contacts")

    assert_counts(second, EXIT_OK, read=4, sent=4, created=1, updated=3, failed=0)
    assert rig.requests("POST", FIELDS) == [] and rig.requests("POST", "/v2/address-books") == []
    assert len(rig.requests("PUT", IMPORT)) == 1
    assert rig.sandbox.contact(email_of(7))["dataFields"]["LOYALTY_POINTS"] == 1007
    assert rig.sandbox.contact(email_of(7))["dataFields"]["CITY"] == "Shelbyville"
    assert rig.sandbox.contact(email_of(8))["dataFields"]["CITY"] == "Springfield"
    assert members(rig, "Customers") == {email_of(n) for n in range(21)}
    assert rig.watermark("contacts") == Watermark(at(600), email_of(20))


def test_existing_field_of_another_type_stops_the_run_before_sending(dotdigital):
    rig = dotdigital()
    auth = (rig.sandbox.settings.username, rig.sandbox.settings.password)
    created = httpx.post(
        f"{rig.base_url}{FIELDS}", json={"name": "LOYALTY_POINTS", "type": "String"}, auth=auth
    )
    assert created.status_code == 201
    rig.table(profile_rows(range(5)))
    rig.configure([dd_sync()])

    result = rig.run("contacts")

    assert result.exit_code == EXIT_FAILED
    assert "LOYALTY_POINTS is String but this sync sends Numeric" in result.record.message
    assert rig.requests("PUT", IMPORT) == [] and rig.sandbox.contacts() == []
    assert rig.watermark("contacts") is None


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (
            {"tier": "LOYALTY_TIER_DESCRIPTION"},
            [
                "'LOYALTY_TIER_DESCRIPTION'",
                "longer than 20 characters",
                "try 'LOYALTY_TIER_DESCRIP'",
            ],
        ),
        (
            {"tier": "loyalty tier"},
            ["'loyalty tier'", "letters, digits, _ and -", "try 'LOYALTY_TIER'"],
        ),
        ({"points": "points$"}, ["'points$'", "letters, digits, _ and -", "try 'POINTS'"]),
        ({"tier": "Tier", "city": "TIER"}, ["mapping.city", "'TIER' collides with 'Tier'"]),
        (
            {"last_name": "firstname"},
            ["mapping.last_name", "'firstname' collides with 'FIRSTNAME'"],
        ),
    ],
    ids=["too-long", "space", "bad-character", "case-collision", "collides-with-standard"],
)
def test_invalid_data_field_names_are_refused_at_config_load(tmp_path, mapping, expected):
    base = {"email": "email", "first_name": "FIRSTNAME"}
    message = dotdigital_config_error(tmp_path, dd_sync(mapping={**base, **mapping}))
    assert "syncs[0] (contacts)" in message
    for fragment in expected:
        assert fragment in message


def test_invalid_consent_field_name_is_refused_at_config_load(tmp_path):
    options = {"consent_mode": "data_field", "consent_field": "NEWSLETTER SUBSCRIBE"}
    sync = dd_sync(options=options, consent={"email": "email_consent"})
    message = dotdigital_config_error(tmp_path, sync)
    assert "destination.consent_field: data field name 'NEWSLETTER SUBSCRIBE'" in message


# --------------------------------------------------------------------------- consent


def test_consent_as_channel_status_and_unsubscribed_book(dotdigital):
    rig = dotdigital()
    rows = profile_rows(range(9))  # email_consent cycles yes, no, NULL
    rig.table(rows)
    options = {"unsubscribed_list": "Customers", "consent_mode": "channel"}
    rig.configure([dd_sync(book="Newsletter", options=options, consent={"email": "email_consent"})])

    assert rig.run("contacts").exit_code == EXIT_OK

    consenting = {email_of(n) for n in range(0, 9, 3)}
    assert members(rig, "Newsletter") == consenting
    assert members(rig, "Customers") == {email_of(n) for n in range(9)} - consenting
    for n in range(9):
        email = rig.sandbox.contact(email_of(n))["channelProperties"]["email"]
        if n % 3 == 0:
            assert (email["status"], email["optInType"]) == ("subscribed", "Single"), n
        elif n % 3 == 1:
            assert email["status"] == "unsubscribed", n
    assert "NEWSLETTER_SUBSCRIBE" not in field_types(rig)  # channel mode writes no field

    rows[0] = profile_row(0, email_consent="no", modified_at=at(100))  # consent withdrawn
    rows[1] = profile_row(1, email_consent="opt-in", modified_at=at(101))  # consent given
    rig.table(rows)
    assert rig.run("contacts").record.counts.updated == 2
    assert (
        rig.sandbox.contact(email_of(0))["channelProperties"]["email"]["status"] == "unsubscribed"
    )
    assert rig.sandbox.contact(email_of(1))["channelProperties"]["email"]["status"] == "subscribed"
    assert email_of(1) in members(rig, "Newsletter")


@pytest.mark.parametrize("field", [None, "MARKETING_OK"])
def test_consent_as_data_field_does_not_suppress(dotdigital, field):
    rig = dotdigital()
    rig.table(profile_rows(range(6)))
    options: dict[str, Any] = {"consent_mode": "data_field"}
    if field:
        options["consent_field"] = field
    rig.configure([dd_sync(options=options, consent={"email": "email_consent"})])

    assert rig.run("contacts").exit_code == EXIT_OK

    name = field or "NEWSLETTER_SUBSCRIBE"
    assert field_types(rig)[name] == "String"
    for n in range(6):
        contact = rig.sandbox.contact(email_of(n))
        assert contact["dataFields"].get(name) == ("YES", "NO", None)[n % 3], n
        assert contact["channelProperties"]["email"]["status"] == "subscribed", n  # not suppressed
    assert members(rig, "Customers") == {email_of(n) for n in range(6)}


# --------------------------------------------------------------------------- per-contact failures


def test_contact_refused_by_dotdigital_is_a_row_error(dotdigital):
    rig = dotdigital()
    rows = profile_rows(range(5)) + [profile_row(5, phone="(415) 555-0001")]  # customer 1's mobile
    rig.table(rows)
    rig.configure([dd_sync()])

    result = rig.run("contacts")

    assert_counts(result, EXIT_ROW_ERRORS, read=6, sent=6, created=5, failed=1)
    [error] = error_rows(result)
    assert (error["row_number"], error["identifier"], error["reason"]) == (
        "6",
        email_of(5),
        "destination_rejected",
    )
    assert "duplicateIdentifier" in error["message"] and "14155550001" in error["message"]
    assert rig.sandbox.contact(email_of(5)) is None
    assert rig.sandbox.contact(email_of(1))["identifiers"]["mobileNumber"] == "14155550001"


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("kind", ["timeout", "reset", "500"])
def test_field_and_book_created_once_when_the_create_answers_are_lost(
    dotdigital, monkeypatch, kind
):
    # Every create meets the fault. A held one (timeout) is applied after the client gave up:
    # the look-ups find it, so it is not sent again. After a reset or a 500 nothing landed: the
    # look-ups find nothing and it is created again (and faulted again, until the client gives
    # up); the next run creates it.
    # nothing lands after a reset or a 500: a short margin keeps the futile look-ups short
    fast_clients(monkeypatch, timeout=0.5, settle_margin=10.0 if kind == "timeout" else 0.2)
    rig = dotdigital(fault_rate=1.0, fault_kinds=(kind,), fault_timeout_seconds=1.0)
    rig.table(profile_rows(range(5)))
    project = rig.configure(
        [dd_sync(mapping={"email": "email", "tier": "LOYALTY_TIER", "points": "LOYALTY_POINTS"})]
    )
    client = DotdigitalClient(project.connections["dotdigital"])  # type: ignore[arg-type]
    try:
        if kind == "timeout":
            assert client.find_or_create_address_book("Customers") > 0
            assert client.create_data_field("LOYALTY_POINTS", "Numeric") == "Numeric"
        else:
            with pytest.raises(DestinationError, match="creating Dotdigital address book"):
                client.find_or_create_address_book("Customers")
            with pytest.raises(DestinationError, match="creating Dotdigital data field"):
                client.create_data_field("LOYALTY_POINTS", "Numeric")
    finally:
        client.close()
    set_faults(rig.sandbox, 0.0)

    result = rig.run("contacts")

    assert_counts(result, EXIT_OK, read=5, sent=5, created=5)
    assert [b["name"] for b in rig.sandbox.address_books()] == ["Customers"]
    assert {k: field_types(rig)[k] for k in ("LOYALTY_TIER", "LOYALTY_POINTS")} == {
        "LOYALTY_TIER": "String",
        "LOYALTY_POINTS": "Numeric",
    }
    lost = 1 if kind == "timeout" else 3  # creates sent under the fault
    assert len(rig.requests("POST", "/v2/address-books")) == lost + (kind != "timeout")
    assert len(rig.requests("POST", FIELDS)) == lost + 1 + (kind != "timeout")
    assert_created_once(rig.sandbox)  # and no create met its own earlier one (a violation)


def test_field_another_writer_created_meanwhile_is_used(dotdigital, monkeypatch):
    # The look-up before the create misses a field another writer creates just then: Dotdigital
    # answers 400 ERROR_NON_UNIQUE_DATAFIELD, and the client looks the field up and uses it.
    rig = dotdigital()
    auth = (rig.sandbox.settings.username, rig.sandbox.settings.password)
    original = DotdigitalClient.data_fields
    calls = 0

    def stale_once(self: DotdigitalClient) -> dict[str, str]:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first look: nothing custom yet; meanwhile someone creates it
            seen = original(self)
            body = {"name": "LOYALTY_POINTS", "type": "Numeric"}
            assert httpx.post(f"{rig.base_url}{FIELDS}", json=body, auth=auth).status_code == 201
            return seen
        return original(self)

    monkeypatch.setattr(DotdigitalClient, "data_fields", stale_once)
    rig.table(profile_rows(range(5)))
    rig.configure([dd_sync(mapping={"email": "email", "points": "LOYALTY_POINTS"})])

    result = rig.run("contacts")

    assert_counts(result, EXIT_OK, read=5, sent=5, created=5)
    assert rig.sandbox.contact(email_of(3))["dataFields"]["LOYALTY_POINTS"] == 30
    assert_created_once(rig.sandbox)
    # the client's create met the other writer's field: refused as Dotdigital does, which the
    # sandbox records as a violation (a client should look first; here the race beat it)
    with rig.sandbox.lock:
        [refused] = rig.sandbox.violations
        rig.sandbox.violations.clear()
    assert (refused.status, refused.code) == (400, "ERROR_NON_UNIQUE_DATAFIELD")


# --------------------------------------------------------------------------- known bugs


def test_null_values_clear_with_channel_consent(dotdigital):
    rig = dotdigital()
    rig.table(profile_rows(range(3)))  # consent yes, no, NULL
    rig.configure([dd_sync(null_values="clear", consent={"email": "email_consent"})])
    result = rig.run("contacts")
    assert rig.sandbox.violations == []
    assert result.exit_code == EXIT_OK
    assert (
        rig.sandbox.contact(email_of(1))["channelProperties"]["email"]["status"] == "unsubscribed"
    )


def test_counts_add_up_when_a_data_field_value_is_refused(dotdigital):
    rig = dotdigital()
    execute(
        rig.db,
        "CREATE TABLE people AS SELECT 'p' || i || '@example.com' AS email, ['vip', 'b2b'] AS tags, "
        "TIMESTAMPTZ '2025-01-01 00:00:00+00' + i * INTERVAL 1 SECOND AS modified_at FROM range(3) t(i)",
    )
    rig.configure([dd_sync(mapping={"email": "email", "tags": "TAGS"})])
    result = rig.run("contacts")
    assert_counts_add_up(result)


# --------------------------------------------------------------------------- identifiers, pacing


def test_rows_without_email_are_missing_email_when_the_identifier_is_another_column(dotdigital):
    rig = dotdigital()
    rows = profile_rows(range(5)) + [profile_row(5, email=None), profile_row(6, email="  ")]
    rig.table(rows)
    rig.configure([dd_sync(identifier="zip")])  # zip → POSTCODE: one value a customer here

    result = rig.run("contacts")

    # found before sending (screen): rejected, never sent
    assert_counts(result, EXIT_ROW_ERRORS, read=7, rejected=2, sent=5, created=5, failed=0)
    errors = error_rows(result)
    assert [(e["row_number"], e["identifier"], e["column"], e["reason"]) for e in errors] == [
        ("6", "10005", "email", "missing_email"),
        ("7", "10006", "email", "missing_email"),
    ]
    assert len(rig.sandbox.contacts()) == 5
    assert rig.watermark("contacts") == Watermark(at(6), "10006")


def test_calls_are_paced_on_the_hourly_budget_without_429s(dotdigital):
    # 12 calls an hour and an hour of 0.5 s: the run needs several windows and waits for
    # each reset (X-RateLimit-Reset) instead of spending calls on refusals
    rig = dotdigital(dotdigital_calls_per_hour=12, speedup=7200)
    rig.table(profile_rows(range(500)))
    rig.configure([dd_sync(batch_size=50, options={"import_size": 50})])

    result = rig.run("contacts")

    assert result.exit_code == EXIT_OK, result.record.message
    assert len(rig.sandbox.contacts()) == 500
    assert rig.sandbox.counters["requests"] > 2 * 12  # more than two windows' budget
    assert rig.sandbox.counters["throttled"] == 0


def test_a_kept_consent_leaves_the_consent_data_field_out_even_when_nulls_clear(dotdigital):
    """``null_values: clear`` sends NULLs to clear fields, but the consent data field of a row
    whose consent Dotdigital holds from us (``consent.kept``) is left out, not cleared: the
    person may have changed it inside Dotdigital since."""
    import orjson
    import pyarrow as pa

    from reverse_etl.consent import KEPT
    from reverse_etl.engine import make_destination

    rig = dotdigital()
    options = {"consent_mode": "data_field"}
    project = rig.configure(
        [dd_sync(options=options, consent={"email": "email_consent"}, null_values="clear")]
    )
    sync = project.sync("contacts")
    dest = make_destination(project, sync)
    table = pa.table(
        {
            "email": [email_of(1), email_of(2), email_of(3)],
            "FIRSTNAME": [None, "B", "C"],
            "consent.email": ["subscribed", "unsubscribed", "subscribed"],
            "__row": pa.array([1, 2, 3], pa.int64()),
            "__id": [email_of(1), email_of(2), email_of(3)],
            KEPT: [True, False, None],
        }
    )
    try:
        [request] = list(dest.requests(table))
    finally:
        dest.close()
    contacts = orjson.loads(request.body)["contacts"]
    fields = [c["dataFields"] for c in contacts]
    assert "NEWSLETTER_SUBSCRIBE" not in fields[0] and fields[0]["FIRSTNAME"] is None
    assert fields[1]["NEWSLETTER_SUBSCRIBE"] == "NO" and fields[2]["NEWSLETTER_SUBSCRIBE"] == "YES"

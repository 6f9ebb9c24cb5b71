"""Consent evidence: how a consent was obtained (the text agreed to, the page, the person's IP
address and browser), from a view's columns or fixed per sync, sent with a subscribe where the
destination keeps it (Dotdigital's ``consentRecords``) and refused by ``check`` where it cannot
(Klaviyo profiles; Dotdigital SMS consent), never dropped silently.

The Dotdigital runs go through the real engine and client to the sandbox, which checks every
import against the v3 spec (``consentRecord``: all five properties, ``uri``, ``ipv4|ipv6``,
``date-time``; no ``null``) and keeps the records on the contact, each with its
``dateTimeCreated``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import pytest

from reverse_etl.config import load_project
from reverse_etl.destinations.dotdigital.profiles import DotdigitalProfiles
from reverse_etl.destinations.klaviyo.profiles import KlaviyoProfiles
from reverse_etl.engine import transform_spec
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, ConfigError
from tests import helpers
from tests.helpers import at, create_table, write_project
from tests.sandboxes import (
    Rig,
    assert_counts,
    dotdigital_config_error,
    dotdigital_project,
    email_of,
    spec_problems,
)
from tests.test_destination_dotdigital import dd_sync

IMPORT = "/contacts/v3/import"
TEXT = "Yes, send me the monthly newsletter. I can unsubscribe at any time."
URL = "https://shop.example.com/signup"
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0"
COLUMNS = {
    "email": "VARCHAR",
    "first_name": "VARCHAR",
    "email_consent": "VARCHAR",
    "consent_at": "TIMESTAMPTZ",
    "signup_ip": "VARCHAR",
    "signup_ua": "VARCHAR",
    "signup_url": "VARCHAR",
    "modified_at": "TIMESTAMPTZ",
}
MAPPING = {"email": "email", "first_name": "FIRSTNAME"}
EVIDENCE: dict[str, Any] = {
    "text": TEXT,
    "url": URL,
    "ip_address": {"column": "signup_ip"},
    "user_agent": {"column": "signup_ua"},
}


def consent(
    evidence: dict[str, Any] | None = None, *, consented_at: str | None = "consent_at"
) -> dict[str, Any]:
    column = {"column": "email_consent", "evidence": EVIDENCE if evidence is None else evidence}
    if consented_at:
        column["consented_at"] = consented_at
    return {"email": column}


def row(n: int, **overrides: Any) -> tuple[Any, ...]:
    values: dict[str, Any] = {
        "email": email_of(n),
        "first_name": f"First{n}",
        "email_consent": "yes",
        "consent_at": at(3600 + n),
        "signup_ip": f"203.0.113.{n}",
        "signup_ua": UA,
        "signup_url": f"https://shop.example.com/signup?from={n}",
        "modified_at": at(n),
    }
    values.update(overrides)
    return tuple(values[c] for c in COLUMNS)


def table(rig: Rig, rows: list[tuple[Any, ...]]) -> None:
    create_table(rig.db, "people", COLUMNS, rows)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def record(n: int, *, ip: str | None = None, url: str = URL) -> dict[str, str]:
    """The consent record row ``n`` (as ``row`` builds it) is sent with."""
    return {
        "text": TEXT,
        "dateTimeConsented": stamp(at(3600 + n)),
        "url": url,
        "ipAddress": ip or f"203.0.113.{n}",
        "userAgent": UA,
    }


def records(rig: Rig, n: int) -> list[dict[str, str]]:
    """The consent records the sandbox holds on contact ``n``, without their creation time
    (a contact without any shows no ``consentRecords``, as Dotdigital's does)."""
    contact = rig.sandbox.contact(email_of(n))
    assert contact is not None, n
    held = contact.get("consentRecords", [])
    assert all(r["dateTimeCreated"] for r in held), held
    return [{k: v for k, v in r.items() if k != "dateTimeCreated"} for r in held]


# Rows 0 and 7 carry every part of a record; each other row lacks one, or sends no subscribe.
ROWS = [
    row(0),
    row(1, email_consent="no"),  # an opt-out: no record
    row(2, email_consent=None),  # no consent: no record
    row(3, signup_ip=None),  # a subscribe without its IP address
    row(4, signup_ua="   "),  # ... with a blank user agent
    row(5, signup_ip="not-an-ip"),  # ... with an IP address that is none
    row(6, consent_at=None),  # ... without its time
    row(7, signup_ip="2001:db8::7"),  # IPv6
]
RECORDED = {0: record(0), 7: record(7, ip="2001:db8::7")}


# --------------------------------------------------------------------------- Dotdigital


@pytest.mark.parametrize("null_values", ["skip", "clear"])
@pytest.mark.parametrize("consent_mode", ["channel", "data_field"])
def test_a_subscribe_with_all_its_evidence_carries_a_consent_record(
    dotdigital, consent_mode, null_values
):
    rig = dotdigital()
    table(rig, ROWS)
    options = {"consent_mode": consent_mode}
    rig.configure(
        [dd_sync(mapping=MAPPING, options=options, consent=consent(), null_values=null_values)]
    )

    result = rig.run("contacts")

    # a row without its full evidence is no error: its contact and consent go, without a record
    assert_counts(result, EXIT_OK, read=8, sent=8, created=8, failed=0)
    assert set(result.by_reason) <= {"consent_evidence_incomplete"}
    assert rig.sandbox.violations == []
    for n in range(8):
        assert records(rig, n) == ([RECORDED[n]] if n in RECORDED else []), n
    for n in (3, 4, 5, 6):  # their subscribe went all the same
        contact = rig.sandbox.contact(email_of(n))
        assert contact is not None
        if consent_mode == "channel":
            assert contact["channelProperties"]["email"]["status"] == "subscribed", n
        else:
            assert contact["dataFields"]["NEWSLETTER_SUBSCRIBE"] == "YES", n


def test_records_follow_consent_changes_only(dotdigital):
    """A record goes with a subscribe that is sent: not again when only another column
    changed (the consent is kept), again when the person consents anew."""
    rig = dotdigital()
    rows = list(ROWS)
    table(rig, rows)
    rig.configure([dd_sync(mapping=MAPPING, consent=consent())])
    assert rig.run("contacts").exit_code == EXIT_OK

    rows[0] = row(0, first_name="Renamed", modified_at=at(100))  # consent unchanged
    rows[1] = row(1, consent_at=at(9000), modified_at=at(101))  # opted in since
    rows[3] = row(3, modified_at=at(102))  # its IP address came: the evidence changed
    table(rig, rows)
    second = rig.run("contacts")

    assert_counts(second, EXIT_OK, read=3, sent=3, updated=3, failed=0)
    assert records(rig, 0) == [record(0)]  # not recorded twice
    assert records(rig, 1) == [{**record(1), "dateTimeConsented": stamp(at(9000))}]
    assert records(rig, 3) == [record(3)]
    contact = rig.sandbox.contact(email_of(0))
    assert contact is not None and contact["dataFields"]["FIRSTNAME"] == "Renamed"


@pytest.mark.parametrize("null_values", ["skip", "clear"])
def test_the_import_holds_a_whole_record_or_none_never_null(dotdigital, tmp_path, null_values):
    """What is sent, per contact: ``consentRecords`` is absent or one record with all five
    properties, never null, whatever ``null_values`` says (the sandbox's spec check refuses
    ``"consentRecords": null``, as the dry run's lines are checked here too)."""
    rig = dotdigital()
    table(rig, ROWS)
    evidence = {**EVIDENCE, "url": {"column": "signup_url"}}  # every kind of value at once
    rig.configure([dd_sync(mapping=MAPPING, consent=consent(evidence), null_values=null_values)])
    target = tmp_path / "dry.jsonl"

    rig.run("contacts", dry_run=True, dry_run_file=str(target))

    lines = [orjson.loads(x) for x in target.read_bytes().splitlines()]
    contacts = {}
    for line in lines:
        assert spec_problems(rig.sandbox, line["method"], line["path"], line["body"]) == []
        for c in line["body"]["contacts"]:
            contacts[c["identifiers"]["email"]] = c
    assert len(contacts) == 8
    for n in range(8):
        doc = contacts[email_of(n)]
        if n in RECORDED:
            url = f"https://shop.example.com/signup?from={n}"
            assert doc["consentRecords"] == [{**RECORDED[n], "url": url}], n
        else:
            assert "consentRecords" not in doc, n
    # the check the bodies passed is a real one: a null record list is off the spec
    sample = {**contacts[email_of(1)], "consentRecords": None}
    assert spec_problems(rig.sandbox, "PUT", IMPORT, {"contacts": [sample]})


def test_a_bad_url_in_the_column_sends_no_record(dotdigital):
    rig = dotdigital()
    table(rig, [row(0, signup_url="shop.example.com/signup"), row(1)])  # no scheme: no URL
    evidence = {**EVIDENCE, "url": {"column": "signup_url"}}
    rig.configure([dd_sync(mapping=MAPPING, consent=consent(evidence))])

    result = rig.run("contacts")
    assert_counts(result, EXIT_OK, read=2, sent=2, created=2, failed=0)
    assert result.by_reason == {"consent_evidence_incomplete": 1}  # a note, not an error

    assert records(rig, 0) == []
    assert records(rig, 1) == [record(1, url="https://shop.example.com/signup?from=1")]


def test_an_evidence_column_missing_from_the_view_stops_the_run(dotdigital):
    rig = dotdigital()
    table(rig, ROWS)
    evidence = {**EVIDENCE, "user_agent": {"column": "browser"}}
    rig.configure([dd_sync(mapping=MAPPING, consent=consent(evidence))])

    result = rig.run("contacts")

    assert result.exit_code == EXIT_FAILED
    assert "column 'browser' is not in the view" in (result.record.message or "")
    assert rig.sandbox.contacts() == []


def test_evidence_columns_are_read_and_checked_like_other_columns(tmp_path):
    write_project(tmp_path, _dotdigital_project(dd_sync(mapping=MAPPING, consent=consent())))
    sync = load_project(None, tmp_path, env={}).sync("contacts")

    fields = {f.field: (f.column, f.kind) for f in transform_spec(sync, DotdigitalProfiles).fields}

    assert fields["consent.email.evidence.ip_address"] == ("signup_ip", "string")
    assert fields["consent.email.evidence.user_agent"] == ("signup_ua", "string")
    # fixed values read no column
    assert "consent.email.evidence.text" not in fields
    assert "consent.email.evidence.url" not in fields


def test_evidence_is_allowed_with_the_consent_data_field(tmp_path):
    """Consent records belong to the contact, not to its email channel status: they go in
    both consent modes."""
    options = {"consent_mode": "data_field"}
    write_project(
        tmp_path, _dotdigital_project(dd_sync(mapping=MAPPING, options=options, consent=consent()))
    )
    sync = load_project(None, tmp_path, env={}).sync("contacts")
    assert sync.consent.email is not None and sync.consent.email.evidence is not None


def test_sms_evidence_is_refused_for_dotdigital(tmp_path):
    sms = {"sms": {"column": "sms_consent", "consented_at": "consent_at", "evidence": EVIDENCE}}
    message = dotdigital_config_error(tmp_path, dd_sync(mapping=MAPPING, consent=sms))
    assert "syncs[0] (contacts)" in message
    assert "consent.sms.evidence: Dotdigital contacts keep consent records for email" in message
    assert "remove it" in message


# --------------------------------------------------------------------------- Klaviyo


@pytest.mark.parametrize("channel", ["email", "sms"])
def test_klaviyo_refuses_evidence_at_load(tmp_path, channel):
    column = {
        "column": f"{channel}_consent",
        "consented_at": "consent_at",
        "evidence": EVIDENCE,
    }
    sync = helpers.sync_entry(consent={channel: column})
    write_project(tmp_path, helpers.project_data(syncs=[sync]))

    with pytest.raises(ConfigError) as raised:
        load_project(None, tmp_path, env={})

    message = str(raised.value)
    assert f"consent.{channel}.evidence: Klaviyo profiles take no consent evidence" in message
    assert "text, url, ip_address, user_agent" in message
    assert "remove evidence" in message


def test_klaviyo_check_is_the_same_without_evidence(tmp_path):
    """consented_at alone (historical import) is what Klaviyo takes, and still loads."""
    column = {"column": "email_consent", "consented_at": "consent_at"}
    write_project(
        tmp_path, helpers.project_data(syncs=[helpers.sync_entry(consent={"email": column})])
    )
    sync = load_project(None, tmp_path, env={}).syncs[0]
    assert KlaviyoProfiles.check_sync(sync) == []


# --------------------------------------------------------------------------- the YAML


@pytest.mark.parametrize(
    ("evidence", "extra", "expected"),
    [
        (EVIDENCE, {"consented_at": None}, "consent.email: evidence needs consented_at"),
        (
            {k: v for k, v in EVIDENCE.items() if k != "user_agent"},
            {},
            "consent.email.evidence: give all of text, url, ip_address, user_agent (a consent "
            "record needs each); missing: user_agent",
        ),
        (
            {**EVIDENCE, "ip": "203.0.113.9"},
            {},
            "consent.email.evidence: unknown key 'ip'",
        ),
        (
            {**EVIDENCE, "url": "shop.example.com/signup"},
            {},
            "url: 'shop.example.com/signup' is not an absolute URL",
        ),
        (
            {**EVIDENCE, "ip_address": "203.0.113"},
            {},
            "ip_address: '203.0.113' is not an IPv4 or IPv6 address",
        ),
        ({**EVIDENCE, "text": "  "}, {}, "text: empty; give a fixed text or {column: NAME}"),
        (
            {**EVIDENCE, "user_agent": {"name": "signup_ua"}},
            {},
            "user_agent: write {column: NAME} to read it from a column of the view",
        ),
        (
            {**EVIDENCE, "text": {"column": "consent_at"}},
            {},
            "evidence.text: column 'consent_at' already holds the consent or its time",
        ),
    ],
    ids=[
        "no-consented-at",
        "missing-key",
        "unknown-key",
        "bad-url",
        "bad-ip",
        "blank",
        "bad-ref",
        "consent-column",
    ],
)
def test_evidence_is_checked_at_load(tmp_path, evidence, extra, expected):
    sync = dd_sync(mapping=MAPPING, consent=consent(evidence, **extra))
    message = dotdigital_config_error(tmp_path, sync)
    assert expected in message, message


def test_fixed_evidence_may_be_given_for_every_key(tmp_path):
    fixed = {"text": TEXT, "url": URL, "ip_address": "2001:db8::1", "user_agent": UA}
    write_project(tmp_path, _dotdigital_project(dd_sync(mapping=MAPPING, consent=consent(fixed))))
    sync = load_project(None, tmp_path, env={}).sync("contacts")
    assert sync.consent.email is not None and sync.consent.email.evidence is not None
    assert sync.consent.email.evidence.columns() == {}
    assert sync.consent.email.evidence.values() == fixed


def _dotdigital_project(sync: dict[str, Any]) -> dict[str, Any]:
    return dotdigital_project([sync])

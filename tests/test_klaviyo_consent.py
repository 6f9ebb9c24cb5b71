"""Klaviyo consent end to end: consent columns become bulk subscribe/unsubscribe calls after
the profiles are imported, with ``historical_import`` for consent given in the past; list
membership never implies consent and an empty consent changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from reverse_etl.destinations.klaviyo import bulk
from reverse_etl.destinations.klaviyo.client import KlaviyoClient
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.destinations.klaviyo.consent import UNSUBSCRIBE
from reverse_etl.errors import EXIT_OK, EXIT_ROW_ERRORS, ConfigError
from reverse_etl.sandbox import KlaviyoSandbox, SandboxServer, SandboxSettings
from tests.helpers import at, create_table
from tests.sandboxes import Rig, assert_counts, assert_counts_add_up, error_rows
from tests.test_klaviyo_support import klaviyo_sync

SUBSCRIBE = "/api/profile-subscription-bulk-create-jobs"
UNSUBSCRIBE_PATH = "/api/profile-subscription-bulk-delete-jobs"
COLUMNS = {
    "email": "VARCHAR",
    "phone": "VARCHAR",
    "email_consent": "VARCHAR",
    "sms_consent": "VARCHAR",
    "consent_at": "TIMESTAMPTZ",
    "modified_at": "TIMESTAMPTZ",
}
MAPPING = {"email": "email", "phone": "phone_number"}
CONSENT = {
    "email": {"column": "email_consent", "consented_at": "consent_at"},
    "sms": "sms_consent",
}
CONSENTED = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def person(n: int, email_consent: str | None, sms_consent: str | None = None, **kw: Any) -> tuple:
    values = {
        "email": f"p{n}@example.com",
        "phone": f"+1415555{n:04d}",
        "email_consent": email_consent,
        "sms_consent": sms_consent,
        "consent_at": CONSENTED,
        "modified_at": at(n),
        **kw,
    }
    return tuple(values[c] for c in COLUMNS)


def people(rig: Rig, rows: list[tuple]) -> None:
    create_table(rig.db, "people", COLUMNS, rows)


def consent_sync(name: str = "profiles", **extra: Any) -> dict[str, Any]:
    # SMS consent here has no time, on purpose (a subscribe without historical_import)
    destination = {"sms_without_consent_time": True, **extra.pop("destination", {})}
    entry = {"consent": CONSENT, "destination": destination, **extra}
    return klaviyo_sync(name, mapping=entry.pop("mapping", MAPPING), **entry)


def subscriptions(rig: Rig) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (s["email"], s["channel"]): s
        for s in rig.sandbox.subscriptions()
        if s["type"] == "marketing"
    }


def test_consent_lands_with_historical_import_and_null_changes_nothing(klaviyo):
    rig = klaviyo()
    people(
        rig,
        [
            person(0, "yes", "y"),  # both subscribed; email consent dated, SMS not
            person(1, "no", "opt-out"),
            person(2, None, None),  # no consent: left alone
            person(3, "never_subscribed"),  # cannot be set: left alone
            person(4, "subscribed", consent_at=None),  # undated email consent
        ],
    )
    rig.configure([consent_sync()])

    result = rig.run("profiles")

    assert result.exit_code == EXIT_OK, result.record.message
    assert_counts_add_up(result)
    subs = subscriptions(rig)
    assert set(subs) == {
        ("p0@example.com", "email"),
        ("p0@example.com", "sms"),
        ("p1@example.com", "email"),
        ("p1@example.com", "sms"),
        ("p4@example.com", "email"),
    }
    dated = subs[("p0@example.com", "email")]
    assert dated["consent"] == "SUBSCRIBED" and dated["historical_import"] is True
    assert dated["consented_at"] == "2024-05-01T10:00:00Z"
    assert dated["custom_source"] == "reverse-etl sync profiles"
    # consent without a time is not back-filled: the account's opt-in process applies
    for key in [("p0@example.com", "sms"), ("p4@example.com", "email")]:
        assert subs[key]["consent"] == "SUBSCRIBED" and subs[key]["historical_import"] is False
    assert subs[("p1@example.com", "email")]["consent"] == "UNSUBSCRIBED"
    assert subs[("p1@example.com", "sms")]["consent"] == "UNSUBSCRIBED"
    assert len(rig.requests("POST", SUBSCRIBE)) == 2  # dated and undated
    assert len(rig.requests("POST", UNSUBSCRIBE_PATH)) == 1
    assert len(rig.sandbox.profiles()) == 5


def test_list_membership_never_implies_consent(klaviyo):
    rig = klaviyo()
    people(rig, [person(n, None) for n in range(4)])
    rig.configure([consent_sync(destination={"list": "Newsletter"})])
    assert rig.run("profiles").exit_code == EXIT_OK
    assert len(rig.sandbox.list_members("Newsletter")) == 4
    assert rig.sandbox.subscriptions() == []
    assert rig.requests("POST", SUBSCRIBE) == [] and rig.requests("POST", UNSUBSCRIBE_PATH) == []


def test_unsubscribing_leaves_list_membership_alone(klaviyo):
    rig = klaviyo()
    people(rig, [person(n, "no") for n in range(3)])
    rig.configure([consent_sync(destination={"list": "Newsletter"})])
    assert rig.run("profiles").exit_code == EXIT_OK
    assert len(rig.sandbox.list_members("Newsletter")) == 3  # a global unsubscribe, no list
    assert {s["consent"] for s in rig.sandbox.subscriptions()} == {"UNSUBSCRIBED"}


def test_consent_goes_after_the_import_and_only_for_profiles_that_landed(klaviyo):
    rig = klaviyo()
    people(rig, [person(n, "yes") for n in range(4)])
    rig.configure([consent_sync()])
    assert rig.run("profiles").exit_code == EXIT_OK
    rig.sandbox.reset_log()

    # customer 3 now claims customer 1's phone: Klaviyo's import refuses that profile
    people(rig, [person(3, "no", phone="+14155550001", modified_at=at(100))])
    result = rig.run("profiles")

    assert result.exit_code == EXIT_ROW_ERRORS
    [error] = error_rows(result)
    assert (error["identifier"], error["reason"]) == ("p3@example.com", "destination_rejected")
    assert subscriptions(rig)[("p3@example.com", "email")]["consent"] == "SUBSCRIBED"
    assert rig.requests("POST", UNSUBSCRIBE_PATH) == []

    people(rig, [person(n, "no", modified_at=at(200 + n)) for n in range(3)])
    rig.sandbox.reset_log()
    assert rig.run("profiles").exit_code == EXIT_OK
    log = [(r.method, r.path.split("/")[2]) for r in rig.sandbox.request_log]
    last_poll = max(i for i, r in enumerate(log) if r == ("GET", "profile-bulk-import-jobs"))
    first_consent = log.index(("POST", "profile-subscription-bulk-delete-jobs"))
    assert first_consent > last_poll  # the import had completed: the profiles existed


def test_consent_without_an_address_is_a_row_error_and_the_profile_lands(klaviyo):
    rig = klaviyo()
    people(
        rig,
        [
            person(0, "yes", "yes", phone=None),
            person(1, "yes", None, phone=None),
            person(2, "yes", "no", phone=None),  # nothing to revoke without a number: no error
        ],
    )
    rig.configure([consent_sync()])

    result = rig.run("profiles")

    # found before sending: p0's SMS consent is taken off its row, its profile still lands
    assert_counts(result, EXIT_ROW_ERRORS, read=3, rejected=0, sent=3, updated=3, failed=0)
    [error] = error_rows(result)
    assert (error["identifier"], error["column"], error["value"]) == (
        "p0@example.com",
        "sms_consent",
        "subscribed",
    )
    assert error["reason"] == "missing_consent_address" and "phone number" in error["message"]
    assert error["how_to_fix"]
    assert set(subscriptions(rig)) == {
        ("p0@example.com", "email"),
        ("p1@example.com", "email"),
        ("p2@example.com", "email"),
    }
    assert len(rig.sandbox.profiles()) == 3


def test_unsubscribes_are_packed_100_to_a_call(klaviyo):
    rig = klaviyo()
    people(rig, [person(n, "no") for n in range(250)])
    rig.configure([consent_sync(consent={"email": "email_consent"})])
    assert rig.run("profiles").exit_code == EXIT_OK
    assert len(rig.requests("POST", UNSUBSCRIBE_PATH)) == 3
    assert len(rig.sandbox.subscriptions()) == 250


def test_consent_time_a_little_ahead_is_sent_as_now(klaviyo):
    rig = klaviyo()
    ahead = datetime.now(UTC) + timedelta(minutes=5)  # within max_future_skew_minutes
    people(rig, [person(0, "yes", consent_at=ahead)])
    rig.configure([consent_sync()])
    assert rig.run("profiles").exit_code == EXIT_OK
    sent = subscriptions(rig)[("p0@example.com", "email")]["consented_at"]
    assert datetime.fromisoformat(sent) <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mapping": {"email": "email"}}, "consent.sms: SMS consent needs a phone number"),
        (
            {"mapping": {"phone": "phone_number"}, "identifier": "phone"},
            "consent.email: email consent needs the email address",
        ),
    ],
)
def test_consent_config_errors(klaviyo, change, message):
    rig = klaviyo()
    people(rig, [person(0, "yes")])
    with pytest.raises(ConfigError) as info:
        rig.configure([consent_sync(**change)])
    assert message in str(info.value)


def test_a_profile_klaviyo_refuses_is_a_row_error_and_the_rest_are_sent(tmp_path):
    """The bulk sender peels refused records off a call: here an unsubscribe whose phone
    number Klaviyo refuses (the sync's own checks never let one through)."""
    sandbox = KlaviyoSandbox(SandboxSettings(enforce_limits=False))
    docs = [
        '{"type":"profile","attributes":{"email":"a@example.com","subscriptions":'
        '{"email":{"marketing":{"consent":"UNSUBSCRIBED"}}}}}',
        '{"type":"profile","attributes":{"phone_number":"+12","subscriptions":'
        '{"sms":{"marketing":{"consent":"UNSUBSCRIBED"}}}}}',
        '{"type":"profile","attributes":{"email":"c@example.com","subscriptions":'
        '{"email":{"marketing":{"consent":"UNSUBSCRIBED"}}}}}',
    ]
    records = bulk.Records(pa.array(docs), pa.array([7, 8, 9]), pa.array(["a", "b", "c"]))
    with SandboxServer(sandbox) as server:
        conn = KlaviyoConnection(
            type="klaviyo", api_key=sandbox.settings.api_key, base_url=server.base_url
        )
        client = KlaviyoClient(conn)
        try:
            errors = bulk.send(client, UNSUBSCRIBE, records)
        finally:
            client.close()
        assert sandbox.wait_idle()
    [error] = errors
    assert (error.row_number, error.identifier, error.reason) == (8, "b", "destination_rejected")
    assert error.column == "/data/attributes/profiles/data/1/attributes/phone_number"
    assert "Invalid phone number" in error.message
    assert {s["email"] for s in sandbox.subscriptions()} == {"a@example.com", "c@example.com"}
    assert [v.pointer for v in sandbox.violations] == [error.column]  # the refusal, nothing else


def test_dry_run_shows_consent_calls_without_counting_rows_twice(klaviyo):
    rig = klaviyo()
    people(rig, [person(0, "yes"), person(1, "no"), person(2, None)])
    rig.configure([consent_sync()])

    result = rig.run("profiles", dry_run=True)

    assert result.record.counts.sent == 3
    lines = [orjson.loads(x) for x in Path(result.dry_run_file).read_bytes().splitlines()]
    assert [(x["path"], x["rows"]) for x in lines] == [
        ("/api/profile-bulk-import-jobs", 3),
        (SUBSCRIBE, 0),
        (UNSUBSCRIBE_PATH, 0),
    ]
    assert lines[1]["body"]["data"]["attributes"]["historical_import"] is True
    assert rig.sandbox.request_log == []

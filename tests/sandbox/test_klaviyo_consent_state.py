"""Klaviyo sandbox: per-person email consent and suppressions, read back as Klaviyo gives them.

The bulk jobs' effect on suppressions, the person acting inside Klaviyo (``act_as_person`` and
``POST /_sandbox/person``), ``subscriptions`` on ``GET /api/profiles`` and
``GET /api/profiles/{id}`` checked against the spec's own schemas, and the suppression-timestamp
filter and sort with cursor paging.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

import pytest
from jsonschema import Draft4Validator

from reverse_etl.sandbox.bodyschema import FORMAT_CHECKER, oas_to_jsonschema
from reverse_etl.sandbox.klaviyo import PERSON_PATH
from reverse_etl.sandbox.spec import load_spec
from tests.sandbox.sandbox_helpers import (
    import_body,
    marketing,
    poll,
    profile,
    subscriber,
    subscription_job,
)

SUBSCRIBE = "/api/profile-subscription-bulk-create-jobs"
UNSUBSCRIBE = "/api/profile-subscription-bulk-delete-jobs"
IMPORT = "/api/profile-bulk-import-jobs"
SUPPRESSED_AT = "subscriptions.email.marketing.suppression.timestamp"
SUBS = {"additional-fields[profile]": "subscriptions"}


@functools.cache
def _validator(schema: str) -> Draft4Validator:
    """A validator for one of profiles.json's component schemas (OpenAPI's dialect converted
    as the sandbox converts request bodies)."""
    components = load_spec("klaviyo/profiles").raw["components"]
    converted = {"schemas": oas_to_jsonschema(components["schemas"])}
    root = {"$ref": f"#/components/schemas/{schema}", "components": converted}
    return Draft4Validator(root, format_checker=FORMAT_CHECKER)


def assert_valid(schema: str, instance: Any) -> None:
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in _validator(schema).iter_errors(instance)
    ]
    assert errors == [], f"not a valid {schema}: {errors}"


def _when(day: int, hour: int = 0) -> datetime:
    return datetime(2025, 1, day, hour, tzinfo=UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def _import(sandbox, client, emails: list[str]) -> None:
    r = client.post(IMPORT, json=import_body([profile(e) for e in emails]))
    assert r.status_code == 202, r.text
    job = r.json()["data"]["id"]
    poll(
        lambda: client.get(f"{IMPORT}/{job}"),
        lambda r: r.json()["data"]["attributes"]["status"] == "complete",
    )


def _run(sandbox, client, path: str, body: dict[str, Any]) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 202, r.text
    assert sandbox.wait_idle()


def _read(client, email: str) -> dict[str, Any]:
    """``subscriptions`` of the profile with ``email``, by GET /api/profiles; the document is
    checked against the operation's response schema."""
    r = client.get("/api/profiles", params={"filter": f'equals(email,"{email}")', **SUBS})
    assert r.status_code == 200, r.text
    assert_valid("GetProfileResponsePluralConversationsCollectionCompoundDocument", r.json())
    (data,) = r.json()["data"]
    subs = data["attributes"]["subscriptions"]
    assert_valid("Subscriptions", subs)
    assert_valid("EmailMarketing", subs["email"]["marketing"])
    for item in subs["email"]["marketing"]["suppression"]:
        assert_valid("EmailMarketingSuppression", item)
    return subs


def _email(client, email: str) -> dict[str, Any]:
    return _read(client, email)["email"]["marketing"]


def test_unsubscribe_job_reads_back_as_unsubscribed_with_one_unsubscribe_suppression(klaviyo):
    sandbox, client = klaviyo
    _run(
        sandbox,
        client,
        SUBSCRIBE,
        subscription_job([subscriber("u@example.com", {"email": marketing("SUBSCRIBED")})]),
    )
    assert _email(client, "u@example.com")["can_receive_email_marketing"] is True

    unsub = subscription_job(
        [subscriber("u@example.com", {"email": marketing("UNSUBSCRIBED")})], delete=True
    )
    before = datetime.now(UTC)
    _run(sandbox, client, UNSUBSCRIBE, unsub)
    after = datetime.now(UTC)
    got = _email(client, "u@example.com")
    assert got["consent"] == "UNSUBSCRIBED" and got["can_receive_email_marketing"] is False
    assert [s["reason"] for s in got["suppression"]] == ["UNSUBSCRIBE"]
    stamp = got["suppression"][0]["timestamp"]
    assert before <= datetime.fromisoformat(stamp) <= after
    assert got["consent_timestamp"] == stamp and got["list_suppressions"] == []
    assert sandbox.suppressions("u@example.com") == [{"reason": "UNSUBSCRIBE", "timestamp": stamp}]

    # again: still one UNSUBSCRIBE suppression, moved to the new time
    _run(sandbox, client, UNSUBSCRIBE, unsub)
    again = sandbox.suppressions("u@example.com")
    assert [s["reason"] for s in again] == ["UNSUBSCRIBE"] and again[0]["timestamp"] > stamp
    assert _email(client, "u@example.com")["suppression"] == again
    assert sandbox.violations == []


def test_subscribe_lifts_unsubscribe_spam_and_user_suppressions_but_not_hard_bounce(klaviyo):
    sandbox, client = klaviyo
    _import(sandbox, client, ["a@example.com", "b@example.com"])
    sandbox.act_as_person("a@example.com", "unsubscribe", at=_when(2))
    sandbox.act_as_person("a@example.com", "complain", at=_when(3))
    sandbox.act_as_person("a@example.com", "suppress", at=_when(4))
    sandbox.act_as_person("b@example.com", "unsubscribe", at=_when(2))
    with sandbox.lock:  # a bounce is Klaviyo's doing, not the person's: set it directly
        pid = sandbox.state.find_by("email", "b@example.com")
        assert pid is not None
        sandbox.state.suppress(pid, "HARD_BOUNCE", _iso(_when(1)), _iso(_when(1)))
    assert [s["reason"] for s in _email(client, "a@example.com")["suppression"]] == [
        "UNSUBSCRIBE",
        "SPAM_COMPLAINT",
        "USER_SUPPRESSED",
    ]

    consented = "2025-01-05T09:30:00+00:00"
    body = subscription_job(
        [
            subscriber(e, {"email": marketing("SUBSCRIBED", consented)})
            for e in ("a@example.com", "b@example.com")
        ],
        historical_import=True,
    )
    _run(sandbox, client, SUBSCRIBE, body)
    a, b = _email(client, "a@example.com"), _email(client, "b@example.com")
    assert (a["consent"], a["consent_timestamp"], a["suppression"]) == ("SUBSCRIBED", consented, [])
    assert a["can_receive_email_marketing"] is True
    assert sandbox.suppressions("a@example.com") == []
    assert (b["consent"], b["consent_timestamp"]) == ("SUBSCRIBED", consented)
    assert b["suppression"] == [{"reason": "HARD_BOUNCE", "timestamp": _iso(_when(1))}]
    assert b["can_receive_email_marketing"] is False  # subscribed, but still suppressed

    # without historical_import the consent is dated when the job is processed
    sandbox.act_as_person("a@example.com", "unsubscribe", at=_when(6))
    before = datetime.now(UTC)
    _run(
        sandbox,
        client,
        SUBSCRIBE,
        subscription_job([subscriber("a@example.com", {"email": marketing("SUBSCRIBED")})]),
    )
    a = _email(client, "a@example.com")
    assert before <= datetime.fromisoformat(a["consent_timestamp"]) <= datetime.now(UTC)
    assert a["suppression"] == [] and a["can_receive_email_marketing"] is True
    assert sandbox.violations == []


def test_never_subscribed_and_sms_consent_in_the_spec_shapes(klaviyo):
    sandbox, client = klaviyo
    _import(sandbox, client, ["n@example.com"])
    subs = _read(client, "n@example.com")
    assert "sms" not in subs
    assert subs["email"]["marketing"] == {
        "can_receive_email_marketing": False,
        "consent": "NEVER_SUBSCRIBED",
        "consent_timestamp": None,
        "last_updated": None,
        "method": None,
        "method_detail": None,
        "custom_method_detail": None,
        "suppression": [],
        "list_suppressions": [],
    }
    consented = "2024-05-01T10:00:00+00:00"
    body = subscription_job(
        [
            subscriber(
                "s@example.com",
                {"sms": marketing("SUBSCRIBED", consented)},
                phone_number="+15005550006",
            )
        ],
        historical_import=True,
    )
    _run(sandbox, client, SUBSCRIBE, body)
    subs = _read(client, "s@example.com")
    sms = subs["sms"]["marketing"]
    assert_valid("SMSMarketing", sms)
    assert (sms["can_receive_sms_marketing"], sms["consent"], sms["consent_timestamp"]) == (
        True,
        "SUBSCRIBED",
        consented,
    )
    assert sms["method"] == "API" and sms["last_updated"]
    # an SMS-only subscribe gives no email consent
    assert subs["email"]["marketing"]["consent"] == "NEVER_SUBSCRIBED"
    # the inspection record keeps its shape
    (record,) = sandbox.subscriptions()
    assert {"email", "channel", "type", "consent", "consented_at", "historical_import"} <= set(
        record
    )
    assert (record["channel"], record["type"], record["consented_at"]) == (
        "sms",
        "marketing",
        consented,
    )
    assert sandbox.violations == []


def test_get_profile_by_id_shows_subscriptions(klaviyo):
    sandbox, client = klaviyo
    _import(sandbox, client, ["one@example.com"])
    sandbox.act_as_person("one@example.com", "complain", at=_when(9))
    pid = sandbox.profile_by_email("one@example.com")["id"]
    r = client.get(f"/api/profiles/{pid}", params=SUBS)
    assert r.status_code == 200, r.text
    assert_valid("GetProfileResponsePluralConversationsCompoundDocument", r.json())
    got = r.json()["data"]["attributes"]["subscriptions"]["email"]["marketing"]
    assert_valid("EmailMarketing", got)
    assert got["consent"] == "UNSUBSCRIBED" and got["consent_timestamp"] == _iso(_when(9))
    assert got["suppression"] == [{"reason": "SPAM_COMPLAINT", "timestamp": _iso(_when(9))}]
    plain = client.get(f"/api/profiles/{pid}").json()["data"]["attributes"]
    assert "subscriptions" not in plain and plain["email"] == "one@example.com"
    # an unknown id is a miss, not the client breaking the API
    assert client.get("/api/profiles/01NOPE", params=SUBS).status_code == 404
    assert sandbox.violations == []


def _emails(doc: dict[str, Any]) -> list[str]:
    return [p["attributes"]["email"] for p in doc["data"]]


def _pages(client, params: dict[str, str]) -> list[list[str]]:
    """Every page's emails, following links.next."""
    doc = client.get("/api/profiles", params=params)
    assert doc.status_code == 200, doc.text
    pages = [_emails(doc.json())]
    while "next" in doc.json()["links"]:
        doc = client.get(doc.json()["links"]["next"])
        assert doc.status_code == 200, doc.text
        pages.append(_emails(doc.json()))
    return pages


@pytest.fixture
def suppressed(klaviyo):
    """Seven profiles: p0-p4 suppressed at known times (p3 twice, newest counts), p5/p6 not."""
    sandbox, client = klaviyo
    _import(sandbox, client, [f"p{i}@example.com" for i in range(7)])
    sandbox.act_as_person("p0@example.com", "unsubscribe", at=_when(5))
    sandbox.act_as_person("p1@example.com", "complain", at=_when(2))
    sandbox.act_as_person("p2@example.com", "suppress", at=_when(8))
    sandbox.act_as_person("p3@example.com", "unsubscribe", at=_when(1))
    sandbox.act_as_person("p3@example.com", "suppress", at=_when(6))  # p3's newest: day 6
    sandbox.act_as_person("p4@example.com", "unsubscribe", at=_when(3))
    sandbox.act_as_person("p5@example.com", "unsubscribe", at=_when(4))
    sandbox.act_as_person("p5@example.com", "subscribe", at=_when(7))  # lifted: no suppression
    return sandbox, client


def test_suppression_timestamp_filter_and_sort_page_exactly(suppressed):
    sandbox, client = suppressed
    # after day 2 (exclusive), oldest first, two a page: p4 (3), p0 (5), p3 (6), p2 (8)
    params = {
        "filter": f"greater-than({SUPPRESSED_AT},2025-01-02T00:00:00+00:00)",
        "sort": SUPPRESSED_AT,
        "page[size]": "2",
        **SUBS,
    }
    assert _pages(client, params) == [
        ["p4@example.com", "p0@example.com"],
        ["p3@example.com", "p2@example.com"],
    ]
    # greater-or-equal takes the boundary; Z and +00:00 are the same time
    params["filter"] = f"greater-or-equal({SUPPRESSED_AT},2025-01-02T00:00:00Z)"
    assert _pages(client, params) == [
        ["p1@example.com", "p4@example.com"],
        ["p0@example.com", "p3@example.com"],
        ["p2@example.com"],
    ]
    # less-or-equal, newest first; p3 is judged by its newest suppression (day 6), not day 1
    desc = {
        "filter": f"less-or-equal({SUPPRESSED_AT},2025-01-05T00:00:00Z)",
        "sort": f"-{SUPPRESSED_AT}",
    }
    assert _pages(client, desc) == [["p0@example.com", "p4@example.com", "p1@example.com"]]
    # a window, with and() and a top-level comma both meaning AND
    window = f"greater-than({SUPPRESSED_AT},2025-01-02T00:00:00Z),less-than({SUPPRESSED_AT},2025-01-06T00:00:00Z)"
    assert _pages(client, {"filter": window, "sort": SUPPRESSED_AT}) == [
        ["p4@example.com", "p0@example.com"]
    ]
    # combined with any(email,...)
    mixed = f'and(any(email,["p2@example.com","p3@example.com","p5@example.com"]),greater-than({SUPPRESSED_AT},2025-01-01T12:00:00Z))'
    assert _pages(client, {"filter": mixed, "sort": f"-{SUPPRESSED_AT}"}) == [
        ["p2@example.com", "p3@example.com"]
    ]
    # sort alone: the suppressed in time order, then the rest in creation order
    assert _pages(client, {"sort": SUPPRESSED_AT}) == [
        [f"p{i}@example.com" for i in (1, 4, 0, 3, 2, 5, 6)]
    ]
    assert _pages(client, {"sort": f"-{SUPPRESSED_AT}"}) == [
        [f"p{i}@example.com" for i in (2, 3, 0, 4, 1, 5, 6)]
    ]
    # what the page shows is what was filtered on
    doc = client.get("/api/profiles", params=params).json()
    for p in doc["data"]:
        latest = max(
            s["timestamp"]
            for s in p["attributes"]["subscriptions"]["email"]["marketing"]["suppression"]
        )
        assert latest >= _iso(_when(2))
    assert_valid("GetProfileResponsePluralConversationsCollectionCompoundDocument", doc)
    assert sandbox.violations == []


def test_suppression_filter_refuses_what_klaviyo_refuses(suppressed):
    sandbox, client = suppressed
    bad_time = client.get(
        "/api/profiles", params={"filter": f"greater-than({SUPPRESSED_AT},yesterday)"}
    )
    assert bad_time.status_code == 400
    assert (
        client.get(
            "/api/profiles", params={"filter": f"equals({SUPPRESSED_AT},2025-01-02T00:00:00Z)"}
        ).status_code
        == 400
    )
    assert client.get("/api/profiles", params={"page[size]": "101"}).status_code == 400
    assert [v.parameter for v in sandbox.violations] == ["filter", "filter", "page[size]"]


def test_act_as_person_in_python(klaviyo):
    sandbox, client = klaviyo
    _import(sandbox, client, ["me@example.com"])
    before = datetime.now(UTC)
    sandbox.act_as_person("ME@example.com", "unsubscribe")  # emails match case-insensitively
    (sup,) = sandbox.suppressions("me@example.com")
    assert sup["reason"] == "UNSUBSCRIBE"
    assert before <= datetime.fromisoformat(sup["timestamp"]) <= datetime.now(UTC)
    sandbox.act_as_person("me@example.com", "subscribe", at=datetime(2025, 3, 1, 12))  # naive: UTC
    got = _email(client, "me@example.com")
    assert (got["consent"], got["consent_timestamp"]) == (
        "SUBSCRIBED",
        "2025-03-01T12:00:00.000000+00:00",
    )
    assert got["suppression"] == [] and got["method"] == "PREFERENCE_PAGE"
    with pytest.raises(KeyError):
        sandbox.act_as_person("nobody@example.com", "unsubscribe")
    with pytest.raises(KeyError):
        sandbox.suppressions("nobody@example.com")
    with pytest.raises(ValueError):
        sandbox.act_as_person("me@example.com", "bounce")
    assert sandbox.violations == []


def test_act_as_person_over_http(klaviyo):
    sandbox, client = klaviyo
    _import(sandbox, client, ["web@example.com"])
    at = "2025-02-03T04:05:06Z"
    r = client.post(
        PERSON_PATH, json={"email": "web@example.com", "action": "unsubscribe", "at": at}
    )
    assert r.status_code == 204, r.text
    got = _email(client, "web@example.com")
    stamp = "2025-02-03T04:05:06.000000+00:00"
    assert got["consent"] == "UNSUBSCRIBED" and got["consent_timestamp"] == stamp
    assert got["suppression"] == [{"reason": "UNSUBSCRIBE", "timestamp": stamp}]
    # no revision header needed; "at" defaults to now
    r = client.post(
        PERSON_PATH,
        json={"email": "web@example.com", "action": "suppress"},
        headers={"revision": ""},
    )
    assert r.status_code == 204, r.text
    assert [s["reason"] for s in sandbox.suppressions("web@example.com")] == [
        "UNSUBSCRIBE",
        "USER_SUPPRESSED",
    ]
    r = client.post(PERSON_PATH, json={"email": "web@example.com", "action": "subscribe"})
    assert r.status_code == 204 and sandbox.suppressions("web@example.com") == []
    assert sandbox.violations == []

    assert (
        client.post(
            PERSON_PATH, json={"email": "who@example.com", "action": "subscribe"}
        ).status_code
        == 404
    )
    assert (
        client.post(PERSON_PATH, json={"email": "web@example.com", "action": "bounce"}).status_code
        == 400
    )
    assert (
        client.post(
            PERSON_PATH, json={"email": "web@example.com", "action": "subscribe", "at": "soon"}
        ).status_code
        == 400
    )
    assert client.post(PERSON_PATH, json=["web@example.com"]).status_code == 400
    assert sandbox.violations == []  # outside the API: neither a miss nor a bad call is a violation
    assert sandbox.counters["not_found"] == 1
    # authenticated like the API
    r = client.post(
        PERSON_PATH,
        json={"email": "web@example.com", "action": "unsubscribe"},
        headers={"Authorization": "Klaviyo-API-Key wrong"},
    )
    assert r.status_code == 401
    assert sandbox.suppressions("web@example.com") == []

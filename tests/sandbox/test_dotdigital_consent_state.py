"""The Dotdigital sandbox's email status history: opt-outs read back through v2's
unsubscribed-since / suppressed-since, resubscribing by v3 import, and the person acting
inside Dotdigital (``act_as_person`` and ``POST /_sandbox/person``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.sandbox.sandbox_helpers import poll

IMPORT = "/contacts/v3/import"
UNSUBSCRIBED = "/v2/contacts/unsubscribed-since/"
SUPPRESSED = "/v2/contacts/suppressed-since/"
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _contact(email, **extra):
    return {"matchIdentifier": "email", "identifiers": {"email": email}, **extra}


def _import(client, contacts):
    r = client.put(IMPORT, json={"contacts": contacts})
    assert r.status_code == 202, r.text
    import_id = r.json()["importId"]
    done = poll(
        lambda: client.get(f"{IMPORT}/{import_id}"),
        lambda r: r.json()["status"] in ("Finished", "Failed"),
    ).json()
    assert done["status"] == "Finished", done
    return done


def _status(sandbox, email):
    return sandbox.contact(email)["channelProperties"]["email"]["status"]


def _since(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _subscribe_again(email, **options):
    email_props = {"status": "subscribed"}
    if options:
        email_props["resubscribeOptions"] = options
    return _contact(email, channelProperties={"email": email_props})


def test_unsubscribe_inside_dotdigital_is_read_back_since_a_date_and_paged(dotdigital):
    sandbox, client = dotdigital
    emails = [f"p{n}@example.com" for n in range(4)]
    _import(client, [_contact(e, dataFields={"firstName": f"P{n}"}) for n, e in enumerate(emails)])
    assert sandbox.removals(emails[0]) is None
    # the person unsubscribes in reverse order: rows come oldest removal first
    for n, email in enumerate(reversed(emails[1:])):
        sandbox.act_as_person(email, "unsubscribe", at=T0 + timedelta(minutes=n))
    assert _status(sandbox, emails[3]) == "unsubscribed"
    assert sandbox.contact(emails[3])["status"] == "unsubscribed"
    assert sandbox.removals(emails[3]) == {
        "dateRemoved": "2024-05-01T12:00:00.123Z",
        "reason": "Unsubscribed",
    }

    r = client.get(UNSUBSCRIBED + _since(T0 - timedelta(days=1)))
    assert r.status_code == 200, r.text
    rows = r.json()
    assert rows[0] == {
        "suppressedContact": {
            "id": sandbox.contact(emails[3])["contactId"],
            "email": emails[3],
            "optInType": "Unknown",
            "emailType": "Html",
            "dataFields": None,
            "status": "Unsubscribed",
        },
        "dateRemoved": "2024-05-01T12:00:00.123Z",
        "reason": "Unsubscribed",
    }
    assert [x["suppressedContact"]["email"] for x in rows] == [emails[3], emails[2], emails[1]]
    assert [x["dateRemoved"] for x in rows] == [
        "2024-05-01T12:00:00.123Z",
        "2024-05-01T12:01:00.123Z",
        "2024-05-01T12:02:00.123Z",
    ]

    # paging: select and skip
    since = UNSUBSCRIBED + _since(T0 - timedelta(days=1))
    pages = [client.get(since, params={"select": 2, "skip": skip}).json() for skip in (0, 2, 4)]
    assert [[x["suppressedContact"]["email"] for x in p] for p in pages] == [
        [emails[3], emails[2]],
        [emails[1]],
        [],
    ]
    # removals after the date only (strictly after: the removal's own time excludes it)
    later = client.get(UNSUBSCRIBED + "2024-05-01T12:00:00.123Z").json()
    assert [x["suppressedContact"]["email"] for x in later] == [emails[2], emails[1]]
    assert client.get(UNSUBSCRIBED + _since(T0 + timedelta(hours=1))).json() == []
    # an offset other than UTC means the same moment
    assert len(client.get(UNSUBSCRIBED + "2024-05-01T13:00:00+02:00").json()) == 3

    # the person subscribes again: no longer listed, the removal cleared
    sandbox.act_as_person(emails[2], "subscribe", at=T0 + timedelta(minutes=5))
    assert _status(sandbox, emails[2]) == "subscribed"
    assert sandbox.removals(emails[2]) is None
    listed = client.get(since).json()
    assert [x["suppressedContact"]["email"] for x in listed] == [emails[3], emails[1]]
    assert sandbox.violations == []


@pytest.mark.parametrize("select", [0, 1001, -1])
def test_select_out_of_range_is_refused_v2_style(dotdigital, select):
    sandbox, client = dotdigital
    for path in (UNSUBSCRIBED, SUPPRESSED):
        r = client.get(path + "2024-01-01T00:00:00Z", params={"select": select})
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["errorCode"] == "ERROR_PARAMETER_INVALID"
        assert body["message"].endswith("ERROR_PARAMETER_INVALID")
    assert [(v.status, v.kind) for v in sandbox.violations] == [(400, "parameter")] * 2


def test_select_bounds_are_accepted(dotdigital):
    sandbox, client = dotdigital
    for select in (1, 1000):
        r = client.get(UNSUBSCRIBED + "2024-01-01T00:00:00Z", params={"select": select})
        assert (r.status_code, r.json()) == (200, [])
    assert sandbox.violations == []


def test_suppressed_since_lists_every_reason_unsubscribed_since_only_unsubscribes(dotdigital):
    sandbox, client = dotdigital
    _import(client, [_contact("u@example.com"), _contact("c@example.com")])
    # an import that asks for "suppressed" is a removal too, dated by the import
    before = datetime.now(UTC) - timedelta(seconds=1)
    _import(
        client, [_contact("s@example.com", channelProperties={"email": {"status": "suppressed"}})]
    )
    sandbox.act_as_person("u@example.com", "unsubscribe", at=T0)
    sandbox.act_as_person("c@example.com", "complain", at=T0 + timedelta(seconds=1))
    assert _status(sandbox, "c@example.com") == "ispComplained"
    assert sandbox.contact("c@example.com")["status"] == "suppressed"  # v3 top-level enum

    rows = client.get(SUPPRESSED + "2024-01-01T00:00:00Z").json()
    got = [
        (x["suppressedContact"]["email"], x["reason"], x["suppressedContact"]["status"])
        for x in rows
    ]
    assert got == [
        ("u@example.com", "Unsubscribed", "Unsubscribed"),
        ("c@example.com", "IspComplained", "IspComplained"),
        ("s@example.com", "Suppressed", "Suppressed"),
    ]
    assert datetime.fromisoformat(rows[2]["dateRemoved"]) > before
    unsubscribed = client.get(UNSUBSCRIBED + "2024-01-01T00:00:00Z").json()
    assert [x["suppressedContact"]["email"] for x in unsubscribed] == ["u@example.com"]
    assert sandbox.violations == []


def test_import_resubscribes_an_unsubscribed_contact_without_challenge_by_default(dotdigital):
    sandbox, client = dotdigital
    _import(client, [_contact("a@example.com"), _contact("b@example.com")])
    for email in ("a@example.com", "b@example.com"):
        sandbox.act_as_person(email, "unsubscribe", at=T0)
    # resubscribeWithNoChallenge defaults to true (v3 spec): subscribed at once
    _import(
        client,
        [
            _subscribe_again("a@example.com"),
            _subscribe_again("b@example.com", resubscribeWithNoChallenge=True),
        ],
    )
    for email in ("a@example.com", "b@example.com"):
        assert _status(sandbox, email) == "subscribed"
        assert sandbox.removals(email) is None
    assert client.get(UNSUBSCRIBED + "2024-01-01T00:00:00Z").json() == []
    assert sandbox.violations == []


def test_import_with_challenge_leaves_the_contact_pending_until_the_person_confirms(dotdigital):
    sandbox, client = dotdigital
    _import(client, [_contact("a@example.com")])
    sandbox.act_as_person("a@example.com", "unsubscribe", at=T0)
    options = {
        "resubscribeWithNoChallenge": False,
        "preferredLocale": "en-EN",
        "redirectUrlAfterChallenge": "https://example.com/thanks",
    }
    done = _import(client, [_subscribe_again("a@example.com", **options)])
    assert done["summary"]["updatedContacts"] == 1 and done["failures"] == []
    assert _status(sandbox, "a@example.com") == "pendingOptIn"
    assert sandbox.contact("a@example.com")["status"] == "pendingOptIn"
    # not confirmed yet: the opt-out stands
    assert sandbox.removals("a@example.com") == {
        "dateRemoved": "2024-05-01T12:00:00.123Z",
        "reason": "Unsubscribed",
    }
    sandbox.act_as_person("a@example.com", "subscribe")  # the person clicks the link
    assert _status(sandbox, "a@example.com") == "subscribed"
    assert sandbox.removals("a@example.com") is None
    assert sandbox.violations == []


def test_import_cannot_resubscribe_a_complained_contact(dotdigital):
    sandbox, client = dotdigital
    _import(client, [_contact("c@example.com")])
    sandbox.act_as_person("c@example.com", "complain", at=T0)
    done = _import(
        client,
        [
            _contact(
                "c@example.com",
                dataFields={"firstName": "Cat"},
                channelProperties={"email": {"status": "subscribed"}},
            )
        ],
    )
    assert done["summary"]["updatedContacts"] == 1
    assert _status(sandbox, "c@example.com") == "ispComplained"  # status stays
    assert sandbox.contact("c@example.com")["dataFields"]["FIRSTNAME"] == "Cat"  # the rest applied
    assert sandbox.removals("c@example.com") == {
        "dateRemoved": "2024-05-01T12:00:00.123Z",
        "reason": "IspComplained",
    }
    # nor can it be turned into an unsubscribe
    _import(
        client, [_contact("c@example.com", channelProperties={"email": {"status": "unsubscribed"}})]
    )
    assert _status(sandbox, "c@example.com") == "ispComplained"
    assert sandbox.violations == []


def test_new_contacts_and_repeated_unsubscribes(dotdigital):
    sandbox, client = dotdigital
    # a new contact without a status is subscribed; with "unsubscribed" it is removed now
    _import(
        client,
        [
            _contact("new@example.com"),
            _contact("out@example.com", channelProperties={"email": {"status": "unsubscribed"}}),
        ],
    )
    assert _status(sandbox, "new@example.com") == "subscribed"
    assert sandbox.removals("new@example.com") is None
    first = sandbox.removals("out@example.com")
    assert first is not None and first["reason"] == "Unsubscribed"
    # an import saying "unsubscribed" again keeps the first date
    _import(
        client,
        [_contact("out@example.com", channelProperties={"email": {"status": "unsubscribed"}})],
    )
    assert sandbox.removals("out@example.com") == first
    assert sandbox.violations == []


def test_patch_contact_resubscribes_as_the_import_does(dotdigital):
    sandbox, client = dotdigital
    r = client.patch("/contacts/v3/email/a@example.com", json={"dataFields": {"firstName": "A"}})
    assert r.status_code == 201, r.text
    assert r.json()["channelProperties"]["email"]["status"] == "subscribed"
    sandbox.act_as_person("a@example.com", "unsubscribe", at=T0)
    body = {
        "channelProperties": {
            "email": {
                "status": "subscribed",
                "resubscribeOptions": {"resubscribeWithNoChallenge": False},
            }
        }
    }
    r = client.patch("/contacts/v3/email/a@example.com", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["channelProperties"]["email"]["status"] == "pendingOptIn"
    r = client.patch(
        "/contacts/v3/email/a@example.com",
        json={"channelProperties": {"email": {"status": "subscribed"}}},
    )
    assert r.json()["channelProperties"]["email"]["status"] == "subscribed"
    assert r.json()["dataFields"] == {"FIRSTNAME": "A"}
    assert sandbox.removals("a@example.com") is None
    sandbox.act_as_person("a@example.com", "complain")
    r = client.patch(
        "/contacts/v3/email/a@example.com",
        json={"channelProperties": {"email": {"status": "subscribed"}}},
    )
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["channelProperties"]["email"]["status"]) == (
        "suppressed",
        "ispComplained",
    )
    assert sandbox.violations == []


def test_patch_contact_refusals(dotdigital):
    sandbox, client = dotdigital
    client.patch("/contacts/v3/email/a@example.com", json={})
    client.patch("/contacts/v3/email/b@example.com", json={})
    # taking another contact's email: 409, as the spec's example
    r = client.patch(
        "/contacts/v3/email/b@example.com", json={"identifiers": {"email": "a@example.com"}}
    )
    assert (r.status_code, r.json()["errorCode"]) == (409, "contacts:idAlreadyExists")
    r = client.patch("/contacts/v3/email/b@example.com", json={"dataFields": {"nope": 1}})
    assert (r.status_code, r.json()["errorCode"]) == (400, "contacts:unknownDataField")
    r = client.patch("/contacts/v3/contactId/999", json={})
    assert r.status_code == 404  # an id the account lacks: not a violation
    assert [(v.status, v.kind) for v in sandbox.violations] == [
        (409, "semantic"),
        (400, "semantic"),
    ]


def test_person_endpoint(dotdigital):
    sandbox, client = dotdigital
    _import(client, [_contact("a@example.com")])
    sandbox.reset_log()
    calls_left = client.get("/v2/data-fields").headers["X-RateLimit-Remaining"]
    r = client.post(
        "/_sandbox/person",
        json={"email": "a@example.com", "action": "unsubscribe", "at": "2024-05-01T12:00:00.123Z"},
    )
    assert r.status_code == 204, r.text
    assert sandbox.removals("a@example.com") == {
        "dateRemoved": "2024-05-01T12:00:00.123Z",
        "reason": "Unsubscribed",
    }
    # no share of the API's hourly budget
    assert client.get("/v2/data-fields").headers["X-RateLimit-Remaining"] == str(
        int(calls_left) - 1
    )
    r = client.post("/_sandbox/person", json={"email": "a@example.com", "action": "complain"})
    assert r.status_code == 204
    assert _status(sandbox, "a@example.com") == "ispComplained"
    removed = datetime.fromisoformat(sandbox.removals("a@example.com")["dateRemoved"])
    assert abs(removed - datetime.now(UTC)) < timedelta(minutes=1)  # "at" defaults to now
    r = client.post("/_sandbox/person", json={"email": "a@example.com", "action": "subscribe"})
    assert r.status_code == 204 and _status(sandbox, "a@example.com") == "subscribed"

    r = client.post("/_sandbox/person", json={"email": "x@example.com", "action": "unsubscribe"})
    assert r.status_code == 404
    r = client.post("/_sandbox/person", json={"email": "a@example.com", "action": "dance"})
    assert r.status_code == 400
    r = client.post(
        "/_sandbox/person", json={"email": "a@example.com", "action": "subscribe", "at": "soon"}
    )
    assert r.status_code == 400
    assert sandbox.violations == []
    r = client.post(
        "/_sandbox/person",
        json={"email": "a@example.com", "action": "subscribe"},
        auth=("someone", "wrong"),
    )
    assert r.status_code == 401  # authenticated as the API is
    assert [v.kind for v in sandbox.violations] == ["auth"]


def test_act_as_person_errors(dotdigital):
    sandbox, client = dotdigital
    _import(client, [_contact("a@example.com")])
    with pytest.raises(KeyError):
        sandbox.act_as_person("nobody@example.com", "unsubscribe")
    with pytest.raises(ValueError):
        sandbox.act_as_person("a@example.com", "dance")
    naive = datetime(2024, 5, 1, 12, 0)  # naive: taken as UTC
    sandbox.act_as_person("a@example.com", "unsubscribe", at=naive)
    assert sandbox.removals("a@example.com") == {
        "dateRemoved": "2024-05-01T12:00:00.000Z",
        "reason": "Unsubscribed",
    }
    assert sandbox.removals("nobody@example.com") is None


# --- GET /contacts/v3: the contacts modified since a date, and the opt-ins they carry ------


def _listed(client, **params):
    r = client.get("/contacts/v3", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_contacts_list_pages_in_contact_order_with_a_marker(dotdigital):
    sandbox, client = dotdigital
    emails = [f"l{n}@example.com" for n in range(5)]
    _import(client, [_contact(e) for e in emails])
    seen, params, pages = [], {"limit": "2"}, 0
    while True:
        body = _listed(client, **params)
        pages += 1
        seen += [c["identifiers"]["email"] for c in body["_items"]]
        assert set(body["_items"][0]) == {
            "contactId",
            "status",
            "created",
            "updated",
            "identifiers",
        }
        nxt = body["_links"].get("next")
        if nxt is None:
            break
        params = {"limit": "2", "marker": nxt["marker"]}
    assert (seen, pages) == (emails, 3)


def test_contacts_list_filters_by_modified_and_includes_what_is_asked(dotdigital):
    sandbox, client = dotdigital
    _import(client, [_contact("old@example.com"), _contact("new@example.com")])
    sandbox.act_as_person("new@example.com", "subscribe", at=T0)
    cut = sandbox.contact("new@example.com")["updated"]
    since = datetime.fromisoformat(cut).astimezone(UTC)
    stamp = since.strftime("%Y-%m-%dT%H:%M:%S.") + f"{since.microsecond // 1000:03d}Z"
    body = _listed(
        client, **{"~modified": f"gte::{stamp}", "include": "channelProperties|consentRecords"}
    )
    [item] = body["_items"]
    assert item["identifiers"]["email"] == "new@example.com"
    assert item["channelProperties"]["email"]["status"] == "subscribed"
    # the signup form kept a consent record dated when the person subscribed
    [record] = item["consentRecords"]
    assert record["dateTimeConsented"] == "2024-05-01T12:00:00.123Z"
    assert "dataFields" not in item


@pytest.mark.parametrize(
    "params",
    [
        {"~modified": "gte::2024-05-01", "limit": "10"},  # not the spec's date-time pattern
        {"limit": "5001"},
        {"~modified": "gte::2024-05-01T00:00:00Z", "~created": "gte::2024-05-01T00:00:00Z"},
    ],
)
def test_contacts_list_refuses_what_the_spec_or_the_docs_refuse(dotdigital, params):
    _, client = dotdigital
    assert client.get("/contacts/v3", params=params).status_code == 400

"""The Dotdigital sandbox over loopback HTTP: imports, data fields, address books, insight."""

from __future__ import annotations

import pytest

from reverse_etl.sandbox.limits import FixedWindow
from tests.sandbox.sandbox_helpers import FakeTime, poll

IMPORT = "/contacts/v3/import"
INSIGHT = "/insightData/v3/import"


def _contact(email, **extra):
    return {"matchIdentifier": "email", "identifiers": {"email": email}, **extra}


def _finished(r):
    return r.json()["status"] in ("Finished", "Failed", "Complete")


def _import(client, contacts, **body):
    r = client.put(IMPORT, json={"contacts": contacts, **body})
    assert r.status_code == 202, r.text
    import_id = r.json()["importId"]
    return poll(lambda: client.get(f"{IMPORT}/{import_id}"), _finished).json()


def _book(client, name):
    r = client.post("/v2/address-books", json={"name": name})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_contact_import_lifecycle_and_typed_fields(dotdigital_factory):
    # 1 s: the status read right after the 202 must come before the import finishes
    sandbox, client = dotdigital_factory(job_seconds=1.0)
    book = _book(client, "Loyalty")
    assert (
        client.post("/v2/data-fields", json={"name": "POINTS", "type": "Numeric"}).status_code
        == 201
    )
    assert (
        client.post("/v2/data-fields", json={"name": "JOINED", "type": "Date"}).status_code == 201
    )
    assert (
        client.post("/v2/data-fields", json={"name": "VIP", "type": "Boolean"}).status_code == 201
    )
    contact = _contact(
        "ann@example.com",
        dataFields={"firstName": "Ann", "points": 12.5, "JOINED": "2024-03-01", "vip": True},
        lists=[book],
        channelProperties={
            "email": {"status": "subscribed", "optInType": "single", "emailType": "html"}
        },
    )
    r = client.put(IMPORT, json={"contacts": [contact]})
    assert r.status_code == 202
    import_id = r.json()["importId"]
    assert client.get(f"{IMPORT}/{import_id}").json() == {
        "importId": import_id,
        "status": "NotFinished",
    }
    done = poll(lambda: client.get(f"{IMPORT}/{import_id}"), _finished).json()
    assert done["status"] == "Finished"
    assert done["summary"]["newContacts"] == 1 and done["failures"] == []
    got = client.get("/contacts/v3/email/ann@example.com").json()
    assert got["dataFields"] == {
        "FIRSTNAME": "Ann",
        "POINTS": 12.5,
        "JOINED": "2024-03-01",
        "VIP": True,
    }
    assert got["channelProperties"]["email"] == {
        "emailType": "Html",
        "optInType": "Single",
        "status": "subscribed",
    }
    assert got["lists"] == [{"id": book, "name": "Loyalty", "status": "subscribed"}]
    # an update: overwriteIfNotEmpty keeps values the row leaves empty
    again = _import(
        client,
        [_contact("ann@example.com", dataFields={"firstName": "", "points": 3})],
        mergeOption="overwriteIfNotEmpty",
    )
    assert again["summary"]["updatedContacts"] == 1
    assert sandbox.contact("ann@example.com")["dataFields"]["FIRSTNAME"] == "Ann"
    assert sandbox.contact("ann@example.com")["dataFields"]["POINTS"] == 3
    assert [c["identifiers"]["email"] for c in sandbox.address_book_members("loyalty")] == [
        "ann@example.com"
    ]
    assert sandbox.violations == [] and sandbox.internal_errors == []


def test_contact_import_failures_per_row(dotdigital):
    sandbox, client = dotdigital
    assert (
        client.post("/v2/data-fields", json={"name": "POINTS", "type": "Numeric"}).status_code
        == 201
    )
    done = _import(
        client,
        [
            _contact("ok@example.com", dataFields={"points": 1}),
            _contact("bob@emailsim@io.com"),
            _contact(
                "typed@example.com",
                dataFields={"points": "lots", "shoe_size": 9, "lastName": "Lee"},
            ),
            _contact("ok@example.com"),
            {"matchIdentifier": "mobileNumber", "identifiers": {"email": "m@example.com"}},
        ],
    )
    assert done["summary"] == {
        "newContacts": 2,
        "updatedContacts": 0,
        "globallySuppressed": 0,
        "invalidEntries": 2,
        "duplicateIdentifiers": 1,
    }
    codes = {
        f["identifiers"].get("email"): [x["failureCode"] for x in f["failures"]]
        for f in done["failures"]
    }
    assert codes == {
        "bob@emailsim@io.com": ["invalidEmail"],
        "typed@example.com": ["invalidDataFieldValue", "unknownDataField"],
        "ok@example.com": ["duplicateIdentifier"],
        "m@example.com": ["invalidIdentifier"],
    }
    # the typed row was imported with the fields it could take
    assert sandbox.contact("typed@example.com")["dataFields"] == {"LASTNAME": "Lee"}
    assert sandbox.contact("bob@emailsim@io.com") is None
    assert sandbox.violations == []


def test_active_contact_import_limit(dotdigital_factory):
    # imports that stay active for an hour: all 26 requests fall inside it on any machine
    sandbox, client = dotdigital_factory(job_seconds=3600)
    answers = [
        client.put(IMPORT, json={"contacts": [_contact(f"c{i}@example.com")]}) for i in range(26)
    ]
    assert [r.status_code for r in answers[:25]] == [202] * 25
    assert answers[25].status_code == 429
    assert answers[25].json()["errorCode"] == "contacts:tooManyActiveImports"
    assert int(answers[25].headers["Retry-After"]) >= 1
    assert sandbox.violations == []


def test_import_batch_limit(dotdigital_factory):
    sandbox, client = dotdigital_factory(dotdigital_import_limit=10)
    r = client.put(IMPORT, json={"contacts": [_contact(f"b{i}@example.com") for i in range(11)]})
    assert r.status_code == 400
    assert r.json()["errorCode"] == "contacts:batchSizeExceeded"
    assert [v.kind for v in sandbox.violations] == ["limit"]
    assert (
        client.put(
            IMPORT, json={"contacts": [_contact(f"b{i}@example.com") for i in range(10)]}
        ).status_code
        == 202
    )


@pytest.mark.parametrize(
    ("request_kwargs", "status", "kind"),
    [
        (
            {
                "method": "PUT",
                "url": IMPORT,
                "content": b'{"contacts": []}',
                "headers": {"Content-Type": "text/plain"},
            },
            415,
            "content_type",
        ),
        (
            {
                "method": "PUT",
                "url": IMPORT + "/",
                "json": {"contacts": [_contact("a@example.com")]},
            },
            404,
            "route",
        ),
        ({"method": "PUT", "url": IMPORT, "json": {"contacts": []}}, 400, "body"),
        (
            {
                "method": "PUT",
                "url": IMPORT,
                "json": {"contacts": [{"identifiers": {"email": "a@example.com"}}]},
            },
            400,
            "body",
        ),
        (
            {
                "method": "PUT",
                "url": IMPORT,
                "json": {
                    "contacts": [
                        _contact(
                            "a@example.com", channelProperties={"email": {"optInType": "triple"}}
                        )
                    ]
                },
            },
            400,
            "body",
        ),
        (
            {
                "method": "PUT",
                "url": IMPORT,
                "json": {"contacts": [_contact("a@example.com", lists=[999])]},
            },
            400,
            "not_found",
        ),
        (
            {
                "method": "PUT",
                "url": IMPORT,
                "json": {"contacts": [{"matchIdentifier": "crmId", "identifiers": {"crmId": "1"}}]},
            },
            400,
            "semantic",
        ),
        ({"method": "GET", "url": "/v2/address-books/abc/contacts"}, 400, "parameter"),
        ({"method": "GET", "url": "/v2/data-fields", "auth": ("someone", "wrong")}, 401, "auth"),
    ],
)
def test_off_spec_requests_are_refused(dotdigital, request_kwargs, status, kind):
    sandbox, client = dotdigital
    r = client.request(**request_kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["errorCode"] and body["description"]
    recorded = [v.kind for v in sandbox.violations]
    assert recorded == ([] if kind == "not_found" else [kind])
    if kind == "body":
        assert body["details"][0]["item"].startswith("/contacts")


def test_data_field_rules(dotdigital):
    sandbox, client = dotdigital
    names = {f["name"] for f in client.get("/v2/data-fields").json()}
    assert {"FIRSTNAME", "LASTNAME", "FULLNAME", "GENDER", "POSTCODE"} <= names
    ok = client.post(
        "/v2/data-fields", json={"name": "Loyalty-tier_2", "type": "String", "visibility": "Public"}
    )
    assert ok.status_code == 201 and ok.json()["name"] == "LOYALTY-TIER_2"
    refused = {
        "too_long": {"name": "A" * 21, "type": "String"},
        "bad_chars": {"name": "has space", "type": "String"},
        "duplicate_case": {"name": "loyalty-TIER_2", "type": "Numeric"},
        "reserved": {"name": "firstname", "type": "String"},
        "bad_type": {"name": "OK1", "type": "Text"},
        "no_type": {"name": "OK2"},
        "bad_default": {"name": "OK3", "type": "Numeric", "defaultValue": "ten"},
    }
    for case, body in refused.items():
        r = client.post("/v2/data-fields", json=body)
        assert r.status_code == 400, case
        assert r.json()["message"].endswith(r.json()["errorCode"]), case
    assert (
        client.post(
            "/v2/data-fields", json={"name": "OK4", "type": "Date", "defaultValue": "2024-01-01"}
        ).status_code
        == 201
    )
    assert len(sandbox.data_fields()) == 7
    assert len(sandbox.violations) == len(refused)


def test_address_books_listing_and_removal(dotdigital):
    sandbox, client = dotdigital
    book = _book(client, "Segment A")
    assert client.post("/v2/address-books", json={"name": "segment a"}).status_code == 400
    _import(client, [_contact(f"s{i}@example.com", lists=[book]) for i in range(4)])
    listed = client.get(f"/v2/address-books/{book}/contacts", params={"select": 3}).json()
    assert [c["email"] for c in listed] == ["s0@example.com", "s1@example.com", "s2@example.com"]
    assert listed[0]["dataFields"] is None and listed[0]["status"] == "Subscribed"
    rest = client.get(f"/v2/address-books/{book}/contacts", params={"select": 3, "skip": 3}).json()
    assert [c["email"] for c in rest] == ["s3@example.com"]
    ids = [c["id"] for c in listed]
    r = client.post(f"/v2/address-books/{book}/contacts/delete", json=ids[:2])
    assert r.status_code == 202 and r.json()["status"] == "Started"
    assert client.delete(f"/v2/address-books/{book}/contacts/{ids[2]}").status_code == 204
    assert sandbox.wait_idle()
    assert [c["identifiers"]["email"] for c in sandbox.address_book_members("Segment A")] == [
        "s3@example.com"
    ]
    assert client.get(f"/v2/address-books/{book}").json()["contacts"] == 1
    assert [b["name"] for b in client.get("/v2/address-books").json()] == ["Segment A"]
    assert (
        client.get(f"/v2/address-books/{book}/contacts", params={"select": 1001}).status_code == 400
    )
    assert client.get("/v2/address-books/4242").status_code == 404
    assert len(sandbox.contacts()) == 4  # removal from a list keeps the contact


def test_insight_imports_and_reads(dotdigital_factory):
    # 1 s: the first status read, right after the 202, must come before the import completes
    sandbox, client = dotdigital_factory(job_seconds=1.0)
    _import(client, [_contact("buyer@example.com")])
    catalog = {
        "collectionName": "catalog_shop",
        "collectionScope": "account",
        "collectionType": "catalog",
        "records": [
            {"key": "sku-1", "json": {"name": "Hat", "price": 5}},
            {"key": "sku-2", "json": {"name": "Cap"}},
        ],
    }
    r = client.put(INSIGHT, json=catalog)
    assert r.status_code == 202
    import_id = r.json()["importId"]
    statuses = []
    poll(
        lambda: client.get(f"{INSIGHT}/{import_id}"),
        lambda r: statuses.append(r.json()["status"]) or statuses[-1] == "Complete",
    )
    phases = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    assert phases in (["NotStarted", "Processing", "Complete"], ["Processing", "Complete"])
    orders = {
        "collectionName": "Orders",
        "collectionScope": "contact",
        "collectionType": "orders",
        "records": [
            {
                "key": "o-1",
                "contactIdentity": {"identifier": "email", "value": "buyer@example.com"},
                "json": {"total": 9.5},
            },
            {
                "key": "o-2",
                "contactIdentity": {"identifier": "email", "value": "ghost@example.com"},
                "json": {"total": 1},
            },
            {"key": "o-3", "json": {"total": 2}},
            {
                "key": "o-1",
                "contactIdentity": {"identifier": "email", "value": "buyer@example.com"},
                "json": {"total": 9.5},
            },
        ],
    }
    r = client.put(INSIGHT, json=orders)
    done = poll(lambda: client.get(f"{INSIGHT}/{r.json()['importId']}"), _finished).json()
    assert done["summary"] == {"totalRecords": 4, "totalImported": 1, "totalRejected": 3}
    assert [f["failureReason"] for f in done["failures"]] == [
        "ContactEmailDoesNotExist",
        "InvalidContactIdentifier",
        "DuplicateKey",
    ]
    collections = {c["collectionName"]: c for c in client.get("/insightData/v3/collections").json()}
    assert (
        collections["catalog_shop"]["recordCount"] == 2
        and collections["Orders"]["collectionScope"] == "contact"
    )
    page = client.get("/insightData/v3/account/catalog_shop", params={"limit": 1}).json()
    assert [x["key"] for x in page["_items"]] == ["sku-1"] and "next" in page["_links"]
    nxt = client.get(page["_links"]["next"]["link"]).json()
    assert [x["key"] for x in nxt["_items"]] == ["sku-2"]
    mine = client.get("/insightData/v3/contacts/email/buyer@example.com/Orders").json()
    assert [x["json"] for x in mine["_items"]] == [{"total": 9.5}]
    assert [r["key"] for r in sandbox.insight("orders")] == ["o-1"]
    bad_name = {**catalog, "collectionName": "has space"}
    assert client.put(INSIGHT, json=bad_name).status_code == 400
    assert client.put(INSIGHT, json={**catalog, "collectionScope": "contact"}).status_code == 400
    assert [v.kind for v in sandbox.violations] == ["body", "semantic"]


def test_active_insight_import_limit(dotdigital_factory):
    sandbox, client = dotdigital_factory(job_seconds=3600)  # active for the whole test
    body = {
        "collectionName": "c",
        "collectionScope": "account",
        "collectionType": "custom",
        "records": [{"key": "k", "json": {}}],
    }
    answers = [client.put(INSIGHT, json={**body, "collectionName": f"c_{i}"}) for i in range(6)]
    assert [r.status_code for r in answers] == [202] * 5 + [429]
    assert answers[5].json()["errorCode"] == "insightData:tooManyActiveImports"


def test_hourly_rate_limit_and_headers(dotdigital_factory):
    # The window runs on a clock that moves only when the test moves it: six calls fall in
    # one window however long a loaded machine takes to send them.
    sandbox, client = dotdigital_factory(dotdigital_calls_per_hour=5, speedup=3600)
    t = FakeTime()
    epoch = 1_750_000_000
    sandbox.window = FixedWindow(
        5, 3600.0, speedup=3600, clock=t.clock, wall=lambda: epoch + t.now
    )  # an hour lasts 1 s
    answers = [client.get("/v2/data-fields") for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 5 + [429]
    assert [int(r.headers["X-RateLimit-Remaining"]) for r in answers] == [4, 3, 2, 1, 0, 0]
    assert all(r.headers["X-RateLimit-Limit"] == "5" for r in answers)
    assert {r.headers["X-RateLimit-Reset"] for r in answers} == {str(epoch + 1)}
    assert answers[5].headers["Retry-After"] == "1"
    assert answers[5].headers["X-Sandbox-Retry-After-Ms"] == "1000"
    t.now += 0.999
    assert client.get("/v2/data-fields").status_code == 429  # refused calls count too
    t.now += 0.001
    fresh = client.get("/v2/data-fields")
    assert fresh.status_code == 200 and fresh.headers["X-RateLimit-Remaining"] == "4"
    assert fresh.headers["X-RateLimit-Reset"] == str(epoch + 2)
    assert sandbox.violations == []

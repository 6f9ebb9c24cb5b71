"""The Klaviyo sandbox over loopback HTTP: each endpoint's effect, spec checks and limits."""

from __future__ import annotations

import orjson
import pytest

from reverse_etl.sandbox.limits import TokenBuckets
from tests.sandbox.sandbox_helpers import (
    FakeTime,
    events_job,
    import_body,
    marketing,
    poll,
    profile,
    subscriber,
    subscription_job,
)

IMPORT = "/api/profile-bulk-import-jobs"


def _job_done(r):
    return r.json()["data"]["attributes"]["status"] in ("complete", "cancelled")


def _run_import(client, profiles, list_id=None):
    r = client.post(IMPORT, json=import_body(profiles, list_id))
    assert r.status_code == 202, r.text
    job_id = r.json()["data"]["id"]
    done = poll(lambda: client.get(f"{IMPORT}/{job_id}"), _job_done)
    return job_id, done.json()["data"]["attributes"]


def _create_list(client, name):
    r = client.post("/api/lists", json={"data": {"type": "list", "attributes": {"name": name}}})
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def test_bulk_import_lifecycle_counts_and_list(klaviyo_factory):
    # 1 s real: the first poll, sent right after the 202, must come before the job completes
    sandbox, client = klaviyo_factory(job_seconds=60, speedup=60)
    list_id = _create_list(client, "Loyalty members")
    r = client.post(
        IMPORT,
        json=import_body([profile(f"u{i}@example.com", first_name="U") for i in range(3)], list_id),
    )
    assert r.status_code == 202
    doc = r.json()["data"]
    assert doc["attributes"]["status"] == "queued" and doc["attributes"]["total_count"] == 3
    assert doc["relationships"]["lists"]["data"] == [{"type": "list", "id": list_id}]
    seen = []
    final = poll(
        lambda: client.get(f"{IMPORT}/{doc['id']}", params={"include": "lists"}),
        lambda r: seen.append(r.json()["data"]["attributes"]["status"]) or seen[-1] == "complete",
    )
    phases = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]
    assert phases in (["queued", "processing", "complete"], ["processing", "complete"])
    attrs = final.json()["data"]["attributes"]
    assert (attrs["completed_count"], attrs["failed_count"]) == (3, 0)
    assert attrs["completed_at"] and attrs["started_at"]
    assert final.json()["included"][0]["attributes"]["name"] == "Loyalty members"
    assert sorted(p["email"] for p in sandbox.list_members("Loyalty members")) == [
        "u0@example.com",
        "u1@example.com",
        "u2@example.com",
    ]
    assert sandbox.violations == [] and sandbox.internal_errors == []


def test_import_errors_point_at_the_bad_profile(klaviyo):
    sandbox, client = klaviyo
    profiles = [
        profile("ok@example.com"),
        profile("not-an-email"),
        profile(phone_number="555-1234"),
        profile(first_name="no identifier"),
    ]
    job_id, attrs = _run_import(client, profiles)
    assert (attrs["completed_count"], attrs["failed_count"]) == (1, 3)
    errors = client.get(f"{IMPORT}/{job_id}/import-errors").json()["data"]
    pointers = [e["attributes"]["source"]["pointer"] for e in errors]
    assert pointers == [
        "/data/attributes/profiles/data/1/attributes/email",
        "/data/attributes/profiles/data/2/attributes/phone_number",
        "/data/attributes/profiles/data/3/attributes",
    ]
    assert errors[0]["attributes"]["original_payload"] == {"email": "not-an-email"}
    assert [p["email"] for p in sandbox.profiles()] == ["ok@example.com"]


def test_identity_rules_and_null_semantics(klaviyo):
    sandbox, client = klaviyo
    first = profile(
        "Ann@Example.com",
        first_name="Ann",
        last_name="Lee",
        properties={"a": 1, "b": 2},
        location={"city": "Leeds"},
    )
    _run_import(client, [first, profile(external_id="X-9", first_name="Ext")])
    # matched by email (case-insensitively): omitted keys kept, properties merged, and nulls
    # ignored, as Klaviyo's bulk import does; custom properties go through patch_properties
    second = profile(
        "ann@example.com",
        first_name=None,
        phone_number="+447700900123",
        location=None,
        properties={"a": None, "c": 3},
    )
    second["meta"] = {"patch_properties": {"unset": ["b"]}}
    _run_import(
        client,
        [
            second,
            profile(
                external_id="X-9", email="ext@example.com"
            ),  # matched by external_id, email added
        ],
    )
    ann = sandbox.profile_by_email("ann@example.com")
    assert ann["first_name"] == "Ann" and ann["last_name"] == "Lee"
    assert ann["properties"] == {"a": 1, "c": 3} and ann["location"] == {"city": "Leeds"}
    assert ann["phone_number"] == "+447700900123"
    assert sandbox.profile_by_email("ext@example.com")["first_name"] == "Ext"
    assert len(sandbox.profiles()) == 2
    # an identifier that belongs to another profile is a per-profile conflict
    job_id, attrs = _run_import(client, [profile("ext@example.com", phone_number="+447700900123")])
    assert attrs["failed_count"] == 1
    error = client.get(f"{IMPORT}/{job_id}/import-errors").json()["data"][0]["attributes"]
    assert error["code"] == "duplicate_profile"


def test_import_batch_size_and_payload_limits(klaviyo):
    sandbox, client = klaviyo
    r = client.post(IMPORT, json=import_body([profile(f"p{i}@example.com") for i in range(10_001)]))
    assert r.status_code == 400
    assert r.json()["errors"][0]["source"]["pointer"] == "/data/attributes/profiles/data"
    big = profile("big@example.com", properties={"blob": "x" * 101_000})
    r = client.post(IMPORT, json=import_body([profile("a@example.com"), big]))
    assert r.status_code == 400
    assert r.json()["errors"][0]["source"]["pointer"] == "/data/attributes/profiles/data/1"
    huge = [profile(f"h{i}@example.com", properties={"blob": "y" * 90_000}) for i in range(60)]
    r = client.post(IMPORT, content=orjson.dumps(import_body(huge)))
    assert r.status_code == 413
    assert [v.kind for v in sandbox.violations] == ["limit", "limit", "limit"]
    r = client.post(IMPORT, json=import_body([profile(f"p{i}@example.com") for i in range(10_000)]))
    assert r.status_code == 202


@pytest.mark.parametrize(
    ("change", "status", "kind"),
    [
        ({"headers": {"Content-Type": "application/json"}}, 415, "content_type"),
        ({"url": IMPORT + "/"}, 404, "route"),
        ({"headers": {"revision": "2024-02-15"}}, 400, "parameter"),
        ({"headers": {"Authorization": "Klaviyo-API-Key wrong"}}, 401, "auth"),
        ({"json": {"data": {"type": "profile-bulk-import-job", "attributes": {}}}}, 400, "body"),
        ({"json": import_body([{"attributes": {"email": "a@example.com"}}])}, 400, "body"),
        ({"json": import_body([profile(email=5)])}, 400, "body"),
        ({"method": "PUT"}, 405, "route"),
    ],
)
def test_off_spec_requests_are_refused_and_recorded(klaviyo, change, status, kind):
    sandbox, client = klaviyo
    request = {
        "method": "POST",
        "url": IMPORT,
        "json": import_body([profile("a@example.com")]),
        **change,
    }
    r = client.request(**request)
    assert r.status_code == status, r.text
    error = r.json()["errors"][0]
    assert error["status"] == status and error["title"] and error["detail"] and error["id"]
    assert [v.kind for v in sandbox.violations] == [kind]
    assert sandbox.violations[0].path.startswith(IMPORT)
    assert sandbox.request_log == [(request["method"], request["url"], status)]


def test_body_errors_name_the_json_pointer(klaviyo):
    sandbox, client = klaviyo
    r = client.post(
        IMPORT, json=import_body([profile("a@example.com"), profile(phone_number=15005550006)])
    )
    assert r.status_code == 400
    assert r.json()["errors"][0]["source"] == {
        "pointer": "/data/attributes/profiles/data/1/attributes/phone_number"
    }
    r = client.get("/api/profiles", params={"page[size]": "500"})
    assert r.status_code == 400 and r.json()["errors"][0]["source"] == {"parameter": "page[size]"}


def test_lists_filter_membership_and_pagination(klaviyo):
    sandbox, client = klaviyo
    vip = _create_list(client, "VIP")
    _create_list(client, 'Quote "list"')
    found = client.get("/api/lists", params={"filter": 'equals(name,"VIP")'}).json()["data"]
    assert [x["id"] for x in found] == [vip]
    found = client.get("/api/lists", params={"filter": "equals(name,'Quote \"list\"')"}).json()[
        "data"
    ]
    assert len(found) == 1
    _run_import(client, [profile(f"m{i}@example.com") for i in range(5)])
    ids = [p["id"] for p in sandbox.profiles()]
    body = {"data": [{"type": "profile", "id": i} for i in ids]}
    assert client.post(f"/api/lists/{vip}/relationships/profiles", json=body).status_code == 204
    assert (
        client.request(
            "DELETE", f"/api/lists/{vip}/relationships/profiles", json={"data": body["data"][:1]}
        ).status_code
        == 204
    )
    one = client.get(
        f"/api/lists/{vip}", params={"additional-fields[list]": "profile_count"}
    ).json()["data"]
    assert one["attributes"]["profile_count"] == 4
    pages, url, params = [], f"/api/lists/{vip}/relationships/profiles", {"page[size]": "3"}
    while url:
        doc = client.get(url, params=params).json()
        pages.append([x["id"] for x in doc["data"]])
        url, params = doc["links"].get("next"), None
    assert pages == [ids[1:4], ids[4:]]
    one_member = client.get(
        f"/api/lists/{vip}/relationships/profiles",
        params={"filter": 'equals(email,"m3@example.com")'},
    )
    assert [x["id"] for x in one_member.json()["data"]] == [ids[3]]
    assert client.get("/api/lists/nope00").status_code == 404
    too_many = {"data": [{"type": "profile", "id": ids[0]}] * 1001}
    assert client.post(f"/api/lists/{vip}/relationships/profiles", json=too_many).status_code == 400
    assert [v.kind for v in sandbox.violations] == ["limit"]


def test_get_profiles_filters_and_cursor(klaviyo):
    sandbox, client = klaviyo
    _run_import(client, [profile(f"f{i}@example.com", external_id=f"E{i}") for i in range(25)])
    one = client.get("/api/profiles", params={"filter": 'equals(email,"F7@example.com")'}).json()[
        "data"
    ]
    assert [p["attributes"]["external_id"] for p in one] == ["E7"]
    some = client.get(
        "/api/profiles", params={"filter": 'any(email,["f1@example.com","f2@example.com"])'}
    ).json()["data"]
    assert len(some) == 2
    first = client.get("/api/profiles", params={"fields[profile]": "email"}).json()
    assert len(first["data"]) == 20 and set(first["data"][0]["attributes"]) == {"email"}
    second = client.get(first["links"]["next"]).json()
    assert len(second["data"]) == 5 and "next" not in second["links"]
    r = client.get("/api/profiles", params={"filter": 'equals(first_name,"x")'})
    assert r.status_code == 400
    assert sandbox.violations[-1].parameter == "filter"


def test_subscriptions_record_consent(klaviyo):
    sandbox, client = klaviyo
    vip = _create_list(client, "Newsletter")
    consented = "2024-05-01T10:00:00+00:00"
    channels = {
        "email": marketing("SUBSCRIBED", consented),
        "sms": marketing("SUBSCRIBED", consented),
    }
    body = subscription_job(
        [subscriber("sub@example.com", channels, phone_number="+15005550006")],
        historical_import=True,
        list_id=vip,
    )
    assert client.post("/api/profile-subscription-bulk-create-jobs", json=body).status_code == 202
    assert sandbox.wait_idle()
    subs = {(s["channel"], s["type"]): s for s in sandbox.subscriptions()}
    assert subs[("email", "marketing")]["consent"] == "SUBSCRIBED"
    assert subs[("email", "marketing")]["consented_at"] == consented
    assert subs[("sms", "marketing")]["historical_import"] is True
    assert [p["email"] for p in sandbox.list_members("Newsletter")] == ["sub@example.com"]
    # consented_at without historical_import is refused, as documented
    body["data"]["attributes"]["historical_import"] = False
    assert client.post("/api/profile-subscription-bulk-create-jobs", json=body).status_code == 400
    # consent in the future is refused
    body["data"]["attributes"]["historical_import"] = True
    body["data"]["attributes"]["profiles"]["data"][0]["attributes"]["subscriptions"]["email"][
        "marketing"
    ]["consented_at"] = "2999-01-01T00:00:00Z"
    assert client.post("/api/profile-subscription-bulk-create-jobs", json=body).status_code == 400
    # over 1,000 profiles
    body["data"]["attributes"]["profiles"]["data"] *= 1001
    assert client.post("/api/profile-subscription-bulk-create-jobs", json=body).status_code == 400
    assert [v.kind for v in sandbox.violations] == ["semantic", "semantic", "limit"]

    unsub = subscription_job(
        [subscriber("sub@example.com", {"email": marketing("UNSUBSCRIBED")})], delete=True
    )
    assert client.post("/api/profile-subscription-bulk-delete-jobs", json=unsub).status_code == 202
    assert sandbox.wait_idle()
    subs = {(s["channel"], s["type"]): s for s in sandbox.subscriptions()}
    assert subs[("email", "marketing")]["consent"] == "UNSUBSCRIBED"
    assert subs[("sms", "marketing")]["consent"] == "SUBSCRIBED"
    unsub["data"]["attributes"]["profiles"]["data"] *= 101
    assert client.post("/api/profile-subscription-bulk-delete-jobs", json=unsub).status_code == 400


def _event(unique_id, value=10.0):
    return {
        "type": "event",
        "attributes": {
            "properties": {"OrderId": unique_id},
            "metric": {"data": {"type": "metric", "attributes": {"name": "Placed Order"}}},
            "time": "2025-01-02T03:04:05+00:00",
            "value": value,
            "unique_id": unique_id,
        },
    }


def test_events_are_deduplicated_by_unique_id(klaviyo):
    sandbox, client = klaviyo
    url = "/api/event-bulk-create-jobs"
    assert client.post(url, json=events_job([_event("o-1"), _event("o-2")])).status_code == 202
    assert (
        client.post(url, json=events_job([_event("o-2"), _event("o-3")])).status_code == 202
    )  # a resend
    assert sandbox.wait_idle()
    events = sandbox.events()
    assert sorted(e["unique_id"] for e in events) == ["o-1", "o-2", "o-3"]
    assert {e["metric"] for e in events} == {"Placed Order"} and events[0][
        "email"
    ] == "buyer@example.com"
    assert client.post(url, json=events_job([_event("d"), _event("d")])).status_code == 400
    assert (
        client.post(url, json=events_job([_event(f"e{i}") for i in range(1001)])).status_code == 400
    )
    late = _event("late")
    late["attributes"]["time"] = "1985-01-01T00:00:00Z"
    assert client.post(url, json=events_job([late])).status_code == 400
    assert [v.kind for v in sandbox.violations] == ["semantic", "limit", "semantic"]


def _item(external_id, **attrs):
    base = {
        "external_id": external_id,
        "title": f"Item {external_id}",
        "description": "d",
        "url": "https://shop.example/x",
    }
    return {"type": "catalog-item", "attributes": {**base, **attrs}}


def test_catalog_jobs_and_items(klaviyo):
    sandbox, client = klaviyo
    create = {
        "data": {
            "type": "catalog-item-bulk-create-job",
            "attributes": {"items": {"data": [_item("A", price=5), _item("B")]}},
        }
    }
    r = client.post("/api/catalog-item-bulk-create-jobs", json=create)
    assert r.status_code == 202
    job = r.json()["data"]
    done = poll(
        lambda: client.get(
            f"/api/catalog-item-bulk-create-jobs/{job['id']}", params={"include": "items"}
        ),
        _job_done,
    )
    assert done.json()["data"]["attributes"]["completed_count"] == 2
    assert {x["attributes"]["external_id"] for x in done.json()["included"]} == {"A", "B"}
    ids = "$custom:::$default:::A"
    got = client.get("/api/catalog-items", params={"filter": f"any(ids,['{ids}'])"}).json()["data"]
    assert [x["attributes"]["price"] for x in got] == [5]
    page = client.get("/api/catalog-items", params={"page[size]": "1"}).json()
    assert len(page["data"]) == 1 and "next" in page["links"]
    # creating an existing item fails that item only, reported in the job's errors
    r = client.post(
        "/api/catalog-item-bulk-create-jobs",
        json={
            **create,
            "data": {**create["data"], "attributes": {"items": {"data": [_item("A"), _item("C")]}}},
        },
    )
    attrs = poll(
        lambda: client.get(f"/api/catalog-item-bulk-create-jobs/{r.json()['data']['id']}"),
        _job_done,
    ).json()["data"]["attributes"]
    assert (attrs["completed_count"], attrs["failed_count"]) == (1, 1)
    assert (
        attrs["errors"][0]["source"]["pointer"]
        == "/data/attributes/items/data/0/attributes/external_id"
    )
    update = {
        "data": {
            "type": "catalog-item-bulk-update-job",
            "attributes": {
                "items": {
                    "data": [
                        {
                            "type": "catalog-item",
                            "id": ids,
                            "attributes": {"price": 7, "image_full_url": None},
                        }
                    ]
                }
            },
        }
    }
    r = client.post("/api/catalog-item-bulk-update-jobs", json=update)
    poll(
        lambda: client.get(f"/api/catalog-item-bulk-update-jobs/{r.json()['data']['id']}"),
        _job_done,
    )
    assert {i["external_id"]: i.get("price") for i in sandbox.catalog_items()} == {
        "A": 7,
        "B": None,
        "C": None,
    }
    too_many = {
        "data": {
            "type": "catalog-item-bulk-create-job",
            "attributes": {"items": {"data": [_item(f"x{i}") for i in range(101)]}},
        }
    }
    assert client.post("/api/catalog-item-bulk-create-jobs", json=too_many).status_code == 400
    assert [v.kind for v in sandbox.violations] == ["limit"]


def test_rate_limit_answers_429_with_retry_after(klaviyo_factory):
    # The buckets run on a clock that moves only when the test moves it, so exactly the burst
    # goes through however slowly a loaded machine sends the calls.
    sandbox, client = klaviyo_factory(speedup=0.2)  # burst: 10 tokens, refilled at 2/s real
    t = FakeTime()
    sandbox.buckets = TokenBuckets(speedup=0.2, clock=t.clock)
    body = {"data": {"type": "list", "attributes": {"name": "L"}}}
    statuses = [client.post("/api/lists", json=body) for _ in range(12)]
    assert [r.status_code for r in statuses] == [201] * 10 + [429] * 2
    first = statuses[10]
    assert first.headers["Retry-After"] == "1"  # whole seconds, rounded up
    assert first.headers["X-Sandbox-Retry-After-Ms"] == "500"  # one token at 2/s
    assert first.json()["errors"][0]["code"] == "throttled"
    t.now += 0.499
    assert client.post("/api/lists", json=body).status_code == 429
    t.now += 0.001
    assert client.post("/api/lists", json=body).status_code == 201
    assert sandbox.violations == [] and sandbox.counters["throttled"] == 3
    assert len(sandbox.lists()) == 11


def test_daily_limit_on_list_creation(klaviyo_factory):
    # On a fake clock that moves only by the waits the sandbox announces: burst and steady
    # waits are seconds and are waited out; after 150 lists the daily bucket's wait is minutes.
    # (On the real clock this depended on how fast a loaded machine sent the requests.)
    sandbox, client = klaviyo_factory()
    t = FakeTime()
    sandbox.buckets = TokenBuckets(clock=t.clock)
    body = {"data": {"type": "list", "attributes": {"name": "L"}}}
    created = 0
    # bounded: without the vendor specs the sandbox has no per-operation limits, and an
    # unbounded loop would never end
    for _ in range(1_000):
        r = client.post("/api/lists", json=body)
        if r.status_code == 201:
            created += 1
            continue
        assert r.status_code == 429, r.text
        wait = int(r.headers["X-Sandbox-Retry-After-Ms"]) / 1000
        if wait > 60:
            break
        t.sleep(wait)
    else:
        pytest.fail(f"no daily limit met after {created} lists (are the vendor specs found?)")
    assert created == 150 == len(sandbox.lists())
    assert t.now == pytest.approx(14.0, abs=0.01)  # 10 at once, then 10 a second
    assert wait == pytest.approx(86400 / 150 - 14.0, abs=0.01)  # the next daily token


def test_limits_off_lets_bursts_through(klaviyo_factory):
    sandbox, client = klaviyo_factory(enforce_limits=False)
    body = {"data": {"type": "list", "attributes": {"name": "L"}}}
    assert {client.post("/api/lists", json=body).status_code for _ in range(30)} == {201}


def test_validation_off_for_benchmarks(klaviyo_factory):
    sandbox, client = klaviyo_factory(validate=False, enforce_limits=False)
    r = client.post(
        IMPORT,
        json=import_body([profile("a@example.com")]),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 202
    assert sandbox.wait_idle() and [p["email"] for p in sandbox.profiles()] == ["a@example.com"]
    assert sandbox.violations == []


def test_profiles_show_their_consent(klaviyo):
    sandbox, client = klaviyo
    body = subscription_job([subscriber("c@example.com", {"email": marketing("SUBSCRIBED")})])
    assert client.post("/api/profile-subscription-bulk-create-jobs", json=body).status_code == 202
    assert sandbox.wait_idle()
    got = client.get(
        "/api/profiles",
        params={
            "filter": 'equals(email,"c@example.com")',
            "additional-fields[profile]": "subscriptions",
        },
    ).json()["data"][0]["attributes"]
    assert got["subscriptions"]["email"]["marketing"]["consent"] == "SUBSCRIBED"
    assert sandbox.subscriptions()[0]["historical_import"] is False

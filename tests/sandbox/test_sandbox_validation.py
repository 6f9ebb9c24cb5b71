"""Spec loading, the body validator (jsonschema-rs, compiled once, agreement with jsonschema)
and limits."""

from __future__ import annotations

import copy
import random
from typing import Any

import jsonschema_rs
import orjson
import pytest
from jsonschema import Draft4Validator

from reverse_etl.sandbox import spec as spec_module
from reverse_etl.sandbox.bodyschema import FORMAT_CHECKER, BodyValidator
from reverse_etl.sandbox.limits import (
    FixedWindow,
    TokenBuckets,
    Window,
    klaviyo_windows,
    retry_after_headers,
)
from reverse_etl.sandbox.spec import SPEC_FILES, SpecViolation, load_spec
from tests.sandbox.sandbox_helpers import events_job, marketing, subscriber, subscription_job


def _ten_thousand_profiles():
    profiles = [
        {
            "type": "profile",
            "attributes": {
                "email": f"user{i}@example.com",
                "phone_number": "+15005550006",
                "first_name": "Ann",
                "location": {"city": "Leeds", "latitude": 53.8},
                "properties": {"points": i, "tier": "gold"},
            },
        }
        for i in range(10_000)
    ]
    return {
        "data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": profiles}}}
    }


@pytest.mark.parametrize("name", sorted(SPEC_FILES))
def test_every_spec_loads(name):
    spec = load_spec(name)
    assert spec.raw["paths"] and spec.host_url.startswith("https://")


def test_spec_examples_pass_after_the_documented_patches():
    op = load_spec("dotdigital/insight").operation("put", "/insightData/v3/import")
    example = op.raw["requestBody"]["content"]["application/json"]["examples"][
        "Account level Insight data"
    ]["value"]
    assert op.body_validator().first_error(example) is None
    contacts = load_spec("dotdigital/contacts").operation("put", "/contacts/v3/import")
    matched_by_id = {
        "contacts": [
            {
                "matchIdentifier": "contactId",
                "identifiers": {"contactId": 123456, "email": "a@b.io"},
            }
        ]
    }
    assert contacts.body_validator().first_error(matched_by_id) is None


def test_ten_thousand_profile_body_is_checked_by_one_compiled_rust_validator(monkeypatch):
    # The speed (well under a second for 10,000 profiles) is printed by `make bench`; what
    # makes it is asserted here: the schema is compiled once per operation, not per request,
    # the compiled validator is jsonschema-rs, and identical parameters are checked once.
    compiled: list[BodyValidator] = []

    class Counting(BodyValidator):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            compiled.append(self)

    monkeypatch.setattr(spec_module, "BodyValidator", Counting)
    spec = load_spec.__wrapped__("klaviyo/profiles")  # a fresh Spec: nothing compiled yet
    op = spec.operation("post", "/api/profile-bulk-import-jobs")
    body = orjson.dumps(_ten_thousand_profiles())
    headers = {"revision": "2026-07-15"}
    for _ in range(3):
        document = op.check(
            path_params={},
            query=[],
            headers=headers,
            content_type="application/vnd.api+json",
            body=body,
        )
        assert len(document["data"]["attributes"]["profiles"]["data"]) == 10_000
    assert len(compiled) == 1 and op.body_validator() is compiled[0]
    assert isinstance(compiled[0]._validator, jsonschema_rs.Draft4Validator)
    cache = spec.check_parameters.cache_info()
    assert (cache.misses, cache.hits) == (1, 2)


def test_first_error_names_pointer_and_reason():
    validator = (
        load_spec("klaviyo/profiles")
        .operation("post", "/api/profile-bulk-import-jobs")
        .body_validator()
    )
    body = _ten_thousand_profiles()
    body["data"]["attributes"]["profiles"]["data"][6001]["attributes"]["location"]["latitude"] = [1]
    error = validator.first_error(body)
    assert error.pointer == "/data/attributes/profiles/data/6001/attributes/location/latitude"
    body["data"]["attributes"]["profiles"]["data"][6001]["attributes"]["location"] = (
        None  # nullable $ref
    )
    assert validator.first_error(body) is None
    del body["data"]["attributes"]["profiles"]["data"][9]["type"]
    error = validator.first_error(body)
    assert error.pointer == "/data/attributes/profiles/data/9"
    assert "type" in error.message and "required" in error.message


def _mutations(document, rng, count):
    """Random small edits of a valid document: wrong types, dropped keys, odd values."""
    odd = [None, 0, 1.5, True, "x", "", [], {}, "2024-01-01T00:00:00Z", "not-a-date", -1, 2**40]
    for _ in range(count):
        doc = copy.deepcopy(document)
        node = doc
        for _depth in range(rng.randint(1, 8)):
            if isinstance(node, dict) and node:
                key = rng.choice(list(node))
                if rng.random() < 0.3:
                    if rng.random() < 0.5:
                        del node[key]
                    else:
                        node[key] = rng.choice(odd)
                    break
                if not isinstance(node[key], (dict, list)):
                    node[key] = rng.choice(odd)
                    break
                node = node[key]
            elif isinstance(node, list) and node:
                i = rng.randrange(len(node))
                if not isinstance(node[i], (dict, list)):
                    node[i] = rng.choice(odd)
                    break
                node = node[i]
        yield doc


SAMPLES = {
    ("klaviyo/profiles", "post", "/api/profile-subscription-bulk-create-jobs"): subscription_job(
        [subscriber("a@b.io", {"email": marketing("SUBSCRIBED", "2024-01-01T00:00:00Z")})],
        historical_import=True,
    ),
    ("klaviyo/events", "post", "/api/event-bulk-create-jobs"): events_job(
        [
            {
                "type": "event",
                "attributes": {
                    "properties": {"a": 1},
                    "metric": {"data": {"type": "metric", "attributes": {"name": "Placed Order"}}},
                    "value": 3.5,
                    "unique_id": "u1",
                },
            }
        ],
        "a@b.io",
        location={"latitude": "1"},
    ),
    ("dotdigital/contacts", "put", "/contacts/v3/import"): {
        "mergeOption": "overwrite",
        "contacts": [
            {
                "matchIdentifier": "email",
                "identifiers": {"email": "a@b.io", "mobileNumber": "447123123123"},
                "dataFields": {"firstName": "A"},
                "channelProperties": {
                    "email": {"status": "subscribed", "optInType": "single", "emailType": "html"},
                    "sms": {"status": "subscribed"},
                },
                "lists": [1, 2],
                "consentRecords": [
                    {
                        "text": "yes",
                        "dateTimeConsented": "2023-01-26T21:29:00Z",
                        "url": "http://x.io/s",
                        "ipAddress": "129.168.0.2",
                        "userAgent": "UA",
                    }
                ],
            }
        ],
    },
    ("dotdigital/insight", "put", "/insightData/v3/import"): {
        "collectionName": "Orders",
        "collectionScope": "contact",
        "collectionType": "orders",
        "records": [
            {
                "key": "1",
                "contactIdentity": {"identifier": "email", "value": "a@b.io"},
                "json": {"a": [1, {"b": 2}]},
            }
        ],
    },
}


@pytest.mark.parametrize("operation", sorted(SAMPLES))
def test_body_validator_agrees_with_jsonschema(operation):
    spec, method, template = operation
    validator: BodyValidator = load_spec(spec).operation(method, template).body_validator()
    reference = Draft4Validator(validator.schema, format_checker=FORMAT_CHECKER)
    sample = SAMPLES[operation]
    assert validator.first_error(sample) is None and reference.is_valid(sample)
    rng = random.Random(42)
    disagreements = []
    invalid = 0
    for doc in _mutations(sample, rng, 400):
        fast_ok = validator.first_error(doc) is None
        invalid += not fast_ok
        if fast_ok != reference.is_valid(doc):
            disagreements.append(doc)
    assert disagreements == []
    assert invalid > 50  # the mutations did exercise the failure paths


def test_parameters_are_checked_with_openapi_core():
    op = load_spec("klaviyo/lists").operation("get", "/api/lists")
    with pytest.raises(SpecViolation) as info:
        op.check(
            path_params={}, query=[("page[size]", "11")], headers={}, content_type=None, body=b""
        )
    assert info.value.violation.parameter == "page[size]"
    op.check(
        path_params={},
        query=[("page[size]", "10"), ("fields[list]", "name")],
        headers={},
        content_type=None,
        body=b"",
    )


def test_token_buckets_burst_steady_and_speedup():
    now = [0.0]
    buckets = TokenBuckets(speedup=60.0, clock=lambda: now[0])
    windows = klaviyo_windows({"burst": "10/s", "steady": "150/m", "daily": "150/d"})
    assert windows == (
        Window(10, 1.0, "burst"),
        Window(150, 60.0, "steady"),
        Window(150, 86400.0, "daily"),
    )
    assert [buckets.acquire(("k",), windows) for _ in range(10)] == [0.0] * 10
    wait = buckets.acquire(("k",), windows)
    assert wait == pytest.approx(1 / 600)  # one burst token every 1/10 s, 60x faster
    now[0] += wait
    assert buckets.acquire(("k",), windows) == 0.0
    assert buckets.acquire(("other",), windows) == 0.0  # per key
    off = TokenBuckets(enforce=False)
    assert all(off.acquire(("k",), windows) == 0.0 for _ in range(1000))
    assert retry_after_headers(0.01) == {"Retry-After": "1", "X-Sandbox-Retry-After-Ms": "10"}
    assert retry_after_headers(2.2)["Retry-After"] == "3"


def test_fixed_window_counts_and_resets():
    now = [100.0]
    window = FixedWindow(3, 3600.0, speedup=3600.0, clock=lambda: now[0], wall=lambda: 1_000.0)
    states = [window.hit("u") for _ in range(4)]
    assert [s.allowed for s in states] == [True, True, True, False]
    assert [s.remaining for s in states] == [2, 1, 0, 0]
    assert states[0].headers() == {
        "X-RateLimit-Limit": "3",
        "X-RateLimit-Remaining": "2",
        "X-RateLimit-Reset": "1001",
    }
    now[0] += 1.0
    assert window.hit("u").allowed and window.peek("u").remaining == 2

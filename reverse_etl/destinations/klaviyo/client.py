"""Klaviyo's API: JSON:API bodies, the pinned revision header, per-endpoint limits.

Limits are the spec's ``x-klaviyo-ratelimit`` values (revision 2026-07-15) and the batch
limits its operation descriptions state. The client paces itself a little under the published
rates (``PACE``): its buckets and Klaviyo's start at slightly different moments and requests
reach the server with jitter, so pacing at exactly 100 % meets a 429 now and then, and each
429 costs a ``Retry-After`` pause far longer than the margin.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import httpx
import orjson

from reverse_etl.consent.memory import account_key
from reverse_etl.destinations import budget
from reverse_etl.destinations.http import ApiClient, RetryPolicy, created, decoded, objects
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection

JSONAPI = "application/vnd.api+json"

# operation -> (burst per second, steady per minute), from the spec's x-klaviyo-ratelimit
LIMITS: dict[str, tuple[float, float]] = {
    "bulk_import_profiles": (10, 150),
    "get_bulk_import_profiles_job": (10, 150),
    "get_errors_for_bulk_import_profiles_job": (10, 150),
    "get_lists": (75, 750),
    "create_list": (10, 150),
    "remove_profiles_from_list": (10, 150),
    "get_profiles": (75, 750),
    "bulk_subscribe_profiles": (75, 750),
    "bulk_unsubscribe_profiles": (75, 750),
    "bulk_create_events": (10, 150),
    "get_catalog_items": (350, 3500),
    "bulk_create_catalog_items": (75, 750),
    "bulk_update_catalog_items": (75, 750),
    "get_bulk_create_catalog_items_job": (75, 750),
    "get_bulk_update_catalog_items_job": (75, 750),
}
PACE = 0.97  # share of the published rates the client uses (see the module docstring)

# Bulk profile import limits (Klaviyo's API reference for profile-bulk-import-jobs).
MAX_PROFILES_PER_JOB = 10_000
MAX_JOB_BYTES = 5_000_000  # "5 MB", read strictly
MAX_PROFILE_BYTES = 100_000  # "100 KB", read strictly
# Other bulk endpoints (their operation descriptions).
MAX_SUBSCRIBE = 1_000  # profiles a bulk subscribe call
MAX_UNSUBSCRIBE = 100  # profiles a bulk unsubscribe call
MAX_EVENTS = 1_000  # events a bulk event call
MAX_LIST_MEMBERS = 1_000  # profiles a list membership call (add or remove)
MAX_PAGE = 100  # the largest page[size] of GET /api/profiles
MAX_CATALOG_ITEMS = 100  # items a catalog item bulk job
MAX_BODY_BYTES = 5_000_000  # "5MB" payload of every bulk endpoint

_RECORD_INDEX = re.compile(r"/data/(\d+)(?:/|$)")


class KlaviyoClient:
    def __init__(
        self, conn: KlaviyoConnection, *, retry: RetryPolicy | None = None, speedup: float = 1.0
    ):
        client = partial(
            ApiClient,
            conn.base_url,
            headers={
                "Authorization": f"Klaviyo-API-Key {conn.api_key.get_secret_value()}",
                "revision": conn.revision,
                "Accept": JSONAPI,
            },
            retry=retry,
            name="Klaviyo",
        )
        # each attempt's whole budget (http.deadline); unset: ApiClient's default (60 s)
        timeout = conn.call_timeout_seconds
        self.api = client() if timeout is None else client(timeout=timeout)
        # Klaviyo counts per API key and operation, so the buckets belong to the account and
        # are shared with every other client of it: in this process, and through the state
        # store when a run has put one in force (destinations/budget.py)
        account = account_key("klaviyo", conn.base_url, conn.api_key.get_secret_value())
        self.limiters = {
            op: budget.limiter(account, op, b * PACE, s * PACE, speedup=speedup)
            for op, (b, s) in LIMITS.items()
        }

    def call(
        self,
        op: str,
        method: str,
        path: str,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
        *,
        idempotent: bool = True,
    ) -> httpx.Response:
        return self.api.request(
            method,
            path,
            content=body,
            params=params,
            limiter=self.limiters.get(op),
            content_type=JSONAPI,
            idempotent=idempotent,
        )

    def json(
        self,
        op: str,
        method: str,
        path: str,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
        *,
        idempotent: bool = True,
    ) -> Any:
        response = self.call(op, method, path, body, params, idempotent=idempotent)
        # a JSON:API document is an object at its top (https://jsonapi.org/format/#document-top-level)
        return decoded(response, f"Klaviyo {method} {path}", expect=dict)

    def find_list(self, name: str) -> str | None:
        """The id of the list named ``name``; the oldest when several share it."""
        found = self.json(
            "get_lists",
            "GET",
            "/api/lists",
            params={"filter": f"equals(name,{quote(name)})", "sort": "created"},
        )
        for item in objects(found.get("data"), "Klaviyo GET /api/lists", keys=("id", "attributes")):
            if isinstance(item["attributes"], dict) and item["attributes"].get("name") == name:
                return str(item["id"])
        return None

    def find_or_create_list(self, name: str) -> str:
        """Look the list up by name first: list creation is limited to 150 a day, and Klaviyo
        lets lists share a name ("Create List" takes any name and answers 201), so a second
        create would make a second list. ``create_once`` keeps looking after a lost answer."""
        body = orjson.dumps({"data": {"type": "list", "attributes": {"name": name}}})

        def create() -> str:
            response = self.call("create_list", "POST", "/api/lists", body, idempotent=False)
            what = f"Klaviyo POST /api/lists ({name!r})"
            (made,) = objects(
                [created(response, what, expect=dict).get("data")], what, keys=("id",)
            )
            return str(made["id"])

        return self.api.create_once(lambda: self.find_list(name), create, f"Klaviyo list {name!r}")

    def close(self) -> None:
        self.api.close()


def quote(value: str) -> str:
    """A string literal for Klaviyo's ``filter`` expressions."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def refusals(response: httpx.Response) -> list[tuple[int | None, str, str, str]]:
    """The errors of a refused bulk call, as ``record_errors`` reads them."""
    try:
        errors = orjson.loads(response.content).get("errors") or []
    except (orjson.JSONDecodeError, AttributeError):
        errors = []
    return record_errors(errors)


def record_errors(errors: list[dict[str, Any]]) -> list[tuple[int | None, str, str, str]]:
    """(record index, pointer, code, message) for each JSON:API error. The index is the record
    the JSON pointer names (``.../data/{i}/...``), None when it names none."""
    out: list[tuple[int | None, str, str, str]] = []
    for err in errors:
        pointer = (err.get("source") or {}).get("pointer") or ""
        found = _RECORD_INDEX.search(pointer)
        message = f"Klaviyo: {err.get('title', '')} {err.get('detail', '')}".strip()
        index = int(found.group(1)) if found else None
        out.append((index, pointer, str(err.get("code") or ""), message))
    return out

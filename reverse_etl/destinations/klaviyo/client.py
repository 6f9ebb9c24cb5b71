"""Klaviyo's API: JSON:API bodies, the pinned revision header, per-endpoint limits.

Limits are the spec's ``x-klaviyo-ratelimit`` values for revision 2026-07-15.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from reverse_etl.config import KlaviyoConnection
from reverse_etl.destinations.http import ApiClient, RetryPolicy, error_detail, find_or_create
from reverse_etl.destinations.ratelimit import RateLimiter
from reverse_etl.errors import DestinationError

JSONAPI = "application/vnd.api+json"

# operation -> (burst per second, steady per minute), from the spec's x-klaviyo-ratelimit
LIMITS: dict[str, tuple[float, float]] = {
    "bulk_import_profiles": (10, 150),
    "get_bulk_import_profiles_job": (10, 150),
    "get_errors_for_bulk_import_profiles_job": (10, 150),
    "get_lists": (75, 750),
    "create_list": (10, 150),
}

# Bulk profile import limits (Klaviyo's API reference for profile-bulk-import-jobs).
MAX_PROFILES_PER_JOB = 10_000
MAX_JOB_BYTES = 5_000_000  # "5 MB", read strictly
MAX_PROFILE_BYTES = 100_000  # "100 KB", read strictly


class KlaviyoClient:
    def __init__(self, conn: KlaviyoConnection, *, retry: RetryPolicy | None = None, speedup: float = 1.0):
        self.api = ApiClient(
            conn.base_url,
            headers={
                "Authorization": f"Klaviyo-API-Key {conn.api_key.get_secret_value()}",
                "revision": conn.revision,
                "Accept": JSONAPI,
            },
            retry=retry,
            name="Klaviyo",
        )
        self.limiters = {op: RateLimiter(b, s, speedup=speedup) for op, (b, s) in LIMITS.items()}

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
        if response.status_code >= 400:
            raise DestinationError(f"Klaviyo {method} {path}: {error_detail(response)}")
        return orjson.loads(response.content) if response.content else None

    def find_list(self, name: str) -> str | None:
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        found = self.json("get_lists", "GET", "/api/lists", params={"filter": f'equals(name,"{escaped}")'})
        for item in found.get("data", []):
            if item.get("attributes", {}).get("name") == name:
                return item["id"]
        return None

    def find_or_create_list(self, name: str) -> str:
        """Look the list up by name first: list creation is limited to 150 a day."""
        body = orjson.dumps({"data": {"type": "list", "attributes": {"name": name}}})
        return find_or_create(
            lambda: self.find_list(name),
            lambda: self.json("create_list", "POST", "/api/lists", body, idempotent=False)["data"]["id"],
            f"Klaviyo list {name!r}",
        )

    def close(self) -> None:
        self.api.close()

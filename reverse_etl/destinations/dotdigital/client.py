"""Dotdigital's API: HTTP Basic with an API user, a region host, JSON bodies.

Dotdigital publishes no per-endpoint burst limits; it answers 429 with ``Retry-After`` when
the account's call budget or its active-import limit (25 contact imports, 5 insight imports)
is reached, and the shared client waits and retries.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from reverse_etl.config import DotdigitalConnection
from reverse_etl.destinations.http import ApiClient, RetryPolicy, error_detail
from reverse_etl.errors import DestinationError

JSON = "application/json"


class DotdigitalClient:
    def __init__(self, conn: DotdigitalConnection, *, retry: RetryPolicy | None = None):
        self.api = ApiClient(
            conn.url(),
            headers={"Accept": JSON},
            auth=(conn.username, conn.password.get_secret_value()),
            retry=retry,
            name="Dotdigital",
        )

    def call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> httpx.Response:
        content = None if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        return self.api.request(method, path, content=content, params=params, content_type=JSON)

    def json(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        response = self.call(method, path, body, params)
        if response.status_code >= 400:
            raise DestinationError(f"Dotdigital {method} {path}: {error_detail(response)}")
        return orjson.loads(response.content) if response.content else None

    def find_or_create_address_book(self, name: str) -> int:
        skip = 0
        while True:
            page = self.json("GET", "/v2/address-books", params={"select": "1000", "skip": str(skip)})
            for book in page:
                if book.get("name") == name:
                    return int(book["id"])
            if len(page) < 1000:
                break
            skip += 1000
        created = self.json("POST", "/v2/address-books", {"name": name, "visibility": "Private"})
        return int(created["id"])

    def data_fields(self) -> dict[str, str]:
        """Existing data fields: upper-cased name → type."""
        return {f["name"].upper(): f.get("type", "String") for f in self.json("GET", "/v2/data-fields")}

    def create_data_field(self, name: str, type_: str) -> None:
        self.json("POST", "/v2/data-fields", {"name": name, "type": type_, "visibility": "Private"})

    def close(self) -> None:
        self.api.close()

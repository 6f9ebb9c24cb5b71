"""Dotdigital's API: HTTP Basic with an API user, a region host, JSON bodies.

Dotdigital publishes no per-endpoint burst limits; it counts an API user's calls per hour and
reports the budget on every answer (``X-RateLimit-*``), which the client paces itself on
(``pacing.CallBudget``). A 429 (budget spent by someone else, or the active-import limit: 25
contact imports, 5 insight imports) carries ``Retry-After``, and the shared client waits and
retries.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.destinations.dotdigital.pacing import CallBudget
from reverse_etl.destinations.http import ApiClient, RetryPolicy, created, decoded

JSON = "application/json"
# v2 error codes of a create that met an existing object of the same name
DUPLICATE_CODES = ("ERROR_NON_UNIQUE_DATAFIELD", "ERROR_ADDRESSBOOK_DUPLICATE")


class DotdigitalClient:
    def __init__(self, conn: DotdigitalConnection, *, retry: RetryPolicy | None = None):
        self.api = ApiClient(
            conn.url(),
            headers={"Accept": JSON},
            auth=(conn.username, conn.password.get_secret_value()),
            retry=retry,
            name="Dotdigital",
        )
        self.budget = CallBudget()

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        *,
        idempotent: bool = True,
    ) -> httpx.Response:
        content = (
            None if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        )
        response = self.api.request(
            method,
            path,
            content=content,
            params=params,
            content_type=JSON,
            idempotent=idempotent,
            limiter=self.budget,
        )
        self.budget.observe(response.headers)
        return response

    def json(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        *,
        idempotent: bool = True,
    ) -> Any:
        response = self.call(method, path, body, params, idempotent=idempotent)
        return decoded(response, f"Dotdigital {method} {path}")

    def find_address_book(self, name: str) -> int | None:
        """The address book named ``name``; Dotdigital refuses a second book whose name
        differs only in case (``ERROR_ADDRESSBOOK_DUPLICATE``), so such a book is the one."""
        skip = 0
        fallback: int | None = None
        while True:
            page = self.json(
                "GET", "/v2/address-books", params={"select": "1000", "skip": str(skip)}
            )
            for book in page:
                if book.get("name") == name:
                    return int(book["id"])
                if fallback is None and str(book.get("name", "")).lower() == name.lower():
                    fallback = int(book["id"])
            if len(page) < 1000:
                return fallback
            skip += 1000

    def find_or_create_address_book(self, name: str) -> int:
        return self.api.create_once(
            lambda: self.find_address_book(name),
            lambda: int(
                self._create("/v2/address-books", {"name": name, "visibility": "Private"})["id"]
            ),
            f"Dotdigital address book {name!r}",
        )

    def data_fields(self) -> dict[str, str]:
        """Existing data fields: upper-cased name → type."""
        return {
            f["name"].upper(): f.get("type", "String") for f in self.json("GET", "/v2/data-fields")
        }

    def create_data_field(self, name: str, type_: str) -> str:
        """Create the data field (the caller has just seen it missing); its type, which may be
        another writer's if that writer created it first."""
        return self.api.create_once(
            lambda: self.data_fields().get(name.upper()),
            lambda: self._create(
                "/v2/data-fields", {"name": name, "type": type_, "visibility": "Private"}
            ).get("type", type_),
            f"Dotdigital data field {name}",
            look_first=False,
        )

    def _create(self, path: str, body: dict[str, Any]) -> Any:
        """POST a create. A lost answer raises ``Unsure`` and a duplicate refusal ``Exists``,
        both for ``create_once`` to look the object up: Dotdigital answers a second data field
        of the same name with 400 "Field already exists. ERROR_NON_UNIQUE_DATAFIELD" and a
        second address book with "That name is in use already, please choose another.
        ERROR_ADDRESSBOOK_DUPLICATE" (v2 error messages, as Dotdigital's own Magento connector
        ``Apiconnector/Client.php`` and the ``dotmailer`` gem, which maps the 400 to
        ``InvalidRequest``, quote them); it is not a 409."""
        response = self.call("POST", path, body, idempotent=False)
        return created(response, f"Dotdigital POST {path}", duplicate=DUPLICATE_CODES)

    def close(self) -> None:
        self.api.close()

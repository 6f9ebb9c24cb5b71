"""Dotdigital's API: HTTP Basic with an API user, a region host, JSON bodies.

Dotdigital reports the API user's call budget on every answer (``X-RateLimit-*``): per hour in
the deprecated flat scheme, per minute and call tier in the tiered one; the client paces
itself on whichever the answers describe (``pacing.Budgets``), so a 429 is the exception. A
429 (budget spent by someone else) carries ``Retry-After``, and the shared client waits and
retries. Import submits go through ``submit_once`` instead: their 429 may mean the account's
import slots are taken, which ``imports.ImportQueue`` waits out in minutes, not seconds.

Regions: an account answers only on its region's endpoint; elsewhere Dotdigital answers 403
"Forbidden: Access is denied" (https://developer.dotdigital.com/docs/api-end-points). A 403
is therefore checked against ``GET /v2/account-info`` on r1, which "returns your account's
correct endpoint" whatever the region (``ApiEndpoint``), and the error names it;
``region: auto`` looks it up once before the first call (``resolve_endpoint``).
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from reverse_etl.destinations.dotdigital.configuration import R1, DotdigitalConnection
from reverse_etl.destinations.dotdigital.pacing import Budgets
from reverse_etl.destinations.http import (
    ApiClient,
    RetryPolicy,
    created,
    deadline,
    decoded,
    objects,
    redirect_error,
    with_deadline,
)
from reverse_etl.errors import DestinationError
from reverse_etl.secrets import register_basic_auth, scrub

JSON = "application/json"
# v2 error codes of a create that met an existing object of the same name
DUPLICATE_CODES = ("ERROR_NON_UNIQUE_DATAFIELD", "ERROR_ADDRESSBOOK_DUPLICATE")


ACCOUNT_INFO = "/v2/account-info"


class DotdigitalClient:
    """``transport``: an httpx transport for every connection the client opens (tests route
    the regions' hosts to a sandbox with it)."""

    def __init__(
        self,
        conn: DotdigitalConnection,
        *,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        self.conn = conn
        self._transport = transport
        self._retry = retry
        self.budgets = Budgets()
        self.base_url = conn.url()
        self.api = self._api(self.base_url)
        self._raw = self._http(self.base_url, conn.call_timeout_seconds)
        if conn.region == "auto" and not conn.base_url:
            self.resolve_endpoint()

    @property
    def budget(self) -> Any:
        """The hourly budget (the flat scheme's, and every call's until a tier is named)."""
        return self.budgets.hourly

    def _auth(self) -> tuple[str, str]:
        """HTTP Basic's user and password; their base64, which the Authorization header
        carries and an error answer may echo, is registered for scrubbing."""
        auth = (self.conn.username, self.conn.password.get_secret_value())
        register_basic_auth(*auth)
        return auth

    def _api(self, base_url: str) -> ApiClient:
        api = ApiClient(
            base_url,
            headers={"Accept": JSON},
            auth=self._auth(),
            retry=self._retry,
            name="Dotdigital",
        )
        if self._transport is not None:  # tests only: the same client, another transport
            api._http.close()
            api._http = self._http(base_url, api.timeout)
        return api

    def _http(self, base_url: str, timeout: float) -> httpx.Client:
        """A client whose requests honour ``http.deadline`` (the callers set it to ``timeout``,
        the request's whole budget) and never follow a redirect."""
        return with_deadline(
            httpx.Client(
                base_url=base_url,
                headers={"Accept": JSON},
                auth=self._auth(),
                timeout=timeout,
                transport=self._transport,
                follow_redirects=False,
            )
        )

    # ------------------------------------------------------------------ regions

    def account_endpoint(self) -> str | None:
        """The account's ``ApiEndpoint``, asked on r1 (or the configured ``base_url``) as
        Dotdigital advises; None when the answer has none."""
        with (
            self._http(self.conn.base_url or R1, self.api.timeout) as http,
            deadline(self.api.timeout),
        ):
            response = http.get(ACCOUNT_INFO)
        what = f"Dotdigital GET {ACCOUNT_INFO} (to find the account's region)"
        for prop in (decoded(response, what, expect=dict) or {}).get("properties") or ():
            if prop.get("name") == "ApiEndpoint" and prop.get("value"):
                return str(prop["value"]).rstrip("/")
        return None

    def resolve_endpoint(self) -> str:
        """``region: auto``: use the account's own endpoint from now on."""
        endpoint = self.account_endpoint()
        if endpoint is None:
            raise DestinationError(
                f"Dotdigital GET {ACCOUNT_INFO} named no ApiEndpoint; set region: r1, r2 or r3 "
                "in the connection"
            )
        if endpoint != self.base_url:
            self.api.close()
            self._raw.close()
            self.base_url = endpoint
            self.api = self._api(endpoint)
            self._raw = self._http(endpoint, self.conn.call_timeout_seconds)
        return endpoint

    def check_region(self, response: httpx.Response) -> None:
        """A 403 that is the wrong region's refusal raises, naming the right endpoint."""
        if response.status_code != 403:
            return
        try:
            endpoint = self.account_endpoint()
        except (DestinationError, httpx.HTTPError):
            return
        if endpoint is None or endpoint == self.base_url:
            return
        region = endpoint.split("//")[-1].split("-api.")[0]
        raise DestinationError(
            scrub(
                f"Dotdigital answered 403 Forbidden at {self.base_url}: the account's API "
                f"endpoint is {endpoint} (GET {ACCOUNT_INFO}), another region's. Set "
                f"region: {region} (or region: auto) in the connection"
            )
        )

    # ------------------------------------------------------------------ calls

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
            limiter=self.budgets.limiter(method, path),
        )
        self.budgets.observe(method, path, response.headers)
        self.check_region(response)
        return response

    def submit_once(self, method: str, path: str, body: bytes) -> httpx.Response:
        """One attempt, paced, with the long timeout (``call_timeout_seconds``): an import's
        submit, whose 429s and lost answers ``imports.ImportQueue`` handles itself. Raises
        httpx's errors for a connection lost or timed out."""
        self.budgets.limiter(method, path).acquire()
        with deadline(self.conn.call_timeout_seconds):  # the whole call, not each read
            response = self._raw.request(method, path, content=body, headers={"Content-Type": JSON})
        if 300 <= response.status_code < 400:
            raise redirect_error(response, f"Dotdigital {method} {path}")
        self.budgets.observe(method, path, response.headers)
        self.check_region(response)
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
            page = objects(
                self.json("GET", "/v2/address-books", params={"select": "1000", "skip": str(skip)}),
                "Dotdigital GET /v2/address-books",
                keys=("id", "name"),
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
                objects(
                    [self._create("/v2/address-books", {"name": name, "visibility": "Private"})],
                    "Dotdigital POST /v2/address-books",
                    keys=("id",),
                )[0]["id"]
            ),
            f"Dotdigital address book {name!r}",
        )

    def data_fields(self) -> dict[str, str]:
        """Existing data fields: upper-cased name → type."""
        fields = objects(
            self.json("GET", "/v2/data-fields"), "Dotdigital GET /v2/data-fields", keys=("name",)
        )
        return {str(f["name"]).upper(): f.get("type", "String") for f in fields}

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
        return created(response, f"Dotdigital POST {path}", duplicate=DUPLICATE_CODES, expect=dict)

    def close(self) -> None:
        self.api.close()
        self._raw.close()

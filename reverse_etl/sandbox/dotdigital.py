"""A local Dotdigital for the client's tests, the demo and benchmarks.

Serves the v3 contacts import, single-contact import (PATCH) and lookup, the v3 insight data
import and reads, the v2 address book and data field calls a sync needs, and v2's
unsubscribed-since and suppressed-since reads; checks each request against the published
specs (v3 contacts 3.4.3, v3 insight 3.3.1, v2 swagger) and keeps the account in memory for
tests (``contacts()``, ``contact()``, ``removals()``, ``address_book_members()``,
``data_fields()``, ``insight()``). Data rules, the email status history and resubscribing
among them, are in ``dotdigital_state``.

The person inside Dotdigital, for tests and the demo: ``act_as_person(email, action, at=)``
(unsubscribe, subscribe, complain), also over HTTP at ``POST /_sandbox/person`` (JSON
``{"email", "action", "at"?}``, Basic auth as the API; 204, 404 unknown email, 400 bad body,
action or time). That endpoint is the sandbox's own: no spec, no faults, no share of the
hourly call budget, and its refusals are not violations.

Limits: at most 25 contact imports and 5 insight imports in progress (429
``contacts:tooManyActiveImports`` / ``insightData:tooManyActiveImports``); at most
``settings.dotdigital_import_limit`` records an import and ``dotdigital_calls_per_hour`` calls an
hour per API user, reported in ``X-RateLimit-Limit/Remaining/Reset`` (Reset in epoch seconds) on
every answer. None of these numbers is in the specs (see the package README).

Rate schemes (``dotdigital_rate_scheme``, https://developer.dotdigital.com/docs/call-rate-limits):
``hourly``, the deprecated flat scheme above, or ``tiered``: each call is in a tier with its own
per-minute limit (``dotdigital_tier_limits``), and the answer's ``X-RateLimit-Limit/Remaining/
Reset`` speak of the call's tier, named in ``X-RateLimit-Scope``. Which tier a call is in is in
``TIERS``: imports and calls returning many records low ("Calls that import or return a lot of
data will usually be in the low call rate tier", same page); single-record writes medium;
single-record reads, import and job status, account info high. The per-call assignment is
UNCONFIRMED (Dotdigital names each call's tier on its reference page, not in the specs).

Regions (``dotdigital_region``): an account belongs to one region, r1, r2 or r3, and "you
cannot use an API endpoint belonging to a different region, and instead will receive a 403 -
Forbidden: Access is denied error" (https://developer.dotdigital.com/docs/api-end-points). The
region a request addresses is read from its Host (``r2-api.dotdigital.com``; any other host
is r1, the default endpoint). ``GET /v2/account-info`` answers on r1 whatever the account's
region ("Call Get Account Information using r1-api.dotdigital.com as the regional endpoint
(regardless of what region you're in), and this returns your account's correct endpoint",
https://developer-loyalty.dotdigital.com/docs/api-endpoints) with the ``ApiEndpoint`` property
(the name Dotdigital's Magento connector reads). The 403's body is the IIS text the docs quote
(UNCONFIRMED: its exact bytes).

Import slots of other integrations: ``hold_import_slots(n, vendor_seconds)``.

Import status follows each spec's enum: contacts ``NotFinished`` -> ``Finished`` (or ``Failed``),
insight ``NotStarted`` -> ``Processing`` -> ``Complete`` (or ``Failed``); a removal from an
address book is a job too (``GET /v2/contacts/deletion/{id}``: ``Started`` -> ``Completed``, or
``Failed``), its members gone only once it completed (``dotdigital_v2``). Errors use the v3 shape
``{"errorCode", "description", "details": [{"item", "description"}]}``; v2 answers add the v2
``message`` with its ``ERROR_...`` code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from reverse_etl.sandbox.base import Call, Endpoint, JSONResponse
from reverse_etl.sandbox.dotdigital_common import V2_CODES, V3_CODES, api_family
from reverse_etl.sandbox.dotdigital_contacts import ContactsAPI
from reverse_etl.sandbox.dotdigital_insight import InsightAPI
from reverse_etl.sandbox.dotdigital_state import PERSON_ACTIONS
from reverse_etl.sandbox.dotdigital_v2 import AddressBooksAPI
from reverse_etl.sandbox.faults import JOB_FAULTS, REQUEST_FAULTS
from reverse_etl.sandbox.jobs import utcnow
from reverse_etl.sandbox.limits import retry_after_headers
from reverse_etl.sandbox.spec import Violation

#: the sandbox's own endpoint where a test or the demo acts as the person (``act_as_person``)
PERSON_PATH = "/_sandbox/person"
ACCOUNT_INFO = "/v2/account-info"
#: the tier of each call in the tiered scheme (module doc; UNCONFIRMED per call); others: high
TIERS: dict[tuple[str, str], str] = {
    ("PUT", "/contacts/v3/import"): "low",
    ("PUT", "/insightData/v3/import"): "low",
    ("GET", "/contacts/v3"): "low",
    ("GET", "/insightData/v3/account/{collectionName}"): "low",
    ("GET", "/insightData/v3/contacts/{identifier}/{value}/{collectionName}"): "low",
    ("GET", "/v2/address-books"): "low",
    ("GET", "/v2/address-books/{addressBookId}/contacts"): "low",
    ("POST", "/v2/address-books/{addressBookId}/contacts/delete"): "low",
    ("GET", "/v2/data-fields"): "low",
    ("GET", "/v2/contacts/unsubscribed-since/{date}"): "low",
    ("GET", "/v2/contacts/suppressed-since/{date}"): "low",
    ("PATCH", "/contacts/v3/{identifier}/{value}"): "medium",
    ("POST", "/v2/address-books"): "medium",
    ("POST", "/v2/data-fields"): "medium",
    ("DELETE", "/v2/address-books/{addressBookId}/contacts/{contactId}"): "medium",
}
_REGION_HOST = re.compile(r"^(r\d+)-api\.")
#: the tier window the current request was counted in (throttle -> decorate, one request task)
_CALL_WINDOW: ContextVar[tuple[str, object] | None] = ContextVar("_CALL_WINDOW", default=None)


class DotdigitalSandbox(ContactsAPI, InsightAPI, AddressBooksAPI):
    """Dotdigital's API on loopback (HTTP Basic auth with the settings' API user)."""

    vendor = "dotdigital"

    # --- routing and the vendor's answers ---------------------------------------------------

    def endpoints(self) -> Sequence[Endpoint]:
        c, i, v2 = "dotdigital/contacts", "dotdigital/insight", "dotdigital/v2"
        req = REQUEST_FAULTS
        return [
            Endpoint("PUT", "/contacts/v3/import", c, self.import_contacts, JOB_FAULTS),
            Endpoint("GET", "/contacts/v3/import/{importId}", c, self.get_contact_import, req),
            Endpoint("GET", "/contacts/v3", c, self.list_contacts),
            Endpoint("GET", "/contacts/v3/{identifier}/{value}", c, self.get_contact),
            Endpoint("PATCH", "/contacts/v3/{identifier}/{value}", c, self.patch_contact, req),
            Endpoint("PUT", "/insightData/v3/import", i, self.import_insight, JOB_FAULTS),
            Endpoint("GET", "/insightData/v3/import/{importId}", i, self.get_insight_import, req),
            Endpoint("GET", "/insightData/v3/collections", i, self.get_collections),
            Endpoint(
                "GET", "/insightData/v3/account/{collectionName}", i, self.get_account_records
            ),
            Endpoint(
                "GET",
                "/insightData/v3/contacts/{identifier}/{value}/{collectionName}",
                i,
                self.get_contact_records,
            ),
            Endpoint("GET", "/v2/address-books", v2, self.get_address_books),
            Endpoint("POST", "/v2/address-books", v2, self.create_address_book, req),
            Endpoint("GET", "/v2/address-books/{id}", v2, self.get_address_book),
            Endpoint(
                "GET", "/v2/address-books/{addressBookId}/contacts", v2, self.get_book_contacts
            ),
            Endpoint(
                "POST",
                "/v2/address-books/{addressBookId}/contacts/delete",
                v2,
                self.remove_contacts,
                JOB_FAULTS,
            ),
            Endpoint(
                "GET",
                "/v2/contacts/deletion/{deletionRequestId}",
                v2,
                self.get_contact_deletion,
                req,
            ),
            Endpoint(
                "DELETE",
                "/v2/address-books/{addressBookId}/contacts/{contactId}",
                v2,
                self.remove_contact,
                req,
            ),
            Endpoint("GET", ACCOUNT_INFO, v2, self.get_account_info),
            Endpoint("GET", "/v2/data-fields", v2, self.get_data_fields),
            Endpoint("POST", "/v2/data-fields", v2, self.create_data_field, req),
            Endpoint(
                "GET", "/v2/contacts/unsubscribed-since/{date}", v2, self.get_unsubscribed_since
            ),
            Endpoint("GET", "/v2/contacts/suppressed-since/{date}", v2, self.get_suppressed_since),
            # the sandbox's own (no spec, never faulted, not rate limited): the person acts
            Endpoint("POST", PERSON_PATH, None, self.post_person),
        ]

    def authenticate(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if header == self._basic:
            return self.settings.username
        return None

    @staticmethod
    def addressed_region(request: Request) -> str:
        """The region whose endpoint the request was sent to (its Host); r1 for any other."""
        found = _REGION_HOST.match(request.headers.get("host", ""))
        return found.group(1) if found else "r1"

    def precheck(self, request: Request, endpoint: Endpoint) -> Violation | None:
        """The account's region only (module doc): another region's endpoint is 403, except
        account info on r1, which tells every account its endpoint."""
        region = self.settings.dotdigital_region
        if not region or endpoint.spec is None:
            return None
        addressed = self.addressed_region(request)
        if addressed == region or (endpoint.template == ACCOUNT_INFO and addressed == "r1"):
            return None
        return Violation(
            403,
            "region",
            f"Forbidden: Access is denied (the account is in {region}, the request went to "
            f"{addressed})",
        )

    def throttle(self, principal: str, endpoint: Endpoint, request: Request) -> Response | None:
        if endpoint.spec is None:  # the sandbox's own endpoint spends none of the API budget
            return None
        if self.settings.dotdigital_rate_scheme == "tiered":
            tier = TIERS.get((endpoint.method, endpoint.template), "high")
            _CALL_WINDOW.set((tier, principal))
            tiered = self.tiers.hit(principal, tier)
            if tiered is None or tiered.allowed:
                return None
            state, what = tiered, f"its {tier} tier per-minute call limit"
        else:
            state, what = self.window.hit(principal), "its hourly call limit"
            if state.allowed:
                return None
        family = api_family(request.url.path)
        code = "ERROR_RATE_LIMIT_EXCEEDED" if family == "v2" else f"{family}:rateLimitExceeded"
        body = self._error_body(family, code, f"Your API user has exceeded {what}.")
        return JSONResponse(body, 429, headers=retry_after_headers(state.wait))

    def decorate(self, response: Response, principal: str | None) -> None:
        if self.settings.dotdigital_rate_scheme == "tiered":
            counted = _CALL_WINDOW.get()
            if counted is None:  # refused before it was counted (auth, route, region)
                return
            tier, key = counted
            state = self.tiers.peek(key, tier)
            if state is not None:
                for name, value in state.headers().items():
                    response.headers[name] = value
                response.headers["X-RateLimit-Scope"] = tier
            return
        for name, value in self.window.peek(principal).headers().items():
            response.headers[name] = value

    async def get_account_info(self, call: Call) -> Response:
        """``GET /v2/account-info`` (``ApiAccount``): the account's id and properties, its
        ``ApiEndpoint`` among them (module doc)."""
        region = self.settings.dotdigital_region or self.addressed_region(call.request)
        properties = [
            {"name": "Name", "type": "String", "value": "Sandbox account"},
            {
                "name": "ApiEndpoint",
                "type": "String",
                "value": f"https://{region}-api.dotdigital.com",
            },
        ]
        return JSONResponse({"id": 1, "properties": properties})

    def throttled_response(self, wait: float) -> Response:
        body = {"errorCode": "tooManyRequests", "description": "Too many requests; retry later."}
        return JSONResponse(body, 429, headers=retry_after_headers(wait))

    def server_error(self, status: int) -> Response:
        text = "Internal server error" if status == 500 else "Service unavailable"
        return JSONResponse({"errorCode": "serverError", "description": text}, status)

    def error_response(self, violation: Violation) -> Response:
        if violation.kind == "region":  # answered before the API: the server's own page
            return Response("403 - Forbidden: Access is denied.", 403, media_type="text/html")
        family = api_family(violation.path)
        if family == "v2":
            code = violation.code or V2_CODES.get(violation.kind, "ERROR_PARAMETER_INVALID")
        else:
            code = f"{family}:{violation.code or V3_CODES.get(violation.kind, 'invalidRequest')}"
        item = violation.pointer or violation.parameter
        details = [{"item": item, "description": violation.detail}] if item else None
        headers = (
            {"WWW-Authenticate": 'Basic realm="dotdigital"'} if violation.status == 401 else None
        )
        return JSONResponse(
            self._error_body(family, code, violation.detail, details),
            violation.status,
            headers=headers,
        )

    # --- the person inside Dotdigital (tests and the demo) ----------------------------------

    def act_as_person(self, email: str, action: str, *, at: datetime | None = None) -> None:
        """The person with ``email`` acts inside Dotdigital at ``at`` (default: now, UTC):
        ``unsubscribe`` (email status ``unsubscribed``, a removal with reason
        ``Unsubscribed``), ``subscribe`` (``subscribed``, the removal cleared) or ``complain``
        (``ispComplained``, reason ``IspComplained``). A naive ``at`` is taken as UTC.

        KeyError for an email no contact has, ValueError for another action."""
        with self.lock:
            cid = self.state.find("email", email)
            if cid is None:
                raise KeyError(email)
            self.state.act_as_person(cid, action, at or utcnow())

    async def post_person(self, call: Call) -> Response:
        """``POST /_sandbox/person`` ``{"email", "action", "at"?}``: :meth:`act_as_person`
        over HTTP. 204 done, 404 unknown email, 400 bad body, action or time. Outside the
        specs: its refusals are not violations (it is no vendor API a client could break)."""
        body = call.body
        if not isinstance(body, dict) or not isinstance(body.get("email"), str):
            return self._person_error(400, "invalidRequest", 'The body needs "email" (a string).')
        action, raw_at = body.get("action"), body.get("at")
        if action not in PERSON_ACTIONS:
            actions = ", ".join(sorted(PERSON_ACTIONS))
            return self._person_error(400, "invalidAction", f'"action" must be one of {actions}.')
        at = None
        if raw_at is not None:
            try:
                at = datetime.fromisoformat(raw_at) if isinstance(raw_at, str) else None
            except ValueError:
                at = None
            if at is None:
                return self._person_error(400, "invalidTime", '"at" must be an ISO 8601 time.')
        try:
            self.act_as_person(body["email"], action, at=at)
        except KeyError:
            return self._person_error(
                404, "contactNotFound", f"No contact has the email {body['email']!r}."
            )
        return Response(status_code=204)

    @staticmethod
    def _person_error(status: int, code: str, description: str) -> Response:
        return JSONResponse({"errorCode": f"sandbox:{code}", "description": description}, status)

    # --- inspection (for tests; no HTTP, no faults) -----------------------------------------

    def contacts(self) -> list[dict[str, Any]]:
        """Every contact as ``GET /contacts/v3/...`` shows it, in creation order."""
        with self.lock:
            return [self._contact_doc(c) for c in self.state.contacts.values()]

    def contact(self, email: str) -> dict[str, Any] | None:
        with self.lock:
            cid = self.state.find("email", email)
            return None if cid is None else self._contact_doc(self.state.contacts[cid])

    def removals(self, email: str) -> dict[str, str] | None:
        """The contact's current email removal as v2's since-endpoints show it
        (``{"dateRemoved": "2020-01-01T09:40:18.527Z", "reason": "Unsubscribed"}``), None when
        it has none (subscribed, never removed) or there is no such contact."""
        with self.lock:
            cid = self.state.find("email", email)
            removal = None if cid is None else self.state.removals.get(cid)
            return None if removal is None else removal.doc()

    def address_books(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._book_doc(b) for b in self.state.address_books.values()]

    def address_book_members(self, name: str) -> list[dict[str, Any]]:
        """Contacts in the address book called ``name`` (case-insensitive), in joining order."""
        with self.lock:
            for book in self.state.address_books.values():
                if book["name"].lower() == name.lower():
                    return [
                        self._contact_doc(self.state.contacts[c])
                        for c in self.state.members[book["id"]]
                    ]
        return []

    def data_fields(self) -> list[dict[str, Any]]:
        with self.lock:
            return orjson.loads(orjson.dumps(list(self.state.data_fields.values())))

    def insight(self, collection: str) -> list[dict[str, Any]]:
        """Records of a collection (case-insensitive name), sorted by owner and key."""
        with self.lock:
            coll = self.state.collections.get(collection.lower())
            if coll is None:
                return []
            rows = sorted(
                coll["records"].values(), key=lambda r: (r.get("ownerContactId") or 0, r["key"])
            )
            return orjson.loads(orjson.dumps(rows))


__all__ = ["DotdigitalSandbox"]

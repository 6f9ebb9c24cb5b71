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

Import status follows each spec's enum: contacts ``NotFinished`` -> ``Finished`` (or ``Failed``),
insight ``NotStarted`` -> ``Processing`` -> ``Complete`` (or ``Failed``); a removal from an
address book is a job too (``GET /v2/contacts/deletion/{id}``: ``Started`` -> ``Completed``, or
``Failed``), its members gone only once it completed (``dotdigital_v2``). Errors use the v3 shape
``{"errorCode", "description", "details": [{"item", "description"}]}``; v2 answers add the v2
``message`` with its ``ERROR_...`` code.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    def throttle(self, principal: str, endpoint: Endpoint, request: Request) -> Response | None:
        if endpoint.spec is None:  # the sandbox's own endpoint spends none of the API budget
            return None
        state = self.window.hit(principal)
        if state.allowed:
            return None
        family = api_family(request.url.path)
        code = "ERROR_RATE_LIMIT_EXCEEDED" if family == "v2" else f"{family}:rateLimitExceeded"
        body = self._error_body(family, code, "Your API user has exceeded its hourly call limit.")
        return JSONResponse(body, 429, headers=retry_after_headers(state.wait))

    def decorate(self, response: Response, principal: str | None) -> None:
        for name, value in self.window.peek(principal).headers().items():
            response.headers[name] = value

    def throttled_response(self, wait: float) -> Response:
        body = {"errorCode": "tooManyRequests", "description": "Too many requests; retry later."}
        return JSONResponse(body, 429, headers=retry_after_headers(wait))

    def server_error(self, status: int) -> Response:
        text = "Internal server error" if status == 500 else "Service unavailable"
        return JSONResponse({"errorCode": "serverError", "description": text}, status)

    def error_response(self, violation: Violation) -> Response:
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

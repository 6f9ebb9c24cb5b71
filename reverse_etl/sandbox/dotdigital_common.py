"""What every part of the Dotdigital sandbox shares: limits, status words, error shapes,
and the base class holding the account state, jobs and common lookups."""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sized
from typing import Any

import orjson
from starlette.responses import Response

from reverse_etl.sandbox.base import BaseSandbox, JSONResponse
from reverse_etl.sandbox.dotdigital_state import DotdigitalState
from reverse_etl.sandbox.jobs import DONE, FAILED, PROCESSING, QUEUED, Job
from reverse_etl.sandbox.limits import FixedWindow, TieredWindows, retry_after_headers
from reverse_etl.sandbox.settings import SandboxSettings
from reverse_etl.sandbox.spec import SpecViolation, Violation

MAX_ACTIVE_CONTACT_IMPORTS = 25
MAX_ACTIVE_INSIGHT_IMPORTS = 5
CHUNK = 500
CONTACT_STATUS = {
    QUEUED: "NotFinished",
    PROCESSING: "NotFinished",
    DONE: "Finished",
    FAILED: "Failed",
}
INSIGHT_STATUS = {
    QUEUED: "NotStarted",
    PROCESSING: "Processing",
    DONE: "Complete",
    FAILED: "Failed",
}
# v3 email channel status -> v2 ApiContactStatuses (others: first letter upper-cased)
V2_STATUS = {
    "subscribed": "Subscribed",
    "unsubscribed": "Unsubscribed",
    "pendingOptIn": "PendingOptIn",
    "suppressed": "Suppressed",
    "softBounced": "SoftBounced",
    "hardBounced": "HardBounced",
    "ispComplained": "IspComplained",
    "directComplaint": "DirectComplaint",
    "sharedsuppression": "SharedSuppression",
    "domainSuppressed": "DomainSuppression",
}
# Error codes by violation kind, per API family.
V3_CODES = {
    "route": "notFound",
    "auth": "unauthorized",
    "content_type": "unsupportedMediaType",
    "parameter": "invalidParameter",
    "body": "validationFailed",
    "limit": "batchSizeExceeded",
    "semantic": "invalidRequest",
    "not_found": "notFound",
    "unsupported": "notImplemented",
}
V2_CODES = {
    "route": "ERROR_RESOURCE_NOT_FOUND",
    "auth": "ERROR_UNAUTHORIZED",
    "content_type": "ERROR_UNSUPPORTED_MEDIA_TYPE",
    "parameter": "ERROR_PARAMETER_INVALID",
    "body": "ERROR_PARAMETER_INVALID",
    "limit": "ERROR_PARAMETER_INVALID",
    "semantic": "ERROR_PARAMETER_INVALID",
    "not_found": "ERROR_RESOURCE_NOT_FOUND",
    "unsupported": "ERROR_NOT_IMPLEMENTED",
}


def api_family(path: str) -> str:
    if path.startswith("/insightData/"):
        return "insightData"
    if path.startswith("/v2/"):
        return "v2"
    return "contacts"


def fail(
    status: int, kind: str, code: str, description: str, item: str | None = None
) -> SpecViolation:
    return SpecViolation(Violation(status, kind, description, pointer=item, code=code))


class DotdigitalBase(BaseSandbox):
    """State and lookups the endpoint groups (contacts, insight, v2) share."""

    def __init__(self, settings: SandboxSettings | None = None):
        self.state = DotdigitalState()
        super().__init__(settings)
        self.window = FixedWindow(
            self.settings.dotdigital_calls_per_hour,
            3600.0,
            speedup=self.settings.speedup,
            enforce=self.settings.enforce_limits,
        )
        self.tiers = TieredWindows(
            dict(self.settings.dotdigital_tier_limits),
            speedup=self.settings.speedup,
            enforce=self.settings.enforce_limits,
        )
        # import slots "another integration" of the account holds: (job kind, count, until,
        # on the monotonic clock)
        self._holds: list[tuple[str, int, float]] = []
        token = f"{self.settings.username}:{self.settings.password}".encode()
        self._basic = "Basic " + base64.b64encode(token).decode()

    @staticmethod
    def _error_body(
        family: str, code: str, description: str, details: list[dict[str, str]] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"errorCode": code, "description": description}
        if details:
            body["details"] = details
        if family == "v2":
            body["message"] = f"{description} {code}"
        return body

    def _check_import_size(self, rows: Sized, noun: str, pointer: str) -> None:
        """Both v3 imports share one batch cap (``dotdigital_import_limit``), refused alike."""
        limit = self.settings.dotdigital_import_limit
        if len(rows) > limit:
            raise fail(
                400,
                "limit",
                "batchSizeExceeded",
                f"{len(rows)} {noun}; an import takes at most {limit}.",
                pointer,
            )

    def hold_import_slots(
        self, count: int, vendor_seconds: float, *, kind: str = "contacts"
    ) -> None:
        """Have another integration of the account hold ``count`` import slots (``kind``:
        contacts or insight) for ``vendor_seconds``: the active-import limit is the account's,
        shared by every API user and integration (a sync meets 429 ``tooManyActiveImports``
        while others' imports run)."""
        until = time.monotonic() + self.settings.real_seconds(vendor_seconds)
        job_kind = "contacts-import" if kind == "contacts" else "insight-import"
        with self.lock:
            self._holds.append((job_kind, count, until))

    def active_imports(self, kind: str) -> int:
        """Unfinished imports of ``kind`` (``contacts-import``, ``insight-import``): this
        account's jobs plus the slots others hold (``hold_import_slots``)."""
        now = time.monotonic()
        with self.lock:
            held = sum(n for k, n, until in self._holds if k == kind and until > now)
        return self.jobs.active(kind) + held

    def _hold_left(self) -> float:
        """Real seconds until the first held slot is given back (0: none held)."""
        now = time.monotonic()
        with self.lock:
            left = [until - now for _, _, until in self._holds if until > now]
        return min(left, default=0.0)

    def _too_many(self, family: str, what: str) -> Response:
        body = {
            "errorCode": f"{family}:tooManyActiveImports",
            "description": f"Your import request cannot be accepted as too many {what} being processed "
            "for you account. Please wait for an import to complete and then resubmit.",
        }
        with self.lock:
            self.counters["too_many_active_imports"] += 1
        wait = min(filter(None, (self.jobs.duration, self._hold_left())), default=1.0)
        return JSONResponse(body, 429, headers=retry_after_headers(wait))

    def _job_of(self, kind: str, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.jobs.get(job_id)
        if job is None or job.kind != kind:
            raise fail(
                404,
                "not_found",
                "importNotFound",
                f"The import request '{job_id}' could not be found!",
            )
        return job

    def _contact_doc(self, contact: Mapping[str, Any]) -> dict[str, Any]:
        cid = contact["contactId"]
        lists = [
            {"id": bid, "name": self.state.address_books[bid]["name"], "status": members[cid]}
            for bid, members in self.state.members.items()
            if cid in members
        ]
        doc = {
            k: contact[k]
            for k in (
                "contactId",
                "status",
                "created",
                "updated",
                "identifiers",
                "dataFields",
                "channelProperties",
            )
        }
        doc["lists"] = lists
        if contact["consentRecords"]:
            doc["consentRecords"] = contact["consentRecords"]
        if contact["preferences"]:
            doc["preferences"] = contact["preferences"]
        return orjson.loads(orjson.dumps(doc))

    def _lookup(self, identifier: str, value: str) -> int:
        if identifier not in ("email", "mobileNumber", "contactId"):
            raise fail(
                400,
                "semantic",
                "invalidIdentifier",
                f"Unknown identifier {identifier!r}.",
                identifier,
            )
        if identifier == "contactId" and not value.isdigit():
            raise fail(
                400,
                "parameter",
                "invalidId",
                f"The id value '{value}' is invalid for the identifier 'contactId'",
            )
        cid = self.state.find(identifier, value)
        if cid is None:
            raise SpecViolation(
                Violation(
                    404,
                    "not_found",
                    "The following contacts could not be found",
                    pointer=value,
                    code="contactNotFound",
                )
            )
        return cid

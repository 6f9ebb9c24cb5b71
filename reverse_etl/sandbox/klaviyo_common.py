"""What every part of the Klaviyo sandbox shares: documented limits, error and JSON:API
helpers, and the base class holding the account state, jobs and common lookups."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.responses import Response

from reverse_etl.sandbox.base import BaseSandbox, Call, JSONResponse
from reverse_etl.sandbox.jobs import DONE, FAILED, PROCESSING, QUEUED, Job, iso
from reverse_etl.sandbox.jsonapi import MEDIA_TYPE, Condition, check_filter, parse_filter
from reverse_etl.sandbox.klaviyo_state import (
    IDENTIFIERS,
    PERSONAL,
    KlaviyoState,
    ProfileError,
    check_email,
    check_phone,
    check_phone_plan,
)
from reverse_etl.sandbox.limits import KlaviyoWindows, TokenBuckets
from reverse_etl.sandbox.settings import SandboxSettings
from reverse_etl.sandbox.spec import SpecViolation, Violation

REVISION = "2026-07-15"
MAX_IMPORT_PROFILES = 10_000
MAX_BODY_BYTES = 5_000_000  # "5MB"; the decimal reading is the stricter one
MAX_PROFILE_BYTES = 100_000  # "100KB", likewise
MAX_SUBSCRIBE = 1_000
MAX_UNSUBSCRIBE = 100
MAX_LIST_MEMBERS = 1_000
MAX_CATALOG_ITEMS = 100
MAX_CATALOG_JOBS = 500
MAX_EVENTS = 1_000
CHUNK = 500  # records applied per step of a job, between which other requests are served

JOB_STATUS = {QUEUED: "queued", PROCESSING: "processing", DONE: "complete", FAILED: "cancelled"}
PROFILE_ATTRS = (
    *IDENTIFIERS,
    *PERSONAL,
    "created",
    "updated",
    "last_event_date",
    "location",
    "properties",
)
ITEM_ATTRS = (
    "external_id",
    "title",
    "description",
    "price",
    "url",
    "image_full_url",
    "image_thumbnail_url",
    "images",
    "custom_metadata",
    "published",
    "created",
    "updated",
)
# Filters the spec allows per endpoint, and the subset the sandbox evaluates.
EQ_ANY = {"equals", "any"}
CMP = {"greater-than", "less-than", "greater-or-equal", "less-or-equal"}
PROFILE_FILTERS = {
    "id": EQ_ANY,
    "email": EQ_ANY,
    "phone_number": EQ_ANY,
    "external_id": EQ_ANY,
    "_kx": {"equals"},
    "created": {"greater-than", "less-than"},
    "updated": {"greater-than", "less-than"},
    "subscriptions.email.marketing.list_suppressions.reason": {"equals"},
    "subscriptions.email.marketing.list_suppressions.timestamp": CMP,
    "subscriptions.email.marketing.list_suppressions.list_id": {"equals"},
    "subscriptions.email.marketing.suppression.reason": {"equals"},
    "subscriptions.email.marketing.suppression.timestamp": CMP,
}
#: A profile's email marketing suppression time, filtered and sorted on by its newest one.
SUPPRESSED_AT = "subscriptions.email.marketing.suppression.timestamp"
PROFILE_FILTERS_DONE = {
    k: v
    for k, v in PROFILE_FILTERS.items()
    if k in ("id", "email", "phone_number", "external_id", "_kx", "created", "updated")
    or k == SUPPRESSED_AT
}
LIST_FILTERS = {
    "name": EQ_ANY,
    "id": EQ_ANY,
    "created": {"greater-than"},
    "updated": {"greater-than"},
}
MEMBER_FILTERS = {
    "email": EQ_ANY,
    "phone_number": EQ_ANY,
    "push_token": EQ_ANY,
    "_kx": {"equals"},
    "joined_group_at": CMP,
}
MEMBER_FILTERS_DONE = {
    "email": EQ_ANY,
    "phone_number": EQ_ANY,
    "_kx": {"equals"},
    "joined_group_at": CMP,
}
ITEM_FILTERS = {
    "ids": {"any"},
    "category.id": {"equals"},
    "title": {"contains"},
    "published": {"equals"},
}
ITEM_FILTERS_DONE = {"ids": {"any"}, "title": {"contains"}, "published": {"equals"}}


def bad(
    detail: str, pointer: str | None = None, *, status: int = 400, kind: str = "semantic"
) -> SpecViolation:
    return SpecViolation(Violation(status, kind, detail, pointer=pointer))


def over_limit(detail: str, pointer: str) -> SpecViolation:
    return bad(detail, pointer, kind="limit")


def jsonapi(
    content: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(content, status, media_type=MEDIA_TYPE, headers=headers)


def accepted() -> Response:
    return Response(status_code=202, media_type=MEDIA_TYPE)


def page_size(call: Call, default: int) -> int:
    return int(call.arg("page[size]") or default)


def csv_arg(call: Call, name: str) -> set[str]:
    return {v for v in (call.arg(name) or "").split(",") if v}


def sparse(attrs: dict[str, Any], call: Call, resource: str) -> dict[str, Any]:
    fields = csv_arg(call, f"fields[{resource}]")
    if not fields:
        return attrs
    tops = {f.split(".")[0] for f in fields}
    return {k: v for k, v in attrs.items() if k in tops}


def related_links(base: str, rel: str) -> dict[str, str]:
    """A relationship's two links, the linkage and the related resources, as Klaviyo gives them."""
    return {"self": f"{base}/relationships/{rel}", "related": f"{base}/{rel}"}


def resource(
    call: Call, kind: str, path: str, rid: str, attrs: dict[str, Any], rels: Iterable[str]
) -> dict[str, Any]:
    """A resource object in Klaviyo's one shape: sparse attributes, relationship links, self."""
    link = f"{call.base_url}/api/{path}/{rid}"
    return {
        "type": kind,
        "id": rid,
        "attributes": sparse(attrs, call, kind),
        "relationships": {rel: {"links": related_links(link, rel)} for rel in rels},
        "links": {"self": link},
    }


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (already format-checked); naive times are taken as UTC."""
    moment = datetime.fromisoformat(text.replace("z", "Z"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def sort_rows(rows: list[dict[str, Any]], sort: str | None) -> list[dict[str, Any]]:
    if not sort:
        return rows
    key = sort.lstrip("-")
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    present.sort(key=lambda r: r[key], reverse=sort.startswith("-"))
    return present + missing


class KlaviyoBase(BaseSandbox):
    """State and lookups the endpoint groups (profiles, lists, consent, events, catalog) share."""

    def __init__(self, settings: SandboxSettings | None = None):
        self.state = KlaviyoState()
        #: Records dropped by jobs that have no status endpoint (events, consent), with why.
        self.async_errors: list[dict[str, Any]] = []
        super().__init__(settings)
        self.buckets: KlaviyoWindows | TokenBuckets = KlaviyoWindows(
            speedup=self.settings.speedup, enforce=self.settings.enforce_limits
        )

    def _job(self, kind: str, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.jobs.get(job_id)
        if job is None or job.kind != kind:
            raise bad(f"No {kind} with id {job_id!r}.", status=404, kind="not_found")
        return job

    def _counts(self, job: Job) -> tuple[str, int, int]:
        phase = self.jobs.phase(job)
        if phase == QUEUED:
            return JOB_STATUS[phase], 0, 0
        if job.fail:
            return JOB_STATUS[phase], 0, (job.total if phase == FAILED else 0)
        return JOB_STATUS[phase], job.data["completed"], job.data["failed"]

    def _job_progress(self, job: Job) -> dict[str, Any]:
        """The attributes every bulk job reports first, in the spec's order; each kind adds more."""
        status, completed, failed = self._counts(job)
        return {
            "status": status,
            "created_at": iso(job.created_at),
            "total_count": job.total,
            "completed_count": completed,
            "failed_count": failed,
            "completed_at": iso(self.jobs.finished_at(job)),
        }

    def _filter(
        self, call: Call, allowed: Mapping[str, set[str]], supported: Mapping[str, set[str]]
    ) -> list[Condition]:
        text = call.arg("filter")
        if not text:
            return []
        conds = parse_filter(text)
        check_filter(conds, allowed, supported)
        return conds

    def _list_resource(self, lst: dict[str, Any], call: Call) -> dict[str, Any]:
        attrs = {k: lst[k] for k in ("name", "created", "updated", "opt_in_process")}
        if "profile_count" in csv_arg(call, "additional-fields[list]"):
            attrs["profile_count"] = len(self.state.members[lst["id"]])
        return resource(
            call, "list", "lists", lst["id"], attrs, ("profiles", "tags", "flow-triggers")
        )

    def _require_lists(self, list_ids: Iterable[str], pointer: str) -> None:
        with self.lock:
            missing = [i for i in list_ids if i not in self.state.lists]
        if missing:
            raise bad(f"List {missing[0]!r} does not exist.", pointer, status=404, kind="not_found")

    def _list(self, list_id: str) -> dict[str, Any]:
        lst = self.state.lists.get(list_id)
        if lst is None:
            raise bad(f"List {list_id!r} does not exist.", status=404, kind="not_found")
        return lst

    def _check_identity(
        self, index: int, attrs: Mapping[str, Any], profile_id: str | None, where: str
    ) -> None:
        """An email and phone number Klaviyo takes; with ``klaviyo_strict_phone_numbers`` the
        number must also be valid in its numbering plan, else the call is refused (400).

        Klaviyo refuses such a call when the number is the profile's only identifier, and
        since 2025 ignores the number when another identifier is given ("Ignore the invalid
        phone number (instead of returning a 400)", answering ``X-Klaviyo-Partial-Failure:
        phone_number``:
        https://community.klaviyo.com/developer-group-64/api-validation-improvements-for-phone-number-handling-18034).
        The sandbox refuses both, the stricter (and earlier) behaviour: a client that passes
        it sends no invalid number, so an SMS consent is never silently lost."""
        ptr = f"{where}/{index}"
        try:
            check_email(attrs.get("email"), f"{ptr}/attributes/email")
            check_phone(attrs.get("phone_number"), f"{ptr}/attributes/phone_number")
            if self.settings.klaviyo_strict_phone_numbers:
                check_phone_plan(attrs.get("phone_number"), f"{ptr}/attributes/phone_number")
        except ProfileError as e:
            raise bad(e.detail, e.pointer) from e
        if profile_id is not None:
            with self.lock:
                known = profile_id in self.state.profiles
            if not known:
                raise bad(f"Profile {profile_id!r} does not exist.", f"{ptr}/id")

    def _copy(self, value: Any) -> Any:
        with self.lock:
            return orjson.loads(orjson.dumps(value))

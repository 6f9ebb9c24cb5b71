"""A local Klaviyo (revision 2026-07-15) for the client's tests, the demo and benchmarks.

Serves the bulk endpoints a sync uses (profile import jobs, lists and membership, consent,
events, catalog items) plus the lookups a client needs, checks every request against Klaviyo's
published spec and documented limits, and keeps the account in memory for tests to inspect
(``profiles()``, ``list_members()``, ``subscriptions()``, ``suppressions()``, ``events()``,
``catalog_items()``).

Consent can be read back as Klaviyo gives it: ``GET /api/profiles`` and ``/api/profiles/{id}``
with ``additional-fields[profile]=subscriptions`` (email marketing consent and its global
suppressions, SMS consent), and ``GET /api/profiles`` filters and sorts on
``subscriptions.email.marketing.suppression.timestamp``. What the person does inside Klaviyo
(unsubscribe link, preference page, spam complaint, a suppression in the app) is played by
``act_as_person`` or, over HTTP, ``POST /_sandbox/person`` (sandbox-only, outside the spec).

Profile rules (identity, "omitted keeps, null clears", merged ``properties``) are documented
in ``klaviyo_state``. Documented limits enforced (all from the spec's operation descriptions):
bulk profile import 10,000 profiles, 5 MB body, 100 KB per profile (413 for the body, 400 for
the others); subscribe 1,000 and unsubscribe 100 profiles a call; list membership 1,000
profiles a call; catalog item bulk jobs 100 items and at most 500 jobs in progress; bulk events
1,000 events a call. Rate limits come from each operation's ``x-klaviyo-ratelimit``, with the
lower ones the descriptions give for ``additional-fields`` (``profile_count``: 1/s, 15/m;
``predictive_analytics``: 10/s, 150/m).

A job's status goes ``queued`` -> ``processing`` -> ``complete``. The spec's status enum has no
"failed", so a job hit by the ``failed_job`` fault ends ``cancelled`` with every operation
counted in ``failed_count`` and reported by ``import-errors``. ``completed_count`` counts the
operations that succeeded, so ``completed_count + failed_count == total_count`` when done.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from reverse_etl.sandbox.base import Call, Endpoint
from reverse_etl.sandbox.faults import JOB_FAULTS, REQUEST_FAULTS
from reverse_etl.sandbox.jobs import utcnow
from reverse_etl.sandbox.jsonapi import error_document
from reverse_etl.sandbox.klaviyo_catalog import CatalogAPI
from reverse_etl.sandbox.klaviyo_common import (
    MAX_BODY_BYTES,
    REVISION,
    bad,
    jsonapi,
    parse_time,
)
from reverse_etl.sandbox.klaviyo_consent import ConsentAPI
from reverse_etl.sandbox.klaviyo_events import EventsAPI
from reverse_etl.sandbox.klaviyo_lists import ListsAPI
from reverse_etl.sandbox.klaviyo_probes import ProbeReadsAPI
from reverse_etl.sandbox.klaviyo_profiles import ProfilesAPI
from reverse_etl.sandbox.klaviyo_state import PERSON_ACTIONS, now_iso, utc_iso
from reverse_etl.sandbox.limits import Window, klaviyo_windows, retry_after_headers
from reverse_etl.sandbox.spec import Violation, load_spec

#: The sandbox-only route for ``act_as_person`` over HTTP.
PERSON_PATH = "/_sandbox/person"


class KlaviyoSandbox(ProfilesAPI, ListsAPI, ConsentAPI, EventsAPI, CatalogAPI, ProbeReadsAPI):
    """Klaviyo's API on loopback. ``app`` is the Starlette app; the object is ASGI too."""

    vendor = "klaviyo"

    # --- routing and the vendor's answers ---------------------------------------------------

    def endpoints(self) -> Sequence[Endpoint]:
        p, li, ev, ca = "klaviyo/profiles", "klaviyo/lists", "klaviyo/events", "klaviyo/catalogs"
        req = REQUEST_FAULTS
        return [
            Endpoint(
                "POST",
                "/api/profile-bulk-import-jobs",
                p,
                self.import_profiles,
                JOB_FAULTS,
                MAX_BODY_BYTES,
            ),
            Endpoint("GET", "/api/profile-bulk-import-jobs/{job_id}", p, self.get_import_job, req),
            Endpoint(
                "GET",
                "/api/profile-bulk-import-jobs/{id}/import-errors",
                p,
                self.get_import_errors,
                req,
            ),
            Endpoint("GET", "/api/profiles", p, self.get_profiles),
            Endpoint("GET", "/api/profiles/{id}", p, self.get_profile),
            Endpoint(
                "POST",
                "/api/profile-subscription-bulk-create-jobs",
                p,
                self.subscribe,
                req,
                MAX_BODY_BYTES,
            ),
            Endpoint(
                "POST",
                "/api/profile-subscription-bulk-delete-jobs",
                p,
                self.unsubscribe,
                req,
                MAX_BODY_BYTES,
            ),
            Endpoint("GET", "/api/lists", li, self.get_lists),
            Endpoint("POST", "/api/lists", li, self.create_list, req),
            Endpoint("GET", "/api/lists/{id}", li, self.get_list),
            Endpoint("GET", "/api/lists/{id}/relationships/profiles", li, self.get_list_profiles),
            Endpoint("POST", "/api/lists/{id}/relationships/profiles", li, self.add_to_list, req),
            Endpoint(
                "DELETE", "/api/lists/{id}/relationships/profiles", li, self.remove_from_list, req
            ),
            Endpoint(
                "POST", "/api/event-bulk-create-jobs", ev, self.create_events, req, MAX_BODY_BYTES
            ),
            Endpoint(
                "POST",
                "/api/catalog-item-bulk-create-jobs",
                ca,
                self.create_items,
                JOB_FAULTS,
                MAX_BODY_BYTES,
            ),
            Endpoint(
                "GET", "/api/catalog-item-bulk-create-jobs/{job_id}", ca, self.get_item_job, req
            ),
            Endpoint(
                "POST",
                "/api/catalog-item-bulk-update-jobs",
                ca,
                self.update_items,
                JOB_FAULTS,
                MAX_BODY_BYTES,
            ),
            Endpoint(
                "GET", "/api/catalog-item-bulk-update-jobs/{job_id}", ca, self.get_item_job, req
            ),
            Endpoint("GET", "/api/catalog-items", ca, self.get_items),
            # reads that ``reverse-etl debug`` probes a key's scopes with
            Endpoint("GET", "/api/events", ev, self.get_events),
            Endpoint("GET", "/api/profile-suppression-bulk-create-jobs", p, self.get_suppress_jobs),
            # sandbox-only (no spec): the person acting inside Klaviyo, for tests and the demo
            Endpoint("POST", PERSON_PATH, None, self.person_action),
        ]

    def authenticate(self, request: Request) -> str | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme == "Klaviyo-API-Key" and key.strip() == self.settings.api_key:
            return key.strip()
        return None

    def precheck(self, request: Request, endpoint: Endpoint) -> Violation | None:
        if endpoint.spec is None:  # sandbox-only: no revision to check
            return None
        missing = self._missing_scopes(endpoint)
        if missing:
            return Violation(
                403,
                "scope",
                "You do not have permission to perform this action.",
                code="permission_denied",
            )
        revision = request.headers.get("revision")
        if revision is None:
            return Violation(
                400, "parameter", "The revision header is required.", parameter="revision"
            )
        if revision != REVISION:
            return Violation(
                400,
                "parameter",
                f"Unsupported revision {revision!r}; the sandbox serves {REVISION}.",
                parameter="revision",
            )
        return None

    def _missing_scopes(self, endpoint: Endpoint) -> list[str]:
        """The operation's ``x-klaviyo-scopes`` the key lacks (``klaviyo_key_scopes``; empty:
        a full-access key). Klaviyo grants each scope as Read or Full access, Full including
        read (https://help.klaviyo.com/hc/en-us/articles/7423954176283-How-to-create-a-private-API-key),
        and refuses a call needing a scope the key lacks with 403 ``permission_denied``, "You
        do not have permission to perform this action." (https://community.klaviyo.com/
        developer-group-64/api-patch-action-status-403-code-permission-denied-9225). Whether
        the scope check comes before the revision and body checks is UNCONFIRMED; here it does.
        """
        held = set(self.settings.klaviyo_key_scopes)
        if not held or endpoint.spec is None:
            return []
        op = load_spec(endpoint.spec).operation(endpoint.method, endpoint.template)
        granted = held | {s.replace(":write", ":read") for s in held if s.endswith(":write")}
        return [s for s in op.raw.get("x-klaviyo-scopes", ()) if s not in granted]

    @functools.cache  # noqa: B019 - one entry per endpoint and variant, for the sandbox's life
    def _windows(self, endpoint: Endpoint, variant: str) -> tuple[Window, ...]:
        if variant == "profile_count":
            return (Window(1, 1.0, "burst"), Window(15, 60.0, "steady"))
        if variant == "predictive_analytics":
            return (Window(10, 1.0, "burst"), Window(150, 60.0, "steady"))
        return klaviyo_windows(
            load_spec(endpoint.spec).operation(endpoint.method, endpoint.template).ratelimit
        )

    def throttle(self, principal: str, endpoint: Endpoint, request: Request) -> Response | None:
        if endpoint.spec is None:  # sandbox-only: no rate limit
            return None
        extra = request.query_params.get("additional-fields[list]", "") + request.query_params.get(
            "additional-fields[profile]", ""
        )
        variant = next((v for v in ("profile_count", "predictive_analytics") if v in extra), "")
        wait = self.buckets.acquire(
            (principal, endpoint.method, endpoint.template, variant),
            self._windows(endpoint, variant),
        )
        return self.throttled_response(wait) if wait > 0 else None

    def throttled_response(self, wait: float) -> Response:
        headers = retry_after_headers(wait)
        detail = f"Request was throttled. Expected available in {headers['Retry-After']} second(s)."
        return jsonapi(error_document(429, detail), 429, headers)

    def server_error(self, status: int) -> Response:
        return jsonapi(error_document(status, "The sandbox injected a server error."), status)

    def error_response(self, violation: Violation) -> Response:
        doc = error_document(
            violation.status,
            violation.detail,
            code=violation.code,
            pointer=violation.pointer,
            parameter=violation.parameter,
        )
        return jsonapi(doc, violation.status)

    # --- the person, inside Klaviyo (for tests and the demo) -------------------------------

    def act_as_person(self, email: str, action: str, *, at: datetime | None = None) -> None:
        """Do what the person with ``email`` can do inside Klaviyo, ``at`` (default now, UTC;
        a naive time is taken as UTC), to their email marketing consent:

        * ``"unsubscribe"``: consent UNSUBSCRIBED at ``at``, an UNSUBSCRIBE suppression at ``at``;
        * ``"subscribe"``: consent SUBSCRIBED at ``at``; UNSUBSCRIBE, SPAM_COMPLAINT and
          USER_SUPPRESSED suppressions removed (HARD_BOUNCE, INVALID_EMAIL stay);
        * ``"complain"``: a SPAM_COMPLAINT suppression at ``at``, consent UNSUBSCRIBED;
        * ``"suppress"``: a USER_SUPPRESSED suppression at ``at``.

        KeyError for an email no profile has; ValueError for another action.
        """
        if action not in PERSON_ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(PERSON_ACTIONS)}")
        when = utc_iso(at or utcnow())
        with self.lock:
            profile_id = self.state.find_by("email", email)
            if profile_id is None:
                raise KeyError(email)
            self.state.person_acts(profile_id, action, when, now_iso())

    async def person_action(self, call: Call) -> Response:
        """POST /_sandbox/person ``{"email", "action", "at"?}``: ``act_as_person`` over HTTP.

        204 done; 404 for an unknown email (counted as ``not_found``, as a lookup miss); 400
        for a body that is not such an object, an unknown action or an ``at`` that is not an
        ISO 8601 time. Outside the vendor's API, so a 400 here is not recorded as a violation.
        """
        body = call.body
        if not isinstance(body, dict):
            return self._person_refusal('The body must be {"email", "action", "at"?}.', "/")
        email, action, at = body.get("email"), body.get("action"), body.get("at")
        if not isinstance(email, str):
            return self._person_refusal("email must be a string.", "/email")
        if action not in PERSON_ACTIONS:
            return self._person_refusal(
                f"action must be one of {', '.join(PERSON_ACTIONS)}; got {action!r}.", "/action"
            )
        moment = None
        if at is not None:
            try:
                moment = parse_time(at) if isinstance(at, str) else None
            except ValueError:
                moment = None
            if moment is None:
                return self._person_refusal("at must be an ISO 8601 date-time.", "/at")
        try:
            self.act_as_person(email, action, at=moment)
        except KeyError:
            raise bad(f"No profile has email {email!r}.", status=404, kind="not_found") from None
        return Response(status_code=204)

    def _person_refusal(self, detail: str, pointer: str) -> Response:
        return self.error_response(Violation(400, "semantic", detail, pointer=pointer))

    # --- inspection (for tests; no HTTP, no faults) -----------------------------------------

    def profiles(self) -> list[dict[str, Any]]:
        """Every profile, in creation order."""
        return self._copy(list(self.state.profiles.values()))

    def profile_by_email(self, email: str) -> dict[str, Any] | None:
        with self.lock:
            pid = self.state.find_by("email", email)
            return None if pid is None else self._copy(self.state.profiles[pid])

    def lists(self) -> list[dict[str, Any]]:
        return self._copy(list(self.state.lists.values()))

    def list_members(self, list_name: str) -> list[dict[str, Any]]:
        """Profiles in every list called ``list_name`` (Klaviyo allows repeated names)."""
        with self.lock:
            ids: dict[str, None] = {}
            for lst in self.state.lists.values():
                if lst["name"] == list_name:
                    ids.update(dict.fromkeys(self.state.members[lst["id"]]))
            return self._copy([self.state.profiles[i] for i in ids])

    def subscriptions(self) -> list[dict[str, Any]]:
        """One record per (profile, channel, consent type): the latest consent given or revoked."""
        return self._copy(list(self.state.subscriptions.values()))

    def suppressions(self, email: str) -> list[dict[str, Any]]:
        """The email marketing suppressions of the profile with ``email``, oldest first:
        ``[{"reason": ..., "timestamp": ...}]`` (UTC ISO times). KeyError for an unknown email."""
        with self.lock:
            profile_id = self.state.find_by("email", email)
            if profile_id is None:
                raise KeyError(email)
            held = self.state.suppressions.get(profile_id, {})
            return [
                {"reason": reason, "timestamp": at}
                for reason, at in sorted(held.items(), key=lambda item: (item[1], item[0]))
            ]

    def events(self) -> list[dict[str, Any]]:
        return self._copy(self.state.events)

    def catalog_items(self) -> list[dict[str, Any]]:
        return self._copy(list(self.state.catalog.values()))


__all__ = ["PERSON_PATH", "REVISION", "KlaviyoSandbox"]

"""Klaviyo's bulk profile import jobs, their import errors, and profile lookups.

``GET /api/profiles`` and ``GET /api/profiles/{id}`` give a profile's consent with
``additional-fields[profile]=subscriptions`` in the spec's ``Subscriptions`` shape: email
marketing always (NEVER_SUBSCRIBED for a profile never given consent), with its global
suppressions; other channels once they have consent. ``GET /api/profiles`` filters on
``subscriptions.email.marketing.suppression.timestamp`` (greater-than, greater-or-equal,
less-than, less-or-equal; a profile matches by its newest suppression, never without one) and
sorts on it (ascending or ``-`` descending; profiles without a suppression last).

With ``klaviyo_strict_phone_numbers`` a profile whose phone number is outside its country's
numbering plan fails in the import job (an import error pointing at
``/data/attributes/profiles/data/{i}/attributes/phone_number``), its other fields not
applied. UNCONFIRMED: Klaviyo documents dropping such a number for its subscribe, profile and
event endpoints, not for the bulk import; failing the profile is the safe reading (a client
must not send the number either way).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
from starlette.responses import Response

from reverse_etl.sandbox.base import Call, paginate
from reverse_etl.sandbox.jobs import FAILED, Job, iso
from reverse_etl.sandbox.jsonapi import Condition, decode_cursor, matches, page_links
from reverse_etl.sandbox.klaviyo_common import (
    CHUNK,
    EQ_ANY,
    MAX_IMPORT_PROFILES,
    MAX_PROFILE_BYTES,
    PROFILE_ATTRS,
    PROFILE_FILTERS,
    PROFILE_FILTERS_DONE,
    SUPPRESSED_AT,
    KlaviyoBase,
    bad,
    csv_arg,
    jsonapi,
    over_limit,
    page_size,
    parse_time,
    related_links,
    resource,
    sort_rows,
    sparse,
)
from reverse_etl.sandbox.klaviyo_state import ProfileError, check_phone_plan, now_iso
from reverse_etl.sandbox.spec import SpecViolation, Violation

_COMPARE = {
    "greater-than": lambda a, b: a > b,
    "greater-or-equal": lambda a, b: a >= b,
    "less-than": lambda a, b: a < b,
    "less-or-equal": lambda a, b: a <= b,
}


class ProfilesAPI(KlaviyoBase):
    """POST/GET /api/profile-bulk-import-jobs..., GET /api/profiles."""

    # --- profile import jobs ----------------------------------------------------------------

    async def import_profiles(self, call: Call) -> Response:
        data = call.body["data"]
        profiles = data["attributes"]["profiles"]["data"]
        where = "/data/attributes/profiles/data"
        if not profiles:
            raise bad("At least one profile is required.", where)
        if len(profiles) > MAX_IMPORT_PROFILES:
            raise over_limit(
                f"{len(profiles)} profiles; a bulk import accepts at most {MAX_IMPORT_PROFILES}.",
                where,
            )
        for i, profile in enumerate(profiles):
            size = len(orjson.dumps(profile))
            if size > MAX_PROFILE_BYTES:
                raise over_limit(
                    f"Profile is {size} bytes; the maximum is {MAX_PROFILE_BYTES}.", f"{where}/{i}"
                )
        list_ids = [
            x["id"]
            for x in ((data.get("relationships") or {}).get("lists") or {}).get("data") or []
        ]
        self._require_lists(list_ids, "/data/relationships/lists/data")
        job = Job("profile-bulk-import-job", len(profiles), fail=call.fault == "failed_job")
        job.data.update(lists=list_ids, errors=[], completed=0, failed=0)
        self.jobs.submit(job, self._import_work(job, profiles, list_ids))
        with self.lock:
            self.counters["profiles_received"] += len(profiles)
        return jsonapi(self._import_job_doc(job, call), 202)

    def _import_work(
        self, job: Job, profiles: list[dict[str, Any]], list_ids: list[str]
    ) -> Iterator[None]:
        state, d = self.state, job.data
        strict = self.settings.klaviyo_strict_phone_numbers
        for start in range(0, len(profiles), CHUNK):
            done: list[str] = []
            stamp = now_iso()
            for i in range(start, min(start + CHUNK, len(profiles))):
                p = profiles[i]
                try:
                    if strict:  # UNCONFIRMED: the import may rather drop the number
                        phone = p["attributes"].get("phone_number")
                        check_phone_plan(phone, "/attributes/phone_number")
                    pid, _ = state.upsert(
                        p["attributes"],
                        profile_id=p.get("id"),
                        meta=p.get("meta"),
                        stamp=stamp,
                        nulls_clear=False,  # the bulk import ignores nulls
                    )
                except ProfileError as e:  # its pointer is relative to the profile
                    e.pointer = f"/data/attributes/profiles/data/{i}{e.pointer}"
                    d["errors"].append(
                        {
                            "code": e.code,
                            "detail": e.detail,
                            "pointer": e.pointer,
                            "payload": p["attributes"],
                        }
                    )
                    d["failed"] += 1
                    continue
                done.append(pid)
                d["completed"] += 1
            for list_id in list_ids:
                state.add_members(list_id, done)
            yield

    def _import_job_doc(self, job: Job, call: Call) -> dict[str, Any]:
        base = f"{call.base_url}/api/profile-bulk-import-jobs/{job.id}"
        attrs = {
            **self._job_progress(job),
            "expires_at": iso(job.created_at + timedelta(days=7)),
            "started_at": iso(self.jobs.started_at(job)),
        }
        doc: dict[str, Any] = {
            "data": {
                "type": "profile-bulk-import-job",
                "id": job.id,
                "attributes": sparse(attrs, call, "profile-bulk-import-job"),
                "relationships": {
                    "lists": {
                        "data": [{"type": "list", "id": i} for i in job.data["lists"]],
                        "links": related_links(base, "lists"),
                    },
                    "profiles": {"links": related_links(base, "profiles")},
                    "import-errors": {"links": {"related": f"{base}/import-errors"}},
                },
                "links": {"self": base},
            },
            "links": {"self": base},
        }
        if "lists" in csv_arg(call, "include"):
            with self.lock:
                doc["included"] = [
                    self._list_resource(self.state.lists[i], call) for i in job.data["lists"]
                ]
        return doc

    async def get_import_job(self, call: Call) -> Response:
        job = self._job("profile-bulk-import-job", call.path_params["job_id"])
        return jsonapi(self._import_job_doc(job, call))

    async def get_import_errors(self, call: Call) -> Response:
        job = self._job("profile-bulk-import-job", call.path_params["id"])
        if job.fail:
            errors: Sequence[dict[str, Any]] = (
                _FailedJobErrors(job.total) if self.jobs.phase(job) == FAILED else []
            )
        else:
            with self.lock:
                errors = list(job.data["errors"])
        offset = decode_cursor(call.arg("page[cursor]"))
        page = paginate(errors, offset, page_size(call, 20))
        data = [
            {
                "type": "import-error",
                "id": f"{job.id}-{offset + n}",
                "attributes": sparse(
                    {
                        "code": e["code"],
                        "title": "Job cancelled." if e["code"] == "cancelled" else "Invalid input.",
                        "detail": e["detail"],
                        "source": {"pointer": e["pointer"]},
                        "original_payload": e.get("payload"),
                    },
                    call,
                    "import-error",
                ),
            }
            for n, e in enumerate(page.items)
        ]
        return jsonapi(
            {"data": data, "links": page_links(call.request, page.next_offset, page.prev_offset)}
        )

    # --- profiles ---------------------------------------------------------------------------

    def _profile_resource(self, profile: dict[str, Any], call: Call) -> dict[str, Any]:
        attrs = {k: profile.get(k) for k in PROFILE_ATTRS}
        if "subscriptions" in csv_arg(call, "additional-fields[profile]"):
            attrs["subscriptions"] = self._subscriptions_of(profile["id"])
        rels = ("lists", "segments", "push-tokens")
        return resource(call, "profile", "profiles", profile["id"], attrs, rels)

    def _subscriptions_of(self, profile_id: str) -> dict[str, Any]:
        """The profile's ``subscriptions`` (the spec's ``Subscriptions``)."""
        consents = self.state.consents(profile_id)
        out: dict[str, Any] = {"email": {"marketing": self._email_marketing(profile_id, consents)}}
        for (channel, kind), rec in consents.items():
            shaped = _channel_consent(channel, kind, rec)
            if shaped is not None:
                out.setdefault(shaped[0], {})[kind] = shaped[1]
        return out

    def _email_marketing(
        self, profile_id: str, consents: dict[tuple[str, str], dict[str, Any]]
    ) -> dict[str, Any]:
        """``EmailMarketing``: consent (NEVER_SUBSCRIBED while none was ever recorded) and the
        global suppressions, oldest first. ``can_receive_email_marketing``: SUBSCRIBED and not
        suppressed. ``last_updated``: when the consent or a suppression last changed."""
        state = self.state
        rec = consents.get(("email", "marketing"))
        held = state.suppressions.get(profile_id, {})
        consent = rec["consent"] if rec else "NEVER_SUBSCRIBED"
        changed = [
            t for t in (rec and rec["updated"], state.suppressions_changed.get(profile_id)) if t
        ]
        return {
            "can_receive_email_marketing": consent == "SUBSCRIBED" and not held,
            "consent": consent,
            "consent_timestamp": rec.get("consented_at") if rec else None,
            "last_updated": max(changed) if changed else None,
            "method": rec.get("method", "API") if rec else None,
            "method_detail": rec.get("method_detail") if rec else None,
            "custom_method_detail": rec.get("custom_source") if rec else None,
            "suppression": [
                {"reason": reason, "timestamp": at}
                for reason, at in sorted(held.items(), key=lambda item: (item[1], item[0]))
            ],
            "list_suppressions": [],
        }

    async def get_profiles(self, call: Call) -> Response:
        conds = self._filter(call, PROFILE_FILTERS, PROFILE_FILTERS_DONE)
        bounds = _suppression_bounds(conds)
        conds = [c for c in conds if c.field != SUPPRESSED_AT]
        with self.lock:
            rows = self._select_profiles(conds, bounds)
            rows = self._sort_profiles(rows, call.arg("sort"))
            offset = decode_cursor(call.arg("page[cursor]"))
            page = paginate(rows, offset, page_size(call, 20))
            data = [self._profile_resource(p, call) for p in page.items]
        return jsonapi(
            {"data": data, "links": page_links(call.request, page.next_offset, page.prev_offset)}
        )

    async def get_profile(self, call: Call) -> Response:
        """GET /api/profiles/{id}: one profile, with ``subscriptions`` when asked for."""
        if call.arg("include"):
            raise SpecViolation(
                Violation(501, "unsupported", "The sandbox does not include related resources.")
            )
        profile_id = call.path_params["id"]
        with self.lock:
            profile = self.state.profiles.get(profile_id)
            if profile is None:
                raise bad(f"Profile {profile_id!r} does not exist.", status=404, kind="not_found")
            data = self._profile_resource(profile, call)
        return jsonapi({"data": data, "links": {"self": str(call.request.url)}})

    def _select_profiles(
        self, conds: list[Condition], bounds: list[tuple[str, datetime]]
    ) -> list[dict[str, Any]]:
        state = self.state
        rows: list[dict[str, Any]] | None = None
        for c in conds:  # use the identifier indexes instead of scanning every profile
            if c.field in ("email", "phone_number", "external_id") and c.op in EQ_ANY:
                values = c.value if isinstance(c.value, list) else [c.value]
                ids = {state.find_by(c.field, v) for v in values if isinstance(v, str)}
                rows = [state.profiles[i] for i in sorted(i for i in ids if i)]
                break
        candidates = state.profiles.values() if rows is None else rows
        return [
            p
            for p in candidates
            if matches(p, conds, {}) and (not bounds or self._suppressed_within(p["id"], bounds))
        ]

    def _suppressed_within(self, profile_id: str, bounds: list[tuple[str, datetime]]) -> bool:
        latest = self.state.latest_suppression(profile_id)
        if latest is None:
            return False
        at = parse_time(latest)
        return all(_COMPARE[op](at, bound) for op, bound in bounds)

    def _sort_profiles(self, rows: list[dict[str, Any]], sort: str | None) -> list[dict[str, Any]]:
        """``sort_rows``, and the newest suppression's time for SUPPRESSED_AT (ties keep
        creation order; profiles without a suppression last either way)."""
        if sort is None or sort.lstrip("-") != SUPPRESSED_AT:
            return sort_rows(rows, sort)
        latest = self.state.latest_suppression
        present = [r for r in rows if latest(r["id"]) is not None]
        missing = [r for r in rows if latest(r["id"]) is None]
        present.sort(key=lambda r: latest(r["id"]) or "", reverse=sort.startswith("-"))
        return present + missing


def _suppression_bounds(conds: list[Condition]) -> list[tuple[str, datetime]]:
    """(operator, time) of each suppression-timestamp condition; 400 for a value not a time."""
    bounds = []
    for c in conds:
        if c.field != SUPPRESSED_AT:
            continue
        try:
            if not isinstance(c.value, str):
                raise ValueError(c.value)
            bounds.append((c.op, parse_time(c.value)))
        except ValueError as exc:
            raise SpecViolation(
                Violation(
                    400,
                    "parameter",
                    f"Invalid filter: {c.op}({c.field},...) needs a datetime, got {c.value!r}",
                    parameter="filter",
                )
            ) from exc
    return bounds


def _channel_consent(
    channel: str, kind: str, rec: dict[str, Any]
) -> tuple[str, dict[str, Any]] | None:
    """(``Subscriptions`` key, object) for a consent record other than email marketing, in its
    schema's shape (``SMSMarketing``, ``SMSTransactional``, ``OpenTrackingConsent``, the
    WhatsApp channels, ``PushMarketing``); None for what has no place there."""
    consent = rec["consent"]
    yes = consent == "SUBSCRIBED"
    when = {"consent_timestamp": rec.get("consented_at")}
    if channel == "sms" and kind in ("marketing", "transactional"):
        return "sms", {
            f"can_receive_sms_{kind}": yes,
            "consent": consent,
            **when,
            "last_updated": rec["updated"],
            "method": rec.get("method", "API"),
            "method_detail": rec.get("method_detail"),
        }
    if (channel, kind) == ("email", "open_tracking") or (
        channel == "whatsapp" and kind in ("marketing", "transactional")
    ):
        return channel, {
            "consent": consent,
            "can_receive": yes,
            **when,
            "last_updated": rec["updated"],
        }
    if (channel, kind) == ("push", "marketing"):
        return "mobile_push", {"can_receive_push_marketing": yes, "consent": consent, **when}
    return None


class _FailedJobErrors(Sequence[dict[str, Any]]):
    """import-errors of a cancelled job: one per profile, made on demand (pages only)."""

    def __init__(self, total: int):
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.total))]
        return {
            "code": "cancelled",
            "detail": "The job was cancelled before this profile was imported (fault injection).",
            "pointer": f"/data/attributes/profiles/data/{index}",
        }

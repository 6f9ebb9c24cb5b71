"""Klaviyo's bulk profile import jobs, their import errors, and profile lookups."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
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
    KlaviyoBase,
    bad,
    csv_arg,
    jsonapi,
    over_limit,
    page_size,
    related_links,
    resource,
    sort_rows,
    sparse,
)
from reverse_etl.sandbox.klaviyo_state import ProfileError, now_iso


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
        for start in range(0, len(profiles), CHUNK):
            done: list[str] = []
            stamp = now_iso()
            for i in range(start, min(start + CHUNK, len(profiles))):
                p = profiles[i]
                try:
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
        out: dict[str, Any] = {}
        for (pid, channel, kind), rec in self.state.subscriptions.items():
            if pid == profile_id:
                out.setdefault(channel, {})[kind] = {
                    "consent": rec["consent"],
                    "consent_timestamp": rec.get("consented_at"),
                    "method": "API",
                    "last_updated": rec["updated"],
                }
        return out

    async def get_profiles(self, call: Call) -> Response:
        conds = self._filter(call, PROFILE_FILTERS, PROFILE_FILTERS_DONE)
        with self.lock:
            rows = self._select_profiles(conds)
            rows = sort_rows(rows, call.arg("sort"))
            offset = decode_cursor(call.arg("page[cursor]"))
            page = paginate(rows, offset, page_size(call, 20))
            data = [self._profile_resource(p, call) for p in page.items]
        return jsonapi(
            {"data": data, "links": page_links(call.request, page.next_offset, page.prev_offset)}
        )

    def _select_profiles(self, conds: list[Condition]) -> list[dict[str, Any]]:
        state = self.state
        for c in conds:  # use the identifier indexes instead of scanning every profile
            if c.field in ("email", "phone_number", "external_id") and c.op in EQ_ANY:
                values = c.value if isinstance(c.value, list) else [c.value]
                ids = {state.find_by(c.field, v) for v in values if isinstance(v, str)}
                candidates = [state.profiles[i] for i in sorted(i for i in ids if i)]
                return [p for p in candidates if matches(p, conds, {})]
        return [p for p in state.profiles.values() if matches(p, conds, {})]


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

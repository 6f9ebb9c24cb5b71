"""Dotdigital's v3 insight data: bulk import, its status, and reading collections."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from starlette.responses import Response

from reverse_etl.sandbox.base import Call, JSONResponse
from reverse_etl.sandbox.dotdigital_common import (
    CHUNK,
    INSIGHT_STATUS,
    MAX_ACTIVE_INSIGHT_IMPORTS,
    DotdigitalBase,
    fail,
)
from reverse_etl.sandbox.dotdigital_state import has_nested_array, now
from reverse_etl.sandbox.jobs import DONE, FAILED, Job
from reverse_etl.sandbox.spec import SpecViolation, Violation


class InsightAPI(DotdigitalBase):
    """PUT /insightData/v3/import and the reads a test or client needs."""

    # --- insight data -----------------------------------------------------------------------

    async def import_insight(self, call: Call) -> Response:
        body = call.body
        records = body["records"]
        self._check_import_size(records, "records", "/records")
        name, scope, kind = body["collectionName"], body["collectionScope"], body["collectionType"]
        with self.lock:
            existing = self.state.collections.get(name.lower())
        if existing is not None and existing["collectionScope"] != scope:
            raise fail(
                400,
                "semantic",
                "collectionScopeMismatch",
                f"Collection {name!r} is {existing['collectionScope']}-scoped, not {scope}.",
                "/collectionScope",
            )
        if self.active_imports("insight-import") >= MAX_ACTIVE_INSIGHT_IMPORTS:
            return self._too_many("insightData", "insight imports are")
        job = Job("insight-import", len(records), fail=call.fault == "failed_job")
        job.data.update(collection=name, imported=0, failures=[])
        self.jobs.submit(job, self._insight_work(job, name, scope, kind, records))
        return JSONResponse({"importId": job.id}, 202)

    def _insight_work(
        self, job: Job, name: str, scope: str, kind: str, records: list[dict[str, Any]]
    ) -> Iterator[None]:
        state = self.state
        coll = state.collection(name, scope, kind)
        seen: set[tuple[int | None, str]] = set()
        for start in range(0, len(records), CHUNK):
            stamp = now()
            for rec in records[start : start + CHUNK]:
                owner, reason, details = self._insight_owner(scope, rec.get("contactIdentity"))
                if reason is None and (owner, rec["key"]) in seen:
                    reason, details = (
                        "DuplicateKey",
                        [f"Key '{rec['key']}' appears more than once in this import"],
                    )
                if reason is None and has_nested_array(rec["json"]):
                    reason, details = (
                        "JsonContainsNestedArray",
                        ["Arrays may not directly contain arrays"],
                    )
                if reason is not None:
                    collection_owner: dict[str, Any] = {"ownerType": scope}
                    if rec.get("contactIdentity"):
                        collection_owner["contactIdentity"] = rec["contactIdentity"]
                    job.data["failures"].append(
                        {
                            "collectionOwner": collection_owner,
                            "failureReason": reason,
                            "details": details,
                            "key": rec["key"],
                            "json": rec["json"],
                        }
                    )
                    continue
                seen.add((owner, rec["key"]))
                state.upsert_record(coll, owner, rec["key"], rec["json"], stamp)
                job.data["imported"] += 1
            yield

    def _insight_owner(
        self, scope: str, identity: Mapping[str, Any] | None
    ) -> tuple[int | None, str | None, list[str]]:
        if scope == "account":
            return None, None, []
        if not identity or identity.get("value") is None:
            return (
                None,
                "InvalidContactIdentifier",
                ["A contact-scoped record needs contactIdentity"],
            )
        ident, value = identity["identifier"], identity["value"]
        if ident not in ("email", "mobileNumber", "contactId"):
            return None, "InvalidContactIdentifier", [f"Unknown identifier '{ident}'"]
        cid = self.state.find(ident, value)
        if cid is None:
            reason = {
                "email": "ContactEmailDoesNotExist",
                "contactId": "ContactIdDoesNotExist",
            }.get(ident, "InvalidContactIdentifier")
            return None, reason, [f"No contact with {ident} '{value}'"]
        return cid, None, []

    async def get_insight_import(self, call: Call) -> Response:
        job = self._job_of("insight-import", call.path_params["importId"])
        phase = self.jobs.phase(job)
        doc: dict[str, Any] = {
            "importId": job.id,
            "status": INSIGHT_STATUS[phase],
            "collectionName": job.data["collection"],
        }
        if phase in (DONE, FAILED):
            imported = 0 if job.fail else job.data["imported"]
            doc["summary"] = {
                "totalRecords": job.total,
                "totalImported": imported,
                "totalRejected": job.total - imported,
            }
            if job.data["failures"] and not job.fail:
                doc["failures"] = job.data["failures"]
        return JSONResponse(doc)

    async def get_collections(self, call: Call) -> Response:
        with self.lock:
            out = [
                {
                    "collectionName": c["collectionName"],
                    "collectionType": c["collectionType"],
                    "collectionScope": c["collectionScope"],
                    "recordCount": len(c["records"]),
                }
                for c in self.state.collections.values()
            ]
        return JSONResponse(out)

    def _records_page(self, call: Call, records: list[dict[str, Any]]) -> Response:
        size = min(int(call.arg("limit") or 1000), 1000)
        marker = call.arg("marker")
        try:
            offset = int(base64.urlsafe_b64decode(marker.encode()).decode()) if marker else 0
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise fail(
                400, "parameter", "invalidMarker", "Invalid pagination marker.", "marker"
            ) from exc
        base = str(call.request.url.replace(query=""))

        def link(at: int) -> dict[str, str]:
            mark = base64.urlsafe_b64encode(str(at).encode()).decode()
            return {"marker": mark, "link": f"{base}?limit={size}&marker={mark}"}

        links = {"self": link(offset), "first": link(0)}
        if offset + size < len(records):
            links["next"] = link(offset + size)
        if offset > 0:
            links["prev"] = link(max(0, offset - size))
        return JSONResponse({"_links": links, "_items": records[offset : offset + size]})

    def _collection(self, name: str) -> dict[str, Any]:
        coll = self.state.collections.get(name.lower())
        if coll is None:
            raise SpecViolation(
                Violation(
                    404,
                    "not_found",
                    "The collection could not be found",
                    pointer=name,
                    code="collectionNotFound",
                )
            )
        return coll

    async def get_account_records(self, call: Call) -> Response:
        with self.lock:
            coll = self._collection(call.path_params["collectionName"])
            records = sorted(coll["records"].values(), key=lambda r: r["key"])
        return self._records_page(call, orjson.loads(orjson.dumps(records)))

    async def get_contact_records(self, call: Call) -> Response:
        with self.lock:
            cid = self._lookup(call.path_params["identifier"], call.path_params["value"])
            coll = self._collection(call.path_params["collectionName"])
            records = sorted(
                (r for r in coll["records"].values() if r.get("ownerContactId") == cid),
                key=lambda r: r["key"],
            )
        return self._records_page(call, orjson.loads(orjson.dumps(records)))

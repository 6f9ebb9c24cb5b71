"""Dotdigital's v3 contacts: bulk import, import status, and reading a contact back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from starlette.responses import Response

from reverse_etl.sandbox.base import Call, JSONResponse
from reverse_etl.sandbox.dotdigital_common import (
    CHUNK,
    CONTACT_STATUS,
    MAX_ACTIVE_CONTACT_IMPORTS,
    DotdigitalBase,
    fail,
)
from reverse_etl.sandbox.dotdigital_state import MERGE_OPTIONS, now
from reverse_etl.sandbox.jobs import Job

SUMMARY_KEYS = (
    "newContacts",
    "updatedContacts",
    "globallySuppressed",
    "invalidEntries",
    "duplicateIdentifiers",
)


class ContactsAPI(DotdigitalBase):
    """PUT /contacts/v3/import, GET /contacts/v3/import/{id}, GET /contacts/v3/{identifier}/{value}."""

    # --- contacts import --------------------------------------------------------------------

    async def import_contacts(self, call: Call) -> Response:
        body = call.body
        rows = body["contacts"]
        self._check_import_size(rows, "contacts", "/contacts")
        merge = body.get("mergeOption", "overwrite")
        if merge not in MERGE_OPTIONS:  # the schema's enum already says so; kept for validate=False
            raise fail(
                400, "body", "validationFailed", f"Unknown mergeOption {merge!r}.", "/mergeOption"
            )
        with self.lock:
            books = set(self.state.address_books)
        for n, row in enumerate(rows):
            if row["matchIdentifier"] not in ("email", "mobileNumber", "contactId"):
                raise fail(
                    400,
                    "semantic",
                    "invalidMatchIdentifier",
                    f"matchIdentifier {row['matchIdentifier']!r} is not an identifier of this account "
                    "(email, mobileNumber, contactId; the sandbox has no custom identifiers).",
                    f"/contacts/{n}/matchIdentifier",
                )
            for list_id in row.get("lists") or ():
                if list_id not in books:
                    raise fail(
                        400,
                        "not_found",
                        "listNotFound",
                        f"List {list_id} does not exist.",
                        f"/contacts/{n}/lists",
                    )
        if self.jobs.active("contacts-import") >= MAX_ACTIVE_CONTACT_IMPORTS:
            return self._too_many("contacts", "imports are")
        job = Job("contacts-import", len(rows), fail=call.fault == "failed_job")
        self.jobs.submit(job, self._contact_work(job, rows, merge))
        with self.lock:
            self.counters["contacts_received"] += len(rows)
        return JSONResponse({"importId": job.id}, 202)

    def _contact_work(self, job: Job, rows: list[dict[str, Any]], merge: str) -> Iterator[None]:
        """Apply the rows in chunks, keeping only the import report (not the payload)."""
        counts = dict.fromkeys(SUMMARY_KEYS, 0)
        report: dict[str, Any] = {"summary": counts, "created": [], "updated": [], "failures": []}
        job.data["report"] = report
        seen: set[tuple[str, str]] = set()
        for start in range(0, len(rows), CHUNK):
            stamp = now()
            for row in rows[start : start + CHUNK]:
                res = self.state.import_contact(row, merge, seen, stamp)
                ref = {"contactId": res.contact_id, "identifiers": res.identifiers}
                if res.outcome in ("created", "updated"):
                    counts["newContacts" if res.outcome == "created" else "updatedContacts"] += 1
                    report[res.outcome].append(ref)
                else:
                    counts[
                        "duplicateIdentifiers" if res.outcome == "duplicate" else "invalidEntries"
                    ] += 1
                if res.failures:
                    failure = {
                        "matchIdentifier": row["matchIdentifier"],
                        "identifiers": row["identifiers"],
                        "failures": res.failures,
                    }
                    if res.contact_id is not None:
                        failure["contactId"] = res.contact_id
                    report["failures"].append(failure)
            yield

    def _import_doc(self, job: Job) -> dict[str, Any]:
        status = CONTACT_STATUS[self.jobs.phase(job)]
        if status != "Finished":
            return {"importId": job.id, "status": status}
        return {"importId": job.id, "status": status, **job.data["report"]}

    async def get_contact_import(self, call: Call) -> Response:
        job = self._job_of("contacts-import", call.path_params["importId"])
        with self.lock:
            return JSONResponse(self._import_doc(job))

    async def get_contact(self, call: Call) -> Response:
        with self.lock:
            cid = self._lookup(call.path_params["identifier"], call.path_params["value"])
            return JSONResponse(self._contact_doc(self.state.contacts[cid]))

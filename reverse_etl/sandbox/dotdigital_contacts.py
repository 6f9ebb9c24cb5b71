"""Dotdigital's v3 contacts: bulk import, import status, reading a contact back, and
importing one contact (``PATCH /contacts/v3/{identifier}/{value}``, ``importContact``).

The single-contact import applies the same rules as a row of the bulk import
(``dotdigital_state``: data fields, channel statuses, resubscribing with
``channelProperties.email.resubscribeOptions``), synchronously: 201 with the contact when it
was created, 200 when updated. Where the bulk import lists a row's refusal in its report, this
call answers it: an invalid email or mobile number 400, an identifier another contact holds
409 ``contacts:idAlreadyExists`` (the spec's example), an unknown ``contactId`` 404, and a data
field value the account cannot take (unknown field, wrong type) 400 before anything changes
(UNCONFIRMED: the spec does not say how Dotdigital answers a bad data field here).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime
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
from reverse_etl.sandbox.spec import SpecViolation, Violation

#: PATCH's ``merge-option`` query values -> the bulk import's ``mergeOption``
MERGE_QUERY = {
    "overwrite": "overwrite",
    "overwrite-if-not-empty": "overwriteIfNotEmpty",
    "overwrite-if-empty": "overwriteIfEmpty",
}
#: what a single-contact import copies from its body into an import row
ROW_KEYS = ("dataFields", "channelProperties", "lists", "consentRecords", "preferences")

SUMMARY_KEYS = (
    "newContacts",
    "updatedContacts",
    "globallySuppressed",
    "invalidEntries",
    "duplicateIdentifiers",
)


class ContactsAPI(DotdigitalBase):
    """PUT /contacts/v3/import, GET /contacts/v3/import/{id}, GET and PATCH
    /contacts/v3/{identifier}/{value}."""

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
        if self.active_imports("contacts-import") >= MAX_ACTIVE_CONTACT_IMPORTS:
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
                res = self.state.import_contact(
                    row,
                    merge,
                    seen,
                    stamp,
                    skip_suppressed=self.settings.dotdigital_report_suppressed,
                )
                ref = {"contactId": res.contact_id, "identifiers": res.identifiers}
                if res.outcome == "suppressed":
                    counts["globallySuppressed"] += 1
                elif res.outcome in ("created", "updated"):
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

    async def list_contacts(self, call: Call) -> Response:
        """``GET /contacts/v3``: contacts in ascending ``contactId`` order ("All data is
        returned in ascending order", spec), ``limit`` a page (at most 5,000; 1,000 when not
        given, UNCONFIRMED) and ``_links.next.marker`` to the next. ``~modified=gte::T`` keeps
        those updated at or after T, ``~created`` those created then; not both (spec). Each
        contact has its key details (id, status, created, updated, identifiers), the
        ``include`` sets asked for, and the ``data-fields`` named (``[[ALL]]``: all)."""
        modified, created = call.arg("~modified"), call.arg("~created")
        if modified and created:
            raise fail(
                400,
                "parameter",
                "invalidParameter",
                "~created can't be used in conjunction with ~modified.",
                "~created",
            )
        field, since = ("updated", modified) if modified else ("created", created)
        floor = None if not since else datetime.fromisoformat(since.removeprefix("gte::"))
        limit = int(call.arg("limit") or 1000)
        after = _unmark(call.arg("marker"))
        include = set(filter(None, (call.arg("include") or "").split("|")))
        fields = set(filter(None, (call.arg("data-fields") or "").split("|")))
        with self.lock:
            found = [
                c
                for cid, c in sorted(self.state.contacts.items())
                if cid > after and (floor is None or datetime.fromisoformat(c[field]) >= floor)
            ]
            page = [self._listed(c, include, fields) for c in found[:limit]]
        links: dict[str, Any] = {
            "self": {"link": str(call.request.url)},
            "first": {"link": str(call.request.url.remove_query_params("marker"))},
        }
        if len(found) > limit:
            marker = _mark(page[-1]["contactId"])
            link = str(call.request.url.include_query_params(marker=marker))
            links["next"] = {"marker": marker, "link": link}
        return JSONResponse({"_items": page, "_links": links})

    def _listed(
        self, contact: dict[str, Any], include: set[str], fields: set[str]
    ) -> dict[str, Any]:
        doc = self._contact_doc(contact)
        out = {k: doc[k] for k in ("contactId", "status", "created", "updated", "identifiers")}
        out.update((k, doc[k]) for k in include if k in doc)
        if fields:
            every = "[[ALL]]" in fields
            wanted = {f.upper() for f in fields}
            out["dataFields"] = {
                k: v for k, v in doc["dataFields"].items() if every or k.upper() in wanted
            }
        return out

    # --- one contact ------------------------------------------------------------------------

    async def patch_contact(self, call: Call) -> Response:
        """``PATCH /contacts/v3/{identifier}/{value}``: create or update one contact."""
        identifier, value = call.path_params["identifier"], call.path_params["value"]
        body = call.body if isinstance(call.body, dict) else {}
        merge = MERGE_QUERY.get(call.arg("merge-option") or "overwrite")
        if merge is None:  # the spec's enum already says so; kept for validate=False
            raise fail(
                400, "parameter", "invalidParameter", "Unknown merge-option.", "merge-option"
            )
        with self.lock:
            if identifier == "contactId" or identifier not in ("email", "mobileNumber"):
                cid: int | None = self._lookup(identifier, value)  # 400 / 404 as GET answers
            else:
                cid = self.state.find(identifier, value)
            ids = {k: v for k, v in (body.get("identifiers") or {}).items() if k != "contactId"}
            if cid is None:
                ids[identifier] = value
                row: dict[str, Any] = {"matchIdentifier": identifier, "identifiers": ids}
            else:
                row = {"matchIdentifier": "contactId", "identifiers": {**ids, "contactId": cid}}
            row.update((k, body[k]) for k in ROW_KEYS if k in body)
            for list_id in row.get("lists") or ():
                if list_id not in self.state.address_books:
                    raise fail(
                        400,
                        "not_found",
                        "listNotFound",
                        f"List {list_id} does not exist.",
                        "/lists",
                    )
            refused = self.state.field_failures(row.get("dataFields") or {})
            if refused:
                raise fail(
                    400,
                    "semantic",
                    refused[0]["failureCode"],
                    "; ".join(f["description"] for f in refused),
                    "/dataFields",
                )
            res = self.state.import_contact(row, merge, set(), now())
            if res.contact_id is None:
                failure = res.failures[0]
                code = failure["failureCode"]
                if code == "duplicateIdentifier":
                    raise SpecViolation(
                        Violation(409, "semantic", failure["description"], code="idAlreadyExists")
                    )
                raise fail(400, "semantic", code, failure["description"], "/identifiers")
            self.counters["contacts_received"] += 1
            doc = self._contact_doc(self.state.contacts[res.contact_id])
        return JSONResponse(doc, 201 if res.outcome == "created" else 200)


def _mark(contact_id: int) -> str:
    """The opaque page marker: the last contact id shown, base64 (as the spec's example)."""
    return base64.b64encode(f"after:{contact_id}".encode()).decode()


def _unmark(marker: str | None) -> int:
    if not marker:
        return 0
    try:
        return int(base64.b64decode(marker).decode().removeprefix("after:"))
    except (ValueError, UnicodeDecodeError):
        raise fail(
            400, "parameter", "invalidMarker", "The marker is not valid.", "marker"
        ) from None

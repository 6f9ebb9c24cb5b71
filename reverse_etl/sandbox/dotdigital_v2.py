"""Dotdigital's v2 address books (lists), contact data fields, and unsubscribed and suppressed
contacts.

Taking contacts out of a book (``POST /v2/address-books/{id}/contacts/delete``) is a job, as
the spec has it ("This will run in the background"): answered 202 with an
``ApiBulkContactDeletion`` (a GUID and ``Started``), its status read at ``GET
/v2/contacts/deletion/{deletionRequestId}``: ``Started`` until the job's time
(``job_seconds``) is up and the members have left the book, then ``Completed``; under a
``failed_job`` fault ``Failed``, nothing removed. The spec's fourth status,
``NotAvailableInThisVersion``, is never answered. The members leave when the job completes,
not when it is accepted, so a client that takes the 202 for the removal sees them still there.

``GET /v2/contacts/unsubscribed-since/{date}`` and ``GET /v2/contacts/suppressed-since/{date}``
answer a JSON array of ``ApiContactSuppression`` (``{suppressedContact: ApiContact with
dataFields null, dateRemoved, reason}``) for the contacts whose email removal (see
``dotdigital_state``) is strictly after ``date`` (the spec's ``date-time``: a date alone or a
time without an offset is refused as a parameter violation; with validation off such a time
is taken as UTC), paged by ``select`` (1-1000, default 1000; 400 outside) and ``skip`` (default 0).
unsubscribed-since lists reason ``Unsubscribed`` only; suppressed-since lists every reason,
``Unsubscribed`` included (UNCONFIRMED: the spec says "suppressed contacts ... along with the
reason for suppression" without listing the reasons). A contact resubscribed since is not
listed. Rows come oldest removal first, ties by contact id (UNCONFIRMED: the spec and docs give
no order; clients page with ``skip`` and should not rely on it).
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from starlette.responses import Response

from reverse_etl.sandbox.base import Call, JSONResponse
from reverse_etl.sandbox.dotdigital_common import CHUNK, V2_STATUS, DotdigitalBase, fail
from reverse_etl.sandbox.dotdigital_state import DotdigitalError
from reverse_etl.sandbox.jobs import DONE, FAILED, PROCESSING, QUEUED, Job
from reverse_etl.sandbox.settings import SandboxSettings

REMOVAL = "address-book-removal"  # the job kind
# the spec's ApiBulkContactDeletionStatuses (Started, Completed, Failed,
# NotAvailableInThisVersion) by job phase
DELETION_STATUS = {
    QUEUED: "Started",
    PROCESSING: "Started",
    DONE: "Completed",
    FAILED: "Failed",
}


class AddressBooksAPI(DotdigitalBase):
    """/v2/address-books..., /v2/contacts/deletion/{id}, /v2/data-fields and
    /v2/contacts/unsubscribed-since|suppressed-since/{date}."""

    def __init__(self, settings: SandboxSettings | None = None):
        # removals accepted whose work is not handed to the job runner yet (``wait_idle``)
        self._removals_due = threading.Condition()
        self._removals_pending = 0
        super().__init__(settings)

    # --- v2 address books and data fields ---------------------------------------------------

    def _book(self, raw_id: str) -> dict[str, Any]:
        book = self.state.address_books.get(int(raw_id))
        if book is None:
            raise fail(
                404,
                "not_found",
                "ERROR_ADDRESSBOOK_NOT_FOUND",
                f"Address book {raw_id} does not exist.",
            )
        return book

    def _book_doc(self, book: Mapping[str, Any]) -> dict[str, Any]:
        return {**book, "contacts": len(self.state.members[book["id"]])}

    @staticmethod
    def _select_skip(call: Call) -> tuple[int, int]:
        select, skip = int(call.arg("select") or 1000), int(call.arg("skip") or 0)
        if not 1 <= select <= 1000 or skip < 0:
            raise fail(
                400,
                "parameter",
                "ERROR_PARAMETER_INVALID",
                "select must be 1-1000 and skip >= 0.",
                "select",
            )
        return select, skip

    async def get_address_books(self, call: Call) -> Response:
        select, skip = self._select_skip(call)
        with self.lock:
            books = [self._book_doc(b) for b in self.state.address_books.values()]
        return JSONResponse(books[skip : skip + select])

    async def create_address_book(self, call: Call) -> Response:
        with self.lock:
            try:
                book = self.state.create_address_book(
                    call.body.get("name", ""), call.body.get("visibility")
                )
            except DotdigitalError as e:
                raise fail(e.status, "semantic", e.code, e.description, "name") from e
            return JSONResponse(self._book_doc(book), 201)

    async def get_address_book(self, call: Call) -> Response:
        with self.lock:
            return JSONResponse(self._book_doc(self._book(call.path_params["id"])))

    async def get_book_contacts(self, call: Call) -> Response:
        select, skip = self._select_skip(call)
        full = (call.arg("withFullData") or "false").lower() == "true"
        with self.lock:
            book = self._book(call.path_params["addressBookId"])
            ids = list(self.state.members[book["id"]])[skip : skip + select]
            out = [self._v2_contact(cid, full) for cid in ids]
        return JSONResponse(out)

    def _v2_contact(self, cid: int, full: bool) -> dict[str, Any]:
        """Contact ``cid`` as v2's ``ApiContact`` (``dataFields`` null unless ``full``)."""
        c = self.state.contacts[cid]
        email = c["channelProperties"]["email"]
        status = email["status"]
        return {
            "id": cid,
            "email": c["identifiers"].get("email"),
            "optInType": email["optInType"],
            "emailType": email["emailType"],
            "dataFields": [{"key": k, "value": v} for k, v in c["dataFields"].items()]
            if full
            else None,
            "status": V2_STATUS.get(status, status[:1].upper() + status[1:]),
        }

    # --- v2 unsubscribed and suppressed contacts ---------------------------------------------

    async def get_unsubscribed_since(self, call: Call) -> Response:
        """``GET /v2/contacts/unsubscribed-since/{date}``: removals with reason Unsubscribed."""
        return self._removed_since(call, frozenset({"Unsubscribed"}))

    async def get_suppressed_since(self, call: Call) -> Response:
        """``GET /v2/contacts/suppressed-since/{date}``: every removal, unsubscribes included."""
        return self._removed_since(call, None)

    def _removed_since(self, call: Call, reasons: frozenset[str] | None) -> Response:
        """``ApiContactSuppression`` rows of contacts removed after ``date`` (module doc)."""
        select, skip = self._select_skip(call)
        raw = call.path_params["date"]
        try:
            since = datetime.fromisoformat(raw)
        except ValueError:  # the spec's format: date-time
            raise fail(
                400,
                "parameter",
                "ERROR_PARAMETER_INVALID",
                f"date {raw!r} is not a date-time.",
                "date",
            ) from None
        with self.lock:
            rows = self.state.removed_since(since, reasons)[skip : skip + select]
            out = [
                {"suppressedContact": self._v2_contact(cid, False), **removal.doc()}
                for cid, removal in rows
            ]
        return JSONResponse(out)

    async def remove_contacts(self, call: Call) -> Response:
        with self.lock:
            book_id = self._book(call.path_params["addressBookId"])["id"]
        ids = [int(x) for x in call.body]
        # ids not in the book (or in no book) are passed over; the id is a GUID, as the spec's
        # ApiBulkContactDeletion says
        job = Job(REMOVAL, len(ids), fail=call.fault == "failed_job", id=str(uuid.uuid4()))
        if job.fail:  # ends Failed when its time is up, nothing removed
            self.jobs.submit(job, None)
        else:
            self._submit_when_due(job, self._removal_work(book_id, ids))
        return JSONResponse({"id": job.id, "status": DELETION_STATUS[QUEUED]}, 202)

    def _removal_work(self, book_id: int, ids: list[int]) -> Iterator[None]:
        members = self.state.members[book_id]
        for n, cid in enumerate(ids):
            members.pop(cid, None)
            if n % CHUNK == CHUNK - 1:
                yield
        yield

    def _submit_when_due(self, job: Job, work: Iterator[None]) -> None:
        """Accept ``job`` now (pollable at once: ``Started`` while not started) and hand its
        work to the job runner when the job's time is up, so the members leave the book when
        the job completes, not when it is accepted; it reads ``Completed`` once they left."""
        with self.lock:
            self.jobs.jobs[job.id] = job
        with self._removals_due:
            self._removals_pending += 1

        def due() -> None:
            try:
                self.jobs.submit(job, work)
            except Exception:  # a sandbox bug: kept for the tests, as the request pipeline does
                with self.lock:
                    self.internal_errors.append(traceback.format_exc())
            finally:
                with self._removals_due:
                    self._removals_pending -= 1
                    self._removals_due.notify_all()

        asyncio.get_running_loop().call_later(self.jobs.duration, due)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every accepted job's work is applied, removals whose time is not up yet
        included."""
        deadline = time.monotonic() + timeout
        with self._removals_due:
            if not self._removals_due.wait_for(
                lambda: self._removals_pending == 0, max(0.0, deadline - time.monotonic())
            ):
                return False
        return super().wait_idle(max(0.0, deadline - time.monotonic()))

    async def get_contact_deletion(self, call: Call) -> Response:
        job_id = call.path_params["deletionRequestId"]
        try:
            uuid.UUID(job_id)
        except ValueError:  # the spec's format: guid
            raise fail(
                400,
                "parameter",
                "ERROR_PARAMETER_INVALID",
                f"deletionRequestId {job_id!r} is not a GUID.",
                "deletionRequestId",
            ) from None
        with self.lock:
            job = self.jobs.jobs.get(job_id.lower())
            if job is None or job.kind != REMOVAL:
                raise fail(
                    404,
                    "not_found",
                    "ERROR_RESOURCE_NOT_FOUND",
                    f"The deletion request '{job_id}' could not be found.",
                )
            return JSONResponse({"id": job.id, "status": DELETION_STATUS[self.jobs.phase(job)]})

    async def remove_contact(self, call: Call) -> Response:
        with self.lock:
            book_id = self._book(call.path_params["addressBookId"])["id"]
            self.state.members[book_id].pop(int(call.path_params["contactId"]), None)
        return Response(status_code=204)

    async def get_data_fields(self, call: Call) -> Response:
        with self.lock:
            return JSONResponse(list(self.state.data_fields.values()))

    async def create_data_field(self, call: Call) -> Response:
        body = call.body
        with self.lock:
            try:
                df = self.state.create_data_field(
                    body.get("name", ""),
                    body.get("type"),
                    body.get("visibility"),
                    body.get("defaultValue"),
                )
            except DotdigitalError as e:
                raise fail(e.status, "semantic", e.code, e.description, "name") from e
        return JSONResponse(df, 201)

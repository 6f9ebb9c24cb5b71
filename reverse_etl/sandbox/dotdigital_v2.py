"""Dotdigital's v2 address books (lists) and contact data fields."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from starlette.responses import Response

from reverse_etl.sandbox.base import Call, JSONResponse
from reverse_etl.sandbox.dotdigital_common import CHUNK, V2_STATUS, DotdigitalBase, fail
from reverse_etl.sandbox.dotdigital_state import DotdigitalError
from reverse_etl.sandbox.jobs import Job


class AddressBooksAPI(DotdigitalBase):
    """/v2/address-books... and /v2/data-fields."""

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
            out = []
            for cid in ids:
                c = self.state.contacts[cid]
                email = c["channelProperties"]["email"]
                out.append(
                    {
                        "id": cid,
                        "email": c["identifiers"].get("email"),
                        "optInType": email["optInType"],
                        "emailType": email["emailType"],
                        "dataFields": [{"key": k, "value": v} for k, v in c["dataFields"].items()]
                        if full
                        else None,
                        "status": V2_STATUS.get(
                            c["status"], c["status"][:1].upper() + c["status"][1:]
                        ),
                    }
                )
        return JSONResponse(out)

    async def remove_contacts(self, call: Call) -> Response:
        with self.lock:
            book_id = self._book(call.path_params["addressBookId"])["id"]
        ids = [int(x) for x in call.body]
        # ids not in the book (or in no book) are passed over; the id is a GUID, as the spec's
        # ApiBulkContactDeletion says
        job = Job("address-book-removal", len(ids), id=str(uuid.uuid4()))

        def work() -> Iterator[None]:
            members = self.state.members[book_id]
            for n, cid in enumerate(ids):
                members.pop(cid, None)
                if n % CHUNK == CHUNK - 1:
                    yield
            yield

        self.jobs.submit(job, work())
        return JSONResponse({"id": job.id, "status": "Started"}, 202)

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

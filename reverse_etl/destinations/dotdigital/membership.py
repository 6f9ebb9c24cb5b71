"""Taking contacts out of a Dotdigital address book (``mode: mirror``): members that left the
view leave ``destination.list``, and nothing else changes.

Removal is not unsubscribing and not deleting: the v2 API keeps them apart ("Delete contacts
from list", ``POST /v2/address-books/{id}/contacts/delete``, beside "Unsubscribe contact from
list", ``.../contacts/unsubscribe``, and "Delete contact", ``DELETE /v2/contacts/{id}``).
Dotdigital's API reference (as dotMailer) says of taking contacts out of an address book:
"Removing the contacts will not cause the contact to be suppressed unless you specify this in
the request" (http://www.dotmailer.co.uk/api/address_books/remove_all_contacts_from_address_book.aspx,
the SOAP call, whose suppression is opt-in through ``preventAddressbookResubscribe`` and
``totalUnsubscribe`` flags; the v2 removal has no such flags), and its help centre tells
removing contacts from address books apart from deleting them from the account
(https://support.dotdigital.com/hc/en-gb/articles/360000151920). The contact, its
data fields and its channel status stay as they are, and the ``unsubscribed_list`` book is
never touched: it records who did not consent, which stays true after they left the view.

Dotdigital counts every call against an hourly budget (about 2,000, ``pacing.py``), so the
contact ids of members without a ``dest_id`` are found with whichever costs fewer calls:

* one ``GET /contacts/v3/email/{email}`` a member: the contact's id and the books it is in (a
  contact that does not exist, 404, or is not in the book is removed already); or
* the book's members, 1,000 a page (``GET /v2/address-books/{id}/contacts?select=1000``), when
  its size (``GET /v2/address-books/{id}``) makes that fewer calls. The listing pages with
  ``skip``, so a book that shrank meanwhile may have shifted a member past us: the size is read
  again afterwards and, if it changed, the members not seen are looked up one by one.

Then ``POST /v2/address-books/{id}/contacts/delete`` with up to ``MAX_REMOVE`` contact ids a
call: Dotdigital answers 202 with an ``ApiBulkContactDeletion`` (a job id) and removes them in
the background ("for larger lists may take some minutes", the v2 spec). The 202 is not the
acknowledgement: a removal that fails in the background leaves the members in the book, and
the engine forgets a member once ``remove`` reports it removed. So each job is polled to its
end (``GET /v2/contacts/deletion/{id}``, the shared ``destinations.jobs.wait``): ``Completed``
acknowledges its members; ``Failed`` (or a status this API version cannot name,
``NotAvailableInThisVersion``, or none) is a job that failed as a whole and is submitted again,
up to ``Destination.job_attempts`` submissions, then ``DestinationError``: no member of the
removal is reported removed, all are tried again next run. Every poll is a call of the hourly
budget: all of a removal's calls are sent before the first job is polled, so while the first
runs the others do too and are mostly found completed at their first poll, and polls back off
from ``Destination.poll_interval`` to ``poll_max_seconds``. A job still ``Started`` is waited
for as long as an import is (the connection's ``import_timeout_minutes``, ``Waits``), then
``DestinationError`` (``jobs.JobTimeout``) says so: no member of the removal is reported
removed, all are tried again next run.

The v2 API states no maximum of contact ids a call; 5,000 is the v3 contacts bulk delete's
``maxItems``, and a refusal naming no contact is narrowed down by halving the call, so a lower
real limit costs calls, not members (``MAX_REFUSED_CALLS`` bounds what one removal spends on
that). A contact id not in the book is no error. A refusal of a single contact is
that member's row error (``destination_rejected``); a refusal of the call as a whole (the book
is gone: 404; 401, 403) or a call failing after the retries raise ``DestinationError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pyarrow as pa

from reverse_etl.destinations import jobs
from reverse_etl.destinations.base import Destination, Leaving, Removed, Request
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.destinations.dotdigital.imports import Waits
from reverse_etl.destinations.http import decoded, error_detail
from reverse_etl.errors import DestinationError
from reverse_etl.transform.rowerrors import RowError

MAX_REMOVE = 5000  # contact ids a removal call (see the module docstring)
PAGE = 1000  # the v2 listing's largest ``select``
# Refusals that may be about some of the contacts, narrowed down by halving the call; at most
# this many refused calls a removal (a refusal of every contact would otherwise cost thousands
# of calls of the hourly budget): the rest become row errors, tried again next run.
SPLIT_STATUS = frozenset({400, 413, 422})
MAX_REFUSED_CALLS = 32


def removal_path(book_id: int) -> str:
    return f"/v2/address-books/{book_id}/contacts/delete"


def deletion_path(job_id: str) -> str:
    return f"/v2/contacts/deletion/{quote(job_id, safe='')}"


@dataclass
class _Member:
    row: int
    ident: Any
    email: str | None
    contact: int | None  # the contact id to take out of the book; None: nothing to take out
    error: RowError | None = None


@dataclass
class Membership:
    """Removal from one address book; ``column`` names the sync's email column in row errors.
    ``poll_interval`` and ``attempts`` pace the removal jobs (None: ``Destination``'s, read
    when a removal runs)."""

    client: DotdigitalClient
    column: str
    poll_interval: float | None = None
    attempts: int | None = None
    # how long a removal job is waited for, and with which clock (None: ``Waits()``'s)
    waits: Waits | None = None

    # ------------------------------------------------------------------ the dry run

    def requests(self, book_id: int, members: pa.Table) -> Iterator[Request]:
        """The removal calls; 0 stands for a contact id a lookup would find (as for a book not
        looked up yet)."""
        ids = [_contact_id(m.dest_id) or 0 for m in Leaving.rows(members)]
        for start in range(0, len(ids), MAX_REMOVE):
            chunk = ids[start : start + MAX_REMOVE]
            yield Request("POST", removal_path(book_id), orjson.dumps(chunk), len(chunk))

    # ------------------------------------------------------------------ removing

    def remove(self, book_id: int, table: pa.Table) -> Removed:
        members = _members(table)
        unknown = [m for m in members if m.contact is None]
        for m in unknown:
            if m.email is None:
                m.error = self._error(m, "no email kept for this member: it cannot be found")
        self._find(book_id, [m for m in unknown if m.error is None])
        self._delete(book_id, [m for m in members if m.contact is not None and m.error is None])
        return Removed.of(members)

    def _find(self, book_id: int, members: list[_Member]) -> None:
        """The contact ids of ``members`` that are in the book, in the fewest calls."""
        wanted: dict[str, list[_Member]] = {}
        for m in members:
            wanted.setdefault(m.email.lower(), []).append(m)  # type: ignore[union-attr]
        if len(wanted) > 2:  # else the size look-up alone costs as much as the look-ups
            size = self._book_size(book_id)
            if math.ceil(size / PAGE) + 1 < len(wanted):
                seen = self._scan(book_id, wanted)
                if self._book_size(book_id) == size:
                    return
                wanted = {e: ms for e, ms in wanted.items() if e not in seen}
        for email, ms in wanted.items():
            self._look_up(book_id, email, ms)

    def _book_size(self, book_id: int) -> int:
        book = self.client.json("GET", f"/v2/address-books/{book_id}")
        return int(book.get("contacts") or 0)

    def _scan(self, book_id: int, wanted: dict[str, list[_Member]]) -> set[str]:
        """Page through the book; the wanted emails found in it, their members given its id."""
        seen: set[str] = set()
        skip = 0
        while True:
            page = self.client.json(
                "GET",
                f"/v2/address-books/{book_id}/contacts",
                params={"select": str(PAGE), "skip": str(skip)},
            )
            for contact in page:
                email = str(contact.get("email") or "").lower()
                if email in wanted:
                    seen.add(email)
                    for m in wanted[email]:
                        m.contact = int(contact["id"])
            if len(page) < PAGE:
                return seen
            skip += PAGE

    def _look_up(self, book_id: int, email: str, members: list[_Member]) -> None:
        """One contact by email: its id if it is in the book; not found or not in the book,
        there is nothing to remove."""
        path = f"/contacts/v3/email/{quote(email, safe='@')}"
        response = self.client.call("GET", path)
        if response.status_code == 404:
            return
        if response.status_code >= 400:
            for m in members:
                m.error = self._error(
                    m, f"Dotdigital refused the look-up: {error_detail(response)}"
                )
            return
        contact = decoded(response, f"Dotdigital GET {path}")
        if any(int(book.get("id", -1)) == book_id for book in contact.get("lists") or []):
            for m in members:
                m.contact = int(contact["contactId"])

    def _delete(self, book_id: int, members: list[_Member]) -> None:
        """Take ``members`` out of the book and see each removal job to its end; raises
        ``DestinationError`` when a job keeps failing (nobody reported removed)."""
        owners: dict[int, list[_Member]] = {}
        for m in members:
            owners.setdefault(m.contact, []).append(m)  # type: ignore[arg-type]
        ids = list(owners)
        pending = [ids[i : i + MAX_REMOVE] for i in range(0, len(ids), MAX_REMOVE)]
        running: list[_Removal] = []
        refused_calls = 0
        while pending:
            chunk = pending.pop(0)
            response = self.client.call("POST", removal_path(book_id), chunk)
            if response.status_code < 400:
                running.append(_Removal(self, book_id, chunk, _job_id(response), attempts=1))
                continue
            if response.status_code not in SPLIT_STATUS:  # the book is gone (404), the API
                raise _refused(book_id, response)  # user may not write to it (403) ...
            refused_calls += 1
            message = f"Dotdigital refused the removal: {error_detail(response)}"
            if refused_calls >= MAX_REFUSED_CALLS:  # not a few bad contacts: all left, next run
                chunk = chunk + [cid for rest in pending for cid in rest]
                pending = []
            elif len(chunk) > 1:
                half = len(chunk) // 2  # the refusal names no contact: halve the call
                pending[:0] = [chunk[:half], chunk[half:]]
                continue
            for cid in chunk:
                for m in owners[cid]:
                    m.error = self._error(m, message)
        attempts = Destination.job_attempts if self.attempts is None else self.attempts
        interval = Destination.poll_interval if self.poll_interval is None else self.poll_interval
        w = self.waits or Waits(poll_first=interval)
        patience = jobs.Patience(
            first=interval,
            ceiling=max(w.poll_max, interval),
            growth=2.0,
            timeout=w.import_timeout,
            clock=w.clock,
            sleep=w.sleep,
        )
        for job in running:  # submitted all at once: they run while the first is polled
            try:
                jobs.wait(job, attempts=attempts, poll_interval=interval, patience=patience)
            except jobs.JobTimeout as late:
                raise jobs.JobTimeout(
                    f"{late}. The limit (the connection's import_timeout_minutes) is "
                    f"{w.import_timeout / 60:g} minutes: raise it to wait longer, or look at "
                    f"the address book {book_id} in Dotdigital",
                    late.waited,
                    late.doc,
                ) from None

    def _error(self, m: _Member, message: str) -> RowError:
        return RowError(m.row, m.ident, self.column, m.email, "destination_rejected", message)


@dataclass
class _Removal:
    """One accepted removal call as the shared job loop (``jobs.wait``) sees it."""

    membership: Membership
    book_id: int
    contacts: list[int]
    id: str
    attempts: int

    @property
    def what(self) -> str:
        n, book = len(self.contacts), self.book_id
        return f"Dotdigital removal of {n} contact{'s' * (n != 1)} from address book {book}"

    def start(self) -> None:
        """Send the removal again (it failed as a whole): the same contact ids, a new job."""
        client = self.membership.client
        response = client.call("POST", removal_path(self.book_id), self.contacts)
        if response.status_code >= 400:
            raise _refused(self.book_id, response)
        self.id = _job_id(response)
        self.attempts += 1

    def status(self) -> tuple[jobs.State, dict[str, Any]]:
        doc = self.membership.client.json("GET", deletion_path(self.id))
        status = doc.get("status") if isinstance(doc, dict) else None
        if status == "Completed":
            return "done", doc
        if status == "Started":
            return "running", doc
        # Failed; or NotAvailableInThisVersion (the v2 API's word for a status it cannot name)
        # or none: not known to have completed, so not taken for it
        return "failed", doc if isinstance(doc, dict) else {"status": status}


def _job_id(response: httpx.Response) -> str:
    """The removal job's id from the 202's ``ApiBulkContactDeletion``."""
    doc = decoded(response, "Dotdigital removal from an address book")
    job_id = doc.get("id") if isinstance(doc, dict) else None
    if not job_id:
        raise DestinationError(
            "Dotdigital accepted a removal from an address book without a job id to follow it "
            f"by: {error_detail(response)}"
        )
    return str(job_id)


def _refused(book_id: int, response: httpx.Response) -> DestinationError:
    return DestinationError(
        f"Dotdigital refused removing contacts from address book {book_id}: "
        f"{error_detail(response)}"
    )


def _contact_id(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _members(table: pa.Table) -> list[_Member]:
    return [
        _Member(m.row, m.ident, m.key or None, _contact_id(m.dest_id)) for m in Leaving.rows(table)
    ]

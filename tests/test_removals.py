"""``mode: mirror`` removals, destination side: ``Destination.remove`` against the Klaviyo and
Dotdigital sandboxes over loopback HTTP, after a normal run has put the members into the list.

A removal takes exactly the given members out of the sync's list and nothing else: the profile
or contact stays, with its consent and its other lists. A member the destination does not have,
or that is not in the list, counts as removed. Every request is on spec (the rig fixture
asserts the sandbox recorded no violation). Dotdigital removes in a background job: a member
counts as removed only once its job completed, never on the 202 alone."""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pytest

from reverse_etl.destinations.base import Destination, Removed
from reverse_etl.destinations.dotdigital import membership as dd_membership
from reverse_etl.destinations.klaviyo import membership as kl_membership
from reverse_etl.engine import make_destination
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, DestinationError
from reverse_etl.sandbox.faults import FaultInjector
from reverse_etl.sandbox.spec import load_spec
from tests.sandboxes import (
    EVERY_FAULT,
    FAULT_SEEDS,
    Rig,
    email_of,
    every_fault,
    fast_clients,
    fast_faulty_clients,
    faults_met,
    profile_rows,
    set_faults,
    sync_entry,
)

KL_MAPPING = {"email": "email", "first_name": "first_name", "phone": "phone_number"}
DD_MAPPING = {"email": "email", "first_name": "FIRSTNAME"}
KL_DELETE = "/relationships/profiles"
DD_DELETE = "/contacts/delete"
DD_JOB = "/v2/contacts/deletion/"  # a removal job's status


def members(keys: Sequence[str | None], dest_ids: Sequence[str | None] | None = None) -> pa.Table:
    """The table the engine hands ``remove``: identifier, match value, destination id."""
    return pa.table(
        {
            "__id": pa.array([k or f"id-{i}" for i, k in enumerate(keys)], pa.string()),
            "key": pa.array(list(keys), pa.string()),
            "dest_id": pa.array(list(dest_ids or [None] * len(keys)), pa.string()),
        }
    )


@contextmanager
def destination(rig: Rig, sync: str, *, prepare: bool = True) -> Iterator[Destination]:
    assert rig.project is not None
    dest = make_destination(rig.project, rig.project.sync(sync))
    try:
        if prepare:
            dest.prepare()
        yield dest
    finally:
        dest.close()


def remove(rig: Rig, sync: str, table: pa.Table) -> Removed:
    with destination(rig, sync) as dest:
        removed = dest.remove(table)
    assert rig.sandbox.wait_idle(30)  # Dotdigital removes in the background
    return removed


def spec_problems(rig: Rig, method: str, path: str, body: Any) -> list[str]:
    """What the vendor's spec refuses in a dry run's request: its route and its body."""
    for ep in rig.sandbox.endpoints():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(ep.template)) + "$"
        if ep.method == method and ep.spec and re.match(pattern, path):
            op = load_spec(ep.spec).operation(ep.method, ep.template)
            first = op.body_validator().first_error(body)
            return [] if first is None else [f"{first.pointer}: {first.message}"]
    return [f"{method} {path}: no such endpoint"]


def calls(rig: Rig, method: str, fragment: str) -> list[Any]:
    return [r for r in rig.sandbox.request_log if r.method == method and fragment in r.path]


# =========================================================================== Klaviyo


def kl_sync(**extra: Any) -> dict[str, Any]:
    mapping = extra.pop("mapping", KL_MAPPING)
    return sync_entry("people", "klaviyo", dict(mapping), destination={"list": "VIP Club"}, **extra)


def kl_members(rig: Rig) -> set[str]:
    return {p["email"] for p in rig.sandbox.list_members("VIP Club")}


def kl_synced(klaviyo: Any, n: int, **sync: Any) -> Rig:
    rig = klaviyo()
    rig.table(profile_rows(range(n)))
    rig.configure([kl_sync(**sync)])
    assert rig.run("people").exit_code == EXIT_OK
    rig.sandbox.reset_log()
    return rig


def test_klaviyo_removes_exactly_the_members_and_keeps_profiles_and_consent(klaviyo):
    rig = kl_synced(klaviyo, 20, consent={"email": "email_consent"})
    profiles, consent = rig.sandbox.profiles(), rig.sandbox.subscriptions()
    assert len(consent) > 0
    leaving = [email_of(n) for n in range(0, 20, 3)]

    removed = remove(rig, "people", members(leaving))

    assert (sorted(removed.ids), removed.errors) == (sorted(leaving), [])
    assert kl_members(rig) == {email_of(n) for n in range(20)} - set(leaving)
    assert rig.sandbox.profiles() == profiles  # no profile deleted or changed
    assert rig.sandbox.subscriptions() == consent  # nobody unsubscribed or suppressed
    assert [lst["name"] for lst in rig.sandbox.lists()] == ["VIP Club"]
    assert len(calls(rig, "GET", "/api/profiles")) == 1  # seven emails, one look-up
    assert len(calls(rig, "DELETE", KL_DELETE)) == 1
    assert [r.method for r in rig.sandbox.request_log if r.method != "GET"] == ["DELETE"]


def test_klaviyo_member_not_in_the_list_or_unknown_counts_as_removed(klaviyo):
    rig = kl_synced(klaviyo, 10)
    assert (removed := remove(rig, "people", members([email_of(1)]))).ids == [email_of(1)]
    known = rig.sandbox.profile_by_email(email_of(2))
    assert known is not None

    removed = remove(
        rig,
        "people",
        members(
            [email_of(1), "never.synced@example.com", email_of(2), email_of(3), email_of(4)],
            # 1: not in the list any more; 2: its Klaviyo id, no look-up; 3: a stale id (the
            # profile was merged away): found again by email; 4: a stale id and its own
            [None, None, known["id"], "XXXXXX", "YYYYYY"],
        ),
    )

    assert removed.errors == []
    assert sorted(removed.ids) == sorted(
        [email_of(1), "never.synced@example.com", email_of(2), email_of(3), email_of(4)]
    )
    assert kl_members(rig) == {email_of(n) for n in (0, *range(5, 10))}
    assert len(rig.sandbox.profiles()) == 10
    assert rig.sandbox.counters["not_found"] >= 1  # the stale ids met their 404


@pytest.mark.parametrize(
    ("identifier", "field", "key"),
    [("phone", "phone_number", "+1415555{:04d}"), ("notes", "external_id", "ext-{}")],
)
def test_klaviyo_finds_members_by_the_identifiers_field(klaviyo, identifier, field, key):
    rig = klaviyo()
    rows = profile_rows(range(6))
    if field == "external_id":
        rows = [r[:15] + (f"ext-{n}",) + r[16:] for n, r in enumerate(rows)]  # notes column
    rig.table(rows)
    mapping = {**KL_MAPPING, identifier: field}
    rig.configure([kl_sync(mapping=mapping, identifier=identifier)])
    assert rig.run("people").exit_code == EXIT_OK

    removed = remove(rig, "people", members([key.format(n) for n in (1, 4)]))

    assert removed.errors == [] and len(removed.ids) == 2
    assert kl_members(rig) == {email_of(n) for n in (0, 2, 3, 5)}


def test_klaviyo_over_1000_members_are_removed_1000_a_call(klaviyo):
    rig = kl_synced(klaviyo, 2500, batch_size=2500)
    leaving = [email_of(n) for n in range(2100)]

    removed = remove(rig, "people", members(leaving))

    assert (len(removed.ids), removed.errors) == (2100, [])
    assert kl_members(rig) == {email_of(n) for n in range(2100, 2500)}
    assert len(calls(rig, "DELETE", KL_DELETE)) == 3  # 1,000 + 1,000 + 100: the spec's maximum
    assert len(calls(rig, "GET", "/api/profiles")) == 21  # 100 values a look-up, one page each


def test_klaviyo_refused_profile_is_a_row_error_and_the_rest_go(klaviyo, monkeypatch):
    rig = kl_synced(klaviyo, 6)
    poison = rig.sandbox.profile_by_email(email_of(2))
    assert poison is not None

    with destination(rig, "people") as dest:
        original = dest.client.call  # type: ignore[attr-defined]

        def refuse_one(op: str, method: str, path: str, body: Any = None, *a: Any, **k: Any):
            if method == "DELETE" and body and poison["id"] in body.decode():
                ids = [x["id"] for x in orjson.loads(body)["data"]]
                error = {
                    "status": 400,
                    "code": "invalid",
                    "title": "Invalid input.",
                    "detail": "This profile cannot be removed.",
                    "source": {"pointer": f"/data/{ids.index(poison['id'])}/id"},
                }
                return httpx.Response(400, json={"errors": [error]})
            return original(op, method, path, body, *a, **k)

        monkeypatch.setattr(dest.client, "call", refuse_one)  # type: ignore[attr-defined]
        removed = dest.remove(members([email_of(n) for n in range(5)]))

    assert sorted(removed.ids) == [email_of(n) for n in (0, 1, 3, 4)]
    [error] = removed.errors
    assert (error.identifier, error.reason, error.value) == (
        email_of(2),
        "destination_rejected",
        email_of(2),
    )
    assert "cannot be removed" in error.message
    assert kl_members(rig) == {email_of(2), email_of(5)}


def test_klaviyo_list_gone_stops_with_a_destination_error(klaviyo):
    rig = kl_synced(klaviyo, 3)
    with destination(rig, "people") as dest:
        dest.list_id = "nope00"  # type: ignore[attr-defined]
        with pytest.raises(DestinationError, match="refused removing members from list nope00"):
            dest.remove(members([email_of(0)]))
    assert len(kl_members(rig)) == 3


def test_klaviyo_removal_requests_are_on_spec_with_placeholders(klaviyo):
    rig = kl_synced(klaviyo, 3)
    with destination(rig, "people", prepare=False) as dest:
        requests = list(dest.removal_requests(members([email_of(n) for n in range(1500)])))
    assert [(r.method, r.rows) for r in requests] == [("DELETE", 1000), ("DELETE", 500)]
    assert requests[0].path == "/api/lists/<id of list 'VIP Club'>/relationships/profiles"
    first = orjson.loads(requests[0].body)["data"][0]
    assert first == {"type": "profile", "id": f"<profile id of email {email_of(0)!r}>"}
    for r in requests:
        assert spec_problems(rig, r.method, r.path, orjson.loads(r.body)) == []
    assert spec_problems(rig, "DELETE", requests[0].path, {"data": [{"id": "x"}]})  # the check
    assert rig.sandbox.request_log == []  # nothing sent, nothing looked up


@pytest.mark.parametrize("seed", FAULT_SEEDS)
def test_klaviyo_removals_through_injected_faults(klaviyo, monkeypatch, seed):
    fast_faulty_clients(monkeypatch)
    monkeypatch.setattr(kl_membership, "MAX_LIST_MEMBERS", 20)  # many calls to meet faults
    rig = klaviyo(**every_fault(seed))
    set_faults(rig.sandbox, 0.0)
    rig.table(profile_rows(range(1200)))
    rig.configure([kl_sync(batch_size=1200)])
    assert rig.run("people").exit_code == EXIT_OK
    set_faults(rig.sandbox, 0.3, EVERY_FAULT, seed)
    leaving = [email_of(n) for n in range(0, 1200, 2)]

    removed = remove(rig, "people", members(leaving))

    assert (sorted(removed.ids), removed.errors) == (sorted(leaving), [])
    assert kl_members(rig) == {email_of(n) for n in range(1, 1200, 2)}
    assert len(rig.sandbox.profiles()) == 1200
    assert sum(faults_met(rig.sandbox).values()) >= 2, faults_met(rig.sandbox)


# =========================================================================== Dotdigital


def dd_sync(**extra: Any) -> dict[str, Any]:
    destination = {"list": "Newsletter", **extra.pop("options", {})}
    return sync_entry("people", "dotdigital", dict(DD_MAPPING), destination=destination, **extra)


def dd_members(rig: Rig, book: str = "Newsletter") -> set[str]:
    return {c["identifiers"]["email"] for c in rig.sandbox.address_book_members(book)}


def dd_synced(
    dotdigital: Any, n: int, *, settings: dict[str, Any] | None = None, **sync: Any
) -> Rig:
    rig = dotdigital(**(settings or {}))
    rig.table(profile_rows(range(n)))
    rig.configure([dd_sync(**sync)])
    assert rig.run("people").exit_code == EXIT_OK
    rig.sandbox.reset_log()
    return rig


def without_lists(contacts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "lists"} for c in contacts]


def test_dotdigital_removes_from_the_book_only_and_keeps_contacts_and_consent(dotdigital):
    # email_consent cycles yes, no, NULL: consenting members go to Newsletter, the others to
    # the unsubscribed_list book, which removal leaves alone
    rig = dd_synced(
        dotdigital,
        12,
        consent={"email": "email_consent"},
        options={"unsubscribed_list": "No consent", "consent_mode": "channel"},
    )
    contacts = rig.sandbox.contacts()
    in_newsletter = {email_of(n) for n in range(0, 12, 3)}
    assert dd_members(rig) == in_newsletter
    leaving = [email_of(n) for n in (0, 1, 2, 3)]  # two consenting, two not

    removed = remove(rig, "people", members(leaving))

    assert (sorted(removed.ids), removed.errors) == (sorted(leaving), [])
    assert dd_members(rig) == in_newsletter - {email_of(0), email_of(3)}
    assert dd_members(rig, "No consent") == {email_of(n) for n in range(12)} - in_newsletter
    after = rig.sandbox.contacts()
    assert without_lists(after) == without_lists(contacts)  # none deleted, consent unchanged
    assert [r.method for r in rig.sandbox.request_log if r.method != "GET"] == ["POST"]
    [post] = calls(rig, "POST", DD_DELETE)
    assert post.status == 202
    assert [r.status for r in calls(rig, "GET", DD_JOB)][-1:] == [200]  # polled to its end


def test_dotdigital_member_not_in_the_book_or_unknown_counts_as_removed(dotdigital):
    rig = dd_synced(dotdigital, 6)
    remove(rig, "people", members([email_of(1)]))
    rig.sandbox.reset_log()

    removed = remove(rig, "people", members([email_of(1), "never.synced@example.com"]))

    assert (sorted(removed.ids), removed.errors) == (
        sorted([email_of(1), "never.synced@example.com"]),
        [],
    )
    assert dd_members(rig) == {email_of(n) for n in (0, 2, 3, 4, 5)}
    assert len(calls(rig, "GET", "/contacts/v3/email/")) == 2  # two members: looked up each
    assert calls(rig, "POST", DD_DELETE) == []  # neither is in the book: nothing to send
    assert rig.sandbox.counters["not_found"] == 1


def test_dotdigital_finds_contacts_in_the_fewest_calls(dotdigital, monkeypatch):
    monkeypatch.setattr(dd_membership, "PAGE", 10)  # a 50-contact book is five pages
    rig = dd_synced(dotdigital, 50)

    few = remove(rig, "people", members([email_of(n) for n in range(4)]))  # 4 look-ups < 1+5+1
    assert len(calls(rig, "GET", "/contacts/v3/email/")) == 4
    looked = [r for r in calls(rig, "GET", "/contacts") if DD_JOB not in r.path]
    assert looked == calls(rig, "GET", "/contacts/v3/email/")  # the book was not paged
    rig.sandbox.reset_log()

    leaving = [email_of(n) for n in range(10, 40)] + ["never.synced@example.com"]
    many = remove(rig, "people", members(leaving))  # the book in pages: 1 + 5 + 1 calls

    assert calls(rig, "GET", "/contacts/v3/") == []
    assert len(calls(rig, "GET", "/v2/address-books/")) == 1 + 5 + 1
    assert few.errors == many.errors == []
    assert sorted(many.ids) == sorted(leaving)
    assert dd_members(rig) == {email_of(n) for n in (*range(4, 10), *range(40, 50))}


def test_dotdigital_book_that_shrinks_while_paged_is_looked_up_again(dotdigital, monkeypatch):
    monkeypatch.setattr(dd_membership, "PAGE", 10)
    rig = dd_synced(dotdigital, 50)
    sandbox = rig.sandbox
    book = next(b["id"] for b in sandbox.address_books() if b["name"] == "Newsletter")
    shifted = False

    original = dd_membership.Membership._scan

    def scan_while_someone_removes(self: Any, book_id: int, wanted: Any) -> Any:
        json = self.client.json

        def paged(method: str, path: str, body: Any = None, params: Any = None, **k: Any) -> Any:
            nonlocal shifted
            page = json(method, path, body, params, **k)
            if (params or {}).get("skip") == "0":  # after the first page another writer takes
                with sandbox.lock:  # the first ten out: the later pages shift by ten
                    for cid in list(sandbox.state.members[book])[:10]:
                        sandbox.state.members[book].pop(cid)
                shifted = True
            return page

        monkeypatch.setattr(self.client, "json", paged)
        return original(self, book_id, wanted)

    monkeypatch.setattr(dd_membership.Membership, "_scan", scan_while_someone_removes)
    leaving = [email_of(n) for n in range(10, 40)]
    removed = remove(rig, "people", members(leaving))

    assert shifted and removed.errors == [] and sorted(removed.ids) == sorted(leaving)
    assert dd_members(rig) == {email_of(n) for n in range(40, 50)}
    assert len(calls(rig, "GET", "/contacts/v3/email/")) == 10  # the ones the shift hid


def test_dotdigital_over_5000_members_by_contact_id_are_split(dotdigital):
    rig = dd_synced(dotdigital, 6000, batch_size=6000)
    ids = {c["identifiers"]["email"]: str(c["contactId"]) for c in rig.sandbox.contacts()}
    leaving = [email_of(n) for n in range(5500)]

    removed = remove(rig, "people", members(leaving, [ids[e] for e in leaving]))

    assert (len(removed.ids), removed.errors) == (5500, [])
    assert dd_members(rig) == {email_of(n) for n in range(5500, 6000)}
    assert [r.status for r in calls(rig, "POST", DD_DELETE)] == [202, 202]
    assert calls(rig, "GET", "/contacts/v3/") == []  # known ids need no look-up
    assert len(rig.sandbox.contacts()) == 6000


def test_dotdigital_refused_contact_is_a_row_error_found_by_halving(dotdigital, monkeypatch):
    rig = dd_synced(dotdigital, 20)
    ids = {c["identifiers"]["email"]: c["contactId"] for c in rig.sandbox.contacts()}
    poison = ids[email_of(7)]

    with destination(rig, "people") as dest:
        original = dest.client.call  # type: ignore[attr-defined]

        def refuse_one(method: str, path: str, body: Any = None, *a: Any, **k: Any):
            if path.endswith(DD_DELETE) and poison in body:  # names no contact, as v2 does
                message = {"message": "The contact cannot be removed. ERROR_PARAMETER_INVALID"}
                return httpx.Response(400, json=message)
            return original(method, path, body, *a, **k)

        monkeypatch.setattr(dest.client, "call", refuse_one)  # type: ignore[attr-defined]
        removed = dest.remove(members([email_of(n) for n in range(16)]))
    assert rig.sandbox.wait_idle(30)

    assert sorted(removed.ids) == sorted(email_of(n) for n in range(16) if n != 7)
    [error] = removed.errors
    assert (error.identifier, error.reason) == (email_of(7), "destination_rejected")
    assert "cannot be removed" in error.message
    assert dd_members(rig) == {email_of(n) for n in (7, *range(16, 20))}


def test_dotdigital_refusing_every_contact_costs_bounded_calls(dotdigital, monkeypatch):
    rig = dd_synced(dotdigital, 300)
    sent: list[int] = []

    with destination(rig, "people") as dest:

        def refuse_all(method: str, path: str, body: Any = None, *a: Any, **k: Any):
            assert path.endswith(DD_DELETE)
            sent.append(len(body))
            return httpx.Response(400, json={"message": "No. ERROR_PARAMETER_INVALID"})

        ids = {c["identifiers"]["email"]: str(c["contactId"]) for c in rig.sandbox.contacts()}
        monkeypatch.setattr(dest.client, "call", refuse_all)  # type: ignore[attr-defined]
        leaving = [email_of(n) for n in range(300)]
        removed = dest.remove(members(leaving, [ids[e] for e in leaving]))

    assert removed.ids == [] and len(removed.errors) == 300  # tried again next run
    assert len(sent) == dd_membership.MAX_REFUSED_CALLS  # not a call per contact
    assert len(dd_members(rig)) == 300


def test_klaviyo_removal_refused_as_a_whole_raises(klaviyo, monkeypatch):
    rig = kl_synced(klaviyo, 5)
    with destination(rig, "people") as dest:
        original = dest.client.call  # type: ignore[attr-defined]

        def forbidden(op: str, method: str, *a: Any, **k: Any):
            if method == "DELETE":
                error = {"status": 403, "code": "permission_denied", "detail": "No lists:write."}
                return httpx.Response(403, json={"errors": [error]})
            return original(op, method, *a, **k)

        monkeypatch.setattr(dest.client, "call", forbidden)  # type: ignore[attr-defined]
        with pytest.raises(DestinationError, match="403"):
            dest.remove(members([email_of(n) for n in range(5)]))
    assert len(kl_members(rig)) == 5


def test_dotdigital_removal_requests_are_on_spec_with_placeholders(dotdigital):
    rig = dd_synced(dotdigital, 3)
    with destination(rig, "people", prepare=False) as dest:
        table = members([email_of(n) for n in range(5200)], ["17"] + [None] * 5199)
        requests = list(dest.removal_requests(table))
    assert [(r.method, r.path, r.rows) for r in requests] == [
        ("POST", "/v2/address-books/0/contacts/delete", 5000),
        ("POST", "/v2/address-books/0/contacts/delete", 200),
    ]
    assert orjson.loads(requests[0].body)[:3] == [17, 0, 0]
    for r in requests:
        assert spec_problems(rig, r.method, r.path, orjson.loads(r.body)) == []
    assert spec_problems(rig, "POST", requests[0].path, ["17"])  # the check checks
    assert rig.sandbox.request_log == []


@pytest.mark.parametrize("seed", FAULT_SEEDS)
def test_dotdigital_removals_through_injected_faults(dotdigital, monkeypatch, seed):
    fast_faulty_clients(monkeypatch)
    monkeypatch.setattr(dd_membership, "MAX_REMOVE", 8)  # many calls to meet faults
    rig = dotdigital(**every_fault(seed))
    set_faults(rig.sandbox, 0.0)
    rig.table(profile_rows(range(400)))
    rig.configure([dd_sync()])
    assert rig.run("people").exit_code == EXIT_OK
    set_faults(rig.sandbox, 0.3, EVERY_FAULT, seed)
    leaving = [email_of(n) for n in range(0, 400, 2)]

    removed = remove(rig, "people", members(leaving))

    assert (sorted(removed.ids), removed.errors) == (sorted(leaving), [])
    assert dd_members(rig) == {email_of(n) for n in range(1, 400, 2)}
    assert len(rig.sandbox.contacts()) == 400
    assert sum(faults_met(rig.sandbox).values()) >= 2, faults_met(rig.sandbox)


def test_dotdigital_api_down_raises_and_removes_nothing(dotdigital, monkeypatch):
    rig = dd_synced(dotdigital, 5)
    fast_clients(monkeypatch, max_attempts=3)
    set_faults(rig.sandbox, 1.0, ("500",))
    ids = {c["identifiers"]["email"]: str(c["contactId"]) for c in rig.sandbox.contacts()}
    with pytest.raises(DestinationError, match="failed after 3 attempts"):
        remove(rig, "people", members([email_of(0)], [ids[email_of(0)]]))
    assert len(dd_members(rig)) == 5


# --------------------------------------------------------------------------- Dotdigital jobs


class FailFirst(FaultInjector):
    """Makes the first ``n`` removal jobs fail (``failed_job``, drawn only on the removal
    call among the calls a removal makes), then injects nothing."""

    def __init__(self, n: int):
        super().__init__(1.0, ("failed_job",), 0)
        self.left = n

    def draw(self, eligible: Collection[str]) -> str | None:
        if self.left <= 0:
            return None
        kind = super().draw(eligible)
        if kind is not None:
            self.left -= 1
        return kind


def watch_removal_jobs(
    rig: Rig, dest: Destination, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, str, set[str]]]:
    """Every status read of a removal job the destination makes, as it made it: the job id,
    its status and the book's members at that moment."""
    seen: list[tuple[str, str, set[str]]] = []
    original = dest.client.json  # type: ignore[attr-defined]

    def json(method: str, path: str, *a: Any, **k: Any) -> Any:
        doc = original(method, path, *a, **k)
        if DD_JOB in path:
            seen.append((doc["id"], doc["status"], dd_members(rig)))
        return doc

    monkeypatch.setattr(dest.client, "json", json)  # type: ignore[attr-defined]
    return seen


def test_dotdigital_removal_counts_only_once_its_job_completed(dotdigital, monkeypatch):
    # 25 s of vendor time at the rig's speedup of 50: a removal job runs 0.5 s, several polls
    rig = dd_synced(dotdigital, 6, settings={"job_seconds": 25.0})
    leaving = [email_of(n) for n in (1, 4)]

    with destination(rig, "people") as dest:
        seen = watch_removal_jobs(rig, dest, monkeypatch)
        started = time.monotonic()
        removed = dest.remove(members(leaving))
        took = time.monotonic() - started
        after = dd_members(rig)  # no wait_idle: the removal is done once remove returns

    assert (sorted(removed.ids), removed.errors) == (sorted(leaving), [])
    assert after == {email_of(n) for n in (0, 2, 3, 5)}
    assert took >= rig.sandbox.jobs.duration
    statuses = [status for _, status, _ in seen]
    assert len(statuses) >= 3 and set(statuses[:-1]) == {"Started"}, statuses
    assert statuses[-1] == "Completed"
    for _, _, book in seen[:-1]:  # accepted (202) and polled: still in the book
        assert set(leaving) <= book
    assert not set(leaving) & seen[-1][2]
    assert len({job for job, _, _ in seen}) == 1  # one job, no resubmission
    [post] = calls(rig, "POST", DD_DELETE)
    assert post.status == 202


def test_dotdigital_failed_removal_job_is_submitted_again_and_then_removes(dotdigital, monkeypatch):
    rig = dd_synced(dotdigital, 6)
    ids = {c["identifiers"]["email"]: str(c["contactId"]) for c in rig.sandbox.contacts()}
    leaving = [email_of(n) for n in (0, 3)]
    rig.sandbox.faults = FailFirst(1)

    with destination(rig, "people") as dest:
        seen = watch_removal_jobs(rig, dest, monkeypatch)
        removed = dest.remove(members(leaving, [ids[e] for e in leaving]))

    assert (sorted(removed.ids), removed.errors) == (sorted(leaving), [])
    assert dd_members(rig) == {email_of(n) for n in (1, 2, 4, 5)}
    assert rig.sandbox.counters["fault_failed_job"] == 1
    assert [r.status for r in calls(rig, "POST", DD_DELETE)] == [202, 202]  # the same call again
    jobs = list(dict.fromkeys(job for job, _, _ in seen))
    assert len(jobs) == 2
    first = [(status, book) for job, status, book in seen if job == jobs[0]]
    assert first[-1][0] == "Failed" and all(set(leaving) <= book for _, book in first)
    assert [status for job, status, _ in seen if job == jobs[1]][-1] == "Completed"


def test_dotdigital_removal_job_that_keeps_failing_raises_and_reports_nobody(dotdigital):
    rig = dd_synced(dotdigital, 6)
    set_faults(rig.sandbox, 1.0, ("failed_job",))
    # the last is not in the book (it would count as removed), and is not reported either
    leaving = [email_of(1), email_of(2), "never.synced@example.com"]

    with destination(rig, "people") as dest:
        outcome: list[Removed] = []
        with pytest.raises(
            DestinationError, match=r"failed as a whole 3 times \(status 'Failed'\)"
        ):
            outcome.append(dest.remove(members(leaving)))

    assert outcome == []  # nobody reported removed, so nobody is forgotten
    assert rig.sandbox.wait_idle(30)
    assert dd_members(rig) == {email_of(n) for n in range(6)}
    posts = calls(rig, "POST", DD_DELETE)
    assert len(posts) == Destination.job_attempts == 3  # submitted, then again twice
    assert rig.sandbox.counters["fault_failed_job"] == 3
    assert len({r.path for r in calls(rig, "GET", DD_JOB)}) == 3  # each job polled to its end


def test_dotdigital_mirror_run_keeps_a_member_whose_removal_job_failed(dotdigital):
    rig = dotdigital()
    rig.table(profile_rows(range(10)))
    rig.configure([dd_sync(mode="mirror")])
    assert rig.run("people").exit_code == EXIT_OK
    rig.table(profile_rows([n for n in range(10) if n != 4]))  # 4 left the view

    set_faults(rig.sandbox, 1.0, ("failed_job",))  # every removal job fails at Dotdigital
    failed = rig.run("people")
    assert failed.exit_code == EXIT_FAILED, failed.record.message
    assert failed.record.counts.removed == 0
    assert email_of(4) in dd_members(rig)

    set_faults(rig.sandbox, 0.0)  # the snapshot still holds 4: the next run removes it
    again = rig.run("people")
    assert again.exit_code == EXIT_OK, again.record.message
    assert again.record.counts.removed == 1
    assert dd_members(rig) == {email_of(n) for n in range(10) if n != 4}
    assert rig.run("people").record.counts.removed == 0  # removed once: forgotten now

"""Dotdigital's opt-ins read back (``readback.read_opt_ins``): the contacts modified since the
last read, dated by their newest consent record, against the sandbox over loopback with its
spec checks on. The end-to-end rule (an older warehouse "no" is held back) is in
test_consent_sandboxes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reverse_etl.consent.memory import ConsentMemory
from reverse_etl.destinations.dotdigital import readback
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.sandbox import DotdigitalSandbox, SandboxServer, SandboxSettings
from reverse_etl.state import StateStore

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
LIST = "/contacts/v3"


class Side:
    def __init__(self, sandbox: DotdigitalSandbox, client: DotdigitalClient, memory: ConsentMemory):
        self.sandbox, self.client, self.memory = sandbox, client, memory

    def add(self, *emails: str) -> None:
        with self.sandbox.lock:
            seen: set[tuple[str, str]] = set()
            for e in emails:
                row = {"matchIdentifier": "email", "identifiers": {"email": e}}
                self.sandbox.state.import_contact(
                    row, "overwrite", seen, datetime.now(UTC).isoformat()
                )

    def read(self) -> tuple[int, int]:
        """(people whose standing changed, list calls made)."""
        before = len(self.sandbox.request_log)
        changed = readback.read_opt_ins(self.client, self.memory)
        calls = [r for r in self.sandbox.request_log[before:] if r.path == LIST]
        return changed, len(calls)

    def opt_ins(self, *emails: str) -> dict[str, datetime]:
        table = self.memory.opt_ins("email", list(emails))
        return dict(zip(table["person"].to_pylist(), table["at"].to_pylist(), strict=True))


@pytest.fixture
def side(tmp_path: Path) -> Iterator[Side]:
    sandbox = DotdigitalSandbox(SandboxSettings())
    store = StateStore("sqlite:///state.db", root=tmp_path)
    with SandboxServer(sandbox) as server:
        s = sandbox.settings
        conn = DotdigitalConnection(
            type="dotdigital", username=s.username, password=s.password, base_url=server.base_url
        )
        client = DotdigitalClient(conn)
        try:
            yield Side(sandbox, client, ConsentMemory(store, "dotdigital:test"))
        finally:
            client.close()
            store.close()
    assert sandbox.violations == [], sandbox.violations


def test_a_form_subscribe_is_an_opt_in_dated_by_its_consent_record(side: Side) -> None:
    side.add("a@example.com", "b@example.com", "c@example.com")
    side.sandbox.act_as_person("a@example.com", "subscribe", at=T0)
    side.sandbox.act_as_person("c@example.com", "unsubscribe", at=T0)
    changed, calls = side.read()
    # b is subscribed (Dotdigital's default) with no record to date it: not an opt-in
    assert (changed, calls) == (1, 1)
    assert side.opt_ins("a@example.com", "b@example.com", "c@example.com") == {"a@example.com": T0}


def test_the_next_read_asks_only_for_what_was_modified_since(side: Side) -> None:
    side.add("a@example.com", "b@example.com")
    side.sandbox.act_as_person("a@example.com", "subscribe", at=T0)
    assert side.read() == (1, 1)
    assert side.read() == (0, 1)  # nothing new: the newest contact again, nothing changed
    # the cursor is the newest contact's ``updated`` (to the millisecond), not the epoch
    newest = max(c["updated"] for c in side.sandbox.contacts())
    cursor = side.memory.cursor(readback.OPT_INS)
    assert cursor is not None and cursor[:23] == newest[:23] and cursor.endswith("Z")
    side.sandbox.act_as_person("b@example.com", "subscribe", at=T0 + timedelta(days=1))
    assert side.read() == (1, 1)
    assert side.opt_ins("b@example.com") == {"b@example.com": T0 + timedelta(days=1)}


def test_the_list_is_followed_page_by_page(side: Side, monkeypatch: Any) -> None:
    monkeypatch.setattr(readback, "CONTACTS_PAGE", 2)
    emails = [f"p{n}@example.com" for n in range(5)]
    side.add(*emails)
    for n, e in enumerate(emails):
        side.sandbox.act_as_person(e, "subscribe", at=T0 + timedelta(minutes=n))
    assert side.read() == (5, 3)
    assert side.opt_ins(*emails) == {e: T0 + timedelta(minutes=n) for n, e in enumerate(emails)}


def test_a_newer_opt_in_replaces_an_opt_out_and_an_older_one_does_not(side: Side) -> None:
    side.add("a@example.com", "b@example.com")
    # a unsubscribes, then subscribes again through a form; b's form record predates its
    # unsubscribe (read back first), and it is subscribed again by something undated
    side.sandbox.act_as_person("a@example.com", "unsubscribe", at=T0)
    side.sandbox.act_as_person("b@example.com", "subscribe", at=T0)
    side.sandbox.act_as_person("b@example.com", "unsubscribe", at=T0 + timedelta(hours=1))
    readback.read_back(side.client, side.memory)
    side.sandbox.act_as_person("a@example.com", "subscribe", at=T0 + timedelta(hours=2))
    with side.sandbox.lock:
        cid = side.sandbox.state.find("email", "b@example.com")
        side.sandbox.state.contacts[cid]["channelProperties"]["email"]["status"] = "subscribed"
    side.read()
    assert side.opt_ins("a@example.com", "b@example.com") == {
        "a@example.com": T0 + timedelta(hours=2)
    }
    out = side.memory.opt_outs("email", ["a@example.com", "b@example.com"])
    assert out["person"].to_pylist() == ["b@example.com"]

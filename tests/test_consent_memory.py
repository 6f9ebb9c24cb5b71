"""The consent memory on both state stores (SQLite, PostgreSQL): our own opt-outs are
remembered by one raw upsert, keeping what was read back and moving only ``ours_at``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reverse_etl.consent.memory import ConsentMemory, Seen
from reverse_etl.state import StateStore

T0 = datetime(2025, 3, 1, 10, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def memory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ConsentMemory]:
    if request.param == "sqlite":
        store = StateStore("sqlite:///state.db", root=tmp_path)
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        store = StateStore(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        yield ConsentMemory(store, f"klaviyo:test:{uuid.uuid4().hex[:8]}")  # an account of its own
    finally:
        store.close()


def test_our_opt_outs_mark_what_was_read_and_add_who_was_not(memory: ConsentMemory) -> None:
    memory.remember("s", [Seen("a@x.com", "email", "unsubscribed", T0, "UNSUBSCRIBE")], "c1")
    ours = T0 + timedelta(days=1)
    memory.remember_ours("email", ["a@x.com", "b@x.com", "b@x.com", ""], ours)
    out = memory.opt_outs("email", ["a@x.com", "b@x.com"]).to_pylist()
    # a keeps the opt-out read back (time, reason) with our send beside it; b was only sent
    assert out == [{"person": "a@x.com", "at": T0, "reason": "UNSUBSCRIBE", "ours_at": ours}]
    assert memory.statements() == [Seen("a@x.com", "email", "unsubscribed", T0, "UNSUBSCRIBE")]
    # b's opt-out read back later keeps ours_at: it is ours
    later = ours + timedelta(minutes=5)
    memory.remember("s", [Seen("b@x.com", "email", "unsubscribed", later, "UNSUBSCRIBE")], "c2")
    again = ours + timedelta(days=1)
    memory.remember_ours("email", ["a@x.com"], again)
    out = {r["person"]: r for r in memory.opt_outs("email", ["a@x.com", "b@x.com"]).to_pylist()}
    assert (out["a@x.com"]["ours_at"], out["b@x.com"]["ours_at"]) == (again, ours)
    assert out["b@x.com"]["at"] == later
    # another channel is another statement
    assert memory.opt_outs("sms", ["a@x.com"]).num_rows == 0

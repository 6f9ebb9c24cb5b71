"""The synced-state snapshot: a row the destination already holds as it is costs no API call,
whatever re-reads it (a lookback, a moved modified_at, a full refresh); a changed row, a
changed sync definition or --resend sends again; the snapshot only remembers what the
destination acknowledged, so nothing is lost after a failure at any point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from reverse_etl.config import load_project
from reverse_etl.destinations.base import Removed
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.engine import RunOptions, RunResult, run_sync
from reverse_etl.errors import EXIT_FAILED
from reverse_etl.state import StateStore
from tests.helpers import (
    FakeDestination,
    at,
    people_db,
    person,
    project_data,
    sync_entry,
    write_project,
)


def email(n: int) -> str:
    return f"person{n:05d}@example.com"


class Env:
    def __init__(self, root: Path, rows: list[tuple[Any, ...]], **sync: Any):
        self.root = root
        self.db = people_db(root, rows)
        self.configure(**sync)
        self.store = StateStore(self.project.state.url, root=root)

    def configure(self, **sync: Any) -> None:
        write_project(self.root, project_data(syncs=[sync_entry(**sync)]))
        self.project = load_project(None, self.root, env={})

    def sql(self, statement: str) -> None:
        con = duckdb.connect(str(self.db))
        try:
            con.execute(statement)
        finally:
            con.close()

    def run(self, fake: FakeDestination | None = None, **options: Any) -> RunResult:
        fake = fake or FakeDestination()
        self.last = fake
        return run_sync(
            self.project,
            "people",
            self.store,
            RunOptions(**options),
            destination_factory=lambda project, s: fake,
        )


@pytest.fixture()
def env(tmp_path: Path):
    made: list[Env] = []

    def make(rows: list[tuple[Any, ...]], **sync: Any) -> Env:
        e = Env(tmp_path, rows, **sync)
        made.append(e)
        return e

    yield make
    for e in made:
        e.store.close()


def counts(result: RunResult) -> tuple[int, int, int, int]:
    c = result.record.counts
    assert c.read == c.sent + c.unchanged + c.rejected, c
    return c.read, c.sent, c.unchanged, c.rejected


def test_a_moved_cursor_without_a_change_sends_nothing(env) -> None:
    e = env([person(i) for i in range(20)], batch_size=7)
    assert counts(e.run()) == (20, 20, 0, 0)
    # profiles.sql moves modified_at on every order: the rows are read again, not sent
    e.sql("UPDATE people SET modified_at = modified_at + INTERVAL 1 HOUR")
    assert counts(e.run()) == (20, 0, 20, 0)
    assert e.last.received == []
    assert e.last.batches == [0, 0, 0]  # every batch read, none of its rows sent
    # and the watermark moved past them: the next run reads nothing
    assert counts(e.run()) == (0, 0, 0, 0)


def test_one_changed_value_sends_exactly_that_row(env) -> None:
    e = env([person(i) for i in range(20)])
    e.run()
    e.sql(
        f"UPDATE people SET first_name = 'Changed', modified_at = modified_at + INTERVAL 1 HOUR "
        f"WHERE email = '{email(7)}'"
    )
    e.sql("UPDATE people SET modified_at = modified_at + INTERVAL 1 HOUR")
    assert counts(e.run()) == (20, 1, 19, 0)
    assert [r["first_name"] for r in e.last.received] == ["Changed"]


def test_a_consent_change_alone_sends_the_row(env) -> None:
    e = env([person(i) for i in range(5)])
    e.run()
    e.sql(f"UPDATE people SET email_consent = 'no', modified_at = now() WHERE email = '{email(3)}'")
    assert counts(e.run()) == (1, 1, 0, 0)
    assert e.last.received_ids() == [email(3)]


def test_a_lookback_rereads_without_resending(env) -> None:
    e = env([person(i) for i in range(10)], lookback_minutes=60)
    e.run()
    result = e.run()
    assert counts(result) == (10, 0, 10, 0)  # the window re-read them all
    assert e.last.received == []


def test_full_refresh_skips_unchanged_rows_unless_resend(env) -> None:
    e = env([person(i) for i in range(10)])
    e.run()
    assert counts(e.run(full_refresh=True)) == (10, 0, 10, 0)
    assert counts(e.run(full_refresh=True, resend=True)) == (10, 10, 0, 0)
    assert sorted(e.last.received_ids()) == [email(i) for i in range(10)]


def test_a_changed_definition_sends_every_row_again(env) -> None:
    e = env([person(i) for i in range(10)])
    e.run()
    e.configure(mapping={"email": "email", "first_name": "last_name", "phone": "phone_number"})
    assert counts(e.run(full_refresh=True)) == (10, 10, 0, 0)
    assert {r["last_name"] for r in e.last.received} == {f"Name{i}" for i in range(10)}


def test_rows_the_destination_refused_are_sent_again_when_read_again(env) -> None:
    e = env([person(i) for i in range(6)], lookback_minutes=60)
    first = e.run(FakeDestination(reject_ids=[email(2)]))
    assert first.record.counts.failed == 1
    again = e.run()  # the lookback reads all six: only the refused one was never held
    assert counts(again) == (6, 1, 5, 0)
    assert e.last.received_ids() == [email(2)]


def test_rows_rejected_before_sending_are_reported_every_time_they_are_read(env) -> None:
    rows = [person(i) for i in range(6)]
    rows[4] = person(4, email="not-an-email")
    e = env(rows, lookback_minutes=60)
    assert counts(e.run()) == (6, 5, 0, 1)
    again = e.run()
    assert counts(again) == (6, 0, 5, 1)
    assert again.by_reason["invalid_email"] == 1


def test_a_failed_batch_is_not_remembered(env) -> None:
    e = env([person(i) for i in range(30)], batch_size=10)
    failing = FakeDestination(fail_on_batch=2, drain_on_failure=False)
    assert e.run(failing).exit_code == EXIT_FAILED
    # batch 2 reached the API but was never acknowledged: it is sent again, batch 1 is not
    result = e.run(full_refresh=True)
    assert counts(result) == (30, 20, 10, 0)
    assert sorted(e.last.received_ids()) == [email(i) for i in range(10, 30)]


def test_a_dry_run_diffs_and_remembers_nothing(env) -> None:
    e = env([person(i) for i in range(8)])
    dry = e.run(dry_run=True)
    assert counts(dry) == (8, 8, 0, 0)
    assert counts(e.run()) == (8, 8, 0, 0)  # the dry run remembered nothing
    e.sql(f"UPDATE people SET first_name = 'X', modified_at = now() WHERE email = '{email(1)}'")
    e.sql("UPDATE people SET modified_at = now()")
    assert counts(e.run(dry_run=True)) == (8, 1, 7, 0)


def test_duplicates_of_an_identifier_are_still_reported(env) -> None:
    rows = [person(i) for i in range(4)] + [person(1, first_name="Older", modified_at=at(-5))]
    e = env(rows, lookback_minutes=60 * 24 * 30)
    e.run()
    again = e.run()
    assert again.by_reason["duplicate_identifier"] == 1
    assert again.record.counts.unchanged == 4


# --------------------------------------------------------------------------- mirror


class MirrorFake(FakeDestination):
    """A list that takes removals: ``members`` are the identifiers in it."""

    capabilities = Capabilities(
        label="fake profiles",
        standard_fields=FakeDestination.capabilities.standard_fields,
        takes_list=True,
        takes_consent=True,
        removes=True,
    )

    def __init__(self, members: set[str], *, refuse: set[str] = frozenset(), **kw: Any):
        super().__init__(**kw)
        self.members = members
        self.refuse = set(refuse)
        self.removed: list[str] = []

    def load(self, batches):  # type: ignore[no-untyped-def]
        for result in super().load(batches):
            self.members.update(r["__id"] for r in self.received)
            yield result

    def remove(self, members: pa.Table) -> Removed:
        keys = members["key"].to_pylist()
        ids = members["__id"].to_pylist()
        done = Removed()
        for ident, key in zip(ids, keys, strict=True):
            if ident in self.refuse:
                continue
            self.members.discard(key)
            self.removed.append(key)
            done.ids.append(ident)
        return done


def mirror_env(env, rows: list[tuple[Any, ...]], **sync: Any) -> Env:
    return env(rows, mode="mirror", destination={"connection": "klaviyo", "list": "VIP"}, **sync)


def test_a_member_who_leaves_the_view_leaves_the_list_and_one_who_returns_is_readded(
    env,
) -> None:
    e = mirror_env(env, [person(i) for i in range(10)])
    members: set[str] = set()
    assert counts(e.run(MirrorFake(members))) == (10, 10, 0, 0)
    assert members == {email(i) for i in range(10)}
    e.sql(f"DELETE FROM people WHERE email IN ('{email(3)}', '{email(7)}')")
    fake = MirrorFake(members)
    result = e.run(fake)
    assert counts(result) == (8, 0, 8, 0)  # the whole view read, nothing changed
    assert result.record.counts.removed == 2
    assert sorted(fake.removed) == [email(3), email(7)]
    assert members == {email(i) for i in range(10)} - {email(3), email(7)}
    # they stay removed: the next run removes nothing more
    again = MirrorFake(members)
    assert e.run(again).record.counts.removed == 0 and again.removed == []
    # one comes back: added again, as a changed row
    e.sql(f"INSERT INTO people VALUES ('{email(3)}', 'Name3', NULL, 'yes', now())")
    back = MirrorFake(members)
    result = e.run(back)
    assert (result.record.counts.sent, result.record.counts.removed) == (1, 0)
    assert email(3) in members


def test_the_guard_stops_an_emptied_view_and_a_large_drop_before_removing(env) -> None:
    e = mirror_env(env, [person(i) for i in range(10)])
    members: set[str] = set()
    e.run(MirrorFake(members))
    e.sql("DELETE FROM people")
    fake = MirrorFake(members)
    result = e.run(fake)
    assert result.exit_code == EXIT_FAILED and fake.removed == []
    assert "no rows" in (result.record.message or "") and "--allow-mass-removal" in (
        result.record.message or ""
    )
    assert len(members) == 10
    # refilled with half of them: a 50 % drop is over the default 20 %
    e.sql(
        "INSERT INTO people SELECT 'person0000' || i || '@example.com', 'N', NULL, 'yes', now() FROM range(5) t(i)"
    )
    fake = MirrorFake(members)
    result = e.run(fake)
    assert fake.removed == [] and "5 of the list's 10 members (50%)" in (
        result.record.message or ""
    )
    # the override lets it through once
    fake = MirrorFake(members)
    result = e.run(fake, allow_mass_removal=True)
    assert result.record.counts.removed == 5 and len(members) == 5


def test_a_refused_removal_is_tried_again_next_run(env) -> None:
    e = mirror_env(env, [person(i) for i in range(10)])
    members: set[str] = set()
    e.run(MirrorFake(members))
    e.sql(f"DELETE FROM people WHERE email = '{email(1)}'")
    first = MirrorFake(members, refuse={email(1)})
    assert e.run(first).record.counts.removed == 0
    second = MirrorFake(members)
    assert e.run(second).record.counts.removed == 1
    assert second.removed == [email(1)]


def test_a_stopped_read_removes_nothing(env) -> None:
    e = mirror_env(env, [person(i) for i in range(30)], batch_size=10)
    members: set[str] = set()
    e.run(MirrorFake(members))
    failing = MirrorFake(members, fail_on_batch=2, drain_on_failure=False)
    assert e.run(failing).exit_code == EXIT_FAILED
    assert failing.removed == [] and len(members) == 30


def test_a_mirror_sync_without_a_cursor_compares_the_whole_view(env) -> None:
    e = mirror_env(env, [person(i) for i in range(6)], cursor=None)
    members: set[str] = set()
    assert counts(e.run(MirrorFake(members))) == (6, 6, 0, 0)
    e.sql(f"UPDATE people SET first_name = 'New' WHERE email = '{email(2)}'")
    e.sql(f"DELETE FROM people WHERE email = '{email(5)}'")
    fake = MirrorFake(members)
    result = e.run(fake)
    assert counts(result) == (5, 1, 4, 0) and fake.removed == [email(5)]
    assert [r["first_name"] for r in fake.received] == ["New"]


def test_dry_run_counts_the_removals_without_making_them(env) -> None:
    e = mirror_env(env, [person(i) for i in range(10)])
    members: set[str] = set()
    e.run(MirrorFake(members))
    e.sql(f"DELETE FROM people WHERE email = '{email(4)}'")
    fake = MirrorFake(members)
    result = e.run(fake, dry_run=True)
    assert result.record.counts.removed == 1 and fake.removed == []
    assert email(4) in members


# --------------------------------------------------------------------------- plan


def test_plan_counts_adds_updates_removals_with_old_and_new_values(env) -> None:
    e = mirror_env(env, [person(i) for i in range(10)])
    members: set[str] = set()
    e.run(MirrorFake(members))
    e.sql(
        f"UPDATE people SET first_name = 'Renamed', modified_at = now() WHERE email = '{email(2)}'"
    )
    e.sql(f"DELETE FROM people WHERE email = '{email(9)}'")
    e.sql(f"INSERT INTO people VALUES ('{email(50)}', 'New', NULL, 'yes', now())")
    e.sql("INSERT INTO people VALUES ('bad-address', 'Bad', NULL, 'yes', now())")
    fake = MirrorFake(members)
    result = e.run(fake, dry_run=True, plan_samples=3)
    plan = result.plan
    assert plan is not None
    assert (plan.adds, plan.updates, plan.removals, plan.unchanged, plan.rejected) == (
        1,
        1,
        1,
        8,
        1,
    )
    assert plan.read == plan.adds + plan.updates + plan.unchanged + plan.rejected
    assert [c.identifier for c in plan.updated] == [email(2)]
    assert plan.updated[0].fields == {"first_name": ("Name2", "Renamed")}
    assert [c.identifier for c in plan.added] == [email(50)]
    assert [c.identifier for c in plan.removed] == [email(9)]
    assert plan.by_reason["invalid_email"] == 1
    # nothing was sent, removed or remembered: a real run does all of it
    assert fake.received == [] and fake.removed == []
    real = e.run(MirrorFake(members))
    assert (real.record.counts.sent, real.record.counts.removed) == (2, 1)


def test_plan_command_prints_json(env) -> None:
    import json

    from click.testing import CliRunner

    from reverse_etl.cli import main

    e = env([person(i) for i in range(4)])
    e.run()
    e.sql(f"UPDATE people SET first_name = 'Z', modified_at = now() WHERE email = '{email(1)}'")
    out = CliRunner().invoke(
        main, ["--project-dir", str(e.root), "plan", "people", "--json"], catch_exceptions=False
    )
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert (data["adds"], data["updates"], data["unchanged"]) == (0, 1, 0)
    assert data["samples"]["updates"][0]["fields"] == {"first_name": {"old": "Name1", "new": "Z"}}


def test_a_member_noted_twice_before_an_answer_counts_once(tmp_path: Path) -> None:
    from reverse_etl.snapshot import Snapshot
    from reverse_etl.transform.transformer import FieldSpec, TransformSpec

    spec = TransformSpec("s", "email", "modified_at", (FieldSpec("email", "email", "email"),))
    snap = Snapshot(tmp_path / "s.duckdb", spec, "salt")
    try:
        # two runs died after sending the same new member, its address spelled differently
        def sent(ident: str, key: str) -> pa.Table:
            prints = {"payload": pa.array([7], pa.uint64()), "consent": pa.array([9], pa.uint64())}
            return pa.table({"id": [ident], "key": [key], **prints})

        snap.reserve(sent("a@x.com", "a@x.com"))
        snap.reserve(sent("a@x.com", "A@x.com"))
        snap.reserve(sent("b@x.com", "b@x.com"))
        snap.begin_mirror()  # then a read that returned nobody
        assert snap.count() == 2 and snap.departed_count() == 2
        assert sorted(snap.departed(10)["__id"].to_pylist()) == ["a@x.com", "b@x.com"]
        snap.forget(["a@x.com"])
        assert snap.departed(10)["__id"].to_pylist() == ["b@x.com"]
    finally:
        snap.close()


def _snapshot(tmp_path: Path) -> Any:
    from reverse_etl.snapshot import Snapshot
    from reverse_etl.transform.transformer import FieldSpec, TransformSpec

    fields = (FieldSpec("email", "email", "email"), FieldSpec("score", "score", "properties.s"))
    spec = TransformSpec("s", "email", "modified_at", fields)
    return Snapshot(tmp_path / "s.duckdb", spec, "salt")


def _numbered_batches(sizes: list[int], start: int = 1) -> list[pa.RecordBatch]:
    from datetime import UTC, datetime
    from decimal import Decimal

    out, row = [], start
    for size in sizes:
        rows = range(row, row + size)
        out.append(
            pa.record_batch(
                {
                    "email": pa.array([f"p{n}@x.com" for n in rows], pa.large_string()),
                    "score": pa.array([Decimal(n) / 100 for n in rows], pa.decimal128(12, 2)),
                    "modified_at": pa.array(
                        [datetime(2025, 1, 1, tzinfo=UTC)] * size, pa.timestamp("us", tz="UTC")
                    ),
                    "__row": pa.array(list(rows), pa.int64()),
                }
            )
        )
        row += size
    return out


@pytest.mark.parametrize(
    ("whole", "group_bytes"),
    [(True, None), (False, None), (False, 1)],
    ids=["streamed", "grouped", "batch-by-batch"],
)
def test_the_diff_hands_each_batch_on_as_it_came_with_its_verdict(
    tmp_path: Path, whole: bool, group_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One query over the read's stream (a whole read) or one per group of batches (an
    incremental read: all four in one group, or each its own with a 1-byte group), yet each
    batch goes on whole, in order, with the types it was read with; a row recorded as sent is
    unchanged on the next read."""
    if group_bytes is not None:
        from reverse_etl.snapshot import local
        from reverse_etl.util import memory

        tiny = memory.Budget(memory.current().total)
        monkeypatch.setattr(type(tiny), "read_ahead", property(lambda self: group_bytes))
        monkeypatch.setattr(local.memory, "current", lambda: tiny)
    snap = _snapshot(tmp_path)
    try:
        read = _numbered_batches([3000, 1, 0, 2500])
        first = list(snap.diffs(iter(read), whole=whole))
        assert [b.num_rows for b, _ in first] == [3000, 1, 0, 2500]
        for (batch, diff), original in zip(first, read, strict=True):
            assert batch.equals(original)  # values and types (large_string, decimal, tz)
            assert diff.unchanged == 0 and diff.prints.num_rows == batch.num_rows
        batch, diff = first[0]
        snap.record(
            diff.prints.slice(0, 10),
            pa.table({"__row": batch["__row"][:10], "key": batch["email"][:10].cast(pa.string())}),
        )
        again = list(snap.diffs(iter(_numbered_batches([3000, 1, 0, 2500])), whole=whole))
        assert [d.unchanged for _, d in again] == [10, 0, 0, 0]
        assert again[0][1].changed.to_pylist()[:11] == [False] * 10 + [True]
    finally:
        snap.close()


def test_a_read_that_fails_midway_fails_the_diff_with_its_own_error(tmp_path: Path) -> None:
    from reverse_etl.errors import SourceError

    def failing() -> Any:
        yield from _numbered_batches([5000])
        raise SourceError("the warehouse went away (row 5001)")

    snap = _snapshot(tmp_path)
    try:
        with pytest.raises(SourceError, match="went away"):
            list(snap.diffs(failing()))
        # the snapshot stays usable after the failed read
        assert [b.num_rows for b, _ in snap.diffs(iter(_numbered_batches([10])))] == [10]
    finally:
        snap.close()


def test_annotations_for_other_rows_than_the_batch_fail_the_run() -> None:
    """The watermark relies on each batch's verdict being for its own rows, in order: the
    query's rows are put in the batch's order, and anything else fails the run."""
    from reverse_etl.snapshot.annotate import EXTRA
    from reverse_etl.snapshot.local import _annotated, _rows_of

    (batch,) = _numbered_batches([3])
    notes = {name: pa.nulls(3) for name in EXTRA}
    good = pa.table({"__row": [1, 2, 3], **notes})
    assert _annotated(batch, good).num_columns == batch.num_columns + len(EXTRA)
    late = pa.table({"__row": [7, 3, 1, 2], "x": ["g", "c", "a", "b"]})
    mine, rest = _rows_of(batch, late)
    assert mine is not None and mine["x"].to_pylist() == ["a", "b", "c"]
    assert rest["__row"].to_pylist() == [7]
    assert _rows_of(batch, late.slice(0, 2)) == (None, late.slice(0, 2))  # 1 and 2 to come
    for rows in ([2, 1, 3], [1, 2]):
        bad = pa.table({"__row": rows, **{n: pa.nulls(len(rows)) for n in EXTRA}})
        with pytest.raises(RuntimeError, match="each of the read's rows once"):
            _annotated(batch, bad)


# --------------------------------------------------------------------------- grouped commits


@pytest.fixture()
def grouped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commit groups as a snapshot of 10M members gets them, for a snapshot of any size."""
    from reverse_etl.engine import CommitGroup

    monkeypatch.setattr(CommitGroup, "GROUP_FROM", 0)
    monkeypatch.setattr(CommitGroup, "GROUP_ROWS", 15)


def test_grouped_commits_record_and_move_the_watermark_as_batch_by_batch(
    env, grouped, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reverse_etl.snapshot import Snapshot

    recorded: list[int] = []
    record = Snapshot.record
    monkeypatch.setattr(
        Snapshot, "record", lambda self, p, a: (recorded.append(a.num_rows), record(self, p, a))
    )
    e = env([person(i) for i in range(40)], batch_size=7)
    assert counts(e.run()) == (40, 40, 0, 0)
    e.sql(
        "UPDATE people SET first_name = first_name || 'x', "
        "modified_at = modified_at + INTERVAL 1 HOUR"
    )
    recorded.clear()
    assert counts(e.run()) == (40, 40, 0, 0)
    assert recorded == [21, 19]  # batches of 7 recorded 15+ rows at a time, not 6 times
    # every changed row was recorded once, the watermark is past them all
    assert counts(e.run()) == (0, 0, 0, 0)
    assert counts(e.run(full_refresh=True)) == (40, 0, 40, 0)


def test_a_failed_run_still_commits_what_was_acknowledged_in_its_group(
    env, grouped, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reverse_etl.engine import CommitGroup

    monkeypatch.setattr(CommitGroup, "GROUP_ROWS", 1000)  # no group fills in this run
    e = env([person(i) for i in range(30)], batch_size=5)
    e.run()
    e.sql(
        "UPDATE people SET first_name = first_name || 'x', "
        "modified_at = modified_at + INTERVAL 1 HOUR"
    )
    failing = FakeDestination(fail_on_batch=4, drain_on_failure=False)
    assert e.run(failing).exit_code == EXIT_FAILED
    # batches 1-3 (15 rows) were acknowledged: committed though their group was not full;
    # the rest is read and sent again
    again = e.run()
    assert counts(again) == (15, 15, 0, 0)
    assert sorted(e.last.received_ids()) == [email(i) for i in range(15, 30)]


def test_a_snapshot_open_in_another_process_is_a_named_error(tmp_path: Path) -> None:
    """``unlock --force`` while the run still went on: the next run met DuckDB's file lock
    on the snapshot and ended "internal error ... please report it"."""
    import subprocess
    import sys

    from reverse_etl.errors import ReverseEtlError

    path = tmp_path / "s.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('open', flush=True); "
            "sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(ReverseEtlError, match="open in another process") as info:
            _snapshot(tmp_path)
        assert str(path) in str(info.value) and "unlock --force" in str(info.value)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    _snapshot(tmp_path).close()  # free again once that process ended

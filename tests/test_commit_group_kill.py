"""An incremental run killed inside a commit group loses nothing: with ``CommitGroup``'s
thresholds lowered (tests/mirror_kill_runner.py sets them in each run's process), a snapshot
of one member already records acknowledged batches ``GROUP_ROWS`` rows at a time, and only
then moves the watermark past them. A run is SIGKILLed again and again while batches are
acknowledged but not yet recorded (injected after an acknowledgement, after the engine took a
batch, before and after a group's snapshot record) and after seeded random delays, while rows
of the view change between the kills (new values, ``modified_at`` moved forward); a run to
completion then leaves every row at the destination with its current values, the watermark
at the view's last (cursor, id), and a full re-read finds every row unchanged in the snapshot.

The runs write a trace (each batch the engine took back, each snapshot record): after every
kill the stored watermark must still be behind each batch acknowledged since the last record
(the watermark never passes rows the snapshot did not record), and the test asserts that kills
did land with such batches in a group, so it exercised the grouped window, not a per-batch
commit. It reuses tests/test_mirror_kill.py's launcher, rig and view (whose ``modified_at``
follows a row's own version, not the order of the changes: here it does).

At the end, a defect these kills found: a row whose change the destination acknowledged but
the snapshot had not recorded when the run died, and which went back to its old values before
the next run, was found unchanged and never sent again; the destination kept the newer values
(a group widens that window from the batches in flight to the whole open group). The diff now
counts every identifier still ``pending`` (sent, never recorded) as changed."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from reverse_etl.config import load_project
from reverse_etl.engine import CommitGroup, RunOptions, run_sync
from reverse_etl.errors import EXIT_OK
from reverse_etl.sandbox import SandboxServer, SandboxSettings
from reverse_etl.state import StateStore, Watermark, decode_value
from tests.helpers import at, write_project
from tests.sandboxes import assert_sandbox_clean, email_of, fast_clients, profile_row
from tests.test_klaviyo_support import klaviyo_speed
from tests.test_mirror_kill import SYNC, Launcher, Rig, View
from tests.test_mirror_kill import launcher as launcher  # the module's own forking launcher
from tests.test_snapshot_sandboxes import KINDS, Recorder, duckdb_warehouse

ROWS = 120  # rows of the view
BATCH = 10  # batch_size: a run of every row has 12 batches
GROUP = {"from": 1, "rows": 30}  # grouped from the second run, three full batches a group
KILLS = 6  # random kills that must land while a run is under way
# injected kills, in this order: after the engine took back batch N (committed), after the
# destination acknowledged batch N (ack), before / after the N-th snapshot record of a run
POINTS = (
    "committed:1",
    "committed:2",
    "ack:3",
    "recording:1",
    "recorded:1",
    "committed:5",
    "recording:2",
    "ack:6",
    "committed:4",
)


@dataclass
class Stamped(View):
    """``View`` whose changed rows get a ``modified_at`` past every row's (``stamp``): a row at
    version 4 changed to 5 must not sort behind one already at 9, which an incremental read
    past the watermark would rightly never see."""

    stamp: dict[int, int] = field(default_factory=dict)  # number -> seconds after T0

    def rows(self) -> list[tuple[Any, ...]]:
        return [
            profile_row(n, first_name=f"First{n}v{v}", modified_at=at(self.stamp[n]))
            for n, v in sorted(self.version.items())
        ]

    def bump(self, numbers: list[int], by: int = 1) -> None:
        """``numbers`` move ``by`` versions (-1: back to their values before), in this order,
        each ``modified_at`` past every row's."""
        clock = max(self.stamp.values(), default=0)
        for n in numbers:
            clock += 1
            self.version[n] = self.version.get(n, 0) + by
            self.stamp[n] = clock

    def last(self) -> tuple[Any, str]:
        """The (cursor, id) of the row read last."""
        return max((at(self.stamp[n]), email_of(n)) for n in self.version)


class GroupedLauncher:
    """The module's launcher, every run with ``GROUP``'s thresholds and a trace file next to
    its log (``run7.log``: ``run7.trace``)."""

    def __init__(self, launcher: Launcher):
        self.launcher = launcher
        self.group = GROUP

    def start(self, order: dict[str, Any]) -> int:
        trace = Path(order["log"]).with_suffix(".trace")
        return self.launcher.start({**order, "commit_group": self.group, "trace": str(trace)})

    def wait(self, pid: int, timeout: float | None) -> int | None:
        return self.launcher.wait(pid, timeout)


@dataclass
class Kill:
    """What one killed run left: ``held`` batches with rows acknowledged since its last
    snapshot record (an open group), the rows in them, and those the watermark passed."""

    run: int
    held: int
    rows: int
    passed: list[Any]


@dataclass
class GroupRig(Rig):
    view: Stamped = field(default_factory=Stamped)
    recorder: Recorder | None = None
    kills: list[Kill] = field(default_factory=list)

    def configure(self, base_url: str) -> None:
        """tests/test_mirror_kill.py's project, its sync made incremental: no mirror, the
        cursor ``modified_at``."""
        super().configure(base_url)
        path = self.root / "profiles" / "profiles.yml"
        data = yaml.safe_load(path.read_text())
        (sync,) = data["syncs"]
        del sync["mode"], sync["max_removal_share"]
        sync.update(cursor="modified_at", batch_size=BATCH)
        write_project(self.root, data)

    @contextlib.contextmanager
    def store(self) -> Iterator[StateStore]:
        project = load_project(None, self.root, env={})
        store = StateStore(project.state.url, root=self.root)
        try:
            yield store
        finally:
            store.close()

    def unlock(self) -> None:
        """After a kill (``Rig.run``): note what the run left behind, then release its lock.
        The watermark must not have passed a batch the snapshot had not recorded: the next
        run would never read it again (and the snapshot would not know what it sent)."""
        kill = self.left_behind()
        self.kills.append(kill)
        assert kill.passed == [], (
            f"run {kill.run}: the watermark passed acknowledged batches the snapshot had not "
            f"recorded: {kill.passed}; runs: {self.runs}"
        )
        super().unlock()

    def trace(self) -> list[dict[str, Any]]:
        path = self.root / f"run{self.logs}.trace"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def left_behind(self) -> Kill:
        """The batches the last run took back after its last snapshot record: acknowledged,
        not recorded. The watermark must not have passed any of them."""
        held: list[dict[str, Any]] = []
        flushed = False  # the next batch is the one whose commit made the record
        for entry in self.trace():
            if "recorded" in entry:
                held, flushed = [], True
            elif flushed:
                flushed = False
            elif entry["rows"]:
                held.append(entry)
        with self.store() as store:
            mark = store.watermark(SYNC)
        assert mark is not None, "the first run completed: there is a watermark"
        passed = [e for e in held if not ahead(e["mark"], mark)]
        return Kill(self.logs, len(held), sum(e["rows"] for e in held), passed)

    def records(self) -> list[tuple[str, Any]]:
        """(email, first_name) of every profile any run sent whole, in order (a run killed
        while sending a body left a part of it)."""
        assert self.recorder is not None
        sent = []
        for logged in self.recorder.log:
            if logged.method != "POST" or not logged.path.startswith(self.kind.import_path):
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                sent += [
                    (r["email"], self.kind.first_name_of(r)) for r in self.kind.records(logged.body)
                ]
        return sent

    def run_here(self, **options: Any) -> Any:
        """A run in this process (``CommitGroup`` lowered here too, by the fixture)."""
        project = load_project(None, self.root, env={})
        with self.store() as store:
            result = run_sync(project, SYNC, store, RunOptions(**options))
        assert result.exit_code == EXIT_OK, result.record.message
        return result.record.counts


def ahead(mark: list[str] | None, than: Watermark) -> bool:
    """Whether a traced batch's mark is past the stored watermark."""
    assert mark is not None, "every batch of this view has a cursor"
    return (decode_value(mark[0]), decode_value(mark[1])) > (than.cursor, than.id)


def recorded(rig: GroupRig) -> list[int]:
    """The rows of each snapshot record the last run made."""
    return [e["recorded"] for e in rig.trace() if "recorded" in e]


def change(rig: GroupRig, rng: random.Random, count: int, among: set[int] | None = None) -> None:
    """``count`` rows (of ``among``, default all) take new values, their ``modified_at``
    moved past every row's."""
    rig.view.bump(rng.sample(sorted(rig.view.version if among is None else among), count))
    rig.load()


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: Launcher) -> Iterator[GroupRig]:
    fast_clients(monkeypatch)  # for the runs made in this process
    klaviyo_speed(monkeypatch)
    monkeypatch.setattr(CommitGroup, "GROUP_FROM", GROUP["from"])
    monkeypatch.setattr(CommitGroup, "GROUP_ROWS", GROUP["rows"])
    kind = KINDS["klaviyo"]
    # jobs take 0.1 s, so a run takes about a second and a kill can land in it
    sandbox = kind.sandbox(SandboxSettings(speedup=50.0, job_seconds=5.0))
    recorder = Recorder(sandbox)
    rig = GroupRig(
        tmp_path,
        kind,
        duckdb_warehouse(tmp_path),
        sandbox,
        GroupedLauncher(launcher),  # type: ignore[arg-type]
        recorder=recorder,
    )
    rig.view.bump(list(range(ROWS)))
    with SandboxServer(recorder) as server:
        rig.configure(server.base_url)
        yield rig
    assert_sandbox_clean(sandbox)


def test_kills_inside_commit_groups_skip_no_row(rig: GroupRig) -> None:
    rng = random.Random("commit-group-kill")
    # the first run (an empty snapshot: each batch recorded as it is acknowledged) fills the
    # snapshot
    rig.load()
    rig.complete()
    assert recorded(rig) == [BATCH] * (ROWS // BATCH), rig.trace()
    rig.assert_list_is_the_view()
    assert len(rig.records()) == ROWS
    # every row changes: a run to completion records them a group at a time (and is timed)
    change(rig, rng, ROWS)
    began = time.monotonic()
    rig.complete()
    window = time.monotonic() - began
    assert recorded(rig) == [GROUP["rows"]] * (ROWS // GROUP["rows"]), rig.trace()
    rig.assert_list_is_the_view()
    before_kills = len(rig.records())

    # every row changes again; then runs are killed at each injected point, the view
    # changing again before every other one. Half the rows change no more: a batch of theirs
    # the snapshot never recorded (the watermark passed it) is still found changed at the end
    change(rig, rng, ROWS)
    moving = set(rng.sample(range(ROWS), ROWS // 2))
    for i, point in enumerate(POINTS):
        if i % 2:
            change(rig, rng, rng.randint(10, 30), moving)
        assert rig.run(kill_at=point) == -signal.SIGKILL, rig.runs
    # ... and after random delays, spread over a run, until enough landed in one
    rounds = 0
    while rig.killed < KILLS:
        rounds += 1
        assert rounds <= 4 * KILLS, f"only {rig.killed} kills landed in a run: {rig.runs}"
        change(rig, rng, rng.randint(15, 45), moving)
        rig.kill_after(rng.uniform(0.0, window))
    rig.complete()
    assert rig.sandbox.wait_idle(30), "sandbox jobs did not finish"

    # no kill left the watermark past a batch the snapshot had not recorded (``unlock``), and
    # kills did land in a group holding acknowledged batches not yet recorded: the first two
    # injected kills (after batch 1 and 2 of a group of three), at least
    held = [(k.run, k.held, k.rows) for k in rig.kills if k.held]
    assert len(held) >= 2, f"no kill landed in an open group: {rig.kills}; runs: {rig.runs}"
    assert rig.kills[0].held == 1 and rig.kills[1].held == 2, rig.kills[:2]
    # whose rows were sent again: the same values twice
    sent = Counter(rig.records()[before_kills:])
    again = sum(times - 1 for times in sent.values())
    assert again >= BATCH, again

    # nothing skipped: every row at the destination with its current values
    rig.assert_list_is_the_view()
    # the watermark at the view's last row
    last = rig.view.last()
    with rig.store() as store:
        mark = store.watermark(SYNC)
    assert mark is not None and (mark.cursor, mark.id) == last, (mark, last)
    # a further run has nothing to read; a whole re-read finds every row unchanged in the
    # snapshot (it agrees with the destination) and sends nothing
    c = rig.run_here()
    assert (c.read, c.sent) == (0, 0), c
    c = rig.run_here(full_refresh=True)
    assert (c.read, c.sent, c.unchanged) == (ROWS, 0, ROWS), c


# --------------------------------------------------------------------------- a lost change

UNGROUPED = {"from": 10**9, "rows": GROUP["rows"]}


class StaleAtDestination(AssertionError):
    """The destination holds values the view no longer has."""


@pytest.mark.parametrize(
    ("point", "group"),
    [("committed:1", GROUP), ("ack:1", UNGROUPED)],
    ids=["in-a-group", "one-batch"],
)
def test_a_change_undone_after_a_kill_reaches_the_destination(
    rig: GroupRig, point: str, group: dict[str, int]
) -> None:
    rig.view.version, rig.view.stamp = {}, {}
    rig.view.bump(list(range(40)))
    rig.load()
    rig.complete()  # the snapshot holds every row at version 1
    rig.launcher.group = group  # type: ignore[attr-defined]
    rig.view.bump(list(range(40)))  # rows 0-9 are read first, the first batch
    rig.load()
    # the destination acknowledged the first batch (rows 0-9 at version 2); the run dies before
    # the snapshot recorded it (the group is open, or the batch was not committed yet)
    assert rig.run(kill_at=point) == -signal.SIGKILL, rig.runs
    assert all(
        rig.kind.first_name_of(rig.kind.held(rig.sandbox, email_of(n))) == f"First{n}v2"
        for n in range(10)
    )
    assert rig.kills[-1].passed == []  # the watermark stayed behind them
    # rows 0-9 go back to their version 1 values (modified_at moved forward) before the run
    rig.view.bump(list(range(10)), by=-1)
    rig.load()
    rig.complete()
    assert rig.sandbox.wait_idle(30), "sandbox jobs did not finish"
    # fails: rows 0-9 match what the snapshot holds (version 1), so they are "unchanged" and
    # never sent; the destination keeps version 2
    stale = {
        email_of(n): rig.kind.first_name_of(rig.kind.held(rig.sandbox, email_of(n)))
        for n, v in rig.view.version.items()
        if rig.kind.first_name_of(rig.kind.held(rig.sandbox, email_of(n))) != f"First{n}v{v}"
    }
    if stale:
        raise StaleAtDestination(f"the destination holds older values: {stale}; {rig.runs}")
    rig.assert_list_is_the_view()

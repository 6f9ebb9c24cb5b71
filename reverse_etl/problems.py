"""Known and new row problems, and the thresholds (``fail_on``) a finished run's exit code
follows.

A scheduler alerts on exit codes, so a run must not exit 1 forever for the same rows: a row
problem already reported by an earlier run of the sync is *known*, any other is *new*. A
problem's key is the row's identifier (or, for a row without one, its cursor, email and the
failing value: what the error file finds it by) with the reason and the column, hashed. The
state store keeps each sync's open problems (``StateStore.see_problems``): those seen by the
latest complete run; older ones are dropped, so the table stays as small as the sync's
current problems. Row notes (``NOTES``) and rows left unsent by a stopped run are not
problems and are never kept.

Exit codes of ``reverse-etl run`` (the contract schedulers read; see ``errors.py``):

====  ===================================================================================
0     every row landed, or the run finished within its ``fail_on`` thresholds: known
      problems never fail a run (they are printed as a warning and written to the error
      file, ``first_seen_run`` naming the run that first reported them)
1     the run finished but crossed a threshold: more rows with a new problem than
      ``fail_on.rejected_share`` of the rows read, or (``fail_on.new_problems``) any problem
      no earlier run reported
2     the command line was wrong
3     the run could not run or could not finish (config, warehouse, lock, API gave up);
      unacknowledged rows stay behind the watermark
130   stopped by Ctrl-C (SIGINT), after committing what the destination acknowledged
143   stopped by SIGTERM (Kubernetes, Airflow, systemd), likewise
====  ===================================================================================

The defaults, ``rejected_share: 0`` and ``new_problems: true``: a run exits 1 when it meets a
problem for the first time, and 0 while the same rows stay broken (a warning each run), so an
hourly schedule goes red once per new problem, not every hour. ``rejected_share`` counts this
run's rows with a *new* problem against its rows read: ``{rejected_share: 1%, new_problems:
false}`` tolerates a trickle of new bad rows. Known problems were alerted on when they were
new; an incremental run reads little besides them, so counting them would make a quiet hour
look like a failure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from reverse_etl.transform.rowerrors import NOTES, RowError, cell_text

if TYPE_CHECKING:
    from reverse_etl.config import Project, Sync
    from reverse_etl.state import StateStore

# reasons that say nothing about the row's data: the run stopped before the row was answered
NOT_PROBLEMS = NOTES | {"not_sent"}


@dataclass(frozen=True)
class Thresholds:
    """A sync's resolved ``fail_on``: crossing either makes a finished run exit 1."""

    rejected_share: float = 0.0  # rows rejected or failed / rows read, above which: exit 1
    new_problems: bool = True  # a problem no earlier run reported: exit 1


def problem_key(error: RowError) -> str | None:
    """The stable key of a row problem across runs, or None for a note (not a problem). A row
    without an identifier is known by its cursor, email and failing value (its row number
    changes from run to run)."""
    if error.reason in NOT_PROBLEMS:
        return None
    ident = cell_text(error.identifier)
    who = (
        ["id", ident]
        if ident
        else ["row", cell_text(error.cursor), cell_text(error.email), cell_text(error.value)]
    )
    return hashlib.sha256(orjson.dumps([who, error.reason, error.column])).hexdigest()


class ProblemTracker:
    """Tells, a batch of row errors at a time, when each problem was first reported (the error
    file's ``first_seen_run``), and counts them known or new. ``record=False`` (a dry run)
    only reads the store. One statement per chunk of keys, never one per row."""

    def __init__(self, store: StateStore, sync: str, run_id: str, *, record: bool = True):
        self.store = store
        self.sync = sync
        self.run_id = run_id
        self.record = record
        self.known = 0  # problems (error lines) first reported by an earlier run
        self.new = 0  # problems reported for the first time by this run
        self.rows = 0  # rows with at least one problem, for rejected_share

    def first_seen(self, errors: Sequence[RowError]) -> list[str]:
        """Per error, the run that first reported its problem ("" for a note)."""
        keys = [problem_key(e) for e in errors]
        wanted = {k: (e.reason, e.column) for k, e in zip(keys, errors, strict=True) if k}
        if not wanted:
            return [""] * len(errors)
        seen = self.store.see_problems(self.sync, self.run_id, wanted, record=self.record)
        out = []
        for key in keys:
            first = seen[key] if key else ""
            if key:
                if first == self.run_id:
                    self.new += 1
                else:
                    self.known += 1
            out.append(first)
        # a row's errors come in one write (transform and screen), or as the API's answer
        self.rows += len({e.row_number for e, k in zip(errors, keys, strict=True) if k})
        return out

    def settle(self) -> int:
        """After a run that read everything: forget the problems it did not see again (fixed,
        filtered out, or past the watermark and not read again). Returns how many."""
        if not self.record:
            return 0
        return self.store.settle_problems(self.sync, self.run_id)


@dataclass(frozen=True)
class Verdict:
    crossed: tuple[str, ...]  # why the run exits 1; empty: within thresholds
    summary: str | None  # what to print and keep with the run; None: no problems at all


def judge(thresholds: Thresholds, *, read: int, rows: int, known: int, new: int) -> Verdict:
    """Whether a finished run with ``rows`` of ``read`` rows rejected or failed, ``known`` and
    ``new`` problems crosses ``thresholds``. No rows read but some failing (a removal refused)
    counts as all of them."""
    if rows == 0 and known == 0 and new == 0:
        return Verdict((), None)
    # rows with a new problem (a row's problems are counted once at most): known problems
    # were alerted on when they were new, and an incremental run may read little else
    fresh = min(new, rows) if rows else new
    share = min(fresh / read, 1.0) if read else 1.0
    crossed = []
    if fresh and share > thresholds.rejected_share:
        crossed.append(
            f"{fresh} of {read} rows with a new problem ({share:.2%}), more than "
            f"fail_on.rejected_share ({thresholds.rejected_share:.2%})"
        )
    if thresholds.new_problems and new:
        crossed.append(f"{new} new problems (no earlier run reported them; fail_on.new_problems)")
    counts = f"{new} new and {known} known problems in {rows} of {read} rows"
    if crossed:
        return Verdict(tuple(crossed), f"fail_on crossed: {'; '.join(crossed)} ({counts})")
    return Verdict((), f"within fail_on: {counts}; see the error file")


def thresholds_for(project: Project, sync: Sync) -> Thresholds:
    """``sync``'s fail_on over the project's, key by key, over the defaults."""
    chosen, default = sync.fail_on.over(project.fail_on), Thresholds()
    return Thresholds(
        default.rejected_share if chosen.rejected_share is None else chosen.rejected_share,
        default.new_problems if chosen.new_problems is None else chosen.new_problems,
    )

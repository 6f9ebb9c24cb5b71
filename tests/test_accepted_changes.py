"""Accepting a changed definition (a run by hand, ``--accept-changes``) re-reads the whole
view. An unattended-run test renamed a sync's destination list and accepted it: the run read
0 rows past the watermark, so the new list stayed empty for good; a new mapped field never
reached the rows already sent either. The snapshot still keeps rows the change does not make
different from being sent again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reverse_etl.config import load_project
from reverse_etl.engine import RunOptions, run_sync
from reverse_etl.errors import EXIT_FAILED, EXIT_OK
from reverse_etl.state import StateStore
from tests.helpers import (
    FakeDestination,
    people_db,
    person,
    project_data,
    sync_entry,
    write_project,
)

ROWS = 40


class Project:
    def __init__(self, root: Path):
        self.root = root
        people_db(root, [person(i) for i in range(ROWS)])
        self.write(list="Members")
        self.store = StateStore("sqlite:///state/state.db", root=root)

    def write(self, **destination: Any) -> None:
        sync = sync_entry(batch_size=10, destination={"connection": "klaviyo", **destination})
        write_project(self.root, project_data(syncs=[sync]))

    def run(self, fake: FakeDestination, **options: Any) -> Any:
        project = load_project(None, self.root, env={})
        return run_sync(
            project,
            "people",
            self.store,
            RunOptions(**options),
            destination_factory=lambda p, s: fake,
        )


@pytest.fixture()
def project(tmp_path: Path) -> Any:
    made = Project(tmp_path)
    yield made
    made.store.close()


def test_an_accepted_list_change_sends_every_row_to_the_new_list(project: Any) -> None:
    assert project.run(FakeDestination()).exit_code == EXIT_OK
    assert project.run(FakeDestination()).record.counts.read == 0  # incremental: nothing new
    project.write(list="Members renamed")
    plan = project.run(FakeDestination(), dry_run=True)
    assert plan.plan is not None and plan.record.counts.read == ROWS  # the plan shows it
    guarded = project.run(FakeDestination(), guard_definition=True)  # a scheduled run
    assert guarded.exit_code == EXIT_FAILED and "definition changed" in guarded.record.message
    accepted = FakeDestination()
    result = project.run(accepted)  # by hand: accepts the change
    assert result.accepted_changes and result.exit_code == EXIT_OK
    assert len(set(accepted.received_ids())) == ROWS
    again = project.run(FakeDestination())
    assert again.record.counts.read == 0  # back to incremental once it read everything


def test_an_accepting_run_that_dies_half_way_reads_on_from_the_start_not_the_old_watermark(
    project: Any,
) -> None:
    assert project.run(FakeDestination()).exit_code == EXIT_OK
    old = project.store.watermark("people")
    project.write(list="Members renamed")
    dies = FakeDestination(fail_on_batch=3, record_failed_batch=False)
    assert project.run(dies).exit_code == EXIT_FAILED
    assert project.store.watermark("people") != old  # reset with the acceptance
    rest = FakeDestination()
    assert project.run(rest).exit_code == EXIT_OK  # the change is accepted by now
    # every row reached the new list, across the two runs
    assert set(dies.received_ids()) | set(rest.received_ids()) == {
        person(i)[0] for i in range(ROWS)
    }

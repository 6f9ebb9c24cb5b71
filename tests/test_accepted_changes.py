"""Accepting a changed definition (a run by hand, ``--accept-changes``) re-reads the whole
view. An unattended-run test renamed a sync's destination list and accepted it: the run read
0 rows past the watermark, so the new list stayed empty for good; a new mapped field never
reached the rows already sent either. The snapshot still keeps rows the change does not make
different from being sent again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reverse_etl import controls, engine
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


def test_a_fingerprint_of_the_sync_as_fitted_to_its_view_is_no_change(tmp_path: Path) -> None:
    """Earlier runs kept the fingerprint of the sync as fitted to its view (the view's
    spelling of its columns: upper case on Snowflake). A store holding one refuses no guarded
    run and re-reads nothing; the run keeps the sync as written, which ``status`` compares."""
    people_db(tmp_path, [person(i) for i in range(ROWS)])
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "people.sql").write_text(
        'SELECT email AS "EMAIL", first_name AS "FIRST_NAME", phone AS "PHONE", '
        'email_consent AS "EMAIL_CONSENT", modified_at AS "MODIFIED_AT" FROM people'
    )
    source = {"connection": "warehouse", "sql": "sql/people.sql"}
    write_project(tmp_path, project_data(syncs=[sync_entry(batch_size=10, source=source)]))
    project = load_project(None, tmp_path, env={})
    store = StateStore("sqlite:///state/state.db", root=tmp_path)
    try:
        written = project.sync("people")
        with engine._default_source(project, written) as src:
            fitted, _, _ = engine.fit_view(project, written, src, project.source_sql(written))
        assert fitted.cursor == "MODIFIED_AT"  # what was fingerprinted before
        first = run_sync(
            project,
            "people",
            store,
            RunOptions(),
            destination_factory=lambda p, s: FakeDestination(),
        )
        assert first.exit_code == EXIT_OK
        old = controls.fingerprint(project, fitted)
        controls.store_fingerprint(store, "people", old, first.record.run_id)
        assert controls.pending_changes(project, store, ["people"])  # status sees a change
        guarded = run_sync(
            project,
            "people",
            store,
            RunOptions(guard_definition=True),
            destination_factory=lambda p, s: FakeDestination(),
        )
        assert guarded.exit_code == EXIT_OK and guarded.record.counts.read == 0
        assert controls.pending_changes(project, store, ["people"]) == {}  # kept as written
    finally:
        store.close()

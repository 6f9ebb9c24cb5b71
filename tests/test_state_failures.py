"""A state store that opened and then failed mid-run (held locked by another process past the
busy timeout, disk full, its PostgreSQL server gone), found by an unattended-run test: the run
ended "internal error ... please report it" with the raw SQL and its parameters, could leave
its lock behind, and the scheduler died of it. Now it is a ``StateError`` naming the store,
the driver's words and what to do; the lock is released and the record kept when the store
allows, and a later run sends every row that was not committed."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reverse_etl import controls
from reverse_etl.config import load_project
from reverse_etl.engine import RunOptions, run_sync
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, ReverseEtlError
from reverse_etl.state import StateError, StateStore
from tests.helpers import (
    FakeDestination,
    people_db,
    person,
    project_data,
    sync_entry,
    write_project,
)

ROWS = 30


def failing(said: str) -> Any:
    """A stand-in for a StateStore write that fails as SQLAlchemy raises it: the statement
    and parameters in its text, the driver's words in ``orig``."""

    def fail(*_args: Any, **_kwargs: Any) -> None:
        raise sa.exc.OperationalError(
            "UPDATE retl_watermarks SET cursor_value=? WHERE sync=?",
            ("SECRET-PARAM", "people"),
            sqlite3.OperationalError(said),
        )

    return fail


@pytest.fixture()
def project(tmp_path: Path) -> Any:
    people_db(tmp_path, [person(i) for i in range(ROWS)])
    write_project(tmp_path, project_data(syncs=[sync_entry(batch_size=10)]))
    return load_project(None, tmp_path, env={})


def run(project: Any, store: StateStore, fake: FakeDestination) -> Any:
    return run_sync(project, "people", store, RunOptions(), destination_factory=lambda p, s: fake)


@pytest.mark.parametrize(
    ("said", "hint"),
    [
        ("database is locked", "another process held the file locked"),
        ("database or disk is full", "free space on the disk"),
        ("attempt to write a readonly database", "cannot be written"),
    ],
)
def test_a_store_failing_mid_run_is_a_state_error_and_the_lock_is_released(
    project: Any, monkeypatch: pytest.MonkeyPatch, said: str, hint: str
) -> None:
    store = StateStore(project.state.url, root=project.root)
    monkeypatch.setattr(store, "set_watermark", failing(said))
    first = FakeDestination()
    with pytest.raises(StateError) as caught:
        run(project, store, first)
    message = str(caught.value)
    assert message.startswith("state store sqlite:///") and said in message and hint in message
    assert "UPDATE" not in message and "SECRET-PARAM" not in message  # no statement, no values
    assert store.lock_info("people") is None  # released: the next run is not "already running"
    (record,) = store.last_runs("people")
    assert (record.status, record.message) == ("failed", message)
    monkeypatch.undo()
    again = FakeDestination()
    result = run(project, store, again)
    assert result.exit_code == EXIT_OK and result.record.counts.read == ROWS  # watermark unmoved
    # rows the snapshot recorded as landed are not sent twice; none is lost
    assert set(first.received_ids()) | set(again.received_ids()) == {
        person(i)[0] for i in range(ROWS)
    }
    assert result.record.counts.sent + result.record.counts.unchanged == ROWS
    store.close()


def test_a_store_that_cannot_save_the_record_or_release_the_lock_keeps_the_first_error(
    project: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The finally's own writes fail too (the disk is still full): logged, never raised over
    the error that ended the run."""
    store = StateStore(project.state.url, root=project.root)
    full = failing("database or disk is full")
    for method in ("set_watermark", "save_run", "release"):
        monkeypatch.setattr(store, method, full)
    with caplog.at_level(logging.ERROR), pytest.raises(StateError, match="free space"):
        run(project, store, FakeDestination())
    assert "its record could not be saved" in caplog.text
    assert "its lock could not be released" in caplog.text
    assert "SECRET-PARAM" not in caplog.text
    store.close()


def test_a_plan_that_fails_is_kept_as_a_plan_not_as_a_failed_run(project: Any) -> None:
    """A failed ``plan`` was stored as a failed run: it blocked the sync's dependents, moved
    its schedule and started its retry backoff. It is kept as a plan saying it failed; the
    plan's own result (its exit code) still says failed."""
    store = StateStore(project.state.url, root=project.root)

    def down(_project: Any, _sync: Any) -> Any:
        raise ReverseEtlError("the warehouse is down")

    result = run_sync(
        project,
        "people",
        store,
        RunOptions(dry_run=True),
        destination_factory=lambda p, s: FakeDestination(),
        source_factory=down,
    )
    assert result.exit_code == EXIT_FAILED
    (kept,) = store.last_runs("people")
    assert kept.status == "dry_run"
    assert kept.message == "plan failed: the warehouse is down"
    assert store.last_started("people") is None  # the schedule did not move
    store.close()


def test_a_record_left_running_by_a_store_failure_is_abandoned_by_the_next_run(
    project: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's record could not be saved at its end, but its lock was released: the record
    said ``running`` forever, with no counts, and never started the retry backoff. The next
    run to take the lock marks it ``abandoned`` (nothing else can be running)."""
    store = StateStore(project.state.url, root=project.root)
    monkeypatch.setattr(store, "set_watermark", failing("database or disk is full"))
    monkeypatch.setattr(store, "save_run", failing("database or disk is full"))
    with pytest.raises(StateError):
        run(project, store, FakeDestination())
    monkeypatch.undo()
    (orphan,) = store.last_runs("people")
    assert orphan.status == "running" and store.lock_info("people") is None
    assert controls.failure_streak(store, "people")[0] == 0
    with store.lock("people", "next"):
        pass
    (orphan,) = store.last_runs("people")
    assert orphan.status == "abandoned" and "state store failed" in (orphan.message or "")
    assert controls.failure_streak(store, "people")[0] == 1  # retried after the backoff
    store.close()

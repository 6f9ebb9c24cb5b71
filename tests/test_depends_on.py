"""``depends_on`` between syncs (run order, skipping after a failed dependency, config errors)
and the retry queue of rows refused for a missing parent: a Dotdigital order whose contact
does not exist yet lands on the run after its contact does, and is given up after a bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from reverse_etl import cli as cli_module
from reverse_etl import engine, retry_queue
from reverse_etl.cli import main
from reverse_etl.config import load_project
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, EXIT_ROW_ERRORS, ConfigError
from reverse_etl.state import RunRecord, StateStore, now
from tests.helpers import (
    FakeDestination,
    at,
    create_table,
    people_db,
    person,
    project_data,
    sync_entry,
    write_project,
)
from tests.sandboxes import email_of, error_rows, profile_rows
from tests.test_dotdigital_insight import ORDER_COLUMNS, contacts_sync, order_row, orders_sync

# --------------------------------------------------------------------------- config


def config_error(tmp_path: Path, syncs: list[dict[str, Any]]) -> str:
    write_project(tmp_path, project_data(syncs=syncs))
    with pytest.raises(ConfigError) as raised:
        load_project(None, tmp_path, env={})
    return str(raised.value)


def test_depends_on_an_unknown_sync_is_a_config_error(tmp_path: Path) -> None:
    said = config_error(
        tmp_path, [sync_entry("contacts"), sync_entry("orders", depends_on=["contcts"])]
    )
    assert "syncs[1].depends_on[0]" in said
    assert "no sync named 'contcts'; did you mean 'contacts'?" in said


def test_depends_on_cycle_is_a_config_error(tmp_path: Path) -> None:
    said = config_error(
        tmp_path,
        [
            sync_entry("a", depends_on=["b"]),
            sync_entry("b", depends_on=["c"]),
            sync_entry("c", depends_on=["a"]),
        ],
    )
    assert "depends_on forms a cycle" in said
    assert "a -> b -> c -> a (each depends on the next)" in " ".join(said.split())


def test_depends_on_itself_is_a_config_error(tmp_path: Path) -> None:
    said = config_error(tmp_path, [sync_entry("a", depends_on=["a"])])
    assert "sync 'a' cannot depend on itself" in said


# --------------------------------------------------------------------------- run order


class Fake(FakeDestination):
    def __init__(self, conn: Any = None, sync: Any = None) -> None:
        super().__init__()


@pytest.fixture()
def ran(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The syncs the CLI ran, in order (each through the real engine, into a fake)."""
    monkeypatch.setattr(engine, "destination_for", lambda type_, obj="profiles": Fake)
    order: list[str] = []
    real = engine.run_sync

    def recording(project: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        order.append(name)
        return real(project, name, *args, **kwargs)

    monkeypatch.setattr(engine, "run_sync", recording)
    for name in ("REVERSE_ETL_CONFIG", "REVERSE_ETL_PROJECT_DIR", "REVERSE_ETL_STATE_URL"):
        monkeypatch.delenv(name, raising=False)
    return order


def cli(root: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--project-dir", str(root), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def chain_project(root: Path, **extra: Any) -> None:
    """``orders`` depends on ``contacts``, listed first; ``other`` stands alone."""
    people_db(root, [person(i) for i in range(3)])
    syncs = [
        sync_entry("orders", depends_on=["contacts"], **extra),
        sync_entry("other", **extra),
        sync_entry("contacts", **extra),
    ]
    write_project(root, project_data(syncs=syncs))


def fail_last_run(root: Path, sync: str) -> None:
    """Record a failed (exit 3) latest run of ``sync``."""
    store = StateStore("sqlite:///state/state.db", root=root)
    record = RunRecord(run_id=store.new_run_id(), sync=sync, started_at=now(), status="running")
    store.start_run(record)
    record.status, record.ended_at, record.message = "failed", now(), "the API key was refused"
    store.save_run(record)
    store.close()


def test_run_sync_runs_its_dependencies_first_unless_no_deps(tmp_path: Path, ran: list[str]):
    chain_project(tmp_path)
    assert cli(tmp_path, "run", "orders").exit_code == EXIT_OK
    assert ran == ["contacts", "orders"]
    ran.clear()
    assert cli(tmp_path, "run", "orders", "--no-deps").exit_code == EXIT_OK
    assert ran == ["orders"]


def test_run_of_all_syncs_is_in_dependency_order(tmp_path: Path, ran: list[str]) -> None:
    chain_project(tmp_path)
    assert cli(tmp_path, "run").exit_code == EXIT_OK
    assert ran.index("contacts") < ran.index("orders")
    assert sorted(ran) == ["contacts", "orders", "other"]


def test_run_due_orders_due_syncs_and_adds_no_dependency(tmp_path: Path, ran: list[str]) -> None:
    chain_project(tmp_path, schedule="hourly")
    assert cli(tmp_path, "run", "--due").exit_code == EXIT_OK
    assert ran.index("contacts") < ran.index("orders")
    ran.clear()
    # contacts ran a minute ago (not due); orders is made due: it runs alone, contacts does not
    store = StateStore("sqlite:///state/state.db", root=tmp_path)
    with store.engine.begin() as con:
        con.exec_driver_sql("DELETE FROM retl_runs WHERE sync = 'orders'")
    store.close()
    assert cli(tmp_path, "run", "--due").exit_code == EXIT_OK
    assert ran == ["orders"]


def test_scheduler_runs_a_due_dependency_first(tmp_path: Path, ran: list[str]) -> None:
    chain_project(tmp_path, schedule="hourly")
    result = cli(tmp_path, "scheduler", "--cycles", "1", "--interval", "1")
    assert result.exit_code == EXIT_OK, result.output
    assert ran.index("contacts") < ran.index("orders")


def test_a_sync_whose_dependency_failed_is_skipped(
    tmp_path: Path, ran: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_module, "_wait", lambda seconds, interrupt: None)  # checks at once
    chain_project(tmp_path, schedule="hourly")
    fail_last_run(tmp_path, "contacts")  # its latest run failed; it is not due now
    scheduled = cli(tmp_path, "scheduler", "--cycles", "3")
    assert "orders" not in ran and "other" in ran
    said = " ".join(scheduled.stderr.split())
    # said once, not at every check while the dependency stays failed
    assert said.count("orders: skipped: it depends on 'contacts', whose latest run") == 1
    ran.clear()
    due = cli(tmp_path, "run", "--due")
    assert due.exit_code == EXIT_FAILED
    assert ran == []  # other ran just now; orders is held back
    assert "orders: skipped: it depends on 'contacts'" in " ".join(due.stderr.split())
    # run orders (with its dependency): contacts runs, succeeds, and orders follows
    ran.clear()
    assert cli(tmp_path, "run", "orders").exit_code == EXIT_OK
    assert ran == ["contacts", "orders"]


# --------------------------------------------------------------------------- retry queue


def queued(store: StateStore | None, sync: str = "orders") -> int:
    assert store is not None
    return retry_queue.counts(store, [sync])[sync]


def test_an_order_refused_for_a_missing_contact_lands_after_the_contact(dotdigital) -> None:
    rig = dotdigital()
    rig.table(profile_rows(range(3)))
    orders = [order_row(0), order_row(1), order_row(2, email=email_of(7))]  # 7: no contact yet
    create_table(rig.db, "orders", ORDER_COLUMNS, orders)
    rig.configure([contacts_sync(), orders_sync(depends_on=["contacts"])])
    assert rig.run("contacts").exit_code == EXIT_OK

    first = rig.run("orders")

    assert first.exit_code == EXIT_ROW_ERRORS
    [refused] = error_rows(first)
    assert (refused["identifier"], refused["reason"]) == ("O00002", "contact_missing")
    assert "queued: sent again by the next run, attempt 1 of 5" in refused["message"]
    assert queued(rig.store) == 1
    assert rig.watermark("orders").id == "O00002"  # the watermark went past it
    # status shows the queue
    status = cli(rig.root, "status", "--json")
    assert '"retry_queue": 1' in status.stdout

    # the contact arrives; the next orders run sends the order though it did not change
    rig.table(profile_rows([7], modified_at=at(100)), replace=False)
    assert rig.run("contacts").exit_code == EXIT_OK
    second = rig.run("orders")

    assert second.exit_code == EXIT_OK, error_rows(second)
    assert (second.record.counts.read, second.record.counts.sent) == (1, 1)
    landed = {r["key"] for r in rig.sandbox.insight("orders")}
    assert landed == {"O00000", "O00001", "O00002"}
    assert queued(rig.store) == 0
    assert rig.run("orders").record.counts.read == 0  # nothing left to retry


def test_a_contact_that_never_arrives_is_given_up_after_the_bound(dotdigital) -> None:
    rig = dotdigital()
    rig.table(profile_rows(range(2)))
    create_table(rig.db, "orders", ORDER_COLUMNS, [order_row(0), order_row(1, email=email_of(9))])
    rig.configure([contacts_sync(), orders_sync(depends_on=["contacts"])])
    assert rig.run("contacts").exit_code == EXIT_OK

    reasons = []
    for _ in range(retry_queue.MAX_ATTEMPTS):
        result = rig.run("orders")
        reasons.append([(e["identifier"], e["reason"]) for e in error_rows(result)])

    assert reasons[:-1] == [[("O00001", "contact_missing")]] * (retry_queue.MAX_ATTEMPTS - 1)
    assert reasons[-1] == [("O00001", "parent_missing_gave_up")]
    assert queued(rig.store) == 0
    after = rig.run("orders")
    assert after.record.counts.read == 0 and after.exit_code == EXIT_OK


def test_a_queued_row_that_left_the_view_is_dropped(dotdigital) -> None:
    rig = dotdigital()
    rig.table(profile_rows(range(2)))
    create_table(rig.db, "orders", ORDER_COLUMNS, [order_row(0), order_row(1, email=email_of(9))])
    rig.configure([contacts_sync(), orders_sync()])
    assert rig.run("contacts").exit_code == EXIT_OK
    rig.run("orders")
    assert queued(rig.store) == 1
    create_table(rig.db, "orders", ORDER_COLUMNS, [order_row(0)])  # the order was deleted
    assert rig.run("orders").exit_code == EXIT_OK
    assert queued(rig.store) == 0

"""The syncs list reads every sync's state in a few set-based queries: what it shows must be
what the CLI computes one sync at a time (``due_syncs``, ``last_runs``, ``retry_queue``,
``lock_info``), also on a PostgreSQL state store through the running page."""

from __future__ import annotations

import csv
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from reverse_etl import controls
from reverse_etl.config import Project, load_project
from reverse_etl.engine import due_syncs
from reverse_etl.state import RunCounts, RunRecord, StateStore, now, retry_queue
from reverse_etl.transform.rowerrors import ERROR_FILE_COLUMNS
from reverse_etl.ui import views
from reverse_etl.ui.jobs import Jobs
from tests.helpers import people_db, project_data, sync_entry, write_project
from tests.ui.uiserver import Ui


def seed(store: StateStore, names: list[str], tmp_path: Path) -> dict[str, str]:
    """Histories the list must read right: failures in a row (due again after a backoff), an
    old success (due by schedule), a recent one (not due), dry runs (ignored), a running run
    holding its lock, rows in a retry queue. Returns sync -> its error file."""
    t = now()
    a, b, c, d, e = names[:5]

    def run(sync: str, minutes_ago: float, status: str, **counts: int) -> RunRecord:
        started = t - timedelta(minutes=minutes_ago)
        record = RunRecord(
            f"{sync}-{minutes_ago}-{uuid.uuid4().hex[:6]}",
            sync,
            started,
            status,
            ended_at=None if status == "running" else started + timedelta(seconds=3),
            counts=RunCounts(**counts),
        )
        store.start_run(record)
        return record

    run(a, 300, "success", read=5, sent=5)
    run(a, 50, "failed")
    run(a, 30, "failed")  # two in a row: due 10 minutes after the latest ended
    run(a, 5, "dry_run")  # a plan after them changes neither the status nor the backoff
    run(b, 180, "success", read=9, sent=7, rejected=2, new_problems=2)
    run(b, 1, "dry_run")  # a plan: neither the last run nor the last start
    run(c, 10, "success", read=3, sent=3)
    error_file = tmp_path / "e.csv"
    with error_file.open("w", newline="", encoding="utf-8-sig") as fh:
        writer = csv.writer(fh)
        writer.writerow(ERROR_FILE_COLUMNS)
        writer.writerow(
            [
                d,
                "r",
                3,
                "<b>x</b>",
                "",
                "",
                "email",
                "<b>x</b>",
                "invalid_email",
                "m",
                "fix it",
                "r",
            ]
        )
    last = run(d, 20, "partial", read=4, sent=3, rejected=1, known_problems=1)
    last.error_file = str(error_file)
    store.save_run(last)
    held = run(e, 0.5, "running")
    with store.engine.begin() as con:
        con.execute(
            sa.insert(retry_queue).values(
                sync=d, identifier="x@example.com", reason="contact_missing", attempts=1,
                first_queued_at=t, last_run=last.run_id,
            )
        )  # fmt: skip
    store._acquire(e, held.run_id)
    return {d: str(error_file)}


def project_with(root: Path, names: list[str], state_url: str) -> Project:
    people_db(root, [])
    syncs = [sync_entry(n, schedule="hourly") for n in names[:5]] + [sync_entry(names[5])]
    write_project(root, project_data(syncs=syncs, state_url=state_url))
    return load_project(None, root, env={})


def assert_list_matches_the_cli(project: Project, store: StateStore, names: list[str]) -> None:
    page = views.syncs_page(project, store)
    rows = {r["name"]: r for r in page["syncs"]}
    assert list(rows) == names
    assert {n for n, r in rows.items() if r["due"]} == set(due_syncs(project, store))
    for name, row in rows.items():
        last = [r for r in store.last_runs(name, 10) if r.status != "dry_run"][:1]
        assert (row["last"] or {}).get("run_id") == (last[0].run_id if last else None)
        held = store.lock_info(name)
        assert (row["lock"] or {}).get("run_id") == (held.run_id if held else None)
    a, b, c, d, e, f = names
    assert [rows[n]["category"] for n in names] == [
        "failed", "success", "success", "partial", "running", "never run",
    ]  # fmt: skip
    assert rows[d]["retry_queue"] == 1 and rows[a]["retry_queue"] == 0
    assert rows[b]["last"]["counts"]["new_problems"] == 2
    # a's next try: 10 minutes (two failures) after its latest failure ended, before its slot
    failed_end = [r for r in store.last_runs(a, 10) if r.status != "dry_run"][0].ended_at
    assert failed_end is not None and rows[a]["next_due"] == failed_end + timedelta(minutes=10)
    assert rows[f]["next_due"] is None  # no schedule
    for name, row in rows.items():  # each sync's own page says what the list says
        own = views.sync_page(project, store, name)
        assert (own["category"], own["next_due"]) == (row["category"], row["next_due"]), name
    only = views.syncs_page(project, store, status="failed", destination="klaviyo")
    assert [r["name"] for r in only["syncs"]] == [a]
    assert views.syncs_page(project, store, destination="nowhere")["syncs"] == []


def test_the_list_shows_what_the_cli_computes(tmp_path: Path) -> None:
    names = ["a_failing", "b_old", "c_recent", "d_queue", "e_running", "f_manual"]
    project = project_with(tmp_path, names, "sqlite:///state/state.db")
    store = StateStore(project.state.url, root=tmp_path)
    try:
        seed(store, names, tmp_path)
        assert_list_matches_the_cli(project, store, names)
        assert controls.enabled_states(project, store)[names[0]].enabled
    finally:
        store.close()


@pytest.mark.postgres
def test_the_pages_on_a_postgresql_store(
    postgres_dsn: str, tmp_path: Path, start_ui: Callable[..., Ui]
) -> None:
    url = postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    tag = uuid.uuid4().hex[:6]  # the database is shared by the tests of this worker
    names = [f"{x}_{tag}" for x in ("a", "b", "c", "d", "e", "f")]
    project = project_with(tmp_path, names, url)
    store = StateStore(url)
    try:
        files = seed(store, names, tmp_path)
        assert_list_matches_the_cli(project, store, names)
        ui = start_ui(tmp_path)
        with httpx.Client(base_url=ui.url, timeout=30) as client:
            listed = client.get("/")
            assert listed.status_code == 200
            assert all(f'data-sync="{n}"' in listed.text for n in names)
            page = client.get(f"/syncs/{names[3]}")
            assert page.status_code == 200 and "partial" in page.text
            (record,) = store.last_runs(names[3], 1)
            run_page = client.get(f"/runs/{record.run_id}")
            assert run_page.status_code == 200, ui.output()
            assert "Download the whole file" in run_page.text
            assert "&lt;b&gt;x&lt;/b&gt;" in run_page.text and "<b>x</b>" not in run_page.text
            got = client.get(f"/runs/{record.run_id}/error-file")
            assert got.content == Path(files[names[3]]).read_bytes()
            csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            done = client.post(f"/syncs/{names[0]}/disable", data={"csrf": csrf})
            assert done.status_code == 303
        assert not controls.enabled_states(project, store)[names[0]].enabled
        assert due_syncs(project, store) == [n for n in due_syncs(project, store) if n != names[0]]
    finally:
        store.unlock(names[4])
        store.close()


def test_the_buttons_run_the_cli_commands(tmp_path: Path) -> None:
    """Run now, Accept changes and Plan are the CLI's own commands, for the same project."""
    config = tmp_path / "p.yml"
    jobs = Jobs(config, tmp_path)
    try:
        base = ["-m", "reverse_etl.cli", "--project-dir", str(tmp_path), "--config", str(config)]
        assert jobs.argv("run", "s")[1:] == [*base, "run", "s", "--even-if-disabled"]
        assert jobs.argv("accept", "s")[1:] == [
            *base, "run", "s", "--even-if-disabled", "--accept-changes",
        ]  # fmt: skip
        assert jobs.argv("plan", "s")[1:] == [*base, "plan", "s", "--json"]
    finally:
        jobs.stop_all()

"""The run page in a browser: list the syncs, open one, Run now lands rows in the Klaviyo
sandbox and the new run appears, the run page shows hostile warehouse values as text, the
error file downloads byte for byte, and Disable stops ``run --due`` from running a sync."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from reverse_etl.cli import main
from reverse_etl.engine import due_syncs
from reverse_etl.sandbox import KlaviyoSandbox
from reverse_etl.state import StateStore
from tests.sandboxes import Rig, profile_row, profile_rows, sync_entry
from tests.ui.uiserver import Ui

SCRIPT = "<script>alert(1)</script>"
FORMULA = '=HYPERLINK("http://evil.example/x","click")'
MAPPING = {"email": "email", "first_name": "first_name", "phone": "phone_number"}
HANG_GUARD_LOADS = 400  # page loads, 0.3 s apart at least: a run of 22 rows takes a few


def screenshot(page: Any, tmp_path: Path, name: str) -> None:
    """Into the test's temp folder; also into $RETL_UI_SCREENSHOTS (how docs/ is refreshed)."""
    target = tmp_path / "screenshots" / name
    target.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 0
    extra = os.environ.get("RETL_UI_SCREENSHOTS")
    if extra:
        shutil.copyfile(target, Path(extra) / name)


def wait_for(page: Any, url: str, done: Callable[[], bool], what: str) -> None:
    """Reload ``url`` until ``done()``. The guard counts page loads, not seconds: a loaded
    machine takes longer per load and so gets longer, never a failure for being slow."""
    for _ in range(HANG_GUARD_LOADS):
        page.goto(url)
        if done():
            return
        time.sleep(0.3)
    raise AssertionError(f"hang guard: {what} after {HANG_GUARD_LOADS} page loads")


def test_run_now_disable_download_and_hostile_values(
    klaviyo: Callable[..., Rig], start_ui: Callable[..., Ui], chromium: Any, tmp_path: Path
) -> None:
    rig = klaviyo()
    sandbox = rig.sandbox
    assert isinstance(sandbox, KlaviyoSandbox)
    rig.table(
        [*profile_rows(range(20)), profile_row(20, email=SCRIPT), profile_row(21, phone=FORMULA)]
    )
    project = rig.configure(
        [
            sync_entry("people", "klaviyo", MAPPING, destination={"list": "Members"}),
            sync_entry(
                "later", "klaviyo", MAPPING, destination={"list": "Later"}, schedule="hourly"
            ),
        ]
    )
    ui = start_ui(rig.root)
    page = chromium.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    dialogs: list[str] = []

    def dialog(d: Any) -> None:
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", dialog)
    try:
        # the list: one row per sync, linked to its page
        page.goto(ui.url + "/")
        assert page.locator("#syncs tbody tr").count() == 2
        assert "never run" in page.locator('tr[data-sync="people"]').inner_text()
        page.click('tr[data-sync="people"] a:has-text("people")')
        assert page.locator("h1").inner_text().startswith("people")
        assert "No runs yet." in page.locator("#runs").inner_text()

        # Plan: `reverse-etl plan` in a child, its preview on the page; nothing is sent
        page.click("button:has-text('Plan')")
        assert "Plan started" in page.locator(".flash").first.inner_text()
        sync_url = ui.url + "/syncs/people"
        plan = page.locator("#plan")
        wait_for(page, sync_url, lambda: plan.count() == 1, "the plan never ended")
        said = " ".join(plan.inner_text().split())
        assert "Would add 20, update 0, remove 0; unchanged 0, rejected 2 (read 22)" in said
        assert sandbox.list_members("Members") == []

        # Run now: a child `reverse-etl run` lands the rows; the new run appears on the page
        page.click("button:has-text('Run now')")
        assert "Run started" in page.locator(".flash").first.inner_text()
        first_row = page.locator("#runs tbody tr").first
        wait_for(
            page,
            sync_url,
            lambda: "partial" in first_row.inner_text() and "ended with exit" in page.content(),
            "the run from the page never ended",
        )
        assert len(sandbox.list_members("Members")) == 20  # 20 clean rows landed
        store = StateStore(project.state.url, root=rig.root)
        try:
            (record,) = [r for r in store.last_runs("people", 5) if r.status != "dry_run"]
        finally:
            store.close()
        c = record.counts
        assert (c.read, c.sent, c.rejected) == (22, 20, 2)
        assert record.run_id in first_row.inner_text()
        assert "ended with exit 1" in page.content()  # partial: new problems (exit 1)
        screenshot(page, tmp_path, "ui-sync.png")

        # the run page: the error file by reason, hostile values shown as text
        page.click(f"a:has-text('{record.run_id}')")
        assert page.locator("h1").inner_text().startswith(f"Run {record.run_id}")
        errors = page.locator("table.errors").all_inner_texts()
        assert any(SCRIPT in t for t in errors), errors
        assert any(FORMULA in t for t in errors), errors  # neutralised in the file: '=HYPER...
        assert page.locator("script").count() == 0  # nothing was injected as an element
        assert page.evaluate("document.querySelectorAll('a[href*=\"evil\"]').length") == 0
        assert dialogs == []  # and nothing ran
        screenshot(page, tmp_path, "ui-run.png")

        # the download is the error file, byte for byte
        with page.expect_download() as got:
            page.click("#download")
        download = got.value
        assert download.suggested_filename == f"people-{record.run_id}-errors.csv"
        assert record.error_file is not None
        assert Path(download.path()).read_bytes() == Path(record.error_file).read_bytes()

        # Disable: `run --due` no longer takes a sync that is due
        store = StateStore(project.state.url, root=rig.root)
        try:
            assert due_syncs(project, store) == ["later"]  # never run, hourly: due now
            page.goto(ui.url + "/syncs/later")
            page.click("button:has-text('Disable')")
            assert "Disabled" in page.locator(".flash").inner_text()
            assert page.locator("button:has-text('Enable')").count() == 1
            due = CliRunner().invoke(main, ["--project-dir", str(rig.root), "run", "--due"])
            assert due.exit_code == 0 and "nothing to run" in due.output, due.output
            assert store.last_runs("later", 5) == []
        finally:
            store.close()
        assert len(sandbox.lists()) == 1  # the "Later" list was never created

        page.goto(ui.url + "/?status=disabled")
        assert page.locator("#syncs tbody tr").all_inner_texts()[0].startswith("later")
        page.goto(ui.url + "/")
        screenshot(page, tmp_path, "ui-syncs.png")
        assert dialogs == []
    finally:
        page.close()

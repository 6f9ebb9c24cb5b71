"""`reverse-etl demo` end to end in a scratch copy of the project: the generated warehouse, both
sandboxes on loopback, every demo sync, and the incremental second run."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from reverse_etl.config import load_project
from reverse_etl.csv_debug import validate
from reverse_etl.demo import run as demo_run
from reverse_etl.engine import RunOptions, run_sync
from reverse_etl.errors import EXIT_OK
from reverse_etl.sandbox import DotdigitalSandbox, KlaviyoSandbox
from reverse_etl.state import RunRecord, StateStore
from tests.helpers import read_csv_rows

REPO = Path(__file__).resolve().parent.parent
SYNCS = ("klaviyo_profiles", "dotdigital_contacts")
# rejected at transform (the row never left the warehouse) vs refused by the API
TRANSFORM_REASONS = {
    "missing_identifier",
    "duplicate_identifier",
    "missing_cursor",
    "invalid_email",
    "missing_email",
    "invalid_phone",
    "invalid_consent",
    "invalid_timestamp",
    "timestamp_too_old",
    "timestamp_in_future",
    "invalid_date",
    "invalid_number",
    "invalid_boolean",
    "number_out_of_range",
    "invalid_cursor",
    "cursor_in_future",
    # found by the destination's offline screen: the row is not sent
    "missing_required_field",
    "value_too_large",
    "unknown_order_status",
    "insight_nested_array",
    "insight_invalid_key",
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repo's profiles/ and sql/; the demo's environment is undone afterwards."""
    for folder in ("profiles", "sql"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    for name in (
        "KLAVIYO_BASE_URL",
        "KLAVIYO_API_KEY",
        "DOTDIGITAL_BASE_URL",
        "DOTDIGITAL_API_USER",
        "DOTDIGITAL_API_PASSWORD",
    ):
        monkeypatch.setenv(name, "set by the demo")  # run_demo overwrites; monkeypatch restores
    monkeypatch.setenv("REVERSE_ETL_WAREHOUSE", "demo/warehouse.duckdb")
    for name in ("REVERSE_ETL_STATE_URL", "REVERSE_ETL_ERROR_DIR", "REVERSE_ETL_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


class Recorded:
    """The sandboxes each demo run starts, kept for inspection after it stops them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.klaviyo: list[KlaviyoSandbox] = []
        self.dotdigital: list[DotdigitalSandbox] = []
        seen = self

        class K(KlaviyoSandbox):
            def __init__(self, *args: Any, **kwargs: Any):
                super().__init__(*args, **kwargs)
                seen.klaviyo.append(self)

        class D(DotdigitalSandbox):
            def __init__(self, *args: Any, **kwargs: Any):
                super().__init__(*args, **kwargs)
                seen.dotdigital.append(self)

        monkeypatch.setattr(demo_run, "KlaviyoSandbox", K)
        monkeypatch.setattr(demo_run, "DotdigitalSandbox", D)


def run_demo(root: Path) -> tuple[int, str]:
    out = io.StringIO()
    code = demo_run.run_demo(
        root, None, profiles=2000, keep_running=False, console=Console(file=out, width=200)
    )
    return code, out.getvalue()


def latest(store: StateStore) -> dict[str, RunRecord]:
    return {sync: store.last_runs(sync, limit=1)[0] for sync in SYNCS}


def test_demo_runs_end_to_end_and_the_second_run_is_incremental(project, monkeypatch):
    sandboxes = Recorded(monkeypatch)

    code, output = run_demo(project)

    assert code == EXIT_OK, output
    assert (project / "demo" / "warehouse.duckdb").exists()
    [klaviyo], [dotdigital] = sandboxes.klaviyo, sandboxes.dotdigital
    for sandbox in (klaviyo, dotdigital):
        assert sandbox.violations == []
        assert sandbox.internal_errors == []
    profiles = klaviyo.profiles()
    contacts = dotdigital.contacts()
    assert len(profiles) > 1000 and len(contacts) > 1000
    # order events also create profiles (guest checkouts), which join no list
    members = klaviyo.list_members("Loyalty members")
    assert 1000 < len(members) <= len(profiles)
    assert all(m.get("email") for m in members)
    books = {b["name"]: b["contacts"] for b in dotdigital.address_books()}
    assert set(books) == {"Newsletter subscribers", "Customers"}
    assert books["Newsletter subscribers"] > 0 and books["Customers"] > 0
    assert sum(books.values()) == len(contacts)

    store = StateStore("sqlite:///.reverse_etl/state.db", root=project)
    first = latest(store)
    for sync, record in first.items():
        c = record.counts
        assert record.status == "partial", (
            sync,
            record.message,
        )  # the demo data is dirty on purpose
        assert c.read == c.sent + c.rejected, (sync, c)
        assert c.sent == c.created + c.updated + c.failed, (sync, c)
        assert c.rejected > 0
        assert record.error_file and Path(record.error_file).is_file()
        assert Path(record.error_file).parent == project / ".reverse_etl" / "errors" / sync
        errors = read_csv_rows(record.error_file)
        assert {e["sync"] for e in errors} == {sync} and {e["run_id"] for e in errors} == {
            record.run_id
        }
        refused = {e["row_number"] for e in errors if e["reason"] in TRANSFORM_REASONS}
        assert len(refused) == c.rejected, (sync, Counter(e["reason"] for e in errors))
        for e in errors:
            assert e["row_number"].isdigit() and e["column"] and e["message"] and e["how_to_fix"], e
        assert all(e["identifier"] for e in errors if e["reason"] != "missing_identifier")
        rejected_ids = {e["identifier"] for e in errors if e["reason"] == "invalid_email"}
        landed = {p.get("email") for p in profiles} | {
            ct["identifiers"].get("email") for ct in contacts
        }
        assert (
            rejected_ids and not rejected_ids & landed
        )  # rows named in the error file never landed
    assert first["klaviyo_profiles"].counts.read == first["dotdigital_contacts"].counts.read
    assert_validate_and_dry_run_refuse_what_the_run_refused(project, store)

    code, output = run_demo(project)  # 25 customers change between the runs

    assert code == EXIT_OK, output
    assert "25 customers changed" in output
    second = latest(store)
    for sync in SYNCS:
        assert second[sync].run_id != first[sync].run_id
        read = second[sync].counts.read
        assert 0 < read <= 50, (sync, second[sync].counts)  # the changed customers, not the view
        assert read * 20 < first[sync].counts.read
        assert 15 <= second[sync].counts.sent <= 25, (
            sync,
            second[sync].counts,
        )  # of the 25 changed
        assert second[sync].status in {"success", "partial"}
    [_, klaviyo2], [_, dotdigital2] = sandboxes.klaviyo, sandboxes.dotdigital
    assert klaviyo2.violations == [] and dotdigital2.violations == []
    assert 0 < len(klaviyo2.profiles()) <= 50 and 0 < len(dotdigital2.contacts()) <= 50
    store.close()


def assert_validate_and_dry_run_refuse_what_the_run_refused(root: Path, store: StateStore) -> None:
    """For every demo sync, ``validate`` and a dry run report, reason by reason, every row the
    first run refused before sending: one read-and-transform path, the destination's offline
    checks included. Only the API's own refusals (and unsent rows) are the run's alone."""
    project = load_project(None, root)
    seen: Counter[str] = Counter()
    for sync in project.syncs:
        record = store.last_runs(sync.name, limit=1)[0]
        ran = Counter(
            e["reason"]
            for e in read_csv_rows(record.error_file)
            if e["reason"] not in {"destination_rejected", "contact_missing", "not_sent"}
        )
        seen += ran
        report = validate(project, sync, csv_path=None, error_file=str(root / f"{sync.name}.csv"))
        assert Counter(report.by_reason) == ran, sync.name
        # --resend: the rows the destination holds are checked again too, as a first run does
        dry = run_sync(
            project, sync.name, store, RunOptions(dry_run=True, full_refresh=True, resend=True)
        )
        # consent the destination holds from the first run is not sent again, --resend or
        # not (consent.kept): so nor is consent missing its address reported again
        again = Counter({k: v for k, v in ran.items() if k != "missing_consent_address"})
        assert Counter(dry.by_reason) == again, sync.name
        assert dry.record.counts.rejected == record.counts.rejected, sync.name
    # what the issue found validate missing on the demo is now among what all three report
    assert {"missing_consent_address", "missing_required_field", "missing_email"} <= set(seen)


def test_demo_command_exits_0(project):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KLAVIYO_", "DOTDIGITAL_", "REVERSE_ETL_"))
    }
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("reverse-etl")),
            "--project-dir",
            str(project),
            "demo",
            "--profiles",
            "2000",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    assert "requests refused as off-spec" in done.stdout
    assert (project / ".reverse_etl" / "state.db").exists()
    store = StateStore("sqlite:///.reverse_etl/state.db", root=project)
    try:
        runs = latest(store)
    finally:
        store.close()
    assert all(r.counts.sent > 1000 and r.status == "partial" for r in runs.values()), runs

"""Progress and logs for unattended runs (issue 17): JSON and text lines with UTC timestamps,
retries logged at WARNING as they happen, one unwrapped progress line per batch off a
terminal, HTTP detail with -v, and no secret in any of it."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from reverse_etl import logs, progress
from reverse_etl.cli import main
from reverse_etl.destinations import http, jobs
from reverse_etl.sandbox import KlaviyoSandbox
from reverse_etl.secrets import register_secret
from reverse_etl.state import RunRecord
from tests.sandboxes import Rig, fast_clients, profile_rows, rig_fixture, sync_entry

MAPPING = {"email": "email", "first_name": "first_name"}
LONG_NAME = "nightly_" + "x" * 92  # the longest name a sync may have: 100 characters


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``logs.setup`` and ``progress.install`` change process state: put it back."""
    root, ours = logging.getLogger(), logging.getLogger("reverse_etl")
    handlers, levels = list(root.handlers), (root.level, ours.level)
    yield
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    ours.setLevel(levels[1])
    progress.install(None)


@pytest.fixture
def klaviyo(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Rig]]:
    fast_clients(monkeypatch)
    yield from rig_fixture(request, tmp_path, KlaviyoSandbox)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def utc(ts: str) -> datetime:
    moment = datetime.fromisoformat(ts)
    assert moment.utcoffset() is not None and moment.utcoffset().total_seconds() == 0, ts
    return moment


# --------------------------------------------------------------------------- formats


def test_json_lines_parse_and_carry_ts_level_message_and_the_run() -> None:
    out = io.StringIO()
    logs.setup("json", handler=logging.StreamHandler(out))
    log = logging.getLogger("reverse_etl.test")
    log.info("outside a run")
    record = RunRecord(run_id="r-1", sync="people", started_at=datetime.now(UTC), status="running")
    with progress.tracking(record, progress.LineProgress()):
        record.counts.read = 7
        log.warning("line one\nline two", extra={"wait_s": 1.5})
        record.status = "success"
    log.debug("below the level: not written")
    lines = json_lines(out.getvalue())
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    assert all(utc(line["ts"]) for line in lines)
    assert "sync" not in lines[0] and lines[0]["message"] == "outside a run"
    warned = [line for line in lines if line["level"] == "WARNING"]
    assert len(warned) == 1 and warned[0]["message"] == "line one\nline two"  # one line still
    assert warned[0]["sync"] == "people" and warned[0]["run_id"] == "r-1"
    assert warned[0]["counters"]["read"] == 7 and warned[0]["wait_s"] == 1.5
    assert warned[0]["phase"] == "starting"
    # the progress sink's own lines: started, and ended with the run's status
    assert lines[-1]["logger"] == "reverse_etl.progress" and lines[-1]["phase"] == "success"
    assert not any("below the level" in line["message"] for line in lines)


def test_text_lines_start_with_a_utc_timestamp_and_level() -> None:
    out = io.StringIO()
    logs.setup("text", handler=logging.StreamHandler(out))
    logging.getLogger("reverse_etl.test").warning("careful")
    ts, level, rest = out.getvalue().strip().split(" ", 2)
    assert ts.endswith("Z") and utc(ts.replace("Z", "+00:00"))
    assert (level, rest) == ("WARNING", "reverse_etl.test: careful")


def test_an_unknown_log_format_is_refused_by_the_cli() -> None:
    result = CliRunner().invoke(main, ["--log-format", "xml", "check"])
    assert result.exit_code == 2 and "'text', 'json'" in result.output


def test_a_job_resubmission_is_a_warning_and_the_wait_is_the_runs_phase(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    class Job:
        what, id, attempts = "Test import job (3 records)", "j1", 1
        answers = iter(["failed", "running", "done"])

        def start(self) -> None:
            self.attempts += 1

        def status(self) -> tuple[jobs.State, dict[str, Any]]:
            run = progress.current_run()
            seen.append(run.phase if run else "")
            return next(self.answers), {"status": "x"}  # type: ignore[return-value]

    record = RunRecord(run_id="r-2", sync="people", started_at=datetime.now(UTC), status="running")
    patience = jobs.Patience(first=0.0, clock=lambda: 0.0, sleep=lambda _: None)
    with caplog.at_level(logging.INFO), progress.tracking(record, progress.LineProgress()) as run:
        run.set_phase("sending")
        jobs.wait(Job(), attempts=3, poll_interval=0.0, patience=patience)
        assert run.phase == "sending"  # back to what it was
    assert seen == ["waiting for Test import job (3 records)"] * 3
    resubmitted = [r for r in caplog.records if "submitting it again" in r.getMessage()]
    assert [r.levelno for r in resubmitted] == [logging.WARNING]
    assert "submission 2 of 3" in resubmitted[0].getMessage()


def test_a_long_job_wait_is_logged_while_it_lasts(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]

    class Job:
        what, id, attempts = "Test import job (1 records)", "j2", 1
        polls = 0

        def start(self) -> None: ...

        def status(self) -> tuple[jobs.State, dict[str, Any]]:
            self.polls += 1
            return ("done" if self.polls > 30 else "running"), {}

    def sleep(seconds: float) -> None:
        now[0] += seconds

    patience = jobs.Patience(first=5.0, ceiling=5.0, clock=lambda: now[0], sleep=sleep)
    with caplog.at_level(logging.INFO, logger="reverse_etl"):
        jobs.wait(Job(), attempts=1, poll_interval=5.0, patience=patience)
    told = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    # 150 s of polls every 5 s: told at 60 s and 120 s, not at every poll
    assert told == [
        "Test import job (1 records) j2: still running after 60.0 s",
        "Test import job (1 records) j2: still running after 2 minutes",
    ]


def test_terminal_display_shows_counters_and_phase() -> None:
    from rich.console import Console

    screen = io.StringIO()
    sink = progress.TerminalProgress(Console(file=screen, force_terminal=True, width=200))
    record = RunRecord(run_id="r-3", sync="people", started_at=datetime.now(UTC), status="running")
    with progress.tracking(record, sink) as run:
        record.counts.read, record.counts.sent, record.counts.rejected = 1200, 1150, 50
        with progress.phase("rate limited, resuming in 12 s"):
            run.acknowledged()
            assert "rate limited, resuming in 12 s" in screen.getvalue()
        record.status = "success"
    shown = screen.getvalue()
    assert "people" in shown and "read 1,200" in shown and "rejected 50" in shown
    assert "success" in shown


# --------------------------------------------------------------------------- runs


def test_each_retry_is_a_warning_logged_before_the_next_attempt(
    klaviyo: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast_clients(monkeypatch, max_attempts=3)
    rig = klaviyo(fault_rate=1.0, fault_kinds=("500",))
    rig.table(profile_rows(range(3)))
    rig.configure([sync_entry("people", "klaviyo", MAPPING)])
    # what the sandbox had answered when each warning was written
    answered: list[tuple[str, list[int]]] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.WARNING and record.name == http.__name__:
                statuses = [r.status for r in rig.sandbox.request_log]
                answered.append((record.getMessage(), statuses))

    watch = Watch()
    logging.getLogger().addHandler(watch)
    try:
        result = rig.run("people")
    finally:
        logging.getLogger().removeHandler(watch)
    assert result.record.status == "failed" and "after 3 attempts" in (result.record.message or "")
    assert [message.split("; ")[-1].split(" in ")[0] for message, _ in answered] == [
        "retry 1 of 2",
        "retry 2 of 2",
    ]
    # each warning was written between the attempts: after the 1st 500, then after the 2nd
    assert [statuses.count(500) for _, statuses in answered] == [1, 2]
    assert all("HTTP 500" in message and "/api/" in message for message, _ in answered)


def cli_run(rig: Rig, *args: str) -> Any:
    runner = CliRunner()
    return runner.invoke(main, ["--project-dir", str(rig.root), *args], catch_exceptions=False)


def test_off_a_terminal_one_unwrapped_line_per_batch(klaviyo: Callable[..., Rig]) -> None:
    rig = klaviyo()
    rig.table(profile_rows(range(10)))
    rig.configure([sync_entry(LONG_NAME, "klaviyo", MAPPING, batch_size=3)])
    result = cli_run(rig, "run", LONG_NAME)
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    batches = [line for line in lines if "acknowledged" in line]
    assert len(batches) == 4  # 10 rows in batches of 3
    assert batches[-1].endswith(")") and "read 10, sent 10, rejected 0, failed 0" in batches[-1]
    # no line is a wrapped piece of another: every one is a whole log line, name and all
    assert len(batches[0]) > 160
    assert all(line.split(" ")[0].endswith("Z") for line in lines), lines
    assert all(LONG_NAME in line for line in lines if "reverse_etl.progress" in line)
    phases = [line.split(f"{LONG_NAME}: ", 1)[1] for line in lines if "progress" in line]
    assert "reading" in phases and "sending" in phases and "success" in phases


def test_json_run_with_http_detail_never_logs_the_secret(
    klaviyo: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "NOTABLE_WAIT", 0.0)  # every retry's wait is a phase line
    rig = klaviyo(fault_rate=0.5, fault_kinds=("429", "500"), seed=3)
    secret = rig.sandbox.settings.api_key
    register_secret(secret)
    rig.table(profile_rows(range(6)))
    rig.configure([sync_entry("people", "klaviyo", MAPPING)])
    logging.getLogger("reverse_etl.test").info("the key is %s", secret)  # before setup: no handler
    result = cli_run(rig, "-v", "--log-format", "json", "run", "people")
    assert result.exit_code == 0, result.stderr
    assert secret not in result.stderr and "Authorization" not in result.stderr
    lines = json_lines(result.stderr)
    traced = [line for line in lines if "duration_ms" in line]
    assert traced and all({"method", "path", "status"} <= line.keys() for line in traced)
    statuses = {line["status"] for line in traced}
    assert statuses & {429, 500} and statuses & {200, 202}, statuses
    retries = [line for line in lines if "attempt" in line and line["level"] == "WARNING"]
    assert retries and all(line["sync"] == "people" and "wait_s" in line for line in retries)
    resumed = [line for line in lines if "resuming in" in line["message"]]
    assert resumed and all(line["level"] == "INFO" for line in resumed)
    assert any(line["message"].startswith("people: rate limited, resuming in") for line in resumed)

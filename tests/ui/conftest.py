"""Fixtures for the run page: ``reverse-etl ui`` started as the user starts it (a child
process on a free loopback port, stopped after the test), and a headless Chromium (Debian's
``chromium`` package, driven by Playwright; never a downloaded browser)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ui.uiserver import Ui, _pump

CHROMIUM = Path(os.environ.get("RETL_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT = 60.0  # hang guard: a server that prints no URL by then is broken


@pytest.fixture()
def start_ui() -> Iterator[Callable[..., Ui]]:
    """``start_ui(root, *args, env={...})`` runs ``reverse-etl --project-dir ROOT ui --port 0
    ARGS`` and returns its URL once it listens; every server started is stopped after."""
    started: list[Ui] = []

    def start(root: Path, *args: str, env: dict[str, str] | None = None) -> Ui:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from reverse_etl.cli import main; main()",
                "--project-dir",
                str(root),
                "ui",
                "--port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=root,
            env={**os.environ, **(env or {})},
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        ui = Ui("", proc, lines)
        started.append(ui)
        seen: list[str] = []
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"reverse-etl ui printed no URL: {''.join(seen)}")
            seen.append(line)
            if line.startswith("reverse-etl ui: http://"):
                ui.url = line.split()[2].rstrip("/")
                return ui
            if proc.poll() is not None and lines.empty():
                pytest.fail(f"reverse-etl ui exited {proc.returncode}: {''.join(seen)}")

    yield start
    for ui in started:
        if ui.proc.poll() is None:
            ui.proc.terminate()
            try:
                ui.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                ui.proc.kill()
                ui.proc.wait()


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    if not CHROMIUM.exists():
        from tests.warehouses import _missing

        _missing(
            f"{CHROMIUM} not found: `apt-get install -y --no-install-recommends chromium` "
            "(.ci/run does it)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()

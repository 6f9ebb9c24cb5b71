"""What keeps the run page safe: it refuses to listen beyond loopback without a token, then
requires the token on every request; every POST needs the CSRF token and its cookie; only
loopback Host headers are answered without a token (DNS rebinding); secrets are scrubbed from
definitions; only a file a run record names can be downloaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from reverse_etl import controls
from reverse_etl.cli import main
from reverse_etl.config import load_project
from reverse_etl.state import RunRecord, StateStore, now
from tests.helpers import (
    API_KEY,
    API_KEY_ENV,
    people_db,
    person,
    project_data,
    sync_entry,
    write_project,
)
from tests.ui.uiserver import Ui

TOKEN = "t0ken-for-the-ui-tests-5b1e"


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose SQL file holds the destination's API key (as a careless comment)."""
    for name in ("REVERSE_ETL_CONFIG", "REVERSE_ETL_PROJECT_DIR", "REVERSE_ETL_STATE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    people_db(tmp_path, [person(i) for i in range(3)])
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "people.sql").write_text(f"SELECT * FROM people -- key {API_KEY}\n")
    source = {"connection": "warehouse", "sql": "sql/people.sql"}
    write_project(tmp_path, project_data(syncs=[sync_entry(source=source, table=None)]))
    return tmp_path


def csrf_of(html: str) -> str:
    marker = 'name="csrf" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


def test_refuses_to_listen_beyond_loopback_without_a_token(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REVERSE_ETL_UI_TOKEN", raising=False)
    refused = CliRunner().invoke(main, ["--project-dir", str(root), "ui", "--host", "0.0.0.0"])
    assert refused.exit_code == 2
    assert "set REVERSE_ETL_UI_TOKEN" in " ".join(refused.stderr.split())
    monkeypatch.setenv("REVERSE_ETL_UI_TOKEN", "short")
    weak = CliRunner().invoke(main, ["--project-dir", str(root), "ui", "--host", "0.0.0.0"])
    assert weak.exit_code == 2 and "too short" in weak.stderr


def test_token_csrf_scrubbing_and_downloads(root: Path, start_ui: Callable[..., Ui]) -> None:
    ui = start_ui(root, env={"REVERSE_ETL_UI_TOKEN": TOKEN})
    with httpx.Client(base_url=ui.url, timeout=30) as anon:
        assert anon.get("/").status_code == 401
        assert anon.get("/syncs/people").status_code == 401
        assert anon.get("/", params={"token": TOKEN + "x"}).status_code == 401
        bearer = anon.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200 and "people" in bearer.text

    with httpx.Client(base_url=ui.url, timeout=30) as browser:
        login = browser.get("/syncs/people", params={"token": TOKEN, "x": "1"})
        assert login.status_code == 303 and login.headers["location"] == "/syncs/people?x=1"
        assert TOKEN not in login.headers["set-cookie"]  # a digest, not the token
        page = browser.get("/syncs/people")
        assert page.status_code == 200
        assert "SELECT * FROM people -- key ***" in page.text  # the definition, scrubbed
        assert API_KEY not in page.text
        assert "script-src" not in page.headers["content-security-policy"]  # no script at all

        csrf = csrf_of(page.text)
        assert browser.post("/syncs/people/disable").status_code == 403
        assert browser.post("/syncs/people/disable", data={"csrf": "forged"}).status_code == 403
        cookieless = httpx.post(
            ui.url + "/syncs/people/disable",
            data={"csrf": csrf},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert cookieless.status_code == 403  # the field alone is not enough
        project = load_project(None, root, env={})
        store = StateStore(project.state.url, root=root)
        try:
            assert controls.enabled_states(project, store)["people"].enabled
            done = browser.post("/syncs/people/disable", data={"csrf": csrf})
            assert done.status_code == 303 and done.headers["location"].endswith("?done=disable")
            assert not controls.enabled_states(project, store)["people"].enabled

            # downloads: only the file a run record names, by run id
            secret_file = root / "outside.csv"
            secret_file.write_text("not an error file\n")
            store.start_run(RunRecord("run-no-file", "people", now(), "failed"))
            store.start_run(
                RunRecord("run-gone", "people", now(), "partial", error_file=str(root / "gone.csv"))
            )
        finally:
            store.close()
        assert browser.get("/runs/run-no-file/error-file").status_code == 404
        assert browser.get("/runs/run-gone/error-file").status_code == 404
        assert browser.get("/runs/nope/error-file").status_code == 404
        traversal = browser.get("/runs/..%2F..%2Foutside.csv/error-file")
        assert traversal.status_code == 404 and "not an error file" not in traversal.text
        gone = browser.get("/runs/run-gone")  # the page says so instead of failing
        assert gone.status_code == 200 and "is gone" in gone.text


def test_loopback_answers_loopback_host_names_only(root: Path, start_ui: Callable[..., Ui]) -> None:
    ui = start_ui(root)
    port = ui.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=ui.url, timeout=30) as client:
        assert client.get("/").status_code == 200
        assert client.get("/", headers={"Host": f"localhost:{port}"}).status_code == 200
        rebound = client.get("/", headers={"Host": f"attacker.example:{port}"})
        assert rebound.status_code == 400 and "people" not in rebound.text

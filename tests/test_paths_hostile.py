"""Mistakes about paths and the state store's URL end in a message saying what to fix (exit 3),
never in "internal error ... please report it": an ``error_dir`` under a file or under /proc, a
state store whose folder is a file, that is a folder, that cannot be reached, of a database
reverse-etl does not run on, or no URL at all. A URL's password never shows; and a run whose
error file cannot be written sends nothing."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from reverse_etl import engine
from reverse_etl.cli import main
from reverse_etl.errors import ReverseEtlError
from reverse_etl.extras import installed
from reverse_etl.util import storage
from tests.helpers import API_KEY_ENV, people_db, person, project_data, write_project
from tests.test_cli import CliFake, flat

PASSWORD = "Pw_hostile_7c1e9b"
HAS_PROC = Path("/proc/self").is_dir()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REVERSE_ETL_CONFIG", "REVERSE_ETL_PROJECT_DIR", "REVERSE_ETL_STATE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(API_KEY_ENV, "pk_test_paths_hostile_5d6e")


@pytest.fixture()
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every row the (fake) destination was handed."""
    CliFake.log = []
    monkeypatch.setattr(engine, "destination_for", lambda type_, obj="profiles": CliFake)
    return CliFake.log


def project(root: Path, **kw: Any) -> Path:
    """A project of three clean people, ``afile`` a regular file beside it."""
    people_db(root, [person(i) for i in range(3)])
    write_project(root, project_data(**kw))
    (root / "afile").write_text("not a folder\n")
    return root


def cli(root: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, ["--project-dir", str(root), *args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def failed_cleanly(result: Result) -> str:
    """Exit 3 with a message, not a bug report: the output, whitespace removed (rich wraps a
    long path anywhere, even inside it); compare with :func:`said`."""
    out = flat(result.output)
    assert result.exit_code == 3, out
    assert "internal error" not in out
    assert "please report it" not in out
    assert "Traceback" not in out
    return said(out)


def said(text: str) -> str:
    return "".join(text.split())


# --------------------------------------------------------------------------- error_dir


def test_error_dir_under_a_file_fails_the_run_before_sending(tmp_path: Path, sent: list) -> None:
    root = project(tmp_path, error_dir="afile/errors")
    out = failed_cleanly(cli(root, "run"))
    assert said(f"people: cannot write {root / 'afile' / 'errors' / 'people'}") in out
    assert said(f"{root / 'afile'} is a file, not a folder") in out
    assert sent == []  # the error file is opened before the view is read
    (run,) = json.loads(cli(root, "runs", "people", "--json").stdout)["runs"]
    assert run["status"] == "failed"  # recorded, the lock released: status says why
    assert "is a file, not a folder" in run["message"]
    assert run["error_file"] is None
    assert run["counts"]["read"] == 0 and run["counts"]["sent"] == 0
    assert said("is a file, not a folder") in failed_cleanly(cli(root, "run"))  # not lock held


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux's /proc")
def test_error_dir_in_proc_fails_the_run_before_sending(tmp_path: Path, sent: list) -> None:
    root = project(tmp_path, error_dir="/proc/x")
    out = failed_cleanly(cli(root, "run"))
    assert said("people: cannot write /proc/x/people/") in out
    assert said("folder /proc/x cannot be created: No such file or directory") in out
    assert sent == []


def test_error_dir_dry_run_fails_too(tmp_path: Path, sent: list) -> None:
    root = project(tmp_path, error_dir="afile/errors")
    out = failed_cleanly(cli(root, "run", "--dry-run"))
    assert said(f"{root / 'afile'} is a file, not a folder") in out
    assert not (root / ".reverse_etl" / "dry-run").exists()  # stopped before the payloads


def test_unwritable_error_file_is_both_an_oserror_and_a_project_error(tmp_path: Path) -> None:
    """Callers that handle file errors (``consent --csv``, ``export``) keep handling it; an
    error while the file is written is not one."""
    (tmp_path / "afile").write_text("")
    target = tmp_path / "afile" / "out.csv"
    with pytest.raises(storage.PathError) as exc, storage.open_text_for_write(str(target)):
        pass
    assert isinstance(exc.value, OSError) and isinstance(exc.value, ReverseEtlError)
    assert str(exc.value) == f"cannot write {target}: {tmp_path / 'afile'} is a file, not a folder"
    (tmp_path / "folder.csv").mkdir()
    folder = str(tmp_path / "folder.csv")
    with (
        pytest.raises(storage.PathError, match="is a folder, not a file"),
        storage.open_text_for_write(folder),
    ):
        pass
    written = str(tmp_path / "ok" / "e.csv")
    with pytest.raises(OSError, match="disk full") as raised, storage.open_text_for_write(written):
        raise OSError("disk full")  # as a write would: passed on as it is
    assert not isinstance(raised.value, storage.PathError)


# --------------------------------------------------------------------------- the state store


@pytest.mark.parametrize("command", ["run", "status"])
def test_state_store_under_a_file(tmp_path: Path, sent: list, command: str) -> None:
    root = project(tmp_path, state_url="sqlite:///afile/state.db")
    out = failed_cleanly(cli(root, command))
    assert (
        said(
            f"error: state store sqlite:///afile/state.db cannot be opened: "
            f"{root / 'afile'} is a file, not a folder"
        )
        in out
    )
    assert sent == []


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["run", "status"])
def test_state_store_in_proc(tmp_path: Path, sent: list, command: str) -> None:
    root = project(tmp_path, state_url="sqlite:////proc/state.db")
    out = failed_cleanly(cli(root, command))
    assert said("error: state store sqlite:////proc/state.db cannot be opened: ") in out
    assert said("unable to open database file") in out
    assert "sqlalche.me" not in out  # SQLAlchemy's footer is not the user's business
    assert sent == []


def test_state_store_that_is_a_folder(tmp_path: Path) -> None:
    root = project(tmp_path, state_url="sqlite:///state")
    (root / "state").mkdir()
    out = failed_cleanly(cli(root, "status"))
    assert (
        said(f"state store sqlite:///state cannot be opened: {root / 'state'} is a folder") in out
    )


def test_state_store_in_a_missing_absolute_folder(tmp_path: Path) -> None:
    gone = tmp_path / "gone" / "deeper"
    root = project(tmp_path, state_url=f"sqlite:///{gone}/state.db")
    out = failed_cleanly(cli(root, "status"))
    assert said(f"cannot be opened: folder {tmp_path / 'gone'} does not exist") in out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not installed("psycopg"), reason="needs the postgres extra")
@pytest.mark.parametrize("via", ["project file", "REVERSE_ETL_STATE_URL"])
@pytest.mark.parametrize("command", ["run", "status"])
def test_unreachable_postgresql_hides_the_password(
    tmp_path: Path, sent: list, via: str, command: str
) -> None:
    port = closed_port()
    url = f"postgresql+psycopg://bob:{PASSWORD}@127.0.0.1:{port}/retl"
    if via == "project file":
        root, env = project(tmp_path, state_url=url), None
    else:
        root, env = project(tmp_path), {"REVERSE_ETL_STATE_URL": url}
    result = cli(root, command, env=env)
    out = failed_cleanly(result)
    assert PASSWORD not in result.output
    assert said(f"error: state store postgresql+psycopg://bob:***@127.0.0.1:{port}/retl") in out
    assert said("cannot be opened: connection failed") in out
    assert sent == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://x/y", "state store URL mysql://x/y: only sqlite and postgresql are supported"),
        (
            f"mysql+pymysql://bob:{PASSWORD}@db/y",
            "state store URL mysql+pymysql://bob:***@db/y: only sqlite and postgresql are "
            "supported",
        ),
        (
            f"posgresql//bob:{PASSWORD}@db/y",
            "state store URL 'posgresql//***@db/y' is not a database URL; write e.g. sqlite:///",
        ),
        ("", "state store URL '' is not a database URL"),
    ],
    ids=["mysql", "mysql-password", "garbled", "empty"],
)
@pytest.mark.parametrize("command", ["run", "status"])
def test_unsupported_or_garbled_state_url(
    tmp_path: Path, sent: list, url: str, message: str, command: str
) -> None:
    root = project(tmp_path, state_url=url)
    result = cli(root, command)
    out = failed_cleanly(result)
    assert said(f"error: {message}") in out
    assert PASSWORD not in result.output
    assert sent == []


@pytest.mark.skipif(installed("pg8000"), reason="pg8000 is installed here")
def test_postgresql_driver_not_installed(tmp_path: Path) -> None:
    root = project(tmp_path, state_url=f"postgresql+pg8000://bob:{PASSWORD}@db/y")
    result = cli(root, "status")
    out = failed_cleanly(result)
    assert said("state store postgresql+pg8000://bob:***@db/y: driver 'postgresql+pg8000' ") in out
    assert said("(pg8000 is not installed); write sqlite:///PATH or postgresql+psycopg://") in out
    assert PASSWORD not in result.output


# --------------------------------------------------------------------------- snapshot


@pytest.mark.parametrize("command", [("run",), ("run", "--dry-run")])
def test_snapshot_path_under_a_file(tmp_path: Path, sent: list, command: tuple[str, ...]) -> None:
    root = project(tmp_path, snapshot={"path": "afile/snaps"})
    out = failed_cleanly(cli(root, *command))
    assert said("snapshot file") in out
    assert said(f"{root / 'afile'} is a file, not a folder") in out
    assert sent == []

"""The package as a team installs it: a wheel built from the tree, installed into a fresh
virtualenv outside the repository, runs ``reverse-etl demo`` with the ``sandbox`` extra (with
and without the vendors' specs), and without extras names the extra a feature needs.

Installs use constraints.txt, the versions ``make test`` pins, so pip's cache serves them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from reverse_etl.extras import MissingExtra, check_state_url, requires
from reverse_etl.sandbox.spec import (
    SPEC_FILES,
    Spec,
    SpecsNotFound,
    SpecViolation,
    find_specs,
    use_spec_dir,
)
from reverse_etl.state import StateStore
from reverse_etl.util import storage

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
SPECS = REPO.parent / "shared" / "api-specs"
# what is not source: left out of the copy the wheel is built from
NOT_SOURCE = {".git", "build", "demo", ".reverse_etl", "bench-results", "dist"}

SNOWFLAKE_PROJECT = """\
connections:
  warehouse:
    type: snowflake
    account: acme
    user: loader
    password: not-used
    database: analytics
    schema: public
    warehouse: loading
  klaviyo: {type: klaviyo, api_key: pk_test, base_url: "http://127.0.0.1:9"}
syncs:
  - name: people
    source: {connection: warehouse, sql: sql/people.sql}
    object: profiles
    identifier: email
    cursor: modified_at
    destination: {connection: klaviyo}
    mapping: {email: email}
"""


# ----------------------------------------------------------------------------- in process


def test_the_shipped_demo_project_is_the_repositorys() -> None:
    shipped = resources.files("reverse_etl.demo").joinpath("project")
    for name in ("profiles/profiles.yml", "sql/profiles.sql", "sql/orders.sql", "sql/catalog.sql"):
        assert shipped.joinpath(name).read_text() == (REPO / name).read_text(), name


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "snowflake", None)  # import snowflake... now fails
    with (
        pytest.raises(MissingExtra, match=r"pip install 'reverse-etl\[snowflake\]'"),
        requires("snowflake", "the snowflake source"),
    ):
        import snowflake.connector  # noqa: F401
    with pytest.raises(ModuleNotFoundError), requires("snowflake", "the snowflake source"):
        import no_such_module_at_all  # noqa: F401  # not the extra's: passes through

    monkeypatch.setitem(sys.modules, "boto3", None)
    with (
        pytest.raises(MissingExtra, match=r"reverse-etl\[s3\]"),
        storage.open_text_for_write("s3://bucket/errors.csv"),
    ):
        pass

    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(MissingExtra, match=r"PostgreSQL state store .* 'reverse-etl\[postgres\]'"):
        StateStore("postgresql+psycopg://etl@127.0.0.1:9/state")
    check_state_url("sqlite:///state.db")  # SQLite needs nothing


@pytest.fixture
def spec_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def make(name: str) -> Path:
        for file in SPEC_FILES.values():
            (tmp_path / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).write_text("{}")
        return tmp_path / name

    monkeypatch.delenv("REVERSE_ETL_API_SPECS", raising=False)
    yield make
    use_spec_dir(None)  # back to the default lookup (and a fresh load_spec cache)


def test_spec_lookup_order(spec_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag, env = spec_dirs("flag"), spec_dirs("env")
    if SPECS.is_dir():
        assert find_specs().path == SPECS.resolve()  # beside the repository checkout
    monkeypatch.setenv("REVERSE_ETL_API_SPECS", str(env))
    assert find_specs().path == env.resolve()
    use_spec_dir(flag)
    assert find_specs().path == flag.resolve()  # --api-specs over the environment
    use_spec_dir(tmp_path / "empty")
    with pytest.raises(SpecsNotFound, match="--api-specs .*empty: not the vendors' API specs"):
        find_specs()  # a directory given on purpose must hold them


def test_without_specs_requests_are_not_checked() -> None:
    spec = Spec("klaviyo/profiles", None)
    op = spec.operation("post", "/api/profile-bulk-import-jobs")
    assert op.ratelimit == {}
    checked = op.check(
        path_params={}, query=[("x", "1")], headers={}, content_type=None, body=b'{"a": 1}'
    )
    assert checked == {"a": 1}
    with pytest.raises(SpecViolation):
        op.check(path_params={}, query=[], headers={}, content_type=None, body=b"{not json")


# ------------------------------------------------------------------ a wheel, installed


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("KLAVIYO_", "DOTDIGITAL_", "REVERSE_ETL_", "PYTHONPATH", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _run(args: list[str], cwd: Path, timeout: float = 300, **env: str):
    return subprocess.run(
        args,
        cwd=cwd,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the tree as it is, built from a copy (no build/ left in the repository)."""
    base = tmp_path_factory.mktemp("wheel")

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == REPO
        return {
            n
            for n in names
            if n in {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
            or n.endswith(".egg-info")
            or (top and (n in NOT_SOURCE or n.startswith(".venv")))
        }

    src = base / "src"
    shutil.copytree(REPO, src, ignore=ignore)
    out = base / "dist"
    _ok(
        _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
            base,
        )
    )
    [built] = out.glob("reverse_etl-*.whl")
    return built


def _venv(where: Path, requirement: str) -> Path:
    """A fresh virtualenv at ``where`` holding ``requirement``; returns its bin/ folder."""
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(where)], where.parent))
    python = where / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile"]
    _ok(_run([*pip, "-c", str(CONSTRAINTS), requirement], where.parent))
    return where / "bin"


def test_without_extras_a_snowflake_source_names_its_extra(wheel: Path, tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "venv", str(wheel))
    project = tmp_path / "project"
    (project / "profiles").mkdir(parents=True)
    (project / "sql").mkdir()
    (project / "profiles" / "profiles.yml").write_text(SNOWFLAKE_PROJECT)
    (project / "sql" / "people.sql").write_text("SELECT email, modified_at FROM people\n")
    cli = str(bin_dir / "reverse-etl")

    done = _run([cli, "check"], project)

    assert done.returncode == 3, done.stdout + done.stderr
    assert (
        "the snowflake source needs the snowflake extra: pip install 'reverse-etl[snowflake]'"
        in done.stderr
    ), done.stderr
    assert "Traceback" not in done.stderr

    done = _run([cli, "demo"], project)

    assert done.returncode == 3, done.stdout + done.stderr
    assert "needs the sandbox extra: pip install 'reverse-etl[sandbox]'" in done.stderr


def test_with_the_sandbox_extra_the_demo_runs_in_any_folder(wheel: Path, tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "venv", f"{wheel}[sandbox]")
    demo = [str(bin_dir / "reverse-etl"), "demo", "--profiles", "300"]
    assert SPECS.is_dir(), f"the vendors' specs are expected in {SPECS}"

    with_specs = tmp_path / "with-specs"
    with_specs.mkdir()
    done = _ok(_run(demo, with_specs, REVERSE_ETL_API_SPECS=str(SPECS)))

    assert f"vendor API specs: {SPECS.resolve()}" in done.stdout, done.stdout
    assert "requests are checked against them" in done.stdout
    assert "wrote the demo project" in done.stdout
    assert (with_specs / "profiles" / "profiles.yml").is_file()
    assert (with_specs / "demo" / "warehouse.duckdb").is_file()
    assert (with_specs / ".reverse_etl" / "state.db").is_file()
    [refused] = [line for line in done.stdout.splitlines() if "refused as off-spec" in line]
    assert refused.rstrip(" │").endswith(" 0"), refused

    without = tmp_path / "without-specs"
    without.mkdir()
    done = _ok(_run(demo, without))

    assert "warning: vendor API specs not found" in done.stdout, done.stdout
    assert "serve WITHOUT request validation" in done.stdout
    assert "not checked (no specs)" in done.stdout
    assert "WARNING" not in done.stderr, done.stderr  # said once, at the start

"""The deployment recipes (Dockerfile, deploy/) hold together with the tool as it is.

The image's install steps (scripts/image-install.sh) run here against the wheel of the tree in
a fresh virtualenv, as ``docker build`` runs them; the Kubernetes CronJob, the Airflow DAG and
the crontab are checked for what a deployment relies on: a non-root user, secrets from the
environment, one run at a time, contacts before orders, exit codes handled.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import shutil
import sys
import types
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from croniter import croniter

from reverse_etl import errors
from tests import test_packaging as packaging

REPO = packaging.REPO
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
INSTALL_SCRIPT = "scripts/image-install.sh"
DAG_FILE = DEPLOY / "airflow" / "reverse_etl_dag.py"
# a fixture under another name: the wheel test_packaging builds (module-scoped there, and here)
packaging_wheel = packaging.wheel
SECRETS = {
    "KLAVIYO_API_KEY": "pk_not_a_key",
    "DOTDIGITAL_API_USER": "apiuser@example.com",
    "DOTDIGITAL_API_PASSWORD": "not-a-password",
}


def demo_syncs() -> list[dict[str, Any]]:
    return yaml.safe_load((REPO / "profiles" / "profiles.yml").read_text())["syncs"]


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), one list per FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        elif not stages:
            continue  # ARG before the first FROM
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch(p, pattern) for p in prefixes):
            ignored = not negated
    return ignored


def test_the_image_runs_as_a_non_root_user_with_the_cli_as_entrypoint() -> None:
    build, runtime = dockerfile_stages()
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE.read_text(), re.M)

    [user] = [args for kw, args in runtime if kw == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and not root"
    [entrypoint] = [args for kw, args in runtime if kw == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["reverse-etl"]
    env = " ".join(args for kw, args in runtime if kw == "ENV")
    assert "REVERSE_ETL_PROJECT_DIR=/project" in env  # the CLI's --project-dir default
    assert ("WORKDIR", "/project") in runtime
    # the runtime stage takes the virtualenv only: no build tools, no wheel, no source
    copies = [args for kw, args in runtime if kw == "COPY"]
    assert copies == ["--from=build /opt/reverse-etl /opt/reverse-etl"]
    # no secret is baked in: the image's environment names none
    assert not re.search(r"KLAVIYO|DOTDIGITAL|PASSWORD|STATE_URL", env)


def test_the_image_runs_the_install_script_the_tests_run() -> None:
    build, _ = dockerfile_stages()
    copies = [args.split() for kw, args in build if kw == "COPY"]
    assert any(INSTALL_SCRIPT in args for args in copies)
    runs = [args for kw, args in build if kw == "RUN"]
    [install] = [r for r in runs if "image-install.sh" in r]
    words = shlex.split(install)
    assert words[words.index("image-install.sh") - 1] == "sh"
    assert words[words.index("image-install.sh") + 1 :] == [
        "/dist/reverse_etl-*.whl",
        "/opt/reverse-etl",
        "constraints.txt",
    ]
    # the extras are a build argument with a production default that includes the state store
    [extras] = [args for kw, args in build if kw == "ARG" and args.startswith("EXTRAS=")]
    assert "postgres" in extras.split("=", 1)[1].split(",")


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_private() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        word
        for stage in dockerfile_stages()
        for kw, args in stage
        if kw == "COPY" and "--from=" not in args
        for word in args.split()[:-1]
    ]
    assert INSTALL_SCRIPT in sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not dockerignored(source, patterns), f"{source} is left out of the build context"
    assert not dockerignored("reverse_etl/cli.py", patterns)
    for private in (".venv/bin/python", ".git/config", ".reverse_etl/state.db", ".env"):
        assert dockerignored(private, patterns), private
    for junk in ("demo/warehouse.duckdb", "reverse_etl/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(junk, patterns), junk


# ----------------------------------------------------------------------------- the image's install


def test_the_image_install_script_installs_a_working_cli(
    packaging_wheel: Path, tmp_path: Path
) -> None:
    """What `docker build` runs, in a fresh folder: the CLI answers and checks a project whose
    secrets come from the environment."""
    venv = tmp_path / "opt" / "reverse-etl"
    script = str(REPO / INSTALL_SCRIPT)

    done = packaging._ok(
        packaging._run(
            ["sh", script, str(packaging_wheel), str(venv), str(packaging.CONSTRAINTS)],
            tmp_path,
            PYTHON=sys.executable,
            BYTECOMPILE="0",  # the only step left out: ~10 s of .pyc files
        )
    )

    cli = str(venv / "bin" / "reverse-etl")
    assert done.stdout.strip().endswith("reverse-etl, version 0.1.0"), done.stdout
    assert not (venv / "bin" / "pip").exists()  # no pip in the image's virtualenv
    # the default extras: PostgreSQL state store and s3:// error files
    packaging._ok(
        packaging._run([str(venv / "bin" / "python"), "-c", "import psycopg, boto3"], tmp_path)
    )
    assert packaging._ok(packaging._run([cli, "--version"], tmp_path)).stdout.strip() == (
        "reverse-etl, version 0.1.0"
    )

    project = tmp_path / "project"  # as mounted at /project
    shutil.copytree(REPO / "profiles", project / "profiles")
    shutil.copytree(REPO / "sql", project / "sql")
    elsewhere = tmp_path / "workdir"
    elsewhere.mkdir()
    check = [cli, "--project-dir", str(project), "check", "--offline"]

    done = packaging._ok(packaging._run(check, elsewhere, 60, **SECRETS))
    assert "OK — 3 connections, 6 syncs" in done.stdout, done.stdout

    missing = {k: v for k, v in SECRETS.items() if k != "KLAVIYO_API_KEY"}
    done = packaging._run(check, elsewhere, 60, **missing)
    assert "environment variable 'KLAVIYO_API_KEY' is not set" in done.stderr, done.stderr
    assert "not-a-password" not in done.stdout + done.stderr


def test_the_image_install_script_names_a_missing_wheel(tmp_path: Path) -> None:
    done = packaging._run(
        ["sh", str(REPO / INSTALL_SCRIPT), str(tmp_path / "nope.whl"), str(tmp_path / "v"), "c"],
        tmp_path,
    )
    assert done.returncode == 2
    assert "nope.whl: no such file (build the wheel first" in done.stderr
    assert not (tmp_path / "v").exists()


# ----------------------------------------------------------------------------- Kubernetes


def test_the_kubernetes_cronjob_runs_the_image_non_root_once_at_a_time() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "cronjob.yaml").read_text()))
    [cron] = [d for d in docs if d and d["kind"] == "CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert croniter.is_valid(spec["schedule"])
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    # a failed run counts as started: a retried `run --due` would find nothing due and pass
    assert job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # the run's own grace (REVERSE_ETL_STOP_GRACE_SECONDS) fits inside the pod's
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert (
        int(env["REVERSE_ETL_STOP_GRACE_SECONDS"]["value"]) < pod["terminationGracePeriodSeconds"]
    )

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    _, runtime = dockerfile_stages()
    [user] = [args for kw, args in runtime if kw == "USER"]
    assert security["runAsUser"] == int(user.split(":")[0]) != 0  # the image's user
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]

    assert container["command"] == ["reverse-etl"]
    assert container["args"] == ["--project-dir", "/project", "run", "--due"]
    # secrets from a Secret: the state store URL by key, the API credentials as a whole
    state = env["REVERSE_ETL_STATE_URL"]["valueFrom"]["secretKeyRef"]
    assert state["key"] == "REVERSE_ETL_STATE_URL"
    [secret] = [s["secretRef"]["name"] for s in container["envFrom"]]
    assert state["name"] == secret
    assert not any("value" in e and e["name"] in SECRETS for e in container["env"])
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["memory"]
    assert container["resources"]["requests"]["cpu"]

    # the project is mounted at /project; what a run writes lives on a volume of its own
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/project/profiles"]["readOnly"] is True
    assert "/project/.reverse_etl" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts["/project/.reverse_etl"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert any(
        d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs
    )


# ----------------------------------------------------------------------------- Airflow


class _Task:
    def __init__(self, task_id: str, python_callable: Any, op_kwargs: dict[str, Any]) -> None:
        self.task_id, self.python_callable, self.op_kwargs = task_id, python_callable, op_kwargs
        self.upstream: set[str] = set()
        _Dag.current.tasks[task_id] = self

    def __rshift__(self, other: _Task) -> _Task:
        other.upstream.add(self.task_id)
        return other


class _Dag:
    current: _Dag

    def __init__(self, dag_id: str, **kwargs: Any) -> None:
        self.dag_id, self.kwargs = dag_id, kwargs
        self.tasks: dict[str, _Task] = {}

    def __enter__(self) -> _Dag:
        _Dag.current = self
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _AirflowException(Exception):
    pass


class _AirflowFailException(_AirflowException):
    pass


@pytest.fixture
def dag_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """The DAG file imported with the few Airflow 3 names it uses stubbed (Airflow itself is
    ~300 MB and pins its own libraries), and a reverse-etl that exits with $EXIT_CODE."""
    stubs: dict[str, dict[str, Any]] = {
        "airflow": {},
        "airflow.sdk": {"DAG": _Dag},
        "airflow.sdk.exceptions": {
            "AirflowException": _AirflowException,
            "AirflowFailException": _AirflowFailException,
        },
        "airflow.providers": {},
        "airflow.providers.standard": {},
        "airflow.providers.standard.operators": {},
        "airflow.providers.standard.operators.python": {"PythonOperator": _Task},
    }
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    fake = tmp_path / "reverse-etl"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\nexit "$EXIT_CODE"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("REVERSE_ETL_BIN", str(fake))
    monkeypatch.setenv("REVERSE_ETL_PROJECT_DIR", "/srv/project")
    spec = importlib.util.spec_from_file_location("reverse_etl_dag", DAG_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module


def test_the_airflow_dag_compiles_and_names_airflow_3s_modules() -> None:
    tree = ast.parse(DAG_FILE.read_text())
    compile(tree, str(DAG_FILE), "exec")
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert {"airflow.sdk", "airflow.providers.standard.operators.python"} <= imported
    # reverse-etl runs in its own virtualenv: the DAG never imports it
    assert not any(m.startswith("reverse_etl") for m in imported)


def test_the_airflow_dag_has_a_task_per_sync_and_orders_after_contacts(
    dag_module: types.ModuleType,
) -> None:
    dag = dag_module.dag
    syncs = demo_syncs()
    assert list(dag.tasks) == [s["name"] for s in syncs]
    # an orders sync waits for the profiles sync of the same destination connection
    profiles = {
        s["destination"]["connection"]: s["name"] for s in syncs if s["object"] == "profiles"
    }
    for sync in syncs:
        expected = (
            {profiles[sync["destination"]["connection"]]} if sync["object"] == "orders" else set()
        )
        assert dag.tasks[sync["name"]].upstream == expected, sync["name"]
    assert dag.kwargs["max_active_runs"] == 1
    assert dag.kwargs["catchup"] is False
    assert dag.kwargs["default_args"]["on_failure_callback"] is dag_module.alert


@pytest.mark.parametrize(
    ("code", "raised"),
    [
        (errors.EXIT_OK, None),
        (errors.EXIT_ROW_ERRORS, _AirflowFailException),  # fails for good: no retry hides it
        (errors.EXIT_USAGE, _AirflowFailException),
        (errors.EXIT_FAILED, _AirflowException),  # retried: rows stay behind the watermark
        (143, _AirflowException),
    ],
)
def test_the_airflow_tasks_turn_exit_codes_into_outcomes(
    dag_module: types.ModuleType,
    code: int,
    raised: type[Exception] | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("EXIT_OK", "EXIT_ROW_ERRORS", "EXIT_USAGE", "EXIT_FAILED"):
        assert getattr(dag_module, name) == getattr(errors, name), name
    monkeypatch.setenv("EXIT_CODE", str(code))
    task = dag_module.dag.tasks["klaviyo_orders"]

    if raised is None:
        task.python_callable(**task.op_kwargs)
    else:
        with pytest.raises(_AirflowException) as info:
            task.python_callable(**task.op_kwargs)
        assert type(info.value) is raised
        assert "klaviyo_orders: " in str(info.value)
        assert f"exit {code}" in str(info.value)

    args = (tmp_path / "args").read_text().split()
    assert args == ["--project-dir", "/srv/project", "run", "klaviyo_orders"]


# ----------------------------------------------------------------------------- cron


def cron_entries() -> list[tuple[str, str, bool]]:
    """(schedule, command, active) for each crontab entry, the commented-out ones too."""
    entries = []
    for raw in (DEPLOY / "cron.example").read_text().splitlines():
        active = not raw.startswith("#")
        line = raw.lstrip("#")
        fields = line.split(None, 5)
        if len(fields) == 6 and croniter.is_valid(" ".join(fields[:5])):
            entries.append((" ".join(fields[:5]), fields[5], active))
        elif active and line.strip():
            assert re.fullmatch(r"[A-Z_]+=\S+", line.strip()), f"not a crontab line: {raw!r}"
    return entries


def test_the_cron_example_runs_due_syncs_and_logs_their_exit_codes() -> None:
    entries = cron_entries()
    assert len(entries) >= 3
    [(_, active, _)] = [e for e in entries if e[2]]
    assert "run --due" in active
    names = {s["name"] for s in demo_syncs()}
    for schedule, command, _ in entries:
        assert croniter.is_valid(schedule)
        assert "/bin/reverse-etl --project-dir " in command
        assert re.search(r">> \S+\.log 2>&1 \|\| echo .*exit \$\?", command), command
        assert not re.search(r"(?<!\\)%", command), "an unescaped % ends a crontab command"
        assert ". /etc/reverse-etl/env" in command  # secrets from a private env file
        named = command.split(" run ", 1)[1].split(">>")[0].split()
        assert set(named) - {"--due"} <= names, named


def test_the_deploy_readme_covers_each_recipe() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != "README.md":
            assert str(path.relative_to(DEPLOY)) in readme, path
    assert "../Dockerfile" in readme
    for scope in ("profiles:write", "lists:write", "subscriptions:write", "events:write"):
        assert scope in readme, scope

"""Session fixtures that start throw-away warehouses: PostgreSQL, fakesnow, bqemulator.

Load as a pytest plugin (``pytest_plugins = ["tests.warehouses"]``). Each fixture starts its
server once per test session (once per xdist worker) on a free loopback port and stops it at the
end. A missing prerequisite fails the test with the command that installs it; set
``RETL_SKIP_MISSING=1`` to skip such tests instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PG_BIN = Path(os.environ.get("RETL_PG_BIN", "/usr/lib/postgresql/15/bin"))
BQEMU_VENV = REPO / ".venv-bqemu"
BQEMU_PROJECT = "retl-test"

# Recognisable secrets, so tests can assert that no error message ever repeats them.
PG_PASSWORD = "pg-pw-" + secrets.token_hex(8)
SNOWFLAKE_PASSWORD = "sf-pw-" + secrets.token_hex(8)


def _missing(message: str) -> None:
    if os.environ.get("RETL_SKIP_MISSING") == "1":
        pytest.skip(message)
    pytest.fail(message + "\n(set RETL_SKIP_MISSING=1 to skip these tests instead)", pytrace=False)


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A PostgreSQL 15 server of its own with password auth; yields the DSN of an empty database
    ``retl_test`` owned by superuser ``retl``."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).exists():
            _missing(
                f"PostgreSQL server binaries not found at {PG_BIN} (no {tool}): install them with "
                "`apt-get install -y postgresql-15` (or point RETL_PG_BIN at their directory)"
            )
    as_root = os.geteuid() == 0
    run_as: list[str] = []
    if as_root:  # the server refuses to run as root
        if shutil.which("runuser") is None:
            _missing("running as root needs `runuser` (util-linux) to start PostgreSQL as postgres")
        run_as = ["runuser", "-u", "postgres", "--"]

    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="retl-pg-"))
    data = root / "data"
    pwfile = root / "pwfile"
    pwfile.write_text(PG_PASSWORD + "\n")
    if as_root:
        shutil.chown(root, user="postgres")
        shutil.chown(pwfile, user="postgres")
    log = root / "server.log"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*run_as, *args], capture_output=True, text=True, timeout=120, cwd=root
        )

    try:
        init = run(
            str(PG_BIN / "initdb"),
            "-D", str(data),
            "-U", "retl",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        if init.returncode != 0:
            pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}", pytrace=False)
        port = 0
        for _attempt in range(3):  # another process may grab the free port first
            port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            start = run(
                str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                "-w", "-t", "60", "start",
            )  # fmt: skip
            if start.returncode == 0:
                break
        else:
            pytest.fail(f"PostgreSQL did not start:\n{start.stderr}\n{_tail(log)}", pytrace=False)

        import psycopg

        admin = f"postgresql://retl:{PG_PASSWORD}@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute("CREATE DATABASE retl_test")
        print(f"\n[warehouses] PostgreSQL ready in {time.monotonic() - started:.2f}s on {port}")
        yield f"postgresql://retl:{PG_PASSWORD}@127.0.0.1:{port}/retl_test"
    finally:
        if (data / "postmaster.pid").exists():
            run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- Snowflake


@pytest.fixture(scope="session")
def snowflake_kwargs() -> Iterator[dict[str, Any]]:
    """A fakesnow server in this process; yields ``snowflake.connector.connect`` kwargs for
    database ``RETL_TEST``, schema ``PUBLIC``. All connections share one in-memory database."""
    try:
        import fakesnow
    except ImportError:
        _missing("fakesnow is not installed: `pip install -e '.[dev]'` (fakesnow[server]==0.12.1)")
    started = time.monotonic()
    with (
        _fakesnow_null_timestamps_fixed(),
        fakesnow.server(host="127.0.0.1") as server_kwargs,
        _quiet_access_log(),  # after the start: uvicorn sets its loggers' levels as it starts
    ):
        print(f"\n[warehouses] fakesnow ready in {time.monotonic() - started:.2f}s")
        yield {
            "user": "retl",
            "password": SNOWFLAKE_PASSWORD,
            "account": "fakesnow",
            "host": server_kwargs["host"],
            "port": server_kwargs["port"],
            "protocol": "http",
            "network_timeout": 5,  # the connector retries server errors until this runs out
            "session_parameters": {"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False},
            "database": "RETL_TEST",
            "schema": "PUBLIC",
        }


@contextlib.contextmanager
def _quiet_access_log() -> Iterator[None]:
    """fakesnow serves through uvicorn in this process, whose access log writes a line per
    query into every captured test output; warnings and errors still show."""
    access = logging.getLogger("uvicorn.access")
    level = access.level
    access.setLevel(logging.WARNING)
    try:
        yield
    finally:
        access.setLevel(level)


@contextlib.contextmanager
def _fakesnow_null_timestamps_fixed() -> Iterator[None]:
    """fakesnow 0.12.1's server encodes timestamps as Snowflake's epoch/fraction structs without
    a validity bitmap, so the real connector reads every NULL timestamp as 1970-01-01T00:00:00.
    Real Snowflake sends NULLs; so does fakesnow with this patch (the server runs in-process)."""
    import fakesnow.arrow
    import pyarrow as pa
    import pyarrow.compute as pc

    original = fakesnow.arrow.timestamp_to_sf_struct

    def with_nulls(ts: pa.Array | pa.ChunkedArray) -> pa.Array:
        if isinstance(ts, pa.ChunkedArray):
            ts = ts.combine_chunks()
        struct = original(ts)
        if ts.null_count == 0:
            return struct
        children = [pc.fill_null(struct.field(i), 0) for i in range(struct.type.num_fields)]
        return pa.StructArray.from_arrays(children, fields=list(struct.type), mask=ts.is_null())

    fakesnow.arrow.timestamp_to_sf_struct = with_nulls
    try:
        yield
    finally:
        fakesnow.arrow.timestamp_to_sf_struct = original


# --------------------------------------------------------------------------- BigQuery


@pytest.fixture(scope="session")
def bigquery_endpoint() -> Iterator[tuple[str, str]]:
    """bqemulator (from its own virtualenv ``.venv-bqemu``) on a free port; yields
    ``(project, endpoint)`` for ``BigQuerySource(project, api_endpoint=endpoint)``."""
    exe = BQEMU_VENV / "bin" / "bqemulator"
    if not exe.exists():
        _missing(
            f"{exe} is missing: create the emulator's virtualenv with `scripts/bqemu-venv.sh` "
            "(python3.11 -m venv .venv-bqemu && .venv-bqemu/bin/pip install bqemulator==1.4.0 "
            "duckdb==1.5.5 duckdb-extension-spatial==1.5.5 numpy, then INSTALL the spatial "
            "extension from its wheel)"
        )
    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="retl-bqemu-"))
    log = log_dir / "bqemulator.log"
    env = dict(os.environ, BQEMU_ENABLE_FORMAT_EXTENSIONS="false")
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _attempt in range(3):  # another process may grab the free port first
            port = free_port()
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    [
                        str(exe),
                        "start",
                        "--rest-host",
                        "127.0.0.1",
                        "--rest-port",
                        str(port),
                        "--grpc-port",
                        "0",
                        "--project",
                        BQEMU_PROJECT,
                        "--log-level",
                        "warning",
                    ],  # fmt: skip
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,  # same HOME: the spatial extension is under ~/.duckdb/extensions
                    cwd=log_dir,
                )
            endpoint = f"http://127.0.0.1:{port}"
            if _wait_healthy(proc, endpoint + "/healthz", timeout=60):
                break
            _stop(proc)
        else:
            pytest.fail(f"bqemulator did not become healthy:\n{_tail(log)}", pytrace=False)
        print(f"\n[warehouses] bqemulator ready in {time.monotonic() - started:.2f}s on {port}")
        yield BQEMU_PROJECT, endpoint
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(log_dir, ignore_errors=True)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), _NO_PROXY.open(url, timeout=2) as response:
            if response.status == 200:
                return True
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

"""Destinations are found, not listed: the registry discovers each package's DESTINATION,
whatever is imported first, and a destination installed from elsewhere (an entry point) is
configured, checked and run like the built-in ones without a line changed in reverse_etl/."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reverse_etl.destinations import registry

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=120,
    )


@pytest.mark.parametrize(
    "first",
    [
        "reverse_etl.destinations.klaviyo.profiles",
        "reverse_etl.destinations.dotdigital.orders",
        "reverse_etl.destinations.klaviyo.configuration",
        "reverse_etl.engine",
        "reverse_etl.config",
    ],
)
def test_every_destination_is_found_whatever_is_imported_first(first: str) -> None:
    done = _python(
        f"""
        import {first}
        import reverse_etl.config as config
        print(",".join(sorted(config.DESTINATION_TYPES)))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ",".join(sorted(registry.plugins()))


def test_every_object_class_declares_capabilities() -> None:
    for plugin in registry.plugins().values():
        for obj in plugin.objects:
            cls = plugin.object_class(obj)
            assert cls.type == plugin.type
            assert cls.capabilities.standard_fields, (plugin.type, obj)
            assert cls.capabilities.label


PLUGIN = """
from typing import Literal

import pyarrow as pa

from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.destinations.configuration import DestinationConnection
from reverse_etl.destinations.registry import DestinationPlugin


class EchoConnection(DestinationConnection):
    type: Literal["echo"]
    base_url: str = "http://127.0.0.1:9"


DESTINATION = DestinationPlugin(
    type="echo",
    title="Echo",
    connection=EchoConnection,
    objects={"profiles": "echo_destination.profiles:EchoProfiles"},
    reasons={"echo_refused": "Echo refuses odd ids; make them even."},
)
"""

PROFILES = """
from reverse_etl.destinations.base import Destination, Request
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.transform.rowerrors import RowError


class EchoProfiles(Destination):
    type = "echo"
    capabilities = Capabilities(
        label="Echo profiles",
        standard_fields={"email": "email", "name": "string"},
        identifier_fields=("email",),
        max_in_flight=2,
    )

    def requests(self, table):
        yield Request("POST", "/echo", b"[]", table.num_rows)

    def submit(self, table):
        return table

    def complete(self, table, tally):
        rows = table.to_pylist()
        odd = [r for r in rows if r["__row"] % 2]
        tally.refused(
            RowError(r["__row"], r["__id"], "email", r["email"], "echo_refused", "odd row")
            for r in odd
        )
        tally.landed(len(rows) - len(odd), created=len(rows) - len(odd))
"""


def test_a_destination_from_elsewhere_runs_without_a_change_in_reverse_etl(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    pkg = site / "echo_destination"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(PLUGIN)
    (pkg / "profiles.py").write_text(PROFILES)
    dist = site / "echo_destination-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-destination\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[reverse_etl.destinations]\necho = echo_destination:DESTINATION\n"
    )
    project = tmp_path / "project"
    (project / "profiles").mkdir(parents=True)
    (project / "profiles" / "profiles.yml").write_text(
        textwrap.dedent(
            """
            connections:
              warehouse: {type: duckdb, path: warehouse.duckdb}
              echo: {type: echo}
            syncs:
              - name: people
                source: {connection: warehouse, table: people}
                object: profiles
                identifier: email
                destination: {connection: echo}
                mapping: {email: email, name: name}
            """
        )
    )
    done = _python(
        f"""
        import duckdb, csv
        from reverse_etl.config import load_project
        from reverse_etl.engine import RunOptions, run_sync
        from reverse_etl.state import StateStore

        root = {str(project)!r}
        con = duckdb.connect(root + "/warehouse.duckdb")
        con.execute(
            "CREATE TABLE people AS SELECT 'p' || i || '@example.com' AS email, "
            "'P' || i AS name, TIMESTAMP '2025-01-01' + INTERVAL (i) MINUTE AS modified_at "
            "FROM range(1, 11) t(i)"
        )
        con.close()
        project = load_project(None, root, env={{}})
        store = StateStore("sqlite:///" + root + "/state.db", root=root)
        result = run_sync(project, "people", store, RunOptions())
        c = result.record.counts
        print(c.read, c.sent, c.created, c.failed)
        with open(result.record.error_file, encoding="utf-8-sig") as fh:
            print(sorted({{row["how_to_fix"] for row in csv.DictReader(fh)}}))
        """,
        PYTHONPATH=f"{site}{os.pathsep}{ROOT}",
    )
    assert done.returncode == 0, done.stderr
    counts, fixes = done.stdout.strip().splitlines()
    assert counts == "10 10 5 5"
    assert fixes == "['Echo refuses odd ids; make them even.']"

"""`reverse-etl demo`: the whole job end to end on the embedded default.

Generates the DuckDB demo warehouse (once; later runs change a few customers so the
incremental effect shows), starts the Klaviyo and Dotdigital sandboxes on 127.0.0.1 with
their published limits, points the project's connections at them through the environment,
runs every sync, prints what landed, and stops the sandboxes.

Outside a project (no ``profiles/profiles.yml`` and no ``--config``) it first writes the demo
project shipped in the package (``profiles/profiles.yml`` and ``sql/``) into the project
directory, so ``pip install "reverse-etl[sandbox]"`` then ``reverse-etl demo`` works in any
folder. The vendors' API specs are not shipped: found, requests are checked against them; not
found, the demo says so and the sandboxes serve unchecked (``reverse_etl.sandbox.spec``).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import duckdb
from rich.console import Console
from rich.table import Table

from reverse_etl.config import load_project
from reverse_etl.demo.generate import generate_demo_warehouse
from reverse_etl.engine import RunOptions, run_sync
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, ConfigError
from reverse_etl.extras import MissingExtra, requires
from reverse_etl.state import StateStore

try:  # the sandbox extra; without it the demo says which extra to install
    with requires("sandbox", "the demo"):
        from reverse_etl.sandbox import (
            DotdigitalSandbox,
            KlaviyoSandbox,
            SandboxServer,
            SandboxSettings,
        )
        from reverse_etl.sandbox.spec import SpecLocation, SpecsNotFound, find_specs, use_spec_dir
    _NO_SANDBOX: MissingExtra | None = None
except MissingExtra as exc:
    _NO_SANDBOX = exc

WAREHOUSE = Path("demo/warehouse.duckdb")
CHANGES_PER_RERUN = 25
#: The demo project shipped in the package, written into a folder that has none.
PROJECT_FILES = ("profiles/profiles.yml", "sql/profiles.sql", "sql/orders.sql", "sql/catalog.sql")


def write_demo_project(root: Path, console: Console) -> None:
    """Write the packaged demo project into ``root`` unless it has a project file already."""
    if (root / PROJECT_FILES[0]).exists():
        return
    shipped = resources.files("reverse_etl.demo").joinpath("project")
    texts = {name: shipped.joinpath(name).read_text(encoding="utf-8") for name in PROJECT_FILES}
    for name, text in texts.items():
        path = root / name
        if path.exists() and path.read_text(encoding="utf-8") != text:
            raise ConfigError(
                f"{path} exists and is not the demo's; run the demo in an empty folder "
                "(or pass --project-dir DIR)"
            )
    for name, text in texts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    console.print(f"wrote the demo project into {root}: profiles/profiles.yml, sql/*.sql")


def prepare_warehouse(root: Path, profiles: int, console: Console) -> Path:
    path = root / WAREHOUSE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        counts = generate_demo_warehouse(path, profiles=profiles)
        console.print(
            f"generated demo warehouse {path}: "
            + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        )
        return path
    con = duckdb.connect(str(path))
    try:  # a re-run: a few customers change, as they would between two scheduled runs
        con.execute("SET TimeZone = 'UTC'")
        con.execute(
            # later than every row already synced, whatever this machine's clock says
            f"UPDATE raw.customers SET loyalty_points = loyalty_points + 10, modified_at = "
            f"greatest(now(), (SELECT max(m) FROM (SELECT max(modified_at) AS m FROM raw.customers "
            f"UNION ALL SELECT max(modified_at) FROM raw.orders)) + INTERVAL 1 MINUTE) "
            f"WHERE customer_id IN (SELECT customer_id FROM raw.customers WHERE customer_id IS NOT NULL "
            f"ORDER BY hash(customer_id || CAST(epoch(now()) AS VARCHAR)) LIMIT {CHANGES_PER_RERUN})"
        )
    finally:
        con.close()
    console.print(
        f"demo warehouse {path} exists: {CHANGES_PER_RERUN} customers changed since the last run"
    )
    return path


def find_demo_specs(api_specs: str | Path | None, console: Console) -> SpecLocation:
    """Where the sandboxes read the vendors' specs from (``--api-specs`` first); printed."""
    use_spec_dir(api_specs)
    try:
        specs = find_specs(told=True)
    except SpecsNotFound as exc:
        raise ConfigError(str(exc)) from exc
    style = "yellow" if specs.path is None else None
    console.print(specs.describe(), style=style, markup=False, soft_wrap=True)
    return specs


def run_demo(
    root: Path,
    config: str | None,
    *,
    profiles: int,
    keep_running: bool,
    console: Console,
    api_specs: str | Path | None = None,
) -> int:
    if _NO_SANDBOX is not None:
        raise _NO_SANDBOX
    specs = find_demo_specs(api_specs, console)
    if config is None:
        write_demo_project(root, console)
    prepare_warehouse(root, profiles, console)
    settings = SandboxSettings()
    klaviyo, dotdigital = KlaviyoSandbox(settings), DotdigitalSandbox(settings)
    with SandboxServer(klaviyo) as k_srv, SandboxServer(dotdigital) as d_srv:
        console.print(f"sandboxes up: Klaviyo {k_srv.base_url}, Dotdigital {d_srv.base_url}")
        os.environ.update(
            {
                "KLAVIYO_BASE_URL": k_srv.base_url,
                "KLAVIYO_API_KEY": settings.api_key,
                "DOTDIGITAL_BASE_URL": d_srv.base_url,
                "DOTDIGITAL_API_USER": settings.username,
                "DOTDIGITAL_API_PASSWORD": settings.password,
            }
        )
        os.environ.setdefault("REVERSE_ETL_WAREHOUSE", str(WAREHOUSE))
        project = load_project(config, root)
        store = StateStore(os.environ.get("REVERSE_ETL_STATE_URL") or project.state.url, root=root)
        results = [
            run_sync(project, s.name, store, RunOptions()) for s in project.syncs if s.enabled
        ]
        klaviyo.wait_idle(30)
        dotdigital.wait_idle(30)
        from reverse_etl.cli import print_runs

        print_runs([r.record for r in results])
        for r in results:
            rec = r.record
            if rec.message:
                console.print(f"[red]{rec.sync}: {rec.message}[/red]")
            reasons = ", ".join(f"{k} {v}" for k, v in r.by_reason.most_common())
            console.print(
                f"{rec.sync}: error file {rec.error_file}" + (f" ({reasons})" if reasons else "")
            )
        _landed(console, klaviyo, dotdigital, checked=specs.path is not None)
        if keep_running:
            console.print("sandboxes stay up; Ctrl-C stops them")
            try:
                import threading

                threading.Event().wait()
            except KeyboardInterrupt:
                pass
    failed = any(r.record.status == "failed" for r in results)
    violations = klaviyo.violations + dotdigital.violations
    if violations:
        console.print(
            f"[red]{len(violations)} requests broke the vendors' specs: {violations[:3]}[/red]"
        )
    return EXIT_FAILED if failed or violations else EXIT_OK


def _landed(
    console: Console, klaviyo: KlaviyoSandbox, dotdigital: DotdigitalSandbox, *, checked: bool
) -> None:
    table = Table(title="what the sandboxes hold now")
    table.add_column("sandbox")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("Klaviyo", "profiles", f"{len(klaviyo.profiles()):,}")
    for name in [lst["name"] for lst in klaviyo.lists()]:
        table.add_row("Klaviyo", f"list {name!r} members", f"{len(klaviyo.list_members(name)):,}")
    table.add_row("Dotdigital", "contacts", f"{len(dotdigital.contacts()):,}")
    for book in dotdigital.address_books():
        table.add_row(
            "Dotdigital",
            f"address book {book['name']!r}",
            f"{len(dotdigital.address_book_members(book['name'])):,}",
        )
    table.add_row(
        "both",
        "requests refused as off-spec",
        str(len(klaviyo.violations) + len(dotdigital.violations))
        if checked
        else "not checked (no specs)",
    )
    console.print(table)

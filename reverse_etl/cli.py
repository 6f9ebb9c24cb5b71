"""Command line: parse, call, print. The work lives in engine, debug and demo."""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from reverse_etl.config import Project, load_project
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, EXIT_ROW_ERRORS, ReverseEtlError
from reverse_etl.interrupt import Interrupt
from reverse_etl.plan import Plan
from reverse_etl.secrets import scrub
from reverse_etl.state import RunRecord, StateStore
from reverse_etl.util import storage
from reverse_etl.util.runtime import tune_memory

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False)


class Ctx:
    def __init__(self, config: str | None, project_dir: str | None):
        self.config = config
        self.project_dir = Path(project_dir or ".").resolve()
        self._project: Project | None = None

    @property
    def project(self) -> Project:
        if self._project is None:
            self._project = load_project(self.config, self.project_dir)
        return self._project

    def store(self) -> StateStore:
        url = os.environ.get("REVERSE_ETL_STATE_URL") or self.project.state.url
        return StateStore(url, root=self.project_dir)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    # escaped: "[...]" in a message (e.g. pip install 'reverse-etl[snowflake]') is text, not markup
    err_console.print(f"[red]error:[/red] {escape(scrub(message))}", markup=True, soft_wrap=True)
    sys.exit(code)


def _stop_grace() -> float:
    """Seconds a run may take, after SIGTERM or Ctrl-C, to have its batches in flight
    acknowledged: below Kubernetes' default 30 s grace period, so the run ends on its own terms."""
    try:
        return float(os.environ.get("REVERSE_ETL_STOP_GRACE_SECONDS", "20"))
    except ValueError:
        return 20.0


class _Group(click.Group):
    """A bug must not look like 'rows rejected' (exit 1): report it and exit 3."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            err_console.print(f"[red]internal error: {scrub(f'{type(exc).__name__}: {exc}')}[/red]")
            err_console.print("please report it with the command you ran (run with -v for details)")
            sys.exit(EXIT_FAILED)


@click.group(cls=_Group)
@click.option(
    "--config",
    "-c",
    envvar="REVERSE_ETL_CONFIG",
    help="Project file (default: profiles/profiles.yml).",
)
@click.option(
    "--project-dir",
    envvar="REVERSE_ETL_PROJECT_DIR",
    help="Root for relative paths (default: current directory).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log HTTP retries and timings.")
@click.version_option(package_name="reverse-etl")
@click.pass_context
def main(ctx: click.Context, config: str | None, project_dir: str | None, verbose: bool) -> None:
    """Sync warehouse views into Klaviyo and Dotdigital."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    tune_memory()
    ctx.obj = Ctx(config, project_dir)


@main.command()
@click.option(
    "--offline", is_flag=True, help="Check the project file only; do not probe the warehouses."
)
@click.pass_obj
def check(obj: Ctx, offline: bool) -> None:
    """Validate the project file, then each sync's view against its mapping (schema only)."""
    from reverse_etl.engine import consent_warnings, view_problems
    from reverse_etl.sources import open_source

    try:
        project = obj.project
    except ReverseEtlError as exc:
        _fail(str(exc))
    problems: list[str] = []
    warnings: list[str] = []
    if not offline:
        by_source: dict[str, list[Any]] = {}
        for s in project.syncs:
            by_source.setdefault(s.source.connection, []).append(s)
        for connection, syncs in by_source.items():
            try:
                with open_source(project.connections[connection], project) as source:  # type: ignore[arg-type]
                    for s in syncs:
                        found = view_problems(project, s, source)
                        problems += [f"{s.name}: {p}" for p in found]
                        if not found:
                            warnings += [
                                f"{s.name}: {w}" for w in consent_warnings(project, s, source)
                            ]
            except ReverseEtlError as exc:
                problems.append(f"connection {connection!r}: {scrub(str(exc))}")
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    if problems:
        _fail(f"{project.file}:\n  - " + "\n  - ".join(problems))
    console.print(
        f"{project.file}: OK — {len(project.connections)} connections, {len(project.syncs)} syncs"
        + (" (views not probed)" if offline else ", every view fits its mapping")
    )


@main.command()
@click.argument("syncs", nargs=-1)
@click.option(
    "--full-refresh",
    is_flag=True,
    help="Ignore the watermark and read the whole view (rows the destination holds as they are "
    "are still not sent; add --resend for that).",
)
@click.option("--resend", is_flag=True, help="Send every row read, also those found unchanged.")
@click.option(
    "--allow-mass-removal",
    is_flag=True,
    help="Let a mirror sync remove more than its max_removal_share of the list, this once.",
)
@click.option(
    "--dry-run", is_flag=True, help="Do everything but the API calls; write the payloads to a file."
)
@click.option("--due", is_flag=True, help="Run only syncs whose schedule says they are due.")
@click.pass_obj
def run(
    obj: Ctx,
    syncs: tuple[str, ...],
    full_refresh: bool,
    resend: bool,
    allow_mass_removal: bool,
    dry_run: bool,
    due: bool,
) -> None:
    """Run syncs (all enabled ones when none is named)."""
    from reverse_etl.engine import RunOptions, due_syncs, in_run_order, run_sync

    try:
        project = obj.project
        store = obj.store()
        names = list(syncs) or (
            due_syncs(project, store)
            if due
            else in_run_order(project, [s.name for s in project.syncs if s.enabled])
        )
        for name in names:
            project.sync(name)
    except ReverseEtlError as exc:
        _fail(str(exc))
    if not names:
        console.print("nothing to run")
        sys.exit(EXIT_OK)
    worst = EXIT_OK
    results = []
    interrupt = Interrupt(grace=_stop_grace())
    with interrupt.installed():
        for name in names:
            if interrupt.requested:
                break
            options = RunOptions(
                full_refresh=full_refresh,
                resend=resend,
                allow_mass_removal=allow_mass_removal,
                dry_run=dry_run,
                interrupt=interrupt,
            )
            try:
                result = run_sync(project, name, store, options)
            except ReverseEtlError as exc:  # e.g. the lock is held: the run never started
                err_console.print(f"[red]{name}: {scrub(str(exc))}[/red]")
                worst = EXIT_FAILED
                continue
            except KeyboardInterrupt:  # the signal's grace ran out: the run is recorded
                break
            results.append(result)
            worst = max(worst, result.exit_code)
    print_runs([r.record for r in results])
    for r in results:
        rec = r.record
        if rec.message:
            err_console.print(f"[red]{rec.sync}: {rec.message}[/red]")
        if r.by_reason:
            reasons = ", ".join(f"{k}={v}" for k, v in r.by_reason.most_common())
            console.print(f"{rec.sync}: rejected/failed rows by reason: {reasons}")
        if rec.error_file:
            console.print(f"{rec.sync}: error file: {rec.error_file}")
        if r.dry_run_file:
            console.print(
                f"{rec.sync}: dry run, payloads written to {r.dry_run_file} (nothing sent, nothing committed)"
            )
        if r.plan is not None:
            console.print(f"{rec.sync}: {plan_line(r.plan)}")
    if interrupt.requested:
        err_console.print(f"stopped by {interrupt.name}; what was acknowledged is committed")
        sys.exit(interrupt.exit_code)
    sys.exit(worst)


def plan_line(plan: Plan) -> str:
    consent = ", ".join(f"{k} {v}" for k, v in sorted(plan.consent.items()) if v)
    return (
        f"would add {plan.adds}, update {plan.updates}, remove {plan.removals}; "
        f"unchanged {plan.unchanged}, rejected {plan.rejected} (read {plan.read})"
        + (f"; consent: {consent}" if consent else "")
    )


@main.command()
@click.argument("sync")
@click.option("--full-refresh", is_flag=True, help="Plan a run over the whole view.")
@click.option("--samples", default=5, show_default=True, help="Changes shown per kind.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_obj
def plan(obj: Ctx, sync: str, full_refresh: bool, samples: int, as_json: bool) -> None:
    """What a run of SYNC would send, update, remove, skip and reject; sends and commits
    nothing."""
    import orjson

    from reverse_etl.engine import RunOptions, run_sync

    try:
        project = obj.project
        project.sync(sync)
        options = RunOptions(
            full_refresh=full_refresh,
            dry_run=True,
            dry_run_file=os.devnull,
            plan_samples=max(samples, 0),
        )
        result = run_sync(project, sync, obj.store(), options)
    except ReverseEtlError as exc:
        _fail(str(exc))
    if result.record.status == "failed" or result.plan is None:
        _fail(f"{sync}: {result.record.message or 'the plan could not be made'}")
    found = result.plan
    if as_json:
        click.echo(orjson.dumps(found.as_dict(), default=str, option=orjson.OPT_INDENT_2))
        sys.exit(EXIT_OK)
    console.print(f"{sync}: {plan_line(found)}")
    for title, changes in (
        ("adds", found.added),
        ("updates", found.updated),
        ("removals", found.removed),
    ):
        if not changes:
            continue
        table = Table(title=f"{title} (first {len(changes)})")
        for col in ("identifier", "field", "old", "new"):
            table.add_column(col)
        for change in changes:
            for i, (name, (old, new)) in enumerate(change.fields.items() or [("", (None, None))]):
                table.add_row(
                    escape(str(change.identifier)) if i == 0 else "",
                    escape(name),
                    "" if old is None else escape(str(old)),
                    "" if new is None else escape(str(new)),
                )
        console.print(table)
    if found.by_reason:
        reasons = ", ".join(f"{k}={v}" for k, v in found.by_reason.most_common())
        console.print(f"{sync}: rejected rows by reason: {reasons}")
    sys.exit(EXIT_OK)


def print_runs(records: list[RunRecord]) -> None:
    table = Table(
        title="runs",
        caption="read = sent + unchanged + rejected; consent held: subscribes not sent, as the "
        "person opted out at the destination since (kept_unsubscribed in the error file)",
    )
    for col in (
        "sync",
        "run",
        "status",
        "read",
        "sent",
        "unchanged",
        "rejected",
        "created",
        "updated",
        "failed",
        "removed",
        "consent held",
        "seconds",
    ):
        table.add_column(col, justify="right" if col not in {"sync", "run", "status"} else "left")
    for r in records:
        c = r.counts
        secs = (r.ended_at - r.started_at).total_seconds() if r.ended_at else 0
        table.add_row(
            r.sync,
            r.run_id,
            r.status,
            *(
                str(v)
                for v in (
                    c.read,
                    c.sent,
                    c.unchanged,
                    c.rejected,
                    c.created,
                    c.updated,
                    c.failed,
                    c.removed,
                    c.consent_held,
                )
            ),
            f"{secs:.1f}",
        )
    console.print(table)


@main.command()
@click.option("--interval", default=60, show_default=True, help="Seconds between schedule checks.")
@click.option("--cycles", default=0, help="Stop after this many checks (0: run until stopped).")
@click.pass_obj
def scheduler(obj: Ctx, interval: int, cycles: int) -> None:
    """Run each sync when its schedule says it is due, until stopped (Ctrl-C)."""
    import time

    from reverse_etl.engine import RunOptions, due_syncs, run_sync

    try:
        project = obj.project
        store = obj.store()
    except ReverseEtlError as exc:
        _fail(str(exc))
    done = 0
    interrupt = Interrupt(grace=_stop_grace())
    with interrupt.installed():
        while not interrupt.requested:
            for name in due_syncs(project, store):
                if interrupt.requested:
                    break
                try:
                    result = run_sync(project, name, store, RunOptions(interrupt=interrupt))
                except ReverseEtlError as exc:  # e.g. still running from the last check
                    err_console.print(f"{name}: {scrub(str(exc))}")
                    continue
                except KeyboardInterrupt:
                    break
                rec = result.record
                console.print(
                    f"{rec.ended_at:%Y-%m-%d %H:%M:%S} {name}: {rec.status}, read {rec.counts.read}, "
                    f"sent {rec.counts.sent}, unchanged {rec.counts.unchanged}, "
                    f"rejected {rec.counts.rejected}, failed {rec.counts.failed}"
                    + (f" — {rec.message}" if rec.message else "")
                )
            done += 1
            if cycles and done >= cycles:
                return
            slept = 0.0
            while slept < interval and not interrupt.requested:
                time.sleep(min(1.0, interval - slept))
                slept += 1.0
    console.print(f"scheduler stopped by {interrupt.name}")
    sys.exit(interrupt.exit_code)


@main.command()
@click.argument("sync")
@click.option("--since", type=click.DateTime(), help="Only opt-outs after this time (UTC).")
@click.option("--csv", "csv_target", help="Write them to this CSV file (or s3://bucket/key).")
@click.pass_obj
def optouts(obj: Ctx, sync: str, since: datetime | None, csv_target: str | None) -> None:
    """What people did to their consent at SYNC's destination (unsubscribes, complaints,
    suppressions), read back first: person, channel, status, time, reason, for analysts to
    join in their views."""
    import csv

    from reverse_etl.consent import export
    from reverse_etl.consent.memory import ConsentMemory
    from reverse_etl.engine import make_destination
    from reverse_etl.sources import open_source
    from reverse_etl.util.storage import open_text_for_write

    try:
        project = obj.project
        s = project.sync(sync)
        destination = make_destination(project, s)
        try:
            account = destination.consent_account()
            if account is None:
                _fail(
                    f"{sync}: its destination reads no consent back (it sends no consent, or "
                    "sends it as a data field)"
                )
            memory = ConsentMemory(obj.store(), account)
            destination.read_back(memory)
        finally:
            destination.close()
        if s.optouts_table:  # the sync's table too, as a run would leave it
            warehouse = project.connections[s.source.connection]
            with open_source(warehouse, project, writable=True) as source:  # type: ignore[arg-type]
                rows = export.as_table(memory.statements(), s.destination.connection)
                export.write(source, s.optouts_table, rows)
        after = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
        found = memory.statements(after)
    except ReverseEtlError as exc:
        _fail(str(exc))
    header = ("person", "channel", "status", "at", "reason", "source")
    rows = [
        (x.person, x.channel, x.status, x.at.isoformat(), x.reason or "", s.destination.connection)
        for x in found
    ]
    if csv_target:
        try:
            with open_text_for_write(csv_target) as out:
                writer = csv.writer(out)
                writer.writerow(header)
                writer.writerows(rows)
        except OSError as exc:
            _fail(f"cannot write {csv_target}: {exc}")
        console.print(f"{sync}: {len(rows)} opt-outs written to {csv_target}")
        return
    table = Table(title=f"{sync}: consent read back from {s.destination.connection}")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@main.command()
@click.argument("sync", required=False)
@click.option("--limit", default=5, show_default=True, help="Runs per sync.")
@click.pass_obj
def status(obj: Ctx, sync: str | None, limit: int) -> None:
    """Show each sync's last runs and watermark."""
    try:
        project = obj.project
        store = obj.store()
        names = [project.sync(sync).name] if sync else [s.name for s in project.syncs]
    except ReverseEtlError as exc:
        _fail(str(exc))
    records = [r for name in names for r in store.last_runs(name, limit)]
    print_runs(records)
    for name in names:
        mark = store.watermark(name)
        sched = project.sync(name).schedule
        console.print(
            f"{name}: watermark {mark.cursor if mark else '(none: next run reads everything)'}"
            + (f", schedule {sched.text}" if sched else "")
        )


@main.command()
@click.argument("sync")
@click.pass_obj
def unlock(obj: Ctx, sync: str) -> None:
    """Release a sync's lock left behind by a process that died."""
    try:
        name = obj.project.sync(sync).name
        released = obj.store().unlock(name)
    except ReverseEtlError as exc:
        _fail(str(exc))
    console.print(f"{name}: {'lock released' if released else 'was not locked'}")


@main.command()
@click.argument("sync")
@click.option("--csv", "csv_target", required=True, help="File or s3://bucket/key to write.")
@click.pass_obj
def export(obj: Ctx, sync: str, csv_target: str) -> None:
    """Export a sync's source rows, exactly as the view returns them, to CSV."""
    from reverse_etl.csv_debug import export_csv

    try:
        s = obj.project.sync(sync)
        rows = export_csv(obj.project, s, csv_target)
    except (ReverseEtlError, OSError) as exc:
        _fail(str(exc))
    console.print(f"{sync}: exported {rows} rows to {csv_target}")


@main.command()
@click.argument("sync")
@click.option("--csv", "csv_path", help="Validate this exported CSV instead of the live view.")
@click.option(
    "--errors", "error_file", help="Where to write the error file (default under error_dir)."
)
@click.pass_obj
def validate(obj: Ctx, sync: str, csv_path: str | None, error_file: str | None) -> None:
    """Validate a sync's rows (live view or CSV) and write the error file. Sends nothing."""
    from reverse_etl.csv_debug import validate as run_validate

    try:
        s = obj.project.sync(sync)
        target = error_file or storage.join(
            storage.join(obj.project.error_dir, s.name), "validate-errors.csv"
        )
        if not storage.is_s3(target):
            target = str(obj.project.path(target))
        report = run_validate(obj.project, s, csv_path=csv_path, error_file=target)
    except (ReverseEtlError, OSError) as exc:
        _fail(str(exc))
    table = Table(title=f"{sync}: {report.rows} rows checked, {report.bad_rows} with problems")
    table.add_column("reason")
    table.add_column("problems", justify="right")
    for reason, count in report.by_reason.most_common():
        table.add_row(reason, str(count))
    console.print(table)
    console.print(f"error file: {report.error_file}")
    sys.exit(EXIT_ROW_ERRORS if report.by_reason else EXIT_OK)


@main.command()
@click.option(
    "--profiles", default=12_000, show_default=True, help="Customer profiles to generate."
)
@click.option(
    "--keep-running", is_flag=True, help="Leave the sandbox APIs up after the syncs (Ctrl-C stops)."
)
@click.option(
    "--api-specs",
    metavar="DIR",
    help="The vendors' OpenAPI specs (default: $REVERSE_ETL_API_SPECS, then ../shared/api-specs);"
    " without them the sandboxes do not check requests.",
)
@click.pass_obj
def demo(obj: Ctx, profiles: int, keep_running: bool, api_specs: str | None) -> None:
    """Generate the demo warehouse, start the sandbox APIs on 127.0.0.1 and run every demo sync."""
    from reverse_etl.demo.run import run_demo

    try:
        code = run_demo(
            obj.project_dir,
            obj.config,
            profiles=profiles,
            keep_running=keep_running,
            console=console,
            api_specs=api_specs,
        )
    except ReverseEtlError as exc:
        _fail(str(exc))
    sys.exit(code)


if __name__ == "__main__":
    main()

"""Command line: parse, call, print. The work lives in engine, debug and demo."""

from __future__ import annotations

import difflib
import hashlib
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeGuard

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from reverse_etl.config import Project, load_project, require_env
from reverse_etl.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ROW_ERRORS,
    LockHeldError,
    NotDueError,
    ReverseEtlError,
)
from reverse_etl.interrupt import Interrupt
from reverse_etl.plan import Plan
from reverse_etl.secrets import scrub
from reverse_etl.state import RunRecord, StateStore, failure_message
from reverse_etl.util import memory, storage
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
        """The project, loaded without requiring destination secrets: the commands that call
        an API ask for them with ``need_secrets`` before they start."""
        if self._project is None:
            self._project = load_project(self.config, self.project_dir, defer_secrets=True)
            memory.configure(self._project.memory_limit)
        return self._project

    def need_secrets(self, syncs: list[str]) -> None:
        """Stop, naming each variable, if the destinations of ``syncs`` lack a secret."""
        project = self.project
        require_env(project, [project.sync(name).destination.connection for name in syncs])

    def store(self) -> StateStore:
        url = os.environ.get("REVERSE_ETL_STATE_URL") or self.project.state.url
        return StateStore(url, root=self.project_dir)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    # escaped: "[...]" in a message (e.g. pip install 'reverse-etl[snowflake]') is text, not markup
    err_console.print(f"[red]error:[/red] {escape(scrub(message))}", markup=True, soft_wrap=True)
    sys.exit(code)


def _known(project: Project, names: Iterable[str]) -> None:
    """An unknown sync name is the command line's mistake (exit 2, naming the known syncs),
    not a run that could not run (3): a typo in a cron line must not look like an outage."""
    known = [s.name for s in project.syncs]
    for name in names:
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            raise click.UsageError(
                f"no sync named {name!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else ".")
                + f" Known syncs: {', '.join(known) or '(none)'}"
            )


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
@click.option(
    "-v", "--verbose", is_flag=True, help="Also log each HTTP request: method, path, status, time."
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    envvar="REVERSE_ETL_LOG_FORMAT",
    show_default=True,
    help="Logs on stderr as text, or as JSON lines for a log shipper (no live display).",
)
@click.version_option(package_name="reverse-etl")
@click.pass_context
def main(
    ctx: click.Context, config: str | None, project_dir: str | None, verbose: bool, log_format: str
) -> None:
    """Sync warehouse views into Klaviyo and Dotdigital."""
    from reverse_etl import logs, progress

    fmt: logs.LogFormat = "json" if log_format == "json" else "text"
    logs.setup(fmt, verbose=verbose)
    # a live display on a terminal; one log line per batch and phase change anywhere else
    progress.install(progress.choose(sys.stderr, log_format=fmt))
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
    from reverse_etl.inspect import missing_env_warnings, sql_file_problems
    from reverse_etl.sources import open_source

    try:
        project = obj.project
    except ReverseEtlError as exc:
        _fail(str(exc))
    unreadable = sql_file_problems(project)
    problems: list[str] = [f"{name}: {p}" for name, p in unreadable.items()]
    warnings: list[str] = missing_env_warnings(project)
    if not offline:
        by_source: dict[str, list[Any]] = {}
        for s in project.syncs:
            if s.name not in unreadable:  # already a problem: no view to probe
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
@click.option(
    "--accept-changes",
    is_flag=True,
    help="Run the named syncs although their definition (SQL, mapping, destination, ...) changed "
    "since their last accepted run, and accept it for later runs.",
)
@click.option(
    "--even-if-disabled",
    is_flag=True,
    help="Run the named syncs although they are disabled (reverse-etl disable, enabled: false).",
)
@click.option(
    "--no-deps", is_flag=True, help="Run the named syncs only, not the syncs they depend_on first."
)
@click.pass_obj
def run(
    obj: Ctx,
    syncs: tuple[str, ...],
    full_refresh: bool,
    resend: bool,
    allow_mass_removal: bool,
    dry_run: bool,
    due: bool,
    no_deps: bool,
    accept_changes: bool,
    even_if_disabled: bool,
) -> None:
    """Run syncs (all enabled ones when none is named), each after the syncs it depends_on."""
    from reverse_etl import controls
    from reverse_etl.engine import RunOptions, due_syncs, in_run_order, run_sync
    from reverse_etl.schedule import blocked_by, in_dependency_order

    if accept_changes and not syncs:  # a flag in a cron line would defeat the lock
        _fail("--accept-changes needs the syncs named: reverse-etl run SYNC --accept-changes", 2)
    try:
        project = obj.project
        _known(project, syncs)
        store = obj.store()
        if due:  # named with --due: only those of them that are due
            names = [n for n in due_syncs(project, store) if not syncs or n in syncs]
        else:
            names = list(syncs) or in_run_order(project, controls.enabled_names(project, store))
        if not no_deps:  # named syncs bring their dependencies; due ones are only ordered
            names = in_dependency_order(project, names, add_dependencies=bool(syncs) and not due)
        # a disabled sync is skipped even when named: Airflow and cron lines name syncs too;
        # --even-if-disabled is the "Sync Now" of a run by hand (controls.py)
        enabled = controls.enabled_states(project, store)
        for name in [n for n in names if not enabled[n].enabled]:
            if even_if_disabled and name in syncs:
                said = "running it anyway (--even-if-disabled)"
            else:
                said = (
                    "skipped; `reverse-etl enable NAME`, or add --even-if-disabled to run it once"
                )
                names.remove(name)
            err_console.print(
                f"[yellow]{name}: {escape(enabled[name].describe())}; "
                f"{said.replace('NAME', name)}[/yellow]",
                soft_wrap=True,
            )
        if not dry_run:
            obj.need_secrets(names)
    except ReverseEtlError as exc:
        _fail(str(exc))
    if not names:
        console.print("nothing to run")
        sys.exit(EXIT_OK)
    # the due list, read before the locks: a sync another process takes meanwhile is not due
    scheduled = due
    worst = EXIT_OK
    results = []
    interrupt = Interrupt(grace=_stop_grace())
    with interrupt.installed():
        for name in names:
            if interrupt.requested:
                break
            blocked = None if no_deps else blocked_by(project, store, name, running=names)
            if blocked:
                err_console.print(
                    f"[yellow]{name}: skipped: {escape(blocked)}[/yellow]", soft_wrap=True
                )
                worst = max(worst, EXIT_FAILED)
                continue
            options = RunOptions(
                full_refresh=full_refresh,
                resend=resend,
                allow_mass_removal=allow_mass_removal,
                dry_run=dry_run,
                interrupt=interrupt,
                # a changed definition is refused unless accepted by hand (controls.py)
                guard_definition=not (full_refresh or (accept_changes and name in syncs)),
                only_if_due=scheduled,
            )
            try:
                result = run_sync(project, name, store, options)
            except ReverseEtlError as exc:  # e.g. the lock is held: the run never started
                if scheduled and _not_due(exc):
                    err_console.print(f"{name}: {_not_due_note(exc)}", soft_wrap=True)
                    continue  # a named sync that is running stays exit 3
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
            # escaped: a message may hold "[...]" (a view's SQL, an install hint), not markup
            err_console.print(f"[red]{escape(rec.sync)}: {escape(rec.message)}[/red]")
        if r.accepted_changes:
            err_console.print(
                f"[yellow]{rec.sync}: definition changes accepted: "
                f"{escape('; '.join(r.accepted_changes))}[/yellow]",
                soft_wrap=True,
            )
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


def _not_due(exc: ReverseEtlError) -> TypeGuard[NotDueError | LockHeldError]:
    """A due sync that another process ran, or is running: a holder that has missed its
    heartbeats may be gone (on a host this one cannot check) and is an error, not a note."""
    if isinstance(exc, LockHeldError):
        return not exc.overdue
    return isinstance(exc, NotDueError)


def _not_due_note(exc: NotDueError | LockHeldError) -> str:
    """What ``run --due`` says of a due sync it did not run because another process has it: no
    failure (cron alerts on the exit code), since that process runs it for this due time."""
    if isinstance(exc, LockHeldError):
        return "not due now: a run of it is still in progress (another process holds its lock)"
    return "not due now: another process ran it for this due time"


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
        _known(project, [sync])
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
    from reverse_etl.controls import pending_changes

    # a definition change the plan shows the effect of, but that a real run would refuse
    changed = pending_changes(project, obj.store(), [sync]).get(sync)
    if as_json:
        doc = {**found.as_dict(), "definition_changed": changed}
        click.echo(orjson.dumps(doc, default=str, option=orjson.OPT_INDENT_2))
        sys.exit(EXIT_OK)
    console.print(f"{sync}: {plan_line(found)}")
    if changed:
        console.print(
            f"{sync}: the definition changed ({escape(changed)}); a run refuses it until "
            f"`reverse-etl run {sync} --accept-changes` (or --full-refresh)",
            soft_wrap=True,
        )
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
        "person opted out at the destination since (kept_unsubscribed in the error file); "
        "known/new: problems an earlier run already reported / reported first by this run "
        "(first_seen_run in the error file; fail_on decides the exit code)",
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
        "known",
        "new",
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
                    c.known_problems,
                    c.new_problems,
                    c.removed,
                    c.consent_held,
                )
            ),
            f"{secs:.1f}",
        )
    console.print(table)


@main.command()
@click.option(
    "--interval",
    type=click.IntRange(min=1),  # 0 would check in a busy loop, at 100% CPU
    default=60,
    show_default=True,
    help="Seconds between schedule checks (at least 1).",
)
@click.option(
    "--cycles",
    type=click.IntRange(min=0),
    default=0,
    help="Stop after this many checks (0: run until stopped).",
)
@click.pass_obj
def scheduler(obj: Ctx, interval: int, cycles: int) -> None:
    """Run each sync when its schedule says it is due, until stopped (Ctrl-C). An edited
    project file applies from the next check."""
    from reverse_etl import controls

    try:
        project = obj.project
        store = obj.store()
        obj.need_secrets(controls.enabled_names(project, store))
    except ReverseEtlError as exc:
        _fail(str(exc))
    interrupt = Interrupt(grace=_stop_grace())
    loop = SchedulerLoop(obj, store, interrupt)
    done = 0
    with interrupt.installed():
        while not interrupt.requested:
            loop.check()
            done += 1
            if cycles and done >= cycles:
                return
            _wait(interval, interrupt)
    console.print(f"scheduler stopped by {interrupt.name}")
    sys.exit(interrupt.exit_code)


def _wait(seconds: int, interrupt: Interrupt) -> None:
    """Sleep until the next check, a second at a time, so a signal ends the wait at once."""
    import time

    slept = 0.0
    while slept < seconds and not interrupt.requested:
        time.sleep(min(1.0, seconds - slept))
        slept += 1.0


def _file_digest(path: Path) -> str | None:
    """What the project file holds, to tell an edit (None: it cannot be read)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class SchedulerLoop:
    """The scheduler between checks: the project as last loaded (reloaded when its file
    changes), the store, and the blocks already said (said once, not at every check)."""

    def __init__(self, obj: Ctx, store: StateStore, interrupt: Interrupt) -> None:
        self.obj = obj
        self.store = store
        self.interrupt = interrupt
        self.project: Project | None = obj.project
        self.file = obj.project.file
        self.seen = _file_digest(self.file)
        self.told: dict[str, str] = {}  # sync -> the block last printed

    def check(self) -> None:
        """One check: the project (reloaded if edited), the due syncs, each one's run. A
        scheduler is a daemon: whatever fails (the state store locked or full, a bug) is said
        and tried again at the next check, never the end of the process."""
        from reverse_etl import engine
        from reverse_etl.schedule import in_dependency_order

        try:
            project = self._current()
            if project is None:
                return
            # a due sync whose dependency is due too runs after it
            names = in_dependency_order(project, engine.due_syncs(project, self.store))
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self._trouble("the schedule check", exc)
            return
        for name in names:
            if self.interrupt.requested:
                return
            try:
                self._run(project, name)
            except KeyboardInterrupt:  # the signal's grace ran out: the run is recorded
                return
            except Exception as exc:  # noqa: BLE001 - see the docstring
                self._trouble(f"sync {name!r}", exc)

    def _current(self) -> Project | None:
        """The project this check runs: reloaded when its file changed, so edits, new syncs
        and changes accepted by hand apply without a restart. A file that does not load (or
        names a secret the environment lacks, as at the start) runs nothing until it loads,
        said once per edit: its old definition is what the user replaced."""
        from reverse_etl import controls

        seen = _file_digest(self.file)
        if seen == self.seen:
            return self.project
        try:
            project = load_project(self.obj.config, self.obj.project_dir, defer_secrets=True)
            enabled = controls.enabled_names(project, self.store)
            require_env(project, [project.sync(n).destination.connection for n in enabled])
        except ReverseEtlError as exc:
            self.seen, self.project = seen, None
            err_console.print(f"[red]error:[/red] {escape(scrub(str(exc)))}", soft_wrap=True)
            err_console.print(
                f"{escape(str(self.file))}: changed but not usable; no sync runs until it is fixed",
                soft_wrap=True,
            )
            return None
        self.seen, self.project = seen, project
        memory.configure(project.memory_limit)
        console.print(f"{escape(str(self.file))}: changed; reloaded ({len(project.syncs)} syncs)")
        return project

    def _run(self, project: Project, name: str) -> None:
        from reverse_etl import engine
        from reverse_etl.schedule import blocked_by

        blocked = blocked_by(project, self.store, name)
        if blocked:
            if self.told.get(name) != blocked:
                err_console.print(f"{name}: skipped: {escape(blocked)}", soft_wrap=True)
                self.told[name] = blocked
            return
        self.told.pop(name, None)
        # only_if_due: a second scheduler (or run --due) that ran it meanwhile wins
        options = engine.RunOptions(
            interrupt=self.interrupt, guard_definition=True, only_if_due=True
        )
        try:
            result = engine.run_sync(project, name, self.store, options)
        except NotDueError:  # another process ran it for this due time: nothing to say
            return
        except ReverseEtlError as exc:  # e.g. still running from the last check
            err_console.print(f"{name}: {escape(scrub(str(exc)))}", soft_wrap=True)
            return
        rec = result.record
        console.print(
            f"{rec.ended_at:%Y-%m-%d %H:%M:%S} {name}: {rec.status}, read {rec.counts.read}, "
            f"sent {rec.counts.sent}, unchanged {rec.counts.unchanged}, "
            f"rejected {rec.counts.rejected}, failed {rec.counts.failed}"
            + (f" — {escape(rec.message)}" if rec.message else "")
        )

    def _trouble(self, what: str, exc: Exception) -> None:
        """One line, scrubbed: a driver's message spans lines and may quote a secret."""
        if isinstance(exc, DBAPIError):  # the driver's words and what to do, not the SQL
            said = failure_message(self.store.engine.url, exc)
        else:
            said = " ".join(scrub(f"{type(exc).__name__}: {exc}").split())
        err_console.print(
            f"{what}: {escape(said)}; will try again at the next check", soft_wrap=True
        )


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
        _known(project, [sync])
        s = project.sync(sync)
        obj.need_secrets([s.name])
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
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (stable keys).")
@click.pass_obj
def status(obj: Ctx, sync: str | None, limit: int, as_json: bool) -> None:
    """Show each sync's last runs (and why a run failed), watermark and lock."""
    from reverse_etl import inspect

    try:
        project = obj.project
        _known(project, [sync] if sync else [])
        store = obj.store()
        names = [project.sync(sync).name] if sync else [s.name for s in project.syncs]
    except ReverseEtlError as exc:
        _fail(str(exc))
    from reverse_etl import retry_queue

    queued = retry_queue.counts(store, names)  # rows waiting for their parent, per sync
    if as_json:
        found = inspect.status_dicts(project, store, names, limit)
        for entry in found:
            entry["retry_queue"] = queued.get(entry["sync"], 0)
        _echo_json({"syncs": found})
        return
    records = [r for name in names for r in store.last_runs(name, limit)]
    print_runs(records)
    for r in records:  # why: the table has no room for it
        if r.message and r.status in inspect.UNHAPPY:
            err_console.print(
                f"{r.sync} {r.run_id} {r.status}: {escape(r.message)}", soft_wrap=True
            )
    for name in names:
        held = store.lock_info(name)
        if held is not None:
            console.print(f"{name}: locked by {inspect.holder_text(held)}")
    from reverse_etl import controls
    from reverse_etl.schedule import blocked_by

    enabled = controls.enabled_states(project, store)
    changed = controls.pending_changes(project, store, names)
    for name in names:
        mark = store.watermark(name)
        sched = project.sync(name).schedule
        console.print(
            f"{name}: watermark {mark.cursor if mark else '(none: next run reads everything)'}"
            + (f", schedule {sched.text}" if sched else "")
            + (f", {queued[name]} rows in the retry queue" if queued.get(name) else "")
            + f", {escape(enabled[name].describe())}",
            soft_wrap=True,
        )
        blocked = blocked_by(project, store, name)
        if blocked:  # its schedule may say due, but runs skip it: say why, not "due"
            err_console.print(f"{name}: blocked: {escape(blocked)}", soft_wrap=True)
        if name in changed:
            err_console.print(
                f"{name}: definition changed since its last accepted run ({escape(changed[name])});"
                f" runs refuse it until `reverse-etl run {name} --accept-changes`",
                soft_wrap=True,
            )


@main.command()
@click.argument("sync")
@click.option(
    "--force",
    is_flag=True,
    help="Release it even though its holder still heartbeats (only if you know it is gone).",
)
@click.pass_obj
def unlock(obj: Ctx, sync: str, force: bool) -> None:
    """Release a sync's lock left behind by a process that died (its heartbeat went stale);
    a lock whose holder still heartbeats is refused, saying who holds it."""
    from reverse_etl import inspect

    try:
        _known(obj.project, [sync])
        name = obj.project.sync(sync).name
        said = inspect.unlock(obj.store(), name, force=force)
    except ReverseEtlError as exc:
        _fail(str(exc))
    console.print(said)


@main.command()
@click.argument("sync")
@click.option("--reset", is_flag=True, help="Forget the setting: the project file decides again.")
@click.pass_obj
def enable(obj: Ctx, sync: str, reset: bool) -> None:
    """Let runs (run --due, scheduler, run with or without names) take SYNC again; kept in
    the state store, over the project file's `enabled:`."""
    _set_enabled(obj, sync, None if reset else True)


@main.command()
@click.argument("sync")
@click.option("--reset", is_flag=True, help="Forget the setting: the project file decides again.")
@click.pass_obj
def disable(obj: Ctx, sync: str, reset: bool) -> None:
    """Pause SYNC: every run skips it until `reverse-etl enable SYNC` (`run SYNC
    --even-if-disabled` runs it once); kept in the state store, over the file's `enabled:`."""
    _set_enabled(obj, sync, None if reset else False)


def _set_enabled(obj: Ctx, sync: str, enabled: bool | None) -> None:
    from reverse_etl import controls

    try:
        project = obj.project
        _known(project, [sync])
        name = project.sync(sync).name
        store = obj.store()
        controls.set_enabled(store, name, enabled)
        said = controls.enabled_states(project, store)[name]
    except ReverseEtlError as exc:
        _fail(str(exc))
    console.print(f"{name}: {escape(said.describe())}")


@main.command()
@click.argument("sync")
@click.option("--limit", default=20, show_default=True, help="Most recent runs shown.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (stable keys).")
@click.pass_obj
def runs(obj: Ctx, sync: str, limit: int, as_json: bool) -> None:
    """SYNC's run history, newest first: counts, duration, message and error file."""
    from reverse_etl import inspect

    try:
        _known(obj.project, [sync])
        name = obj.project.sync(sync).name
        records = obj.store().last_runs(name, max(limit, 1))
    except ReverseEtlError as exc:
        _fail(str(exc))
    if as_json:
        _echo_json({"sync": name, "runs": [inspect.run_dict(r) for r in records]})
        return
    table = Table(title=f"{name}: last {len(records)} runs")
    for col in ("run", "started (UTC)", "status"):
        table.add_column(col, no_wrap=True)
    for col in ("seconds", "read", "sent", "unchanged", "rejected", "failed", "removed"):
        table.add_column(col, justify="right")
    for r in records:
        c, secs = r.counts, inspect.duration(r)
        table.add_row(
            r.run_id,
            f"{r.started_at:%Y-%m-%d %H:%M:%S}",
            r.status,
            "" if secs is None else f"{secs:.1f}",
            *(str(v) for v in (c.read, c.sent, c.unchanged, c.rejected, c.failed, c.removed)),
        )
    console.print(table)
    for r in records:  # below the table: a message is too long for a cell
        if r.message:
            console.print(f"{r.run_id} {r.status}: {escape(r.message)}", soft_wrap=True)
        if r.error_file:
            console.print(f"{r.run_id} error file: {escape(r.error_file)}", soft_wrap=True)


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (stable keys).")
@click.pass_obj
def errors(obj: Ctx, run_id: str, as_json: bool) -> None:
    """A run's error file counted by reason, with how to fix each, and where the file is."""
    from reverse_etl import inspect

    try:
        obj.project  # noqa: B018 - the store's URL is in the project file
        summary = inspect.summarize_errors(obj.store(), run_id)
    except (ReverseEtlError, OSError) as exc:
        _fail(str(exc))
    if as_json:
        _echo_json(summary.as_dict())
        return
    run = summary.run
    console.print(
        f"{run.sync} {run.run_id}: {run.status}"
        + (f" — {escape(run.message)}" if run.message else "")
    )
    if not summary.error_file:
        console.print("no error file (the run stopped before it could write one)")
        return
    table = Table(title=f"{summary.problems} problems by reason")
    table.add_column("reason")
    table.add_column("problems", justify="right")
    table.add_column("how to fix")
    for reason, count, fix in summary.by_reason:
        table.add_row(escape(reason), str(count), escape(fix))
    console.print(table)
    console.print(f"error file: {summary.error_file}")


@main.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (stable keys).")
@click.pass_obj
def list_syncs(obj: Ctx, as_json: bool) -> None:
    """The project's syncs: object, source, destination, schedule, enabled."""
    from reverse_etl import controls, inspect

    try:
        project = obj.project
        found = inspect.sync_dicts(project, controls.enabled_states(project, obj.store()))
    except ReverseEtlError as exc:
        _fail(str(exc))
    if as_json:
        _echo_json({"syncs": found})
        return
    table = Table(title=f"{len(found)} syncs")
    for col in ("sync", "object", "mode", "source", "destination", "schedule", "enabled"):
        table.add_column(col)
    for s in found:
        src, dst = s["source"], s["destination"]
        table.add_row(
            escape(s["name"]),
            s["object"],
            s["mode"],
            escape(f"{src['connection']}: {src['sql'] or src['table']}"),
            escape(
                f"{dst['connection']} ({dst['type']})"
                + (f", list {dst['list']}" if dst["list"] else "")
            ),
            escape(s["schedule"] or "-"),
            ("yes" if s["enabled"] else "no")
            + (" (state store)" if s["enabled_from"] == "state" else ""),
        )
    console.print(table)


def _echo_json(data: object) -> None:
    """JSON on stdout, nothing else: for scripts (json.loads reads it)."""
    import orjson

    click.echo(orjson.dumps(data, default=str, option=orjson.OPT_INDENT_2).decode())


@main.command()
@click.argument("sync")
@click.option("--csv", "csv_target", required=True, help="File or s3://bucket/key to write.")
@click.pass_obj
def export(obj: Ctx, sync: str, csv_target: str) -> None:
    """Export a sync's source rows, exactly as the view returns them, to CSV."""
    from reverse_etl.csv_debug import export_csv

    try:
        _known(obj.project, [sync])
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
        _known(obj.project, [sync])
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_obj
def debug(obj: Ctx, as_json: bool) -> None:
    """Connect to every connection and report each check, pass or fail, with its fix: the
    warehouse, each sync's SQL and key columns, the destinations' credentials, region, scopes."""
    import orjson

    from reverse_etl.debug import run_checks

    try:
        results = run_checks(obj.project)
    except ReverseEtlError as exc:
        _fail(str(exc))
    code = EXIT_ROW_ERRORS if any(not r.ok for r in results) else EXIT_OK
    if as_json:
        click.echo(orjson.dumps([r.as_dict() for r in results], option=orjson.OPT_INDENT_2))
        sys.exit(code)
    table = Table(title=f"reverse-etl debug: {obj.project.file}")
    for col in ("connection / sync", "check", "", "detail", "fix"):
        table.add_column(col, overflow="fold")
    for r in results:
        mark = "[green]OK[/green]" if r.ok else "[red]FAIL[/red]"
        table.add_row(escape(r.target), escape(r.name), mark, escape(r.detail), escape(r.fix))
    console.print(table)
    failed = sum(1 for r in results if not r.ok)
    console.print(f"{len(results)} checks, {failed} failed" if failed else "all checks passed")
    sys.exit(code)


# `reverse-etl ui` lives in its own package (reverse_etl/ui/); its web libraries load only when
# it runs
from reverse_etl.ui.command import ui as _ui  # noqa: E402

main.add_command(_ui)

if __name__ == "__main__":
    main()

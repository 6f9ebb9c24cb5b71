"""The Starlette application: routes, templates, and the project and store they read.

The project file is re-read when it changes (an edited mapping shows up as a definition
change at the next page load); the state store is opened once and pooled. Every value a
template prints goes through ``scrub`` (the environment's ``finalize``) and is HTML-escaped
(autoescape is on for every template).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from reverse_etl import controls
from reverse_etl.config import Project, load_project
from reverse_etl.errors import ReverseEtlError
from reverse_etl.secrets import scrub
from reverse_etl.state import StateStore
from reverse_etl.ui import errorfile, views
from reverse_etl.ui.guard import CSRF_FIELD, Guard, new_csrf, read_form
from reverse_etl.ui.jobs import JobBusy, Jobs

# what a POST did, by code in the redirect (never free text from the request)
SAID = {
    "run": "Run started: it takes the sync's lock, as `reverse-etl run` does.",
    "accept": "Run with --accept-changes started: its definition is accepted when it runs.",
    "plan": "Plan started: a dry run that sends and commits nothing.",
    "busy": "A run or plan of this sync started from this page is still going.",
    "enable": "Enabled (kept in the state store).",
    "disable": "Disabled: `run --due`, the scheduler and `run` skip it until enabled.",
    "reset": "The project file's `enabled:` decides again.",
}


class Source:
    """The project (re-read when its file changes) and the state store, as the CLI finds them."""

    def __init__(self, config: Path | None, project_dir: Path) -> None:
        self.config = config
        self.project_dir = project_dir
        self._lock = threading.Lock()
        self._project: Project | None = None
        self._stamp: tuple[int, int] | None = None
        self._store: StateStore | None = None
        self._store_url: str | None = None

    def _file(self) -> Path:
        return self.config or self.project_dir / "profiles" / "profiles.yml"

    def project(self) -> Project:
        with self._lock:
            try:
                st = self._file().stat()
                stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if self._project is None or stamp != self._stamp:
                self._project = load_project(self.config, self.project_dir, defer_secrets=True)
                self._stamp = stamp
            return self._project

    def store(self) -> StateStore:
        project = self.project()
        url = os.environ.get("REVERSE_ETL_STATE_URL") or project.state.url
        with self._lock:
            if self._store is None or url != self._store_url:
                if self._store is not None:
                    self._store.close()
                self._store = StateStore(url, root=self.project_dir)
                self._store_url = url
            return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _scrubbed(value: Any) -> Any:
    """Every printed value, scrubbed of registered secrets before it is escaped."""
    if isinstance(value, Markup):
        return Markup(scrub(str(value)))
    return scrub(value) if isinstance(value, str) else value


def _when(value: datetime | str | None, seconds: bool = True) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if seconds else f"{value:%Y-%m-%d %H:%M} UTC"


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("reverse_etl.ui", "templates"),
        autoescape=True,
        finalize=_scrubbed,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["num"] = lambda n: "" if n is None else f"{n:,}"
    return env


def create_app(
    config: Path | None, project_dir: Path, *, token: str | None = None, loopback: bool = True
) -> Starlette:
    source = Source(config, project_dir)
    jobs = Jobs(config, project_dir)
    env = templates()
    csrf = new_csrf()

    def page(name: str, status_code: int = 200, **data: Any) -> HTMLResponse:
        html = env.get_template(name).render(csrf=csrf, csrf_field=CSRF_FIELD, **data)
        return HTMLResponse(html, status_code=status_code)

    def failing(call: Callable[[], Response]) -> Response:
        """A project or store that cannot be read is a page saying why, not a traceback."""
        try:
            return call()
        except (ReverseEtlError, OSError) as exc:
            return page(
                "message.html", status_code=500, title="Cannot read the project", message=str(exc)
            )

    def list_syncs(request: Request) -> Response:
        def render() -> Response:
            data = views.syncs_page(
                source.project(),
                source.store(),
                destination=request.query_params.get("destination", ""),
                status=request.query_params.get("status", ""),
            )
            return page("syncs.html", **data, refresh=data["running"] or jobs.any_alive())

        return failing(render)

    def show_sync(request: Request) -> Response:
        name = request.path_params["name"]

        def render() -> Response:
            project = source.project()
            try:
                project.sync(name)
            except ReverseEtlError as exc:
                raise HTTPException(404, str(exc)) from None
            data = views.sync_page(project, source.store(), name)
            run_job, plan_job = jobs.latest(name, "run"), jobs.latest(name, "plan")
            plan = _plan_result(plan_job)
            busy = any(j is not None and j.alive for j in (run_job, plan_job))
            return page(
                "sync.html",
                **data,
                run_job=run_job,
                plan_job=plan_job,
                plan=plan,
                said=SAID.get(request.query_params.get("done", "")),
                refresh=busy or data["category"] == "running",
            )

        return failing(render)

    async def act(request: Request) -> Response:
        name, action = request.path_params["name"], request.path_params["action"]
        await read_form(request, csrf)

        def do() -> str:
            project = source.project()
            try:
                sync = project.sync(name).name
            except ReverseEtlError as exc:
                raise HTTPException(404, str(exc)) from None
            if action in ("run", "accept", "plan"):
                try:
                    jobs.start(action, sync)
                except JobBusy:
                    return "busy"
            elif action in ("enable", "disable", "reset"):
                value = {"enable": True, "disable": False, "reset": None}[action]
                controls.set_enabled(source.store(), sync, value)
            else:
                raise HTTPException(404, f"no action {action!r}")
            return action

        done = await run_in_threadpool(do)
        return RedirectResponse(
            request.url_for("sync", name=name).path + f"?done={done}", status_code=303
        )

    def show_run(request: Request) -> Response:
        run_id = request.path_params["run_id"]

        def render() -> Response:
            try:
                data = views.run_page(source.store(), run_id)
            except ReverseEtlError as exc:
                raise HTTPException(404, str(exc)) from None
            return page("run.html", **data, refresh=data["run"]["status"] == "running")

        return failing(render)

    def error_file(request: Request) -> Response:
        """Only the file a run record names: the URL carries a run id, never a path."""
        run_id = request.path_params["run_id"]
        from reverse_etl.inspect import find_run

        try:
            record = find_run(source.store(), run_id)
        except ReverseEtlError as exc:
            raise HTTPException(404, str(exc)) from None
        if not record.error_file:
            raise HTTPException(404, f"run {run_id} has no error file")
        try:
            return errorfile.download(record.error_file, record.sync, record.run_id)
        except OSError as exc:
            raise HTTPException(404, f"the error file {record.error_file} is gone: {exc}") from None

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return page(
            "message.html",
            status_code=exc.status_code,
            title=f"Error {exc.status_code}",
            message=exc.detail,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(jobs.stop_all)
            source.close()

    app = Starlette(
        routes=[
            Route("/", list_syncs, name="syncs"),
            Route("/syncs/{name:str}", show_sync, name="sync"),
            Route("/syncs/{name:str}/{action:str}", act, methods=["POST"], name="act"),
            Route("/runs/{run_id:str}", show_run, name="run"),
            Route("/runs/{run_id:str}/error-file", error_file, name="error_file"),
        ],
        middleware=[Middleware(Guard, token=token, loopback=loopback, csrf=csrf)],
        exception_handlers={HTTPException: not_found},
        lifespan=lifespan,
    )
    app.state.jobs = jobs
    return app


def _plan_result(job: Any) -> dict[str, Any] | None:
    """The finished plan's JSON (``reverse-etl plan --json``), or None."""
    if job is None or job.alive or job.exit_code != 0 or job.out is None:
        return None
    import orjson

    try:
        data: dict[str, Any] = orjson.loads(job.out.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data

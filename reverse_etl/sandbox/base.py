"""What both sandboxes do with every request, so each vendor module holds only its API.

The order is the vendors' own: route (404/405), authentication (401), vendor pre-checks,
rate limit (429), spec validation (400/413/415), injected faults, then the handler. Every
request that breaks the API (unknown route, bad credentials, off-spec parameters, content type
or body, a documented limit exceeded, a refused meaning) is kept in ``violations`` so a test
can assert a client made none; a 404 for an unknown id is counted (``counters["not_found"]``)
but is not a violation. Every request is kept in ``request_log``; sandbox bugs go to
``internal_errors``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from reverse_etl.sandbox.faults import FaultInjector, drop_connection
from reverse_etl.sandbox.jobs import JobRunner
from reverse_etl.sandbox.settings import SandboxSettings
from reverse_etl.sandbox.spec import Operation, SpecViolation, Violation, load_spec

log = logging.getLogger("reverse_etl.sandbox")

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
#: Refusals that are not the client breaking the API: an id the account does not have (a
#: lookup may legitimately miss) and what the sandbox does not implement.
NOT_VIOLATIONS = frozenset({"not_found", "unsupported"})


class JSONResponse(Response):
    """orjson-encoded JSON with the vendor's media type."""

    def __init__(
        self,
        content: Any,
        status_code: int = 200,
        *,
        media_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(orjson.dumps(content), status_code, dict(headers or {}), media_type)


class LoggedRequest(NamedTuple):
    method: str
    path: str
    status: int


@dataclass
class Call:
    """One request as a handler sees it: already routed, authenticated and validated."""

    request: Request
    op: Operation | None
    body: Any
    path_params: dict[str, str]
    query: list[tuple[str, str]]
    principal: str
    fault: str | None = None

    def arg(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return default

    @property
    def base_url(self) -> str:
        return str(self.request.base_url).rstrip("/")


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """A vendor operation the sandbox serves.

    ``spec``/``template`` name the operation in the vendor spec (None: sandbox-only route).
    ``faults`` lists the fault kinds that may hit it; ``max_body`` is a documented payload cap.
    """

    method: str
    template: str
    spec: str | None
    handler: Handler
    faults: frozenset[str] = frozenset()
    max_body: int | None = None


@dataclass
class Refusal:
    """An early answer from a vendor hook (auth, pre-check, throttle)."""

    response: Response
    violation: Violation | None = None


class BaseSandbox:
    """The request pipeline and inspection plumbing shared by both vendors."""

    vendor = "sandbox"

    def __init__(self, settings: SandboxSettings | None = None):
        self.settings = settings or SandboxSettings()
        self.lock = threading.RLock()
        self.violations: list[Violation] = []
        self.request_log: list[LoggedRequest] = []
        self.internal_errors: list[str] = []
        self.counters: Counter[str] = Counter()
        self.jobs = JobRunner(self.settings.real_seconds(self.settings.job_seconds), self.lock)
        self.faults = FaultInjector(
            self.settings.fault_rate, self.settings.fault_kinds, self.settings.seed
        )
        self.app = self._build_app()

    # --- vendor hooks ------------------------------------------------------------------------

    def endpoints(self) -> Sequence[Endpoint]:
        raise NotImplementedError

    def authenticate(self, request: Request) -> str | None:
        """The caller's identity (API key or user), or None to answer 401."""
        raise NotImplementedError

    def precheck(self, request: Request, endpoint: Endpoint) -> Violation | None:
        return None

    def throttle(self, principal: str, endpoint: Endpoint, request: Request) -> Response | None:
        """A 429 answer if the call is over the rate limit, else None."""
        return None

    def error_response(self, violation: Violation) -> Response:
        raise NotImplementedError

    def server_error(self, status: int) -> Response:
        raise NotImplementedError

    def throttled_response(self, wait: float) -> Response:
        raise NotImplementedError

    def decorate(self, response: Response, principal: str | None) -> None:
        """Add headers every answer carries (Dotdigital's X-RateLimit-*)."""

    # --- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def _build_app(self) -> Starlette:
        by_template: dict[str, dict[str, Endpoint]] = {}
        for ep in self.endpoints():
            by_template.setdefault(ep.template, {})[ep.method.upper()] = ep
        # Literal segments before parameters: /contacts/v3/import/{id} before /contacts/v3/{a}/{b}.
        ordered = sorted(by_template, key=lambda t: (t.count("{"), -len(t)))
        routes = [
            Route(t, self._endpoint(by_template[t]), methods=_METHODS, name=t) for t in ordered
        ]
        routes.append(Route("/{path:path}", self._endpoint({}), methods=_METHODS))
        app = Starlette(routes=routes)
        app.router.redirect_slashes = False  # a trailing slash is a different (unknown) path
        return app

    def _endpoint(self, by_method: dict[str, Endpoint]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                response, principal = await self._pipeline(request, by_method)
            except ClientDisconnect:  # the client went away mid-body (killed): nothing to answer
                with self.lock:
                    self.counters["client_disconnects"] += 1
                return Response(status_code=499)
            except Exception:  # a sandbox bug: answer 500 and keep the trace for the tests
                trace = traceback.format_exc()
                log.error("sandbox request failed: %s", trace)
                with self.lock:
                    self.internal_errors.append(trace)
                response, principal = self.server_error(500), None
            self.decorate(response, principal)
            with self.lock:
                self.request_log.append(
                    LoggedRequest(request.method, request.url.path, response.status_code)
                )
                self.counters["requests"] += 1
                self.counters[f"status_{response.status_code}"] += 1
            return response

        return endpoint

    def _refuse(self, request: Request, violation: Violation) -> Response:
        recorded = replace(violation, method=request.method, path=request.url.path)
        with self.lock:
            if recorded.kind in NOT_VIOLATIONS:
                self.counters[recorded.kind] += 1
            else:
                self.violations.append(recorded)
                self.counters["violations"] += 1
        return self.error_response(recorded)

    async def _pipeline(
        self, request: Request, by_method: dict[str, Endpoint]
    ) -> tuple[Response, str | None]:
        method = request.method.upper()
        ep = by_method.get(method)
        if ep is None:
            if by_method:
                allowed = ", ".join(sorted(by_method))
                v = Violation(405, "route", f"{method} is not allowed here; allowed: {allowed}")
            else:
                v = Violation(404, "route", f"No such endpoint: {method} {request.url.path}")
            return self._refuse(request, v), None

        principal = self.authenticate(request)
        if principal is None:
            return self._refuse(
                request, Violation(401, "auth", "Missing or invalid credentials.")
            ), None
        early = self.precheck(request, ep)
        if early is not None:
            return self._refuse(request, early), principal
        throttled = self.throttle(principal, ep, request)
        if throttled is not None:
            with self.lock:
                self.counters["throttled"] += 1
            return throttled, principal

        try:
            call = await self._parse(request, ep, principal)
        except SpecViolation as exc:
            return self._refuse(request, exc.violation), principal

        fault = self.faults.draw(ep.faults)
        if fault is not None:
            with self.lock:
                self.counters[f"fault_{fault}"] += 1
            if fault == "429":
                return self.throttled_response(self.settings.fault_retry_after), principal
            if fault in ("500", "503"):
                return self.server_error(int(fault)), principal
            if fault == "reset":
                if await drop_connection(request):
                    return Response(status_code=499), principal  # never reaches the client
                return self.server_error(500), principal  # not under uvicorn: the nearest thing
            if fault == "timeout":
                await asyncio.sleep(self.settings.fault_timeout_seconds)
            call.fault = fault

        try:
            return await ep.handler(call), principal
        except SpecViolation as exc:
            return self._refuse(request, exc.violation), principal

    async def _parse(self, request: Request, ep: Endpoint, principal: str) -> Call:
        length = request.headers.get("content-length")
        if ep.max_body is not None and length is not None and int(length) > ep.max_body:
            raise SpecViolation(
                Violation(
                    413, "limit", f"The payload is {length} bytes; the maximum is {ep.max_body}."
                )
            )
        body = await request.body()
        if ep.max_body is not None and len(body) > ep.max_body:
            raise SpecViolation(
                Violation(
                    413, "limit", f"The payload is {len(body)} bytes; the maximum is {ep.max_body}."
                )
            )
        query = request.query_params.multi_items()
        path_params = {k: str(v) for k, v in request.path_params.items()}
        op = load_spec(ep.spec).operation(ep.method, ep.template) if ep.spec else None
        if op is not None and self.settings.validate:
            parsed = op.check(
                path_params=path_params,
                query=query,
                headers=dict(request.headers.items()),
                content_type=request.headers.get("content-type"),
                body=body,
            )
        else:
            try:
                parsed = orjson.loads(body) if body else None
            except orjson.JSONDecodeError as exc:
                raise SpecViolation(Violation(400, "body", f"Invalid JSON: {exc}")) from exc
        return Call(request, op, parsed, path_params, query, principal)

    # --- inspection --------------------------------------------------------------------------

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every accepted job's work is applied (for inspection from tests)."""
        return self.jobs.wait_idle(timeout)

    def reset_log(self) -> None:
        """Forget violations, the request log and counters (state is kept)."""
        with self.lock:
            self.violations.clear()
            self.request_log.clear()
            self.internal_errors.clear()
            self.counters.clear()


@dataclass
class Page:
    """One page of a collection and the offsets of its neighbours."""

    items: list[Any]
    next_offset: int | None = None
    prev_offset: int | None = None


def paginate(items: Sequence[Any], offset: int, size: int) -> Page:
    chunk = list(items[offset : offset + size])
    nxt = offset + size if offset + size < len(items) else None
    prev = max(0, offset - size) if offset > 0 else None
    return Page(chunk, nxt, prev)

"""Who may use the page, and which requests it takes.

- **Where it listens.** Loopback by default. Bound elsewhere it refuses to start without
  ``REVERSE_ETL_UI_TOKEN`` (``check_bind``): the page starts runs and pauses syncs.
- **Token.** When set, every request needs it: ``Authorization: Bearer TOKEN``, or a cookie
  that ``?token=TOKEN`` sets once (then the URL is redirected without it, so it does not stay
  in the history or a Referer). The cookie holds a digest of the token, not the token.
- **Host header.** On loopback without a token, only ``127.0.0.1``/``localhost``/``::1`` are
  answered: a page on another site whose name is rebound to 127.0.0.1 (DNS rebinding)
  cannot read it.
- **CSRF.** Every POST carries a per-process random token in a hidden field, also set as a
  SameSite=Strict cookie; both must match (``check_csrf``).
- **Headers.** A Content-Security-Policy without any script source: even a value that slipped
  past escaping could not run.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from urllib.parse import parse_qsl, urlencode

from starlette.exceptions import HTTPException
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

TOKEN_ENV = "REVERSE_ETL_UI_TOKEN"
MIN_TOKEN = 16
SESSION_COOKIE = "retl_ui_session"
CSRF_COOKIE = "retl_ui_csrf"
CSRF_FIELD = "csrf"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> str | None:
    """Why the server must not start on ``host`` with ``token``, or None."""
    if token is not None and len(token) < MIN_TOKEN:
        return f"{TOKEN_ENV} is too short: use at least {MIN_TOKEN} random characters"
    if not is_loopback(host) and not token:
        return (
            f"--host {host} is reachable from other machines, and the page starts runs: set "
            f"{TOKEN_ENV} (e.g. `export {TOKEN_ENV}=$(openssl rand -hex 24)`), then open "
            "/?token=... once, or bind to 127.0.0.1"
        )
    return None


def _digest(token: str) -> str:
    return hmac.new(token.encode(), b"reverse-etl-ui-session", hashlib.sha256).hexdigest()


class Guard(BaseHTTPMiddleware):
    """Token, Host header and response headers for every request (CSRF is per form)."""

    def __init__(self, app: ASGIApp, *, token: str | None, loopback: bool, csrf: str) -> None:
        super().__init__(app)
        self.token = token
        self.check_host = loopback and not token
        self.csrf = csrf

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = self._refuse(request)
        if response is None:
            response = await call_next(request)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if request.cookies.get(CSRF_COOKIE) != self.csrf:
            response.set_cookie(CSRF_COOKIE, self.csrf, httponly=True, samesite="strict")
        return response

    def _refuse(self, request: Request) -> Response | None:
        if self.check_host and request.url.hostname not in LOOPBACK_NAMES:
            return PlainTextResponse("unknown Host header", status_code=400)
        if not self.token:
            return None
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                SESSION_COOKIE, _digest(self.token), httponly=True, samesite="strict"
            )
            return response
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and hmac.compare_digest(
            auth[7:].strip().encode(), self.token.encode()
        ):
            return None
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if hmac.compare_digest(cookie.encode(), _digest(self.token).encode()):
            return None
        return PlainTextResponse(
            f"this page needs the token ({TOKEN_ENV}): open /?token=... once, or send "
            "Authorization: Bearer ...",
            status_code=401,
        )


def new_csrf() -> str:
    return secrets.token_urlsafe(32)


async def read_form(request: Request, csrf: str) -> dict[str, str]:
    """The POSTed form (urlencoded), after checking its CSRF token and cookie (403 if not)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    form = dict(parse_qsl(body, keep_blank_values=True))
    field, cookie = form.get(CSRF_FIELD, ""), request.cookies.get(CSRF_COOKIE, "")
    if not (
        hmac.compare_digest(field.encode(), csrf.encode())
        and hmac.compare_digest(cookie.encode(), csrf.encode())
    ):
        raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page")
    return form

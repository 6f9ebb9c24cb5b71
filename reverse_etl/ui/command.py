"""The ``reverse-etl ui`` command. Import-light: the web libraries are imported when it runs,
so the CLI starts as fast without them (and says which extra to install if they are missing)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8765, show_default=True, type=int, help="Port (0: any free one, printed)."
)
@click.pass_obj
def ui(obj: Any, host: str, port: int) -> None:
    """Serve a local page over the project and its state store: every sync, its runs and
    errors; Run now, Plan, Enable/Disable, Accept changes. Loopback only unless
    REVERSE_ETL_UI_TOKEN is set (then every request needs it)."""
    import socket

    from reverse_etl.cli import _fail
    from reverse_etl.errors import ReverseEtlError
    from reverse_etl.extras import MissingExtra
    from reverse_etl.ui.guard import TOKEN_ENV, check_bind, is_loopback

    token = os.environ.get(TOKEN_ENV) or None
    refused = check_bind(host, token)
    if refused:
        _fail(refused, 2)
    config = Path(obj.config).resolve() if obj.config else None
    try:
        obj.project  # noqa: B018 - a broken project file stops here, not at the first page
        try:
            import uvicorn

            from reverse_etl.ui.app import create_app
        except ImportError as exc:
            raise MissingExtra("ui", "reverse-etl ui", exc.name) from exc
        app = create_app(config, obj.project_dir, token=token, loopback=is_loopback(host))
    except ReverseEtlError as exc:
        _fail(str(exc))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # before the URL is printed: a client may connect at once
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc}")
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    click.echo(f"reverse-etl ui: http://{shown}:{bound}/ (Ctrl-C stops)", err=False)
    config_ = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    uvicorn.Server(config_).run(sockets=[sock])

"""Run a sandbox over real loopback HTTP, so clients are tested with their real transport.

``SandboxServer`` runs uvicorn in a background thread on 127.0.0.1 (port 0 picks a free one;
the socket is bound before the thread starts, so ``base_url`` is known at once) and stops it
cleanly; use it as a context manager. ``serve_forever`` runs one in the foreground for the CLI
(``python -m reverse_etl.sandbox``).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from reverse_etl.sandbox.settings import SandboxSettings

__all__ = ["SandboxServer", "SandboxSettings", "serve_forever"]


class SandboxServer:
    """``with SandboxServer(KlaviyoSandbox()) as srv: httpx.get(srv.base_url + ...)``."""

    def __init__(
        self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ):
        self.app = app
        self.host = host
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so, and
        # without it each answer waits ~40 ms for the client's delayed ACK (Nagle).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 5.0) -> SandboxServer:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"sandbox-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"sandbox server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"sandbox server did not start within {timeout}s")
            time.sleep(0.002)
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (1 s at most), join the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def tune_gc() -> None:
    """For a process that only serves a sandbox: collect young garbage less often.

    A sandbox keeps every profile it was sent as dicts, and a 10,000-profile body parses into
    ~100,000 more. With CPython's default thresholds the collector re-walks them so often that
    it takes more time than parsing and applying the body (measured: 7.6 µs a profile to parse
    instead of 2.6). Cycles are still collected, just in larger, rarer sweeps.
    """
    gc.collect()
    gc.freeze()  # what is alive at start-up (modules, specs) is never garbage
    gc.set_threshold(50_000, 50, 100)


def serve_forever(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "info"
) -> None:
    """Serve ``app`` in the foreground until Ctrl-C, printing where it listens."""
    tune_gc()
    server = SandboxServer(app, host=host, port=port, log_level=log_level)
    with server:
        print(
            f"{getattr(app, 'vendor', 'sandbox')} sandbox listening on {server.base_url}",
            flush=True,
        )
        try:
            while server._thread is not None and server._thread.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass

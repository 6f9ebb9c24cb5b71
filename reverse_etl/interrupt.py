"""SIGTERM and Ctrl-C during a run: stop reading, let the batches in flight be acknowledged
and committed, then stop.

Kubernetes, Airflow and systemd stop a task with SIGTERM and kill it ``grace`` seconds later;
a run that dies there leaves its lock held and its record ``running``. The first signal only
asks the run to stop reading (``requested``): the destination finishes the batches it holds,
the engine commits them, records the run ``interrupted`` and releases the lock. If that takes
longer than ``grace`` seconds (a long rate-limit wait), or a second signal comes, the main
thread is interrupted at once (KeyboardInterrupt), which the engine also records.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_SIGINT = 130  # the shell's convention: 128 + the signal's number
EXIT_SIGTERM = 143


class Interrupt:
    def __init__(self, grace: float = 30.0):
        self.grace = grace
        self.signum: int | None = None
        self._timer: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_SIGTERM if self.signum == signal.SIGTERM else EXIT_SIGINT

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def request(self, signum: int) -> None:
        """What the handler does on the first signal (callable directly, e.g. by tests)."""
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        main = threading.main_thread().ident
        if main is not None:
            # a real signal, not interrupt_main(): it also wakes a main thread blocked in a
            # lock or a socket wait, where a simulated one would wait for the call to return
            self._timer = threading.Timer(self.grace, signal.pthread_kill, (main, signal.SIGINT))
            self._timer.daemon = True
            self._timer.start()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.request(signum)

    @contextmanager
    def installed(self) -> Iterator[Interrupt]:
        """Handle SIGINT and SIGTERM for the block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for s, handler in previous.items():
                signal.signal(s, handler)

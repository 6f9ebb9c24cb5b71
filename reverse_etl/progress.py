"""What a running sync is doing, for the person or the log shipper watching it.

A run reports to a ``Progress`` sink: rows read, sent, rejected, the rate, and its phase
("reading", "sending", "waiting for Klaviyo profile import job (10000 records)", "rate limited,
resuming in 12 s"). On a terminal ``TerminalProgress`` draws one live rich line per sync; else
``LineProgress`` logs one structured line per acknowledged batch and per phase change, so a
200,000-row run or a long retry loop is never silent in a scheduler's log.

The engine owns the ``RunProgress`` of a run and hands it batches. Destination code never sees
it: it calls ``phase(...)``, which finds the run through a context variable (the destination
works in the run's thread), so no destination signature carries a progress argument.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # http.py imports this module: keep it light (rich loads on a terminal only)
    from rich.console import Console
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

    from reverse_etl.state import RunCounts, RunRecord

log = logging.getLogger("reverse_etl.progress")

# The counters a progress line carries, in this order.
COUNTERS = ("read", "sent", "rejected", "failed", "unchanged")


class Progress(Protocol):
    """A sink for run progress. Called from the run's thread and from its read-ahead thread:
    implementations are thread-safe."""

    def started(self, run: RunProgress) -> None: ...

    def batch(self, run: RunProgress) -> None:
        """A batch was acknowledged (or, in a dry run, planned) and counted."""

    def read(self, run: RunProgress) -> None:
        """A batch was read and checked (not yet sent): a display may refresh, a log not."""

    def phase(self, run: RunProgress, *, back: bool = False) -> None:
        """The run entered ``run.phase``; ``back``: it went back to it after a wait, news for a
        display, not for a log (the next line carries the phase anyway)."""

    def finished(self, run: RunProgress, status: str) -> None: ...


class RunProgress:
    """One run as its sinks see it: names, live counters (the run record's own ``RunCounts``),
    the current phase, and the batches acknowledged so far."""

    def __init__(
        self,
        sync: str,
        run_id: str,
        counts: RunCounts,
        sink: Progress,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.sync = sync
        self.run_id = run_id
        self.counts = counts
        self.sink = sink
        self.batches = 0
        self.phase = "starting"
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()

    def counters(self) -> dict[str, int]:
        return {name: getattr(self.counts, name) for name in COUNTERS}

    def rate(self) -> float:
        """Rows sent (acknowledged) per second so far: the pace the destination allows."""
        elapsed = self._clock() - self._start
        return self.counts.sent / elapsed if elapsed > 0 else 0.0

    def fields(self) -> dict[str, Any]:
        """What a structured log line says about the run (see ``logs.py``)."""
        return {
            "sync": self.sync,
            "run_id": self.run_id,
            "phase": self.phase,
            "counters": self.counters(),
        }

    def set_phase(self, text: str, *, back: bool = False) -> str:
        """Enter phase ``text`` (``back``: return to it after a wait); returns the phase left,
        to go back to. Repeats are no news."""
        with self._lock:
            before, self.phase = self.phase, text
        if text != before:
            self.sink.phase(self, back=back)
        return before

    def read_batch(self) -> None:
        self.sink.read(self)

    def acknowledged(self) -> None:
        with self._lock:
            self.batches += 1
        self.sink.batch(self)


_RUN: ContextVar[RunProgress | None] = ContextVar("retl_progress_run", default=None)


def current_run() -> RunProgress | None:
    """The run this thread works for, if any: log records take its fields (``logs.py``)."""
    return _RUN.get()


@contextmanager
def tracking(record: RunRecord, sink: Progress | None = None) -> Iterator[RunProgress]:
    """Report the run of ``record`` to ``sink`` (default: the one ``install`` chose) and make it
    the context's current run, for ``phase`` and for log records. Leaving the block reports
    the run ended with ``record.status`` (set by then: the engine sets it inside the block)."""
    run = RunProgress(record.sync, record.run_id, record.counts, sink or default())
    token = _RUN.set(run)
    run.sink.started(run)
    try:
        yield run
    finally:
        _RUN.reset(token)
        status = "failed" if record.status == "running" else record.status
        run.set_phase(status)
        run.sink.finished(run, status)


@contextmanager
def phase(text: str) -> Iterator[None]:
    """Within the block, the current run is in phase ``text`` (then back to what it was). With
    no run in this context (a destination used outside a sync run), ``text`` is logged."""
    run = _RUN.get()
    if run is None:
        log.info("%s", text)
        yield
        return
    before = run.set_phase(text)
    try:
        yield
    finally:
        run.set_phase(before, back=True)


# --------------------------------------------------------------------------- sinks


class LineProgress:
    """One log record per acknowledged batch and per phase change, at INFO on logger
    ``reverse_etl.progress``, carrying the run's fields: the configured formatter (text or JSON,
    ``logs.py``) writes each as one unwrapped line."""

    def started(self, run: RunProgress) -> None:
        self._log(run, "%s: run %s started", run.sync, run.run_id)

    def batch(self, run: RunProgress) -> None:
        c = run.counts
        self._log(
            run,
            "%s: batch %d acknowledged; read %d, sent %d, rejected %d, failed %d (%.0f rows sent/s)",
            run.sync,
            run.batches,
            c.read,
            c.sent,
            c.rejected,
            c.failed,
            run.rate(),
        )

    def read(self, run: RunProgress) -> None:
        pass  # a read batch shows in the next acknowledged batch's counters

    def phase(self, run: RunProgress, *, back: bool = False) -> None:
        if not back:
            self._log(run, "%s: %s", run.sync, run.phase)

    def finished(self, run: RunProgress, status: str) -> None:
        c = run.counts
        self._log(
            run,
            "%s: run %s ended %s; read %d, sent %d, rejected %d, failed %d",
            run.sync,
            run.run_id,
            status,
            c.read,
            c.sent,
            c.rejected,
            c.failed,
        )

    @staticmethod
    def _log(run: RunProgress, message: str, *args: Any) -> None:
        # the fields go with the record: the read-ahead thread has no current run
        log.info(message, *args, extra={"retl": run.fields()})


class TerminalProgress:
    """A live rich line per sync on a terminal: spinner, sync name, counters, rate, phase and
    time elapsed. Logging goes to ``sys.stderr`` at write time (``logs.py``), which rich's live
    display redirects above itself, so log lines never tear the display."""

    def __init__(self, console: Console | None = None):
        from rich.console import Console

        self._console = console or Console(stderr=True)
        self._display: RichProgress | None = None
        self._tasks: dict[int, TaskID] = {}
        self._lock = threading.Lock()

    def started(self, run: RunProgress) -> None:
        with self._lock:
            if self._display is None:
                from rich.progress import Progress as RichProgress
                from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

                self._display = RichProgress(
                    SpinnerColumn(),
                    TextColumn("[bold]{task.description}"),
                    TextColumn("{task.fields[counters]}"),
                    TextColumn("[dim]{task.fields[rate]}"),
                    TextColumn("[cyan]{task.fields[phase]}"),
                    TimeElapsedColumn(),
                    console=self._console,
                    redirect_stderr=True,
                    redirect_stdout=True,
                )
                self._display.start()
            self._tasks[id(run)] = self._display.add_task(run.sync, total=None, **self._fields(run))

    def batch(self, run: RunProgress) -> None:
        self._update(run)

    def read(self, run: RunProgress) -> None:
        self._update(run)

    def phase(self, run: RunProgress, *, back: bool = False) -> None:
        self._update(run, refresh=True)  # drawn now: a wait may be shorter than a refresh

    def finished(self, run: RunProgress, status: str) -> None:
        with self._lock:
            task = self._tasks.pop(id(run), None)
            if self._display is None or task is None:
                return
            self._display.update(task, total=1, completed=1, **self._fields(run))
            self._display.stop_task(task)
            if not self._tasks:  # the last run shown: leave its final line and let go
                self._display.stop()
                self._display = None

    def _update(self, run: RunProgress, *, refresh: bool = False) -> None:
        with self._lock:
            task = self._tasks.get(id(run))
            if self._display is not None and task is not None:
                self._display.update(task, refresh=refresh, **self._fields(run))

    @staticmethod
    def _fields(run: RunProgress) -> dict[str, Any]:
        c = run.counts
        counters = f"read {c.read:,}  sent {c.sent:,}  rejected {c.rejected:,}"
        if c.failed:
            counters += f"  failed {c.failed:,}"
        return {"counters": counters, "rate": f"{run.rate():,.0f} sent/s", "phase": run.phase}


def choose(stream: IO[str] | None = None, *, log_format: str = "text") -> Progress:
    """``TerminalProgress`` when ``stream`` (default stderr) is a terminal and logs are text;
    else ``LineProgress`` (a pipe, a file, a scheduler, or JSON logs for a shipper)."""
    stream = stream if stream is not None else sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return TerminalProgress() if tty and log_format == "text" else LineProgress()


_installed: Progress | None = None


def install(sink: Progress | None) -> None:
    """Make ``sink`` what runs report to when the caller names none (the CLI's choice)."""
    global _installed
    _installed = sink


def default() -> Progress:
    """The installed sink, else ``LineProgress``: a library caller sees progress in its own
    logging configuration, at INFO on ``reverse_etl.progress``."""
    return _installed if _installed is not None else LineProgress()

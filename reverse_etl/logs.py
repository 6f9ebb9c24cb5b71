"""Logging for the CLI: text for people, JSON lines for log shippers, UTC timestamps in both.

Every line starts from a record the standard library made (so a scheduler's own handlers see
the same records) and is scrubbed of registered secrets once more as it is written
(``secrets.scrub``; the record factory already scrubbed the message). A record of a sync run
carries the run's fields (sync, run_id, phase, counters): from the record itself when the
progress sink put them there (``extra={"retl": ...}``), else from the context's current run.

Levels: ``reverse_etl`` logs at INFO (progress lines, retries at WARNING as they happen);
``verbose`` adds DEBUG, which includes one line per HTTP request (method, path, status,
duration). Other libraries stay at WARNING even then: httpx logs whole URLs at INFO, and our
own request lines say what is useful without headers or bodies.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from reverse_etl import progress
from reverse_etl.secrets import scrub, scrub_log_records

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")
# Fields a call may pass in ``extra`` that the JSON line carries at its top level.
EXTRA_FIELDS = ("method", "path", "status", "error", "duration_ms", "attempt", "wait_s", "job")


def timestamp(record: logging.LogRecord) -> str:
    """UTC ISO 8601 with milliseconds: 2026-11-30T02:25:57.123Z."""
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The sync run's fields for ``record``: its own, else the current run's, else none."""
    own = getattr(record, "retl", None)
    if isinstance(own, dict):
        return own
    run = progress.current_run()
    return run.fields() if run is not None else {}


class TextFormatter(logging.Formatter):
    """``2026-11-30T02:25:57.123Z WARNING reverse_etl.destinations.http: message``; an
    exception's traceback follows on the next lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        return scrub(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then the run's sync, run_id,
    phase and counters when known, the ``EXTRA_FIELDS`` a call passed, and ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(run_fields(record))
        for name in EXTRA_FIELDS:
            if name in record.__dict__:
                line[name] = record.__dict__[name]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        # scrubbed after encoding: a secret cannot hide in a field the message did not carry
        return scrub(orjson.dumps(line, default=str).decode())


class _StderrHandler(logging.StreamHandler[Any]):
    """Writes to whatever ``sys.stderr`` is at the time (as ``logging.lastResort`` does), so a
    live progress display that redirects stderr prints log lines above itself."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r}: use one of {', '.join(FORMATS)}")
    return JsonFormatter() if log_format == "json" else TextFormatter()


def setup(
    log_format: LogFormat = "text", *, verbose: bool = False, handler: logging.Handler | None = None
) -> logging.Handler:
    """Send log records to stderr (or ``handler``) in ``log_format``; idempotent: a second call
    replaces the handler the first installed. Returns the handler."""
    scrub_log_records()
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_retl", False)]:
        root.removeHandler(old)
    target = handler or _StderrHandler()
    target.setFormatter(formatter(log_format))
    target._retl = True  # type: ignore[attr-defined]
    root.addHandler(target)
    root.setLevel(logging.WARNING)
    logging.getLogger("reverse_etl").setLevel(logging.DEBUG if verbose else logging.INFO)
    return target

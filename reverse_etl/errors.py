"""Exceptions that end a run, and the exit codes the CLI maps them to.

Exit codes are part of the public contract (schedulers and CI read them):
0 every row landed, or the run finished within its ``fail_on`` thresholds (known problems
are warnings); 1 the run finished but crossed a threshold (too large a share of the rows read
rejected or failed, or a problem no earlier run reported; by default any rejected or failed
row); 2 the command line was wrong (click's usage errors); 3 the run could not run or could
not finish (config, warehouse, lock, API gave up); 130 and 143 stopped by SIGINT or SIGTERM
after committing what was acknowledged (``interrupt.py``). The full table, and what known and
new problems are, is in ``problems.py``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ROW_ERRORS = 1  # a fail_on threshold crossed (problems.py)
EXIT_USAGE = 2
EXIT_FAILED = 3


class ReverseEtlError(Exception):
    """Base class: the message is meant for the user and never carries a secret."""


class ConfigError(ReverseEtlError):
    """The project file is wrong; the message names the file, the key, the value and the fix."""


class LockHeldError(ReverseEtlError):
    """Another run of the same sync holds its lock. ``overdue``: its holder has missed
    heartbeats (it may be gone, on a host this one cannot check), so waiting for it quietly
    is no answer: ``run --due`` says so as an error, not as "not due now"."""

    def __init__(self, message: str, *, overdue: bool = False) -> None:
        super().__init__(message)
        self.overdue = overdue


class NotDueError(ReverseEtlError):
    """A scheduled run found, once it held the lock, that the sync is no longer due: another
    scheduler (or ``run --due``) ran it for this due time while this one waited its turn."""


class LockLostError(ReverseEtlError):
    """Another run took this run's lock over (it looked stale) or it was unlocked: the run
    stops before committing more, so two runs never move one watermark."""


class SchemaMismatchError(ReverseEtlError):
    """The view's columns or types no longer fit the sync's mapping; nothing was sent."""


class SourceError(ReverseEtlError):
    """A warehouse refused or failed a query; the message says which and why (no secrets)."""


class MassRemovalError(ReverseEtlError):
    """A mirror run would remove more of a list than its sync allows; nothing was removed."""


class DestinationError(ReverseEtlError):
    """The destination API failed in a way retries could not fix; unacknowledged rows stay
    behind the watermark and are sent again on the next run."""

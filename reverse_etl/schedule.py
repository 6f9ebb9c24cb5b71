"""Schedules: ``hourly``, ``daily``, ``every 6 hours``, ``every 30 minutes`` or a cron line.

A sync is due when the next fire time after its last started run has passed; a sync that has
never run is due at once. ``reverse-etl run --due`` (from cron or a loop) uses this.

A run that failed or was abandoned is due again before its next slot, after a backoff from its
end: 5 minutes, doubling with each failure in a row (5, 10, 20, 40 minutes, ...), whichever
comes first of that and the next slot, so a daily sync whose warehouse blipped at midnight is
not a day late, and a sync failing for good is tried a few times a day, not every check.

A sync's ``depends_on`` orders the syncs one command runs: dependencies first
(``in_dependency_order``), and a sync whose dependency's latest run failed waits (``blocked_by``):
its rows would be refused for the parent the failed run did not send.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from croniter import croniter
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from reverse_etl.config import Project
    from reverse_etl.state import StateStore

_EVERY = re.compile(r"^every\s+(\d+)\s*(m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days)$")
_UNIT_MINUTES = {"m": 1, "h": 60, "d": 1440}


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    text: str
    every_minutes: int | None = None
    cron: str | None = None

    def next_after(self, moment: datetime) -> datetime:
        if self.cron:
            return croniter(self.cron, moment).get_next(datetime)
        return moment + timedelta(minutes=self.every_minutes or 60)

    def is_due(
        self,
        last_started: datetime | None,
        now: datetime | None = None,
        *,
        failures: int = 0,
        failed_at: datetime | None = None,
    ) -> bool:
        """``failures``: failed or abandoned runs in a row up to the latest, which ended at
        ``failed_at``; such a sync is also due once ``retry_delay(failures)`` has passed."""
        due = self.next_due(last_started, failures=failures, failed_at=failed_at)
        return due is None or due <= (now or datetime.now(UTC))

    def next_due(
        self,
        last_started: datetime | None,
        *,
        failures: int = 0,
        failed_at: datetime | None = None,
    ) -> datetime | None:
        """When the sync is next due (``is_due``'s rule as a time): its next slot, or sooner
        after a failure's backoff; None if it never ran (due at once)."""
        if last_started is None:
            return None
        due = self.next_after(last_started)
        if failures > 0 and failed_at is not None:
            due = min(due, failed_at + retry_delay(failures))
        return due


RETRY_FIRST = timedelta(minutes=5)  # the wait after a first failure, doubled for each more
RETRY_STATUSES = ("failed", "abandoned")  # runs that are due again before their next slot


def retry_delay(failures: int) -> timedelta:
    """The wait after ``failures`` failed runs in a row: 5 min doubling, bounded at 5 min x 2**12
    (14 days); ``is_due`` takes the earlier of it and the next slot, so the slot bounds it."""
    return RETRY_FIRST * 2 ** min(max(failures, 1) - 1, 12)


def parse_schedule(value: Any) -> Schedule:
    """Parse the user's spelling; raise ValueError naming what is accepted."""
    if isinstance(value, dict) and set(value) == {"cron"}:
        value = str(value["cron"])
    if not isinstance(value, str):
        raise ValueError(f"schedule must be text, got {value!r}")
    text = value.strip().lower()
    if text == "hourly":
        return Schedule(text=value, every_minutes=60)
    if text == "daily":
        return Schedule(text=value, cron="0 0 * * *")
    match = _EVERY.match(text)
    if match:
        count = int(match.group(1))
        if count <= 0:
            raise ValueError(f"schedule {value!r}: the interval must be at least 1")
        return Schedule(text=value, every_minutes=count * _UNIT_MINUTES[match.group(2)[0]])
    if croniter.is_valid(value.strip()):
        return Schedule(text=value, cron=value.strip())
    raise ValueError(
        f"schedule {value!r} is not understood; use hourly, daily, 'every N hours', "
        "'every N minutes' or a 5-field cron line such as '0 */6 * * *'"
    )


def in_dependency_order(
    project: Project, names: list[str], *, add_dependencies: bool = False
) -> list[str]:
    """``names`` with each sync after the syncs it ``depends_on`` (otherwise in the order
    given). ``add_dependencies``: also the enabled dependencies not named, transitively (the
    config has no cycles: ``config/models.py``)."""
    wanted, out, seen = set(names), [], set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in project.sync(name).depends_on:
            if dep in wanted or (add_dependencies and project.sync(dep).enabled):
                visit(dep)
        out.append(name)

    for name in names:
        visit(name)
    return out


def blocked_by(project: Project, store: StateStore, name: str) -> str | None:
    """Why ``name`` must not run now: a dependency's latest run failed (exit 3), so what this
    sync sends would be refused for the parents that run did not send. None when free."""
    for dep in project.sync(name).depends_on:
        last = store.last_runs(dep, 1)
        if last and last[0].status == "failed":
            return (
                f"skipped: it depends on {dep!r}, whose latest run ({last[0].run_id}) failed; "
                f"fix {dep!r} (reverse-etl status {dep}) and it runs after it next time"
            )
    return None

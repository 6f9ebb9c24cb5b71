"""Schedules: ``hourly``, ``daily``, ``every 6 hours``, ``every 30 minutes`` or a cron line.

A sync is due when the next fire time after its last started run has passed; a sync that has
never run is due at once. ``reverse-etl run --due`` (from cron or a loop) uses this. Times are
UTC (a cron line too: there are no time zones); a last start or failure later than now (the
clock was set back) is read as now.

A run that failed, was abandoned or was interrupted (SIGTERM from a deploy) is due again
before its next slot, after a backoff from its end: 5 minutes, doubling with each failure in a row (5, 10, 20, 40 minutes, ...), whichever
comes first of that and the next slot, so a daily sync whose warehouse blipped at midnight is
not a day late, and a sync failing for good is tried a few times a day, not every check.

A sync's ``depends_on`` orders the syncs one command runs: dependencies first
(``in_dependency_order``), and a sync whose dependency's latest run failed, or whose dependency
is disabled, waits (``blocked_by``): its rows would be refused for the parents not sent.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from croniter import croniter
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from reverse_etl.config import Project
    from reverse_etl.controls import EnabledState
    from reverse_etl.state import RunRecord, StateStore

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
        """``failures``: failed, abandoned or interrupted runs in a row up to the latest, which
        ended at ``failed_at``; such a sync is also due once ``retry_delay(failures)`` has
        passed."""
        now = now or datetime.now(UTC)
        due = self.next_due(last_started, failures=failures, failed_at=failed_at, now=now)
        return due is None or due <= now

    def next_due(
        self,
        last_started: datetime | None,
        *,
        failures: int = 0,
        failed_at: datetime | None = None,
        now: datetime | None = None,
    ) -> datetime | None:
        """When the sync is next due (``is_due``'s rule as a time): its next slot, or sooner
        after a failure's backoff; None if it never ran (due at once). Times after ``now``
        are read as ``now``: after the clock is set back, an hourly sync that started
        "tomorrow" must not wait until tomorrow."""
        if last_started is None:
            return None
        now = now or datetime.now(UTC)
        due = self.next_after(min(last_started, now))
        if failures > 0 and failed_at is not None:
            due = min(due, min(failed_at, now) + retry_delay(failures))
        return due


RETRY_FIRST = timedelta(minutes=5)  # the wait after a first failure, doubled for each more
# runs that are due again before their next slot: an interrupted one (a deploy's SIGTERM) has
# rows left to send, as a failed one has
RETRY_STATUSES = ("failed", "abandoned", "interrupted")


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
    fields = value.split()
    if len(fields) != 5 and (len(fields) > 5 or croniter.is_valid(value.strip())):
        raise ValueError(_not_five_fields(value, fields))
    if croniter.is_valid(value.strip()):
        return Schedule(text=value, cron=value.strip())
    raise ValueError(
        f"schedule {value!r} is not understood; use hourly, daily, 'every N hours', "
        "'every N minutes' or a 5-field cron line such as '0 */6 * * *'"
    )


def _not_five_fields(value: str, fields: list[str]) -> str:
    """croniter also reads 6 fields (a trailing seconds field: '0 0 9 * * *' fires every second
    of minute 0) and 7 (years) and @-words; only the 5 fields of cron itself are meant here."""
    said = (
        f"schedule {value!r}: a cron line must have exactly 5 fields (minute hour day month "
        f"weekday), this one has {len(fields)}"
    )
    if len(fields) == 6:
        said += (
            "; seconds are not supported: if the first field is Quartz-style seconds, drop it "
            f"({' '.join(fields[1:])!r})"
        )
    return said


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


def blocked_by(
    project: Project, store: StateStore, name: str, *, running: Collection[str] = ()
) -> str | None:
    """Why ``name`` must not run now (``block_reason``), read from the store: runs skip it
    (``skipped: <reason>``), ``status`` and the run page show it blocked. None when free."""
    from reverse_etl.controls import enabled_states

    latest = {  # plans aside: a plan after a failed run does not make the failure go away
        dep: next((r for r in store.last_runs(dep, 20) if r.status != "dry_run"), None)
        for dep in project.sync(name).depends_on
    }
    return block_reason(project, name, enabled_states(project, store), latest, running=running)


def block_reason(
    project: Project,
    name: str,
    enabled: Mapping[str, EnabledState],
    latest: Mapping[str, RunRecord | None],
    *,
    running: Collection[str] = (),
) -> str | None:
    """Why ``name`` must not run now: a dependency's latest run (``latest``, plans aside)
    failed (exit 3), or the dependency is disabled (paused: it sends nothing), so what this
    sync sends would be refused for the parents not sent. ``running``: the syncs this command
    runs before it (``run A B --even-if-disabled``): a disabled one there does not block.
    None when free."""
    for dep in project.sync(name).depends_on:
        last = latest.get(dep)
        if last is not None and last.status == "failed":
            return (
                f"it depends on {dep!r}, whose latest run ({last.run_id}) failed; "
                f"fix {dep!r} (reverse-etl status {dep}) and it runs after it next time"
            )
        if not enabled[dep].enabled and dep not in running:
            return (
                f"it depends on {dep!r}, which is {enabled[dep].describe()}: the parents "
                f"its rows need are not being sent; enable it (`reverse-etl enable {dep}`), "
                f"or run this one without it (`reverse-etl run {name} --no-deps`)"
            )
    return None

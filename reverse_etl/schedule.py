"""Schedules: ``hourly``, ``daily``, ``every 6 hours``, ``every 30 minutes`` or a cron line.

A sync is due when the next fire time after its last started run has passed; a sync that has
never run is due at once. ``reverse-etl run --due`` (from cron or a loop) uses this.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from croniter import croniter
from pydantic import BaseModel, ConfigDict

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

    def is_due(self, last_started: datetime | None, now: datetime | None = None) -> bool:
        if last_started is None:
            return True
        now = now or datetime.now(UTC)
        return self.next_after(last_started) <= now


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

"""Dotdigital's asynchronous imports (contacts and insight data): submit, poll, resubmit.

Both import APIs accept a body at once (``PUT``, answering an ``importId``) and work in the
background, and both refuse a new import with 429 while too many of the account's imports are
unfinished (25 contact imports, 5 insight imports). The queue keeps at most that many of its
own imports unfinished: before submitting one more it waits for the oldest, so the limit is
met by waiting on work already under way rather than by 429s and retries. An import that
ends failed as a whole (not its records' fault) is submitted again a few times before the run
gives up with its rows behind the watermark.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from reverse_etl.destinations import jobs
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.destinations.http import error_detail
from reverse_etl.errors import DestinationError


@dataclass
class Import:
    """One import body and the run's row numbers of its records, in body order."""

    body: bytes
    rows: pa.Array
    id: str | None = None
    attempts: int = 0
    report: dict[str, Any] | None = None  # the final status document, once it finished

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class ImportApi:
    """Where one kind of import lives and how its status reads."""

    path: str  # PUT path; the status is GET {path}/{importId}
    what: str  # for messages: "contact import", "insight data import"
    finished: frozenset[str]  # statuses of an import that ran to its end
    failed: frozenset[str]  # statuses of an import that failed as a whole
    max_active: int


class ImportQueue:
    def __init__(
        self,
        client: DotdigitalClient,
        api: ImportApi,
        *,
        poll_interval: float,
        attempts: int = 3,
        max_active: int | None = None,
    ):
        self.client = client
        self.api = api
        self.poll_interval = poll_interval
        self.attempts = attempts
        self.max_active = max_active or api.max_active
        self._active: deque[Import] = deque()  # submitted, not yet seen to its end, oldest first

    def submit(self, imp: Import) -> None:
        """PUT ``imp``, first waiting for the oldest unfinished import if the limit is reached."""
        while len(self._active) >= self.max_active:
            self.wait(self._active[0])
        imp.id = self._put(imp)
        imp.attempts = 1
        self._active.append(imp)

    def wait(self, imp: Import) -> dict[str, Any]:
        """Poll ``imp`` to its end (``destinations.jobs.wait``, resubmitting it while it fails
        as a whole) and return its final status."""
        if imp.report is not None:
            return imp.report
        try:
            imp.report = jobs.wait(
                _Running(self, imp), attempts=self.attempts, poll_interval=self.poll_interval
            )
        finally:
            self._active.remove(imp)
        return imp.report

    def status(self, imp: Import) -> tuple[jobs.State, dict[str, Any]]:
        report: dict[str, Any] = self.client.json("GET", f"{self.api.path}/{imp.id}")
        status = report.get("status")
        if status in self.api.finished:
            return "done", report
        return ("failed" if status in self.api.failed else "running"), report

    def _put(self, imp: Import) -> str:
        response = self.client.call("PUT", self.api.path, imp.body)
        if response.status_code >= 400:
            raise DestinationError(
                f"Dotdigital refused a {self.api.what} ({len(imp)} records): {error_detail(response)}"
            )
        return str(orjson.loads(response.content)["importId"])


@dataclass
class _Running:
    """A submitted ``Import`` as the shared job loop sees it."""

    queue: ImportQueue
    imp: Import

    @property
    def what(self) -> str:
        return f"Dotdigital {self.queue.api.what} ({len(self.imp)} records)"

    @property
    def id(self) -> str | None:
        return self.imp.id

    @property
    def attempts(self) -> int:
        return self.imp.attempts

    def start(self) -> None:
        self.imp.id = self.queue._put(self.imp)
        self.imp.attempts += 1

    def status(self) -> tuple[jobs.State, dict[str, Any]]:
        return self.queue.status(self.imp)

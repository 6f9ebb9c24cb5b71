"""Dotdigital's asynchronous imports (contacts and insight data): submit, poll, resubmit.

Both import APIs accept a body at once (``PUT``, answering an ``importId``) and work in the
background, and both refuse a new import with 429 while too many of the account's imports are
unfinished (25 contact imports, 5 insight imports). The queue keeps at most that many of its
own imports unfinished: before submitting one more it waits for the oldest, so the limit is
met by waiting on work already under way rather than by 429s and retries. An import that
ends failed as a whole (not its records' fault) is submitted again a few times before the run
gives up with its rows behind the watermark.

The import limit is the account's, shared with every other integration on it (an ecommerce
connector, another sync), so a submit can still meet 429 ``tooManyActiveImports``. That is a
wait for a slot, not an error: the submit is tried again after a pause growing from the
answer's ``Retry-After`` (or ``Destination.poll_interval``) to ``poll_max_seconds``, for up to
``import_slot_wait_minutes``, then the run stops saying who held the slots. A 429 of the call
budget is waited out as its ``Retry-After`` says (seconds, or an HTTP-date: RFC 9110 10.2.3),
each wait logged; it counts against the submit's attempts (``RetryPolicy.max_attempts``, with
lost answers), so a budget that never comes back ends the run instead of waiting for ever.

Acknowledgement: an import is under way only when Dotdigital answers with its ``importId``
(``ImportContactsResponse``/``ImportInsightDataResponse`` in the v3 specs). A 2xx without one
(a proxy's page) is a ``DestinationError`` naming the call: its rows are not counted as done.

Lost answers: a submit's HTTP timeout is ``call_timeout_seconds`` (150 s; Dotdigital advises
clients to allow 121 s), so a slow answer is waited for, never resubmitted. When the answer is
lost all the same (a timeout past that, a dropped connection, a 5xx), the import may or may
not have been accepted, and it cannot be looked up: the contacts and insight specs offer no
list of imports (only ``PUT .../import`` and ``GET .../import/{importId}``), and an import
body carries no client reference. It is submitted again: contact and insight imports are
upserts ("Creates contacts if they do not exist and updates contacts if they do", contacts
spec ``importContacts``; insight records are keyed), so a second submit of the same body
leaves the same data. What may differ: rows the first import created count as updated in the
second's report, a consent record may be stored twice (UNCONFIRMED whether Dotdigital keeps
identical records once), and the lost import held a slot for a while.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pyarrow as pa

from reverse_etl.destinations import jobs
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.destinations.http import error_detail, retry_after_asked
from reverse_etl.errors import DestinationError

log = logging.getLogger(__name__)


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
    # statuses of an import still on its way; any status in none of the three sets is an
    # error at once (it was waited on for import_timeout_minutes, 360 by default)
    running: frozenset[str] = frozenset({"NotStarted", "NotFinished"})


@dataclass
class Waits:
    """How long the queue waits, in seconds (the connection's options, module doc), and the
    clock and sleep it waits with (tests count polls on a fake clock)."""

    poll_first: float = 0.2
    poll_max: float = 60.0
    import_timeout: float = 6 * 3600.0
    slot_wait: float = 30 * 60.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    slot_waits: int = field(default=0)  # 429 tooManyActiveImports met, for tests and logs
    slot_waited: float = field(default=0.0)


class ImportQueue:
    def __init__(
        self,
        client: DotdigitalClient,
        api: ImportApi,
        *,
        poll_interval: float,
        attempts: int = 3,
        max_active: int | None = None,
        waits: Waits | None = None,
    ):
        self.client = client
        self.api = api
        self.poll_interval = poll_interval
        self.attempts = attempts
        self.max_active = max_active or api.max_active
        self.waits = waits or Waits(poll_first=poll_interval)
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
        w = self.waits
        patience = jobs.Patience(
            first=w.poll_first,
            ceiling=w.poll_max,
            growth=2.0,
            timeout=w.import_timeout,
            clock=w.clock,
            sleep=w.sleep,
        )
        try:
            imp.report = jobs.wait(
                _Running(self, imp),
                attempts=self.attempts,
                poll_interval=w.poll_first,
                patience=patience,
            )
        finally:
            self._active.remove(imp)
        return imp.report

    def status(self, imp: Import) -> tuple[jobs.State, dict[str, Any]]:
        path = f"{self.api.path}/{imp.id}"
        report = self.client.json("GET", path)
        if not isinstance(report, dict):
            raise DestinationError(
                f"Dotdigital GET {path}: the answer is not an import report (check base_url / "
                "proxy); nothing the import carried is counted as done"
            )
        status = report.get("status")
        if status in self.api.finished:
            return "done", report
        if status in self.api.failed:
            return "failed", report
        if status in self.api.running:
            return "running", report
        raise DestinationError(
            f"Dotdigital GET {path}: the {self.api.what} has status {status!r}, which the API "
            f"does not document (finished: {', '.join(sorted(self.api.finished))}; still "
            f"running: {', '.join(sorted(self.api.running))}); check base_url / proxy. Nothing "
            "the import carried is counted as done, and the next run sends it again"
        )

    def _put(self, imp: Import) -> str:
        """Submit ``imp`` until it is accepted (module doc): wait for a slot while the
        account's are taken, wait out the call budget, and send again after a lost answer."""
        w, retry = self.waits, self.client.api.retry
        started = w.clock()
        slot_pause = 0.0
        failures = 0
        last = ""
        while True:
            try:
                response = self.client.submit_once("PUT", self.api.path, imp.body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                response, last = None, type(exc).__name__
            if response is not None and response.status_code < 300:
                return self._import_id(imp, response)
            if response is not None and response.status_code == 429:
                retry_after = _retry_after(response)
                if b"tooManyActiveImports" not in response.content:  # the call budget
                    failures += 1
                    if failures >= retry.max_attempts:
                        raise DestinationError(
                            f"Dotdigital PUT {self.api.path} met 429 (the call budget) "
                            f"{failures} times in {failures} attempts; rows not acknowledged "
                            "stay behind the watermark and are sent again next run"
                        )
                    pause = min(retry_after or 1.0, retry.max_retry_after)
                    log.warning(
                        "Dotdigital %s: 429 (the call budget); trying again in %.1fs "
                        "(attempt %d of %d)",
                        self.api.what,
                        pause,
                        failures + 1,
                        retry.max_attempts,
                    )
                    w.sleep(pause)
                    continue
                waited = w.clock() - started
                if waited >= w.slot_wait:
                    raise DestinationError(self._slots_held(waited))
                slot_pause = min(
                    max(slot_pause * 2, retry_after or w.poll_first, w.poll_first), w.poll_max
                )
                pause = min(slot_pause, max(0.0, w.slot_wait - waited))
                w.slot_waits += 1
                w.slot_waited += pause
                log.info(
                    "Dotdigital %s: the account's %d import slots are taken; trying again in %.1fs",
                    self.api.what,
                    self.max_active,
                    pause,
                )
                w.sleep(pause)
                continue
            if response is not None and response.status_code < 500:
                raise DestinationError(
                    f"Dotdigital refused a {self.api.what} ({len(imp)} records): "
                    f"{error_detail(response)}"
                )
            if response is not None:
                last = f"HTTP {response.status_code}"
            failures += 1
            if failures >= retry.max_attempts:
                raise DestinationError(
                    f"Dotdigital PUT {self.api.path} failed after {failures} attempts (last: "
                    f"{last}); rows not acknowledged stay behind the watermark and are sent "
                    "again next run"
                )
            log.info("Dotdigital %s: %s; submitting it again (an upsert)", self.api.what, last)
            delay = min(retry.max_delay, retry.base_delay * 2 ** (failures - 1))
            w.sleep(delay * (0.5 + random.random() / 2))

    def _import_id(self, imp: Import, response: httpx.Response) -> str:
        """The ``importId`` of an accepted submit; a 2xx without one is not an acceptance."""
        try:
            doc = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            doc = None
        import_id = doc.get("importId") if isinstance(doc, dict) else None
        if not isinstance(import_id, str) or not import_id:
            raise DestinationError(
                f"Dotdigital PUT {self.api.path} ({self.api.what}, {len(imp)} records) answered "
                f"HTTP {response.status_code} without an importId (check base_url / proxy); "
                "nothing in it is counted as done, its rows are sent again next run"
            )
        return import_id

    def _slots_held(self, waited: float) -> str:
        ours = len(self._active)
        return (
            f"Dotdigital refused a {self.api.what} for {waited / 60:.1f} minutes: all "
            f"{self.api.max_active} of the account's import slots stayed taken ({ours} by this "
            f"sync, {max(self.api.max_active - ours, 0)} or more by other integrations or API "
            "users of the account: 429 tooManyActiveImports). The rows stay behind the "
            "watermark and are sent next run; raise the connection's import_slot_wait_minutes "
            "to wait longer, or look for what imports into the account (Settings > Contacts > "
            "Import history)"
        )


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (``http.retry_after_asked``, never below 0); None when absent
    or unreadable."""
    asked = retry_after_asked(response.headers.get("Retry-After"), time.time())
    return None if asked is None else max(0.0, asked)


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

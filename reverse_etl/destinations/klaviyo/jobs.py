"""Klaviyo's asynchronous bulk jobs (profile import, catalog item create/update): submit, poll
to the end, and submit again when Klaviyo cancelled one.

A cancelled job failed as a whole (Klaviyo's status enum has no "failed"): not its records'
fault, so it is submitted again a few times before the run gives up with its rows behind the
watermark. Profile imports and catalog updates are idempotent in effect (upserts) and are
retried as any call. A job that creates (catalog items) carries ``landed_check``, a look-up
of its records: its submission goes through ``ApiClient.create_once``, so a submission whose
answer was lost is not repeated while its records may still appear; if they all do, the job
is done without an id to poll (``Job.landed``).

Klaviyo runs an account's imports one after another, so a job can wait behind others for
hours. Polls back off from the destination's ``poll_interval`` to ``POLL_CEILING`` (never more
than a tenth of the time waited so far, so a quick job is seen quickly), and the wait ends at
``timeout`` (``job_timeout_minutes``, default ``JOB_TIMEOUT_MINUTES``) with an error that
leaves the job's rows unacknowledged: the watermark stays before them and the next run sends
them again (an import is an upsert). The state-store lock heartbeats from its own thread
(``state.StateStore.lock``), so a run waiting this long keeps its lock. Subscribe and
unsubscribe jobs have no status endpoint (202, no id): there is nothing to poll.

Answers are checked against the spec before they count. A submission's answer carries the
job's id (``data.id``; ``PostProfileImportJobResponse``, ``PostCatalogItemCreateJobResponse``
in ``../shared/api-specs/klaviyo/``); one without it (a proxy's page, a redirect) is a
``DestinationError`` naming the call, not an internal error. A poll's answer carries
``data.attributes.status``, one of the spec's enum (``STATUSES``: queued, processing,
complete, cancelled, the same for every job kind); a status outside it ("failed") is not a
job still running: it is a ``DestinationError`` naming the status at once, rather than a wait
until ``job_timeout_minutes`` runs out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from reverse_etl.destinations import jobs
from reverse_etl.destinations.http import error_detail
from reverse_etl.destinations.klaviyo.client import KlaviyoClient
from reverse_etl.errors import DestinationError

CANCELLED = "cancelled"
COMPLETE = "complete"
# the job status enum of the 2026-07-15 spec (every bulk job kind: profile import, catalog)
STATUSES = frozenset({"queued", "processing", COMPLETE, CANCELLED})
JOB_TIMEOUT_MINUTES = 120.0  # how long a run waits for one job (job_timeout_minutes)
POLL_CEILING = 120.0  # seconds between polls at most
POLL_SHARE = 0.1  # ... and at most this share of the time waited so far
LANDED = ""  # what create_once gives back when a lost submission's records all showed up


@dataclass
class JobKind:
    """One kind of job: where it is posted and polled, and the operations' rate-limit names."""

    path: str
    submit_op: str
    poll_op: str
    what: str  # for messages: "profile import job"


@dataclass
class Job:
    kind: JobKind
    body: bytes  # kept to submit again a job Klaviyo cancelled
    count: int  # records in the job
    # a job that creates: True once every record it creates exists (see the module docstring)
    landed_check: Callable[[], bool] | None = field(default=None, repr=False)
    id: str = ""
    attempts: int = 0
    landed: bool = False  # its records landed through a submission whose answer was lost


def submit(client: KlaviyoClient, job: Job) -> Job:
    """Post the job; a refused job (4xx) is a bug or an account problem, not a record's."""
    job.attempts += 1
    if job.landed_check is None:
        job.id = _post(client, job, idempotent=True)
        return job
    check = job.landed_check
    outcome = client.api.create_once(
        lambda: LANDED if check() else None,
        lambda: _post(client, job, idempotent=False),
        f"a Klaviyo {job.kind.what} ({job.count} records)",
        look_first=False,
    )
    job.landed = outcome == LANDED
    job.id = "" if job.landed else outcome
    return job


def _post(client: KlaviyoClient, job: Job, *, idempotent: bool) -> str:
    response = client.call(
        job.kind.submit_op, "POST", job.kind.path, job.body, idempotent=idempotent
    )
    if response.status_code >= 400:
        raise DestinationError(
            f"Klaviyo refused a {job.kind.what} ({job.count} records): {error_detail(response)}"
        )
    call = f"Klaviyo POST {job.kind.path} ({job.kind.what}, {job.count} records)"
    if response.status_code >= 300:
        raise DestinationError(
            f"{call} answered HTTP {response.status_code}, not 202 Accepted with the job "
            "(check base_url / proxy); nothing it carried is counted as done"
        )
    try:
        doc = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        doc = None
    data = doc.get("data") if isinstance(doc, dict) else None
    job_id = data.get("id") if isinstance(data, dict) else None
    if not isinstance(job_id, str) or not job_id:
        raise DestinationError(
            f"{call} answered HTTP {response.status_code} without the job's data.id (check "
            "base_url / proxy); nothing it carried is counted as done"
        )
    return job_id


def patience(
    poll_interval: float,
    timeout_minutes: float | None = JOB_TIMEOUT_MINUTES,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> jobs.Patience:
    """How a Klaviyo job is waited for (see the module docstring); tests inject the clock."""
    return jobs.Patience(
        first=poll_interval,
        ceiling=max(POLL_CEILING, poll_interval),
        share=POLL_SHARE,
        timeout=None if timeout_minutes is None else timeout_minutes * 60,
        clock=clock,
        sleep=sleep,
    )


def wait(
    client: KlaviyoClient,
    job: Job,
    *,
    attempts: int,
    poll_interval: float,
    timeout_minutes: float | None = JOB_TIMEOUT_MINUTES,
    waiting: jobs.Patience | None = None,
) -> dict[str, Any]:
    """Poll ``job`` to its end (``destinations.jobs.wait``, resubmitting it while Klaviyo
    cancels it) and return its final document. A job whose records landed through a lost
    submission has nothing to poll: it is complete, every record done. A job still running
    after ``timeout_minutes`` (or ``waiting``'s timeout) raises ``DestinationError``."""
    waiting = waiting or patience(poll_interval, timeout_minutes)
    try:
        return jobs.wait(
            _Running(client, job), attempts=attempts, poll_interval=poll_interval, patience=waiting
        )
    except jobs.JobTimeout as late:
        limit = "none" if waiting.timeout is None else f"{waiting.timeout / 60:g} minutes"
        raise jobs.JobTimeout(
            f"{late}. The limit (destination.job_timeout_minutes) is {limit}: raise it to "
            "wait longer, or look at the job in Klaviyo",
            late.waited,
            late.doc,
        ) from None


@dataclass
class _Running:
    """A submitted ``Job`` as the shared job loop sees it."""

    client: KlaviyoClient
    job: Job

    @property
    def what(self) -> str:
        return f"Klaviyo {self.job.kind.what} ({self.job.count} records)"

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def attempts(self) -> int:
        return self.job.attempts

    def start(self) -> None:
        submit(self.client, self.job)

    def status(self) -> tuple[jobs.State, dict[str, Any]]:
        if self.job.landed:
            return "done", _landed_document(self.job)
        kind = self.job.kind
        path = f"{kind.path}/{self.job.id}"
        body = self.client.json(kind.poll_op, "GET", path)
        data = body.get("data") if isinstance(body, dict) else None
        attrs = data.get("attributes") if isinstance(data, dict) else None
        if not isinstance(attrs, dict):
            raise DestinationError(
                f"Klaviyo GET {path} ({self.what}): the answer has no data.attributes (check "
                "base_url / proxy); nothing the job carried is counted as done"
            )
        status = attrs.get("status")
        if status not in STATUSES:
            raise DestinationError(
                f"{self.what} {self.job.id}: Klaviyo answered status {status!r}, which is not "
                f"one of the spec's ({', '.join(sorted(STATUSES))}); nothing the job carried "
                "is counted as done, so the next run sends it again"
            )
        # Klaviyo's status enum has no "failed": a cancelled job failed as a whole
        state: jobs.State = (
            "done" if status == COMPLETE else "failed" if status == CANCELLED else "running"
        )
        return state, body


def _landed_document(job: Job) -> dict[str, Any]:
    n = job.count
    attrs = {"status": "complete", "total_count": n, "completed_count": n, "failed_count": 0}
    return {"data": {"type": job.kind.what, "id": job.id, "attributes": {**attrs, "errors": []}}}

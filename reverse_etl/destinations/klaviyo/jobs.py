"""Klaviyo's asynchronous bulk jobs (profile import, catalog item create/update): submit, poll
to the end, and submit again when Klaviyo cancelled one.

A cancelled job failed as a whole (Klaviyo's status enum has no "failed"): not its records'
fault, so it is submitted again a few times before the run gives up with its rows behind the
watermark. Submissions are idempotent in effect (profile imports upsert; catalog creates that
meet an existing item are routed to updates by the catalog destination).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from reverse_etl.destinations.http import error_detail
from reverse_etl.destinations.jobs import poll
from reverse_etl.destinations.klaviyo.client import KlaviyoClient
from reverse_etl.errors import DestinationError

DONE = {"complete", "cancelled"}


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
    id: str = ""
    attempts: int = 0


def submit(client: KlaviyoClient, job: Job) -> Job:
    """Post the job; a refused job (4xx) is a bug or an account problem, not a record's."""
    response = client.call(job.kind.submit_op, "POST", job.kind.path, job.body)
    if response.status_code >= 400:
        raise DestinationError(
            f"Klaviyo refused a {job.kind.what} ({job.count} records): {error_detail(response)}"
        )
    job.id = orjson.loads(response.content)["data"]["id"]
    job.attempts += 1
    return job


def wait(client: KlaviyoClient, job: Job, *, attempts: int, poll_interval: float) -> dict[str, Any]:
    """Poll ``job`` to its end and return its final document; resubmit it while cancelled."""
    fetch: Callable[[], Any] = lambda: client.json(  # noqa: E731 - rebinds job.id each call
        job.kind.poll_op, "GET", f"{job.kind.path}/{job.id}"
    )
    while True:
        body = poll(
            fetch, lambda b: b["data"]["attributes"].get("status") in DONE, first=poll_interval
        )
        if body["data"]["attributes"].get("status") == "complete":
            return body
        if job.attempts >= attempts:
            raise DestinationError(
                f"Klaviyo cancelled {job.kind.what} {job.id} {job.attempts} times; its rows "
                "stay behind the watermark and are sent again next run"
            )
        submit(client, job)

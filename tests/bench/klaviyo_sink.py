"""A measuring instrument, not a Klaviyo: it answers the four calls a profile sync makes
(list lookup, bulk import, job poll, import errors) and does nothing with the profiles.

The sandbox checks every profile against the spec and keeps it, which costs ~10 µs of Python a
profile, more than the engine spends producing it; on a 2-core machine the two processes then
share the cores and the sandbox sets the pace. Against this sink (a few µs a *request*) the run
shows what the client itself sustains: extract, transform, JSON, HTTP and job polling. It reads
each body whole and answers only once it has, so nothing is skipped on the client's side.
Correctness is the sandbox's business (tests and the other bench runs); never test against this.
"""

from __future__ import annotations

import itertools

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

JSONAPI = "application/vnd.api+json"
LIST = b'{"data":[{"type":"list","id":"SINK01","attributes":{"name":"%s"}}]}'


def _doc(job_id: str, total: int) -> bytes:
    return (
        b'{"data":{"type":"profile-bulk-import-job","id":"%s","attributes":{"status":"complete",'
        b'"total_count":%d,"completed_count":%d,"failed_count":0}}}'
        % (job_id.encode(), total, total)
    )


def sink_app() -> Starlette:
    jobs: dict[str, int] = {}
    ids = itertools.count(1)

    async def lists(request: Request) -> Response:
        name = request.query_params.get("filter", "").partition(',"')[2].rstrip('")')
        return Response(LIST % name.encode(), media_type=JSONAPI)

    async def submit(request: Request) -> Response:
        body = await request.body()
        job_id = f"SINKJOB{next(ids)}"
        # profiles counted without parsing: each one is an object of type "profile"
        jobs[job_id] = body.count(b'{"type":"profile"')
        return Response(_doc(job_id, jobs[job_id]), status_code=202, media_type=JSONAPI)

    async def poll(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        return Response(_doc(job_id, jobs[job_id]), media_type=JSONAPI)

    return Starlette(
        routes=[
            Route("/api/lists", lists, methods=["GET"]),
            Route("/api/profile-bulk-import-jobs", submit, methods=["POST"]),
            Route("/api/profile-bulk-import-jobs/{job_id}", poll, methods=["GET"]),
        ]
    )

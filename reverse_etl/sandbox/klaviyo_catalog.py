"""Klaviyo's catalog item bulk create/update jobs and item lookups."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from starlette.responses import Response

from reverse_etl.sandbox.base import Call, paginate
from reverse_etl.sandbox.jobs import DONE, FAILED, Job, iso
from reverse_etl.sandbox.jsonapi import decode_cursor, matches, page_links
from reverse_etl.sandbox.klaviyo_common import (
    ITEM_ATTRS,
    ITEM_FILTERS,
    ITEM_FILTERS_DONE,
    MAX_CATALOG_ITEMS,
    MAX_CATALOG_JOBS,
    KlaviyoBase,
    csv_arg,
    jsonapi,
    over_limit,
    page_size,
    related_links,
    resource,
    sort_rows,
    sparse,
)
from reverse_etl.sandbox.klaviyo_state import ProfileError


class CatalogAPI(KlaviyoBase):
    """POST/GET /api/catalog-item-bulk-*-jobs..., GET /api/catalog-items."""

    # --- catalog ----------------------------------------------------------------------------

    async def create_items(self, call: Call) -> Response:
        return self._item_job(call, "catalog-item-bulk-create-job")

    async def update_items(self, call: Call) -> Response:
        return self._item_job(call, "catalog-item-bulk-update-job")

    def _item_job(self, call: Call, kind: str) -> Response:
        items = call.body["data"]["attributes"]["items"]["data"]
        if len(items) > MAX_CATALOG_ITEMS:
            raise over_limit(
                f"{len(items)} items; at most {MAX_CATALOG_ITEMS} per job.",
                "/data/attributes/items/data",
            )
        active = self.jobs.active("catalog-item-bulk-create-job") + self.jobs.active(
            "catalog-item-bulk-update-job"
        )
        if (
            active >= MAX_CATALOG_JOBS
        ):  # "The maximum number of jobs in progress at one time is 500."
            return self.throttled_response(self.jobs.duration)
        job = Job(kind, len(items), fail=call.fault == "failed_job")
        job.data.update(errors=[], item_ids=[], completed=0, failed=0)
        self.jobs.submit(job, self._item_work(job, items, create=kind.endswith("create-job")))
        return jsonapi(self._item_job_doc(job, call), 202)

    def _item_work(self, job: Job, items: list[dict[str, Any]], *, create: bool) -> Iterator[None]:
        state, d = self.state, job.data
        for i, item in enumerate(items):
            ptr = f"/data/attributes/items/data/{i}"
            try:
                if create:
                    item_id = state.create_item(item["attributes"], ptr)
                else:
                    item_id = state.update_item(item["id"], item["attributes"], ptr)
            except ProfileError as e:
                d["errors"].append(
                    {
                        "id": f"{job.id}-{i}",
                        "code": e.code,
                        "title": "Invalid input.",
                        "detail": e.detail,
                        "source": {"pointer": e.pointer},
                    }
                )
                d["failed"] += 1
                continue
            d["item_ids"].append(item_id)
            d["completed"] += 1
        yield

    def _item_job_doc(self, job: Job, call: Call) -> dict[str, Any]:
        progress = self._job_progress(job)  # before `done`, so "complete" never lacks its items
        route = (
            "catalog-item-bulk-create-jobs"
            if job.kind.endswith("create-job")
            else "catalog-item-bulk-update-jobs"
        )
        base = f"{call.base_url}/api/{route}/{job.id}"
        done = self.jobs.phase(job) == DONE
        errors = job.data["errors"] if done else []
        if job.fail and self.jobs.phase(job) == FAILED:
            errors = [
                {
                    "id": f"{job.id}-failed",
                    "code": "cancelled",
                    "title": "Job cancelled.",
                    "detail": "The sandbox failed this job (fault injection).",
                    "source": {"pointer": "/data"},
                }
            ]
        attrs = {
            **progress,
            "errors": errors,
            "expires_at": iso(job.created_at + timedelta(days=7)),
        }
        item_ids = job.data["item_ids"] if done else []
        doc: dict[str, Any] = {
            "data": {
                "type": job.kind,
                "id": job.id,
                "attributes": sparse(attrs, call, job.kind),
                "relationships": {
                    "items": {
                        "data": [{"type": "catalog-item", "id": i} for i in item_ids],
                        "links": related_links(base, "items"),
                    }
                },
                "links": {"self": base},
            },
            "links": {"self": base},
        }
        if "items" in csv_arg(call, "include"):
            with self.lock:
                doc["included"] = [
                    self._item_resource(self.state.catalog[i], call)
                    for i in item_ids
                    if i in self.state.catalog
                ]
        return doc

    async def get_item_job(self, call: Call) -> Response:
        kind = (
            "catalog-item-bulk-create-job"
            if "create" in call.request.url.path
            else "catalog-item-bulk-update-job"
        )
        return jsonapi(self._item_job_doc(self._job(kind, call.path_params["job_id"]), call))

    def _item_resource(self, item: dict[str, Any], call: Call) -> dict[str, Any]:
        attrs = {k: item.get(k) for k in ITEM_ATTRS}
        return resource(call, "catalog-item", "catalog-items", item["id"], attrs, ("variants",))

    async def get_items(self, call: Call) -> Response:
        conds = self._filter(call, ITEM_FILTERS, ITEM_FILTERS_DONE)
        with self.lock:
            rows = [i for i in self.state.catalog.values() if matches(i, conds, {"ids": "id"})]
            rows = sort_rows(rows, call.arg("sort"))
            page = paginate(rows, decode_cursor(call.arg("page[cursor]")), page_size(call, 100))
            data = [self._item_resource(i, call) for i in page.items]
        return jsonapi(
            {"data": data, "links": page_links(call.request, page.next_offset, page.prev_offset)}
        )

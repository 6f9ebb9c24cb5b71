"""Klaviyo's lists and list membership."""

from __future__ import annotations

from starlette.responses import Response

from reverse_etl.sandbox.base import Call, paginate
from reverse_etl.sandbox.jsonapi import decode_cursor, matches, page_links
from reverse_etl.sandbox.klaviyo_common import (
    LIST_FILTERS,
    MAX_LIST_MEMBERS,
    MEMBER_FILTERS,
    MEMBER_FILTERS_DONE,
    KlaviyoBase,
    bad,
    jsonapi,
    over_limit,
    page_size,
    sort_rows,
)


class ListsAPI(KlaviyoBase):
    """GET/POST /api/lists..., list relationships/profiles."""

    # --- lists ------------------------------------------------------------------------------

    async def get_lists(self, call: Call) -> Response:
        conds = self._filter(call, LIST_FILTERS, LIST_FILTERS)
        with self.lock:
            rows = [x for x in self.state.lists.values() if matches(x, conds, {})]
            rows = sort_rows(rows, call.arg("sort"))
            page = paginate(rows, decode_cursor(call.arg("page[cursor]")), page_size(call, 10))
            data = [self._list_resource(x, call) for x in page.items]
        return jsonapi(
            {"data": data, "links": page_links(call.request, page.next_offset, page.prev_offset)}
        )

    async def create_list(self, call: Call) -> Response:
        attrs = call.body["data"]["attributes"]
        with self.lock:
            lst = self.state.create_list(attrs["name"], attrs.get("opt_in_process"))
            doc = {
                "data": self._list_resource(lst, call),
                "links": {"self": f"{call.base_url}/api/lists/{lst['id']}"},
            }
        return jsonapi(doc, 201)

    async def get_list(self, call: Call) -> Response:
        with self.lock:
            lst = self._list(call.path_params["id"])
            doc = {"data": self._list_resource(lst, call), "links": {"self": str(call.request.url)}}
        return jsonapi(doc)

    async def get_list_profiles(self, call: Call) -> Response:
        conds = self._filter(call, MEMBER_FILTERS, MEMBER_FILTERS_DONE)
        with self.lock:
            list_id = self._list(call.path_params["id"])["id"]
            rows = [
                {**self.state.profiles[pid], "joined_group_at": joined}
                for pid, joined in self.state.members[list_id].items()
            ]
        rows = [r for r in rows if matches(r, conds, {})]
        sort = call.arg("sort")
        if sort:
            rows.sort(key=lambda r: r["joined_group_at"], reverse=sort.startswith("-"))
        page = paginate(rows, decode_cursor(call.arg("page[cursor]")), page_size(call, 20))
        data = [{"type": "profile", "id": r["id"]} for r in page.items]
        return jsonapi(
            {"data": data, "links": page_links(call.request, page.next_offset, page.prev_offset)}
        )

    def _member_ids(self, call: Call, *, removing: bool = False) -> tuple[str, list[str]]:
        items = call.body["data"]
        if len(items) > MAX_LIST_MEMBERS:
            raise over_limit(
                f"{len(items)} profiles; at most {MAX_LIST_MEMBERS} per call.", "/data"
            )
        with self.lock:
            list_id = self._list(call.path_params["id"])["id"]
            for i, item in enumerate(items):
                if item["id"] not in self.state.profiles:
                    detail, where = f"Profile {item['id']!r} does not exist.", f"/data/{i}/id"
                    if removing:  # a client's id may have gone stale (merged, deleted): no fault
                        raise bad(detail, where, status=404, kind="not_found")
                    raise bad(detail, where)
        return list_id, [item["id"] for item in items]

    async def add_to_list(self, call: Call) -> Response:
        list_id, ids = self._member_ids(call)
        with self.lock:
            self.state.add_members(list_id, ids)
        return Response(status_code=204)

    async def remove_from_list(self, call: Call) -> Response:
        """Idempotent, as JSON:API has it: profiles already missing from the list are fine
        (https://jsonapi.org/format/#crud-updating-to-many-relationships), the call is answered
        204 and membership is all that changes (the profile, its consent and its other lists
        stay). A profile that does not exist is a 404 naming it (``/data/{i}/id``), JSON:API's
        answer to a request referencing a related resource that does not exist."""
        list_id, ids = self._member_ids(call, removing=True)
        with self.lock:
            self.state.remove_members(list_id, ids)
        return Response(status_code=204)

"""Taking members out of a Klaviyo list (``mode: mirror``): profiles that left the view.

Only the membership goes. "Remove Profiles from List" (``DELETE
/api/lists/{id}/relationships/profiles``) "will not impact the profile's consent status or
subscription status in general" (Klaviyo's API reference,
https://developers.klaviyo.com/en/v2026-07-15/reference/remove_profiles_from_list); the profile
and its subscriptions stay as they are. Nothing here unsubscribes, suppresses or deletes.

The calls, per batch of members:

* Members without a Klaviyo id (``dest_id``) are looked up by the sync's match field (email,
  phone_number or external_id; the spec allows ``any`` on each of them for ``GET
  /api/profiles``): up to ``LOOKUP_VALUES`` values a call, one page of ``MAX_PAGE`` profiles,
  asking only for that field. A member no profile has is not in the list: removed.
* ``DELETE /api/lists/{id}/relationships/profiles`` with at most ``MAX_LIST_MEMBERS`` profile
  ids a call ("This endpoint accepts a maximum of 1000 profiles per call", the same page).
  A profile that is not in the list is fine: JSON:API answers a removal of members "already
  missing from the relationship" with success (https://jsonapi.org/format/#crud-updating-to-many-relationships).

Only ``204 No Content`` acknowledges a removal: the DELETE's one success answer in the
2026-07-15 spec (``remove_profiles_from_list``: responses ``204``, ``4XX``, ``5XX``,
``../shared/api-specs/klaviyo/lists.json``; the API reference above). Any other answer below
400 (a redirect, a proxy's 200 HTML page) is not Klaviyo's: ``DestinationError``, so the
members stay in the snapshot, are not counted removed and are tried again next run.

Refusals of the DELETE, read per record from the error's pointer (``/data/{i}/id``):

* 404 for a profile (it does not exist): a looked-up one was deleted or merged since, so it is
  in no list; a ``dest_id`` may be stale (profiles merge), so that member is looked up by its
  match field once and whatever profile holds it now is removed.
* Any other refusal of a record: that member is a row error (``destination_rejected``) and
  stays in the snapshot; the rest of the call is sent again without it. A 400 naming no record
  is narrowed down by halving the call until one record is left (``MAX_REFUSED_CALLS`` bounds
  the refused calls one removal spends on that).
* A refusal of the call as a whole (404 naming no record: the list is gone; 401, 403) and a
  failure that outlasts the retries (429, 5xx, timeouts): ``DestinationError``, so the engine
  stops with the members kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa

from reverse_etl.destinations.base import Leaving, Removed, Request
from reverse_etl.destinations.http import error_detail, unacknowledged
from reverse_etl.destinations.klaviyo.client import (
    MAX_LIST_MEMBERS,
    MAX_PAGE,
    KlaviyoClient,
    quote,
    refusals,
)
from reverse_etl.errors import DestinationError
from reverse_etl.transform.rowerrors import RowError

PROFILES_PATH = "/api/profiles"
# Values one lookup carries: one page of profiles answers it (emails and phone numbers are
# unique to a profile), and the filter, however long the values, keeps the URL well under the
# 8 KB that servers commonly accept (Klaviyo publishes no limit for either).
LOOKUP_VALUES = MAX_PAGE
LOOKUP_CHARS = 4_000
# Refusals of a DELETE naming no record are narrowed down by halving the call; a refusal of the
# call as a whole (403 missing scope, 404 list gone) is not. After this many refused calls in
# one removal the refusal is not about a few records: the rest become row errors, tried again
# next run, rather than costing thousands of calls.
SPLIT_STATUS = frozenset({400, 413, 422})
MAX_REFUSED_CALLS = 32
REMOVED = 204  # the only answer that acknowledges a removal (module docstring)


def members_path(list_id: str) -> str:
    return f"/api/lists/{list_id}/relationships/profiles"


def removal_body(profile_ids: list[str]) -> bytes:
    return orjson.dumps({"data": [{"type": "profile", "id": i} for i in profile_ids]})


@dataclass
class _Member:
    row: int
    ident: Any
    key: str | None
    dest_id: str | None
    profiles: set[str] = field(default_factory=set)  # ids still to take out of the list
    error: RowError | None = None


@dataclass
class Membership:
    """Removal from one list, finding profiles by ``match_field`` (the value in ``key``);
    ``column`` names the sync's column of that field in row errors."""

    client: KlaviyoClient
    match_field: str
    column: str

    # ------------------------------------------------------------------ the dry run

    def requests(self, list_id: str, members: pa.Table) -> Iterator[Request]:
        """The DELETE calls, with a placeholder for each profile id a lookup would find."""
        ids = [
            m.dest_id or f"<profile id of {self.match_field} {m.key!r}>"
            for m in Leaving.rows(members)
        ]
        for start in range(0, len(ids), MAX_LIST_MEMBERS):
            chunk = ids[start : start + MAX_LIST_MEMBERS]
            yield Request("DELETE", members_path(list_id), removal_body(chunk), len(chunk))

    # ------------------------------------------------------------------ removing

    def remove(self, list_id: str, table: pa.Table) -> Removed:
        members = _members(table)
        self._find([m for m in members if m.dest_id is None])
        for m in members:
            if m.dest_id is not None:
                m.profiles.add(m.dest_id)
        gone = self._delete(list_id, members)
        # a stale id (the profile was merged or deleted): whichever profile holds the member's
        # match value now is taken out too; without one the member is in no list
        stale = [m for m in members if m.dest_id in gone and m.key is not None]
        for m in stale:
            m.profiles.clear()
        self._find(stale)
        self._delete(list_id, stale)
        return Removed.of(members)

    def _find(self, members: list[_Member]) -> None:
        """Each member's profiles, by the match field; a row error for a member without a
        value to find it by."""
        wanted: dict[str, list[_Member]] = {}
        for m in members:
            if m.key is None:
                m.error = self._error(
                    m, f"no {self.match_field} kept for this member: it cannot be found in Klaviyo"
                )
            else:
                wanted.setdefault(self._norm(m.key), []).append(m)
        for group in _groups(list(wanted), LOOKUP_VALUES, LOOKUP_CHARS):
            for value, profile_id in self._lookup(group):
                for m in wanted.get(value, ()):
                    m.profiles.add(profile_id)

    def _lookup(self, values: list[str]) -> Iterator[tuple[str, str]]:
        """(match value, profile id) for each profile holding one of ``values``."""
        f = self.match_field
        path = PROFILES_PATH
        params: dict[str, str] | None = {
            "filter": f"any({f},[{','.join(quote(v) for v in values)}])",
            "page[size]": str(MAX_PAGE),
            "fields[profile]": f,
        }
        while True:
            body = self.client.json("get_profiles", "GET", path, params=params)
            for item in body.get("data") or []:
                value = (item.get("attributes") or {}).get(f)
                if isinstance(value, str):
                    yield self._norm(value), str(item["id"])
            nxt = (body.get("links") or {}).get("next")
            if not nxt:
                return
            path, params = nxt, None

    def _delete(self, list_id: str, members: list[_Member]) -> set[str]:
        """Take the members' profiles out of the list; the profile ids Klaviyo says do not
        exist. A member with a refused profile gets its row error."""
        owners: dict[str, list[_Member]] = {}
        for m in members:
            if m.error is None:
                for pid in sorted(m.profiles):
                    owners.setdefault(pid, []).append(m)
        gone: set[str] = set()
        ids = list(owners)
        pending = [ids[i : i + MAX_LIST_MEMBERS] for i in range(0, len(ids), MAX_LIST_MEMBERS)]
        refused_calls = 0
        while pending:
            chunk = pending.pop(0)
            response = self.client.call(
                "remove_profiles_from_list", "DELETE", members_path(list_id), removal_body(chunk)
            )
            status = response.status_code
            if status == REMOVED:
                continue
            if status < 400:  # not Klaviyo's acknowledgement: nobody counts as removed
                raise unacknowledged(  # (a redirect is refused by ApiClient.request already)
                    response,
                    f"Klaviyo DELETE {members_path(list_id)} ({len(chunk)} profiles)",
                    "204 No Content",
                    "the members stay in the snapshot and are removed next run",
                )
            named = {i: msg for i, _, _, msg in refusals(response) if i is not None}
            named = {i: msg for i, msg in named.items() if 0 <= i < len(chunk)}
            if named and status == 404:  # profiles that do not exist: they are in no list
                gone.update(chunk[i] for i in named)
            elif not named and status not in SPLIT_STATUS:  # the call as a whole: the list is
                raise DestinationError(  # gone (404), the key lacks a scope (403) ...
                    f"Klaviyo refused removing members from list {list_id}: "
                    f"{error_detail(response)}"
                )
            else:
                refused_calls += 1
                if refused_calls >= MAX_REFUSED_CALLS:  # not a few bad records: all left,
                    chunk = chunk + [pid for rest in pending for pid in rest]  # next run
                    pending = []
                    message = f"Klaviyo refused the removal: {error_detail(response)}"
                    named = dict.fromkeys(range(len(chunk)), message)
                elif not named and len(chunk) > 1:  # a refusal naming no record: halve it
                    half = len(chunk) // 2
                    pending += [chunk[:half], chunk[half:]]
                    continue
                elif not named:
                    named = {0: f"Klaviyo refused the removal: {error_detail(response)}"}
                for i, message in named.items():
                    for m in owners[chunk[i]]:
                        m.error = m.error or self._error(m, message)
            rest = [pid for i, pid in enumerate(chunk) if i not in named]
            if rest:
                pending.append(rest)
        return gone

    # ------------------------------------------------------------------ helpers

    def _norm(self, value: str) -> str:
        """Emails are matched ignoring case, as Klaviyo matches them."""
        return value.lower() if self.match_field == "email" else value

    def _error(self, m: _Member, message: str) -> RowError:
        return RowError(m.row, m.ident, self.column, m.key, "destination_rejected", message)


def _members(table: pa.Table) -> list[_Member]:
    return [_Member(m.row, m.ident, m.key, m.dest_id or None) for m in Leaving.rows(table)]


def _groups(values: list[str], most: int, chars: int) -> Iterator[list[str]]:
    """``values`` in runs of at most ``most`` values and about ``chars`` characters quoted."""
    group: list[str] = []
    size = 0
    for v in values:
        cost = len(quote(v)) + 1
        if group and (len(group) >= most or size + cost > chars):
            yield group
            group, size = [], 0
        group.append(v)
        size += cost
    if group:
        yield group

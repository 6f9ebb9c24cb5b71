"""Profiles into Klaviyo through bulk import jobs, then their consent as subscriptions.

Each batch becomes jobs packed to Klaviyo's limits (10,000 profiles, 5 MB a job, 100 KB a
profile: a larger profile is a row error, not a failed job). Jobs of later batches are
submitted while earlier ones are polled, and results come back in batch order. Klaviyo's
import job does not say which profiles were new, so every completed profile counts as
``updated`` (upserted).

Consent (``consent.py``) is sent when a batch's import jobs have completed, so the profiles
exist, and only for the profiles that landed. A row whose consent Klaviyo refuses moves from
``updated`` to ``failed``: it is counted once, with its error.

``screen`` finds what Klaviyo would refuse before anything is sent: a profile over 100 KB
(the row is left out: ``value_too_large``), a phone number outside its country's numbering
plan (``phones.py``: ``invalid_phone``; the profile goes without it and without its SMS
consent, or is left out when the number is its only identifier) and consent without the
address it needs (the profile is sent, that consent is not: ``missing_consent_address``). ``load`` and ``requests``
take screened batches; the same checks run there on the JSON they build anyway, so a batch
that was not screened is still refused row by row (sent and failed), and a screened one finds
nothing to report twice.

A job's import errors are tied to rows by ``import_errors.py``; consent is never sent for a
row whose profile failed, nor for any row of a job with an error tied to no row (which of
its profiles failed is unknown; those rows get an error and their consent goes on their
next change). Jobs are waited for up to ``job_timeout_minutes`` (``jobs.py``).

A job whose ``failed_count`` is more than the errors its import-errors listing gives (a
listing cut short, emptied by a proxy, or Klaviyo counting failures it does not list) does
not say which of its profiles failed: the shortfall is not counted as landed. The batch fails
(``DestinationError``, "Klaviyo reported N failures it did not list"): nothing of it is
acknowledged, its rows stay behind the watermark and are sent again next run (an import is an
upsert), and no consent of it is sent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.config import Sync
from reverse_etl.consent import cleared
from reverse_etl.consent.memory import ConsentMemory, account_key
from reverse_etl.consent.newest import record_intent
from reverse_etl.destinations.base import Removed, Request, Screened, Tally
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.destinations.klaviyo import jobs, phones, readback, sizes
from reverse_etl.destinations.klaviyo.client import (
    MAX_JOB_BYTES,
    MAX_PROFILE_BYTES,
    MAX_PROFILES_PER_JOB,
)
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.destinations.klaviyo.consent import Consent
from reverse_etl.destinations.klaviyo.destination import (
    KlaviyoBase,
    any_true,
    column_or_null,
    row_errors,
)
from reverse_etl.destinations.klaviyo.import_errors import JobProfiles
from reverse_etl.destinations.klaviyo.membership import Membership
from reverse_etl.destinations.rowjson import Expr, RowJson, bodies, nest, null_names
from reverse_etl.errors import DestinationError
from reverse_etl.transform.consent import SUBSCRIBED
from reverse_etl.transform.rowerrors import RowError, cell_text

IMPORT_PATH = "/api/profile-bulk-import-jobs"
IMPORT = jobs.JobKind(
    IMPORT_PATH, "bulk_import_profiles", "get_bulk_import_profiles_job", "profile import job"
)
_ENVELOPE = b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":['
ERRORS_PAGE = 100  # import errors a page, the most the endpoint gives

STANDARD_FIELDS = {
    "email": "email",
    "phone_number": "phone",
    "external_id": "string",
    "first_name": "string",
    "last_name": "string",
    "organization": "string",
    "title": "string",
    "locale": "string",
    "image": "string",
    "location.address1": "string",
    "location.address2": "string",
    "location.city": "string",
    "location.country": "string",
    "location.region": "string",
    "location.zip": "string",
    "location.timezone": "string",
    "location.ip": "string",
    "location.latitude": "number",
    "location.longitude": "number",
}
IDENTIFIER_FIELDS = ("email", "phone_number", "external_id")


@dataclass
class _Job:
    job: jobs.Job
    start: int  # its profiles are the _InFlight table's rows start .. start + count


@dataclass
class _InFlight:
    table: pa.Table  # the profiles sent (oversized ones left out)
    jobs: list[_Job] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


def _template(fields: dict[str, str], clear: bool) -> dict[str, Any]:
    """One profile of the bulk import. Its nulls are left out: the bulk import ignores them
    ("does not support setting fields to null to clear them", Klaviyo's Bulk Import Profiles
    guide). With ``null_values: clear`` the custom properties that are null in the row are
    named in ``meta.patch_properties.unset``, which removes them; standard fields cannot be
    cleared through the bulk import and keep their value."""
    template: dict[str, Any] = {"type": "profile", "attributes": nest(fields)}
    custom = {f.partition(".")[2]: f for f in fields if f.startswith("properties.")}
    if clear and custom:
        unset = null_names(custom)
        template["meta"] = Expr(  # left out (null) when nothing is to be cleared
            f"CASE WHEN len({unset}) = 0 THEN NULL "
            f"ELSE {{'patch_properties': {{'unset': {unset}}}}} END"
        )
    return template


def _size_bound(table: pa.Table) -> np.ndarray:
    """At least each profile's JSON size: its fields, each name again (``null_values: clear``
    may list a custom property in ``meta.patch_properties.unset``) and the envelope."""
    fields = [c for c in table.column_names if not c.startswith(("consent.", "__"))]
    return sizes.row_bound(table, fields) + sum(sizes.key_bound(f) for f in fields) + 200


def _payload(table: pa.Table) -> pa.Table:
    """What the profile's JSON is built from: the mapped fields, not the consent."""
    return table.drop_columns([c for c in table.column_names if c.startswith("consent.")])


def _measured(
    table: pa.Table, docs: pa.Array, columns: Mapping[str, str] | None = None
) -> tuple[pa.Table, pa.Array, list[RowError]]:
    """``table`` and its profiles' JSON without the profiles over Klaviyo's size, and a
    ``value_too_large`` row error for each of those, naming the view's column (``columns``:
    field -> column) whose value is the largest: the one to shorten or stop mapping."""
    lengths = pc.binary_length(docs)
    too_big = pc.greater(lengths, MAX_PROFILE_BYTES)
    if not any_true(too_big):
        return table, docs, []
    big = table.filter(too_big)
    fields = [c for c in big.column_names if not c.startswith("__")]
    errors = []
    for n, (row, ident, size) in enumerate(
        zip(
            big["__row"].to_pylist(),
            big["__id"].to_pylist(),
            pc.filter(lengths, too_big).to_pylist(),
            strict=True,
        )
    ):
        # per row, only for the rare profile over 100 KB: which value makes it so large
        values = {f: big[f][n].as_py() for f in fields}
        largest = max(fields, key=lambda f: len(cell_text(values[f])), default=None)
        column = (columns or {}).get(largest or "", largest) if largest else "(profile)"
        errors.append(
            RowError(
                row,
                ident,
                column,
                f"{size} bytes",
                "value_too_large",
                f"the profile is {size} bytes, Klaviyo accepts at most {MAX_PROFILE_BYTES}; "
                f"its largest value is in column {column!r} "
                f"({len(cell_text(values[largest]))} characters)"
                if largest
                else f"the profile is {size} bytes; Klaviyo accepts at most {MAX_PROFILE_BYTES}",
            )
        )
    keep = pc.invert(too_big)
    return table.filter(keep), docs.filter(keep), errors


class KlaviyoProfiles(KlaviyoBase):
    capabilities = Capabilities(
        label="Klaviyo profiles",
        standard_fields=STANDARD_FIELDS,
        custom_prefix="properties",
        identifier_fields=IDENTIFIER_FIELDS,
        # list_members: all (every profile joins destination.list) or consented (only those
        # whose email consent is sent as subscribed)
        # job_timeout_minutes: how long a run waits for one import job (jobs.py)
        options=("list_members", "sms_without_consent_time", "job_timeout_minutes"),
        bool_options=("sms_without_consent_time",),
        takes_list=True,
        takes_consent=True,
        removes=True,  # membership.py; found by the identifier's field (match_field None)
        batch_records=MAX_PROFILES_PER_JOB,
        batch_bytes=MAX_JOB_BYTES,
        record_bytes=MAX_PROFILE_BYTES,
        max_in_flight=4,
    )
    profiles_per_job = MAX_PROFILES_PER_JOB  # benchmarks lower it to make many small jobs

    def __init__(self, conn: KlaviyoConnection, sync: Sync, *, speedup: float | None = None):
        super().__init__(conn, sync, speedup=speedup)
        self.list_id: str | None = None
        self.list_members: str = sync.destination.options().get("list_members", "all")
        fields = {t.field: t.field for t in sync.fields().values()}
        self.columns = {t.field: column for column, t in sync.fields().items()}  # field -> column
        self.phone_is_identity = self.columns.get("phone_number") == sync.identifier
        self.job_timeout: float = self.option("job_timeout_minutes", jobs.JOB_TIMEOUT_MINUTES)
        self._template = _template(fields, sync.null_values == "clear")
        self._json = RowJson(self._template, drop_nulls=True)
        self._screen_json: RowJson | None = None  # screen's own: it runs on another thread
        self.consent = Consent(sync)
        self._memory: ConsentMemory | None = None  # set by read_back (not by a dry run)

    @classmethod
    def check_sync(cls, sync: Sync) -> list[str]:
        problems = super().check_sync(sync)
        members = sync.destination.options().get("list_members", "all")
        if members not in {"all", "consented"}:
            problems.append(
                "destination.list_members: use all (every profile joins the list) or consented "
                "(only profiles whose email consent is sent as subscribed)"
            )
        elif members == "consented" and not sync.consent.email:
            problems.append("destination.list_members: consented needs consent.email")
        timeout = sync.destination.options().get("job_timeout_minutes", jobs.JOB_TIMEOUT_MINUTES)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            problems.append(
                f"destination.job_timeout_minutes: a number of minutes above 0 (got {timeout!r}); "
                "how long a run waits for one Klaviyo import job before it stops with those "
                f"rows not done (default {jobs.JOB_TIMEOUT_MINUTES:g})"
            )
        mapped = {t.field for t in sync.fields().values()}
        if sync.consent.email and "email" not in mapped:
            problems.append(
                "consent.email: email consent needs the email address; map a column to email"
            )
        sms = sync.consent.sms
        if (
            sms is not None
            and sms.consented_at is None
            and not sync.destination.options().get("sms_without_consent_time", False)
        ):
            problems.append(
                "consent.sms: SMS consent needs a consented_at column (when the person agreed: "
                "TCPA and PECR ask for proof of it), or say destination.sms_without_consent_time: "
                "true to subscribe without one (Klaviyo then applies the account's opt-in process)"
            )
        if sync.consent.sms and "phone_number" not in mapped:
            problems.append(
                "consent.sms: SMS consent needs a phone number; map a column to phone_number"
            )
        for channel, consent in sync.consent.columns().items():
            if consent.evidence is not None:
                problems.append(
                    f"consent.{channel}.evidence: Klaviyo profiles take no consent evidence "
                    f"({', '.join(consent.evidence.values())}); Klaviyo keeps only when consent "
                    f"was given, from consent.{channel}.consented_at (sent as a historical "
                    "import); remove evidence"
                )
        return problems

    # ------------------------------------------------------------------ payloads

    def screen(self, table: pa.Table) -> Screened:
        """Profiles over Klaviyo's 100 KB are left out; consent without its address is taken
        off the row (the profile still goes). Only rows whose size bound passes 100 KB have
        their JSON built here, with screen's own builder."""
        suspects = _size_bound(table) > MAX_PROFILE_BYTES
        kept, too_big = table, list[RowError]()
        if suspects.any():
            if self._screen_json is None:
                self._screen_json = RowJson(self._template, drop_nulls=True)
            candidates = table.filter(pa.array(suspects))
            _, _, too_big = _measured(
                candidates, self._screen_json.build(_payload(candidates)), self.columns
            )
            if too_big:
                gone = pa.array([e.row_number for e in too_big], pa.int64())
                kept = table.filter(pc.invert(pc.is_in(table["__row"], value_set=gone)))
        kept, phone_errors = self._screen_phones(kept)
        kept, consent_errors = self.consent.screen(kept)
        errors = sorted(too_big + phone_errors + consent_errors, key=lambda e: e.row_number)
        return Screened(kept, errors, rejected=table.num_rows - kept.num_rows)

    def _screen_phones(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """Numbers outside their country's numbering plan (``phones.py``), which Klaviyo
        refuses: the profile goes without the number and without its SMS consent (an email
        never fails for a phone), or is left out when the number is its only identifier (the
        sync's identifier, or no email or external_id beside it)."""
        if "phone_number" not in table.column_names or table.num_rows == 0:
            return table, []
        bad = phones.invalid(table["phone_number"])
        if not any_true(bad):
            return table, []
        column = self.columns.get("phone_number", "phone_number")
        if self.phone_is_identity:
            alone = bad
        else:
            others = pa.array([False] * table.num_rows)
            for name in ("email", "external_id"):
                if name in table.column_names:
                    others = pc.or_(others, pc.is_valid(table[name]))
            alone = pc.and_(bad, pc.invert(others))
        plan = "is not a valid number in its country's numbering plan, which Klaviyo refuses"
        errors = row_errors(
            table,
            alone,
            column,
            "invalid_phone",
            f"phone_number {plan}; it is the profile's only identifier, so the row was not sent",
            value="phone_number",
        )
        dropped = pc.and_(bad, pc.invert(alone))
        if any_true(dropped):
            sms = "consent.sms" in table.column_names
            errors += row_errors(
                table,
                dropped,
                column,
                "phone_not_sent",
                f"phone_number {plan}; the profile was sent without it"
                + (" and its SMS consent was not sent" if sms else ""),
                value="phone_number",
            )
            table = cleared(table, "phone_number", dropped)
            if sms:
                table = cleared(table, "consent.sms", dropped)
        if errors and any_true(alone):
            table = table.filter(pc.invert(alone))
        return table, errors

    def _docs(self, table: pa.Table) -> tuple[pa.Table, pa.Array, list[RowError]]:
        """Profiles as JSON, minus any over Klaviyo's per-profile size (row errors; none in a
        screened batch)."""
        return _measured(table, self._json.build(_payload(table)), self.columns)

    def _joins(self, table: pa.Table) -> pa.Array | pa.ChunkedArray:
        """Which rows join destination.list: all of them, or with ``list_members:
        consented`` those whose email consent is sent as subscribed (Klaviyo treats every
        profile in a list without a suppression as emailable)."""
        if self.list_members != "consented":
            return pa.array([True] * table.num_rows)
        consent = column_or_null(table, "consent.email", pa.string())
        return pc.fill_null(pc.equal(consent, SUBSCRIBED), False)

    def _members_first(self, table: pa.Table) -> tuple[pa.Table, pa.Array, list[RowError], int]:
        """The rows that join the list first (an import job joins all its profiles to the
        list, or none), then their JSON: (table, docs, row errors, how many join)."""
        joins = self._joins(table)
        if self.list_members == "consented" and table.num_rows:
            table = pa.concat_tables(
                [table.filter(joins), table.filter(pc.invert(joins))]
            ).combine_chunks()
        table, docs, errors = self._docs(table)  # keeps the order: the joining rows first
        joining = int(pc.sum(pc.cast(self._joins(table), pa.int64())).as_py() or 0)
        return table, docs, errors, joining

    def _bodies(
        self, docs: pa.Array, joining: int | None = None
    ) -> Iterator[tuple[int, int, bytes]]:
        """Import jobs of ``docs``; the first ``joining`` (all) join destination.list."""
        joining = len(docs) if joining is None else joining
        plain = b"]}}}}"  # closes data, profiles, attributes, data, the document
        tail = plain
        if self.list_id or self.sync.destination.list:
            list_id = self.list_id or f"<id of list {self.sync.destination.list!r}>"
            rel = orjson.dumps({"lists": {"data": [{"type": "list", "id": list_id}]}})
            tail = b']}},"relationships":' + rel + b"}}"
        for lo, hi, end in ((0, joining, tail), (joining, len(docs), plain)):
            part = docs.slice(lo, hi - lo)
            for start, stop, body in bodies(
                part, _ENVELOPE, end, self.profiles_per_job, MAX_JOB_BYTES
            ):
                yield lo + start, lo + stop, body

    def requests(self, table: pa.Table) -> Iterator[Request]:
        """Import jobs, then the consent calls (a dry run cannot know which profiles Klaviyo
        will refuse, so consent is shown for every profile sent)."""
        sent, docs, _, joining = self._members_first(table)
        for start, end, body in self._bodies(docs, joining):
            yield Request("POST", IMPORT_PATH, body, end - start)
        yield from self.consent.requests(sent)

    # ------------------------------------------------------------------ sending

    def prepare(self) -> None:
        if self.sync.destination.list:
            self.list_id = self.client.find_or_create_list(self.sync.destination.list)

    def consent_account(self) -> str | None:
        key = self.conn.api_key.get_secret_value()
        return account_key("klaviyo", self.conn.base_url, key) if self.consent else None

    def read_back(self, memory: ConsentMemory) -> None:
        readback.read_back(self.client, memory)
        self._memory = memory

    def consent_standing(self, channel: str, persons: Sequence[str]) -> pa.Table | None:
        """Email opt-ins made in Klaviyo (looked up); SMS ones are not asked for."""
        return readback.subscribed(self.client, persons) if channel == "email" else None

    def submit(self, table: pa.Table) -> _InFlight:
        table, docs, errors, joining = self._members_first(table)
        item = _InFlight(table, errors=errors)
        for start, end, body in self._bodies(docs, joining):
            job = jobs.submit(self.client, jobs.Job(IMPORT, body, end - start))
            item.jobs.append(_Job(job, start))
        return item

    def complete(self, item: _InFlight, tally: Tally) -> None:
        # profiles refused here: too large, only in a batch that was not screened
        tally.refused(item.errors)
        refused: list[RowError] = []  # tied to their rows
        untied: list[RowError] = []  # shown against their job's first row
        unsure: list[pa.Table] = []  # rows of jobs with an error tied to no row
        for job in item.jobs:
            body = jobs.wait(
                self.client,
                job.job,
                attempts=self.job_attempts,
                poll_interval=self.poll_interval,
                timeout_minutes=self.job_timeout,
            )
            failed = _failed_count(body, job.job)
            if failed:
                rows = JobProfiles(item.table.slice(job.start, job.job.count), self.columns)
                found = rows.attribute(self._import_errors(job.job.id))
                _all_listed(job.job, failed, found.errors, found.unknown)
            tally.landed(job.job.count, failed=failed)  # an import upserts: all are updated
            if failed:
                refused.extend(found.errors)
                if found.unknown:
                    unsure.append(rows.table)
                    untied.extend(_unattributed(job.job.id, rows.table, found.unknown))
        tally.reported(refused + untied)
        if self.consent:
            failed_rows = pa.array({e.row_number for e in refused}, pa.int64())
            for rows in unsure:  # which of these failed is unknown: none gets consent
                # shown, not counted: the job's failed_count already counts the failed ones
                tally.reported(_consent_withheld(_without(rows, failed_rows)))
            gone = pa.concat_arrays([failed_rows, *(t["__row"].combine_chunks() for t in unsure)])
            sending = _without(item.table, gone)
            if self._memory is not None:  # our unsubscribes, recorded before they are sent
                record_intent(self._memory, sending, self.sync.consent.columns())
            tally.later_refused(self.consent.send(self.client, sending))

    def _import_errors(self, job_id: str) -> list[dict[str, Any]]:
        """The ``attributes`` of every import error of a job, all pages."""
        out: list[dict[str, Any]] = []
        path = f"{IMPORT_PATH}/{job_id}/import-errors"
        params: dict[str, str] | None = {"page[size]": str(ERRORS_PAGE)}
        while True:
            body = self.client.json(
                "get_errors_for_bulk_import_profiles_job", "GET", path, params=params
            )
            data = body.get("data") if isinstance(body, dict) else None
            if not isinstance(data, list):
                raise DestinationError(
                    f"Klaviyo GET {path}: the answer has no data list (check base_url / "
                    f"proxy); the {len(out)} errors listed so far cannot be all of the job's, so "
                    "its rows are not counted as done and are sent again next run"
                )
            out.extend(
                (err.get("attributes") or {}) if isinstance(err, dict) else {} for err in data
            )
            nxt = (body.get("links") or {}).get("next")
            if not nxt:
                return out
            path, params = nxt, None

    # ------------------------------------------------------------------ mode: mirror

    def _membership(self) -> Membership:
        target = self.sync.fields().get(self.sync.identifier)
        return Membership(self.client, target.field if target else "email", self.sync.identifier)

    def remove(self, members: pa.Table) -> Removed:
        """Take ``members`` out of the sync's list (``membership.py``): never unsubscribes."""
        if self.list_id is None and self.sync.destination.list:
            self.list_id = self.client.find_list(self.sync.destination.list)
        if self.list_id is None or members.num_rows == 0:  # no list: nobody is in it
            return Removed(ids=members["__id"].to_pylist())
        return self._membership().remove(self.list_id, members)

    def removal_requests(self, members: pa.Table) -> Iterator[Request]:
        list_id = self.list_id or f"<id of list {self.sync.destination.list!r}>"
        return self._membership().requests(list_id, members)

    def close(self) -> None:
        super().close()
        self._json.close()
        if self._screen_json is not None:
            self._screen_json.close()
        self.consent.close()


def _without(table: pa.Table, rows: pa.Array) -> pa.Table:
    """``table`` without the rows numbered ``rows``."""
    if len(rows) == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table["__row"], value_set=rows)))


def _unattributed(job_id: str, table: pa.Table, errors: list[dict[str, Any]]) -> list[RowError]:
    """Import errors tied to no row: shown against the job's first row, as what they are."""
    first = table["__row"][0].as_py() if table.num_rows else 0
    ident = table["__id"][0].as_py() if table.num_rows else None
    return [
        RowError(
            first,
            ident,
            "(import job)",
            orjson.dumps(e.get("original_payload")).decode(),
            "destination_rejected",
            f"Klaviyo import job {job_id} refused a profile without saying which: "
            f"{e.get('title', '')} {e.get('detail', '')} (pointer "
            f"{(e.get('source') or {}).get('pointer')!r}); the consent of the job's "
            f"{table.num_rows} rows was not sent",
        )
        for e in errors
    ]


def _consent_withheld(table: pa.Table) -> list[RowError]:
    """Rows whose consent is not sent because their job had an error tied to no row: one error
    each for those with consent to send (it goes on the row's next change)."""
    consents = [c for c in table.column_names if c.startswith("consent.") and c.count(".") == 1]
    if not consents or table.num_rows == 0:
        return []
    has = pc.is_valid(table[consents[0]])
    for name in consents[1:]:
        has = pc.or_(has, pc.is_valid(table[name]))
    return row_errors(
        table,
        has,
        "(consent)",
        "destination_rejected",
        "consent not sent: Klaviyo refused a profile of this row's import job without saying "
        "which, and consent is never sent for a profile that may not exist; it is sent on the "
        "row's next change",
    )


__all__ = ["IDENTIFIER_FIELDS", "STANDARD_FIELDS", "KlaviyoProfiles"]


def _failed_count(body: dict[str, Any], job: jobs.Job) -> int:
    """The finished job's ``failed_count`` (``jobs.wait`` checked the document's shape)."""
    value = body["data"]["attributes"].get("failed_count") or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DestinationError(
            f"Klaviyo {job.kind.what} {job.id}: failed_count {value!r} is not a count (check "
            "base_url / proxy); its rows are not counted as done and are sent again next run"
        )
    return value


def _all_listed(
    job: jobs.Job, failed: int, errors: list[RowError], unknown: list[dict[str, Any]]
) -> None:
    """Raise when ``failed`` passes what the job's import errors account for (module doc):
    the rows they are tied to, and one profile for each error tied to none."""
    listed = len({e.row_number for e in errors}) + len(unknown)
    if failed > listed:
        raise DestinationError(
            f"Klaviyo {job.kind.what} {job.id} ({job.count} records): Klaviyo reported "
            f"{failed - listed} failures it did not list (failed_count {failed}, "
            f"{listed} listed by GET {IMPORT_PATH}/{job.id}/import-errors); which profiles "
            "failed is unknown, so none of the batch is counted as done: its rows stay behind "
            "the watermark and are sent again next run (an import is an upsert)"
        )

"""Contacts into Dotdigital through v3 contact imports (the ``profiles`` object).

Mapped columns become identifiers (``email``, ``mobileNumber``) or data fields; a data field
that does not exist yet is created on first use with the type of its values. Consent is
written as the user configures it: as the email channel status (``consent_mode: channel``)
or as a YES/NO data field such as NEWSLETTER_SUBSCRIBE (``consent_mode: data_field``), which
does not suppress the contact. List membership never implies consent. A subscribe sent with
its time (``consented_at``) and the sync's ``evidence`` (the consent text, the page's URL,
the person's IP address and browser) carries a consent record (``consentRecords``).

Contacts are matched by email, so a row without one cannot become a contact: when the sync's
identifier is another column (a customer id), ``screen`` leaves such rows out as row errors
(``missing_email``) and they never reach the API. ``load`` and ``requests`` take screened
batches and run the same cheap check as a safety net (a batch that was not screened: such
rows count as sent and failed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.config import Sync
from reverse_etl.config.models import URI_PATTERN, ConsentEvidence, EvidenceColumn, evidence_ip
from reverse_etl.consent import HELD, KEPT, NEW, flag_sql, flagged, written
from reverse_etl.consent.memory import ConsentMemory, account_key
from reverse_etl.consent.newest import record_intent
from reverse_etl.destinations.base import Removed, Request, Screened, Tally
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.destinations.dotdigital import fields as df
from reverse_etl.destinations.dotdigital import readback
from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.destinations.dotdigital.destination import (
    MAX_IMPORT_BYTES,
    MAX_IMPORT_RECORDS,
    DotdigitalBase,
)
from reverse_etl.destinations.dotdigital.imports import Import, ImportApi
from reverse_etl.destinations.dotdigital.membership import Membership
from reverse_etl.destinations.rowjson import Col, Expr, RowJson, bodies
from reverse_etl.errors import DestinationError
from reverse_etl.sql import ident, literal
from reverse_etl.transform.consent import SUBSCRIBED
from reverse_etl.transform.rowerrors import RowError

IMPORT_PATH = "/contacts/v3/import"
CONTACT_IMPORTS = ImportApi(
    IMPORT_PATH,
    "contact import",
    finished=frozenset({"Finished"}),
    failed=frozenset({"Failed", "RejectedByWatchdog", "ExceedsAllowedContactLimit"}),
    max_active=25,  # 429 contacts:tooManyActiveImports beyond
)
# consent evidence key -> the property of Dotdigital's consent record it fills; the record's
# dateTimeConsented is the consent's consented_at
RECORD_KEYS = {"text": "text", "url": "url", "ip_address": "ipAddress", "user_agent": "userAgent"}
CONSENTED_AT = "consent.email.consented_at"


class DotdigitalProfiles(DotdigitalBase):
    capabilities = Capabilities(
        label="Dotdigital contacts",
        standard_fields={
            "email": "email",
            "mobileNumber": "phone",
            **dict.fromkeys(df.STANDARD, "string"),
        },
        options=(
            "consent_mode",
            "consent_field",
            "opt_in_type",
            "unsubscribed_list",
            "unknown_consent",
            "resubscribe",
            "import_size",
        ),
        takes_list=True,
        takes_consent=True,
        removes=True,  # from destination.list only (membership.py)
        match_field="email",
        batch_records=MAX_IMPORT_RECORDS,
        batch_bytes=MAX_IMPORT_BYTES,
        max_in_flight=4,
    )
    import_api = CONTACT_IMPORTS

    def __init__(self, conn: DotdigitalConnection, sync: Sync):
        super().__init__(conn, sync)
        opts = sync.destination.options()
        self.consent_mode: str = opts.get("consent_mode", "channel")
        self.consent_field: str = str(opts.get("consent_field", "NEWSLETTER_SUBSCRIBE")).upper()
        self.opt_in_type: str = opts.get("opt_in_type", "single")
        self.unsubscribed_list: str | None = opts.get("unsubscribed_list")
        self.unknown_consent: str = opts.get("unknown_consent", "opt_in_unknown")
        self.resubscribe: str = opts.get("resubscribe", "no_challenge")
        self._memory: ConsentMemory | None = None  # set by read_back: opt-ins are read lazily
        self._opt_ins_read = False
        self.email_column = next(c for c, t in sync.fields().items() if t.field == "email")
        self.evidence: ConsentEvidence | None = (
            sync.consent.email.evidence if sync.consent.email else None
        )
        self.list_ids: dict[str, int] = {}
        self._fields_ready = False
        # one document builder per template: (the batch has the consent flags KEPT, HELD,
        # NEW; the consent data field is left out; the contact carries a consent record)
        self._json: dict[tuple[bool, ...], RowJson] = {}

    # ------------------------------------------------------------------ config checks

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        return df.name_problem(name) is None

    @classmethod
    def custom_field_hint(cls) -> str:
        return "a data field name of at most 20 letters, digits, _ or -"

    @classmethod
    def check_options(cls, sync: Sync) -> list[str]:
        problems = super().check_options(sync)
        opts = sync.destination.options()
        if opts.get("consent_mode", "channel") not in {"channel", "data_field"}:
            problems.append("destination.consent_mode: use channel or data_field")
        if opts.get("opt_in_type", "single") not in {
            "unknown",
            "single",
            "double",
            "verifiedDouble",
        }:
            problems.append(
                "destination.opt_in_type: use unknown, single, double or verifiedDouble"
            )
        if opts.get("resubscribe", "no_challenge") not in {"no_challenge", "challenge"}:
            problems.append(
                "destination.resubscribe: use no_challenge (a newer consent resubscribes an "
                "unsubscribed contact at once) or challenge (Dotdigital emails them to confirm)"
            )
        unknown = opts.get("unknown_consent", "opt_in_unknown")
        if unknown not in {"opt_in_unknown", "skip"}:
            problems.append(
                "destination.unknown_consent: use opt_in_unknown (contacts whose consent is "
                "empty are created with opt-in type unknown, in unsubscribed_list when set) or "
                "skip (no contact is created for them)"
            )
        elif unknown == "skip" and not sync.consent.email:
            problems.append(
                "destination.unknown_consent: skip needs consent.email (without a consent "
                "column every contact's consent is unknown, so none would be created)"
            )
        name = opts.get("consent_field", "NEWSLETTER_SUBSCRIBE")
        if df.name_problem(name):
            problems.append(f"destination.consent_field: {df.name_problem(name)}")
        return problems

    @classmethod
    def check_sync(cls, sync: Sync) -> list[str]:
        problems = super().check_sync(sync)
        seen: dict[str, str] = {}
        for column, target in sync.fields().items():
            if target.field in df.IDENTIFIERS:
                continue
            if target.field not in cls.capabilities.standard_fields:
                problem = df.name_problem(target.field)
                if problem:
                    problems.append(f"mapping.{column}: {problem}")
            key = target.field.upper()
            if key in seen:
                problems.append(
                    f"mapping.{column}: data field {target.field!r} collides with {seen[key]!r} "
                    "(data field names are unique whatever their case)"
                )
            seen[key] = target.field
        opts = sync.destination.options()
        consent_field = str(opts.get("consent_field", "NEWSLETTER_SUBSCRIBE")).upper()
        if opts.get("consent_mode") == "data_field" and consent_field in seen:
            problems.append(
                f"mapping: {seen[consent_field]!r} is also destination.consent_field, which the "
                "consent column fills; map the column to another data field or rename consent_field"
            )
        if "email" not in {t.field for t in sync.fields().values()}:
            problems.append("map a column to `email`: Dotdigital contacts are matched by email")
        if sync.consent.sms is not None and sync.consent.sms.evidence is not None:
            problems.append(
                "consent.sms.evidence: Dotdigital contacts keep consent records for email "
                "consent only (this tool writes no SMS consent to Dotdigital); remove it, or "
                "give it under consent.email"
            )
        return problems

    # ------------------------------------------------------------------ payloads

    def _template(
        self, table: pa.Table, *, consent_field: bool = True, record: bool = False
    ) -> dict[str, Any]:
        identifiers: dict[str, Any] = {"email": Col("email")}
        if "mobileNumber" in table.column_names:
            identifiers["mobileNumber"] = Expr("ltrim(t.\"mobileNumber\", '+')")
        data: dict[str, Any] = {}
        for name in table.column_names:
            if name.startswith(("__", "consent.")) or name in df.IDENTIFIERS:
                continue
            dtype = table.schema.field(name).type
            nested = pa.types.is_list(dtype) or pa.types.is_struct(dtype) or pa.types.is_map(dtype)
            # a data field holds one value: lists and records travel as their JSON text
            data[name.upper()] = (
                Expr(f'CAST(to_json(t."{name}") AS VARCHAR)') if nested else Col(name)
            )
        doc: dict[str, Any] = {"matchIdentifier": "email", "identifiers": identifiers}
        given = 't."consent.email"' if "consent.email" in table.column_names else "NULL"
        # consent Dotdigital holds from us (consent.kept) is not written again: no status, no
        # data field; its address books are still chosen by it (the same as last time)
        kept = flag_sql(table.schema, KEPT)
        consent = given if kept == "FALSE" else f"CASE WHEN {kept} THEN NULL ELSE {given} END"
        if self.consent_mode == "data_field" and consent != "NULL" and consent_field:
            data[self.consent_field] = Expr(
                f"CASE {consent} WHEN 'subscribed' THEN 'YES' WHEN 'unsubscribed' THEN 'NO' END"
            )
        if data:
            doc["dataFields"] = data
        if self.consent_mode == "channel" and (
            consent != "NULL" or self.unknown_consent == "opt_in_unknown"
        ):
            # nulls are never sent inside channelProperties (the spec closes that object),
            # whatever null_values says: an unknown consent leaves the status as it is
            status = f"CASE {consent} WHEN 'subscribed' THEN 'subscribed' WHEN 'unsubscribed' THEN 'unsubscribed' END"
            opt_in = f"CASE WHEN {consent} = 'subscribed' THEN '{self.opt_in_type}' END"
            if self.unknown_consent == "opt_in_unknown":
                # a first send without consent: say so, rather than leave Dotdigital's
                # default opt-in standing (it creates such a contact subscribed)
                unknown = self._unknown_sql(table.schema, given)
                opt_in = (
                    f"CASE WHEN {consent} = 'subscribed' THEN '{self.opt_in_type}' "
                    f"WHEN {unknown} AND {flag_sql(table.schema, NEW)} THEN 'unknown' END"
                )
            # a subscribe says how a contact unsubscribed there comes back: Dotdigital's
            # default is without a confirmation email (resubscribeWithNoChallenge: true); only
            # consent newer than the opt-out gets this far (consent/newest.py)
            again = "true" if self.resubscribe == "no_challenge" else "false"
            options = (
                f"CASE WHEN {consent} = 'subscribed' THEN "
                f"json_object('resubscribeWithNoChallenge', {again}) END"
            )
            doc["channelProperties"] = {
                "email": Expr(
                    f"json_strip_nulls(json_object('status', {status}, 'optInType', {opt_in}, "
                    f"'resubscribeOptions', {options}))"
                )
            }
        lists = self._lists_sql(given)
        if lists:
            doc["lists"] = Expr(lists)
        if record:
            doc["consentRecords"] = Expr(self._record_sql())
        return doc

    def _record_sql(self) -> str:
        """SQL: the row's consent record, a list of one, for rows that have every part of it
        (``_recorded``): the evidence, fixed (a literal) or the row's column, and the time."""
        assert self.evidence is not None
        parts = {}
        for key, value in self.evidence.values().items():
            name = f"consent.email.evidence.{key}"
            parts[RECORD_KEYS[key]] = (
                f"t.{ident(name)}" if isinstance(value, EvidenceColumn) else literal(value)
            )
        at = f"t.{ident(CONSENTED_AT)}"
        parts["dateTimeConsented"] = (
            f"strftime(CAST({at} AS TIMESTAMPTZ) AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ')"
        )
        order = ("text", "dateTimeConsented", "url", "ipAddress", "userAgent")
        return "[{" + ", ".join(f"{literal(k)}: {parts[k]}" for k in order) + "}]"

    def _recorded(self, table: pa.Table) -> pa.Array | None:
        """Which rows carry a consent record: their email consent goes as a subscribe (not
        kept, not held back) with its time, and every piece of evidence read per row is there
        and of its kind (an IP address, an absolute URL). None when no row does. A row that
        lacks one is sent without a record: its consent still goes."""
        mask = self._subscribing(table)
        if mask is None or self.evidence is None:
            return None
        names = table.column_names
        for key in self.evidence.columns():
            name = f"consent.email.evidence.{key}"
            if name not in names:
                return None
            values = table[name]
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                values = pc.cast(values, pa.string())
            ok = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0)
            if key == "url":
                ok = pc.and_(ok, pc.match_substring_regex(values, URI_PATTERN))
            elif key == "ip_address":
                ok = pc.and_(ok, _ip_addresses(values))
            mask = pc.and_(mask, ok)
        mask = pc.fill_null(mask, False)
        if isinstance(mask, pa.ChunkedArray):
            mask = mask.combine_chunks()
        return mask if pc.any(mask).as_py() else None

    def _subscribing(self, table: pa.Table) -> pa.Array | pa.ChunkedArray | None:
        """Rows whose email consent goes as a subscribe with its time (not kept, not held
        back): those a consent record belongs to. None without evidence configured."""
        names = table.column_names
        if self.evidence is None or "consent.email" not in names or CONSENTED_AT not in names:
            return None
        if table.num_rows == 0:
            return None
        mask = pc.and_(
            pc.equal(table["consent.email"], SUBSCRIBED), pc.is_valid(table[CONSENTED_AT])
        )
        return pc.and_(pc.fill_null(mask, False), written(table))

    def _evidence_notes(self, table: pa.Table) -> list[RowError]:
        """A note for each subscribe sent without its consent record, its evidence missing a
        value or holding one of the wrong kind (an IP address, an absolute URL)."""
        wanted = self._subscribing(table)
        if wanted is None or not pc.any(wanted).as_py():
            return []
        recorded = self._recorded(table)
        missing = wanted if recorded is None else pc.and_(wanted, pc.invert(recorded))
        if not pc.any(missing).as_py():
            return []
        rows = table.filter(missing)
        column = self.sync.consent.email.column if self.sync.consent.email else "consent"
        return [
            RowError(
                row,
                ident,
                column,
                "subscribed",
                "consent_evidence_incomplete",
                "the subscribe was sent without its consent record: a piece of its evidence "
                "(text, url, ip_address, user_agent) is empty or not of its kind",
            )
            for row, ident in zip(rows["__row"].to_pylist(), rows["__id"].to_pylist(), strict=True)
        ]

    @staticmethod
    def _unknown_sql(schema: pa.Schema, given: str) -> str:
        """SQL: the row's consent is empty in the warehouse (not kept, not held back)."""
        kept, held = flag_sql(schema, KEPT), flag_sql(schema, HELD)
        return f"({given} IS NULL AND NOT {kept} AND NOT {held})"

    def _lists_sql(self, consent: str) -> str | None:
        main = self._list_ref(self.sync.destination.list)
        other = self._list_ref(self.unsubscribed_list)
        if main is None:
            return None
        if other is None or consent == "NULL":
            return f"json('[{main}]')"
        return (
            f"CASE WHEN {consent} = 'subscribed' THEN json('[{main}]') ELSE json('[{other}]') END"
        )

    def _list_ref(self, name: str | None) -> int | None:
        if name is None:
            return None
        return self.list_ids.get(name, 0)  # 0 in a dry run: the book is looked up when sending

    def screen(self, table: pa.Table) -> Screened:
        """Rows without an email left out with their row errors: no contact can be made; with
        ``unknown_consent: skip``, rows whose consent is empty, with a row note."""
        kept, errors = self._without_email(table)
        if self.unknown_consent == "skip":
            kept, skipped = self._unknown_skipped(kept)
            errors += skipped
        errors += self._evidence_notes(kept)
        kept, too_large = self.too_large(kept)
        errors = sorted(errors + too_large, key=lambda e: e.row_number)
        return Screened(kept, errors, rejected=table.num_rows - kept.num_rows)

    def _unknown_skipped(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        if table.num_rows == 0 or "consent.email" not in table.column_names:
            return table, []
        unknown = pc.and_(pc.is_null(table["consent.email"]), written(table))
        if not pc.any(unknown).as_py():
            return table, []
        bad = table.filter(unknown)
        column = self.sync.consent.email.column if self.sync.consent.email else "consent"
        notes = [
            RowError(
                row,
                ident,
                column,
                None,
                "unknown_consent_skipped",
                "consent is empty and unknown_consent is skip: no contact was created or updated",
            )
            for row, ident in zip(bad["__row"].to_pylist(), bad["__id"].to_pylist(), strict=True)
        ]
        return table.filter(pc.invert(unknown)), notes

    def _without_email(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """Rows with no email (possible when the identifier is another column) split off as
        row errors: a contact is created and matched by its email."""
        missing = pc.is_null(table["email"])
        if not pc.any(missing).as_py():
            return table, []
        bad = table.filter(missing)
        errors = [
            RowError(
                row,
                ident,
                self.email_column,
                None,
                "missing_email",
                f"{self.email_column}: empty; Dotdigital contacts are matched by email",
            )
            for row, ident in zip(bad["__row"].to_pylist(), bad["__id"].to_pylist(), strict=True)
        ]
        return table.filter(pc.invert(missing)), errors

    def _docs(self, table: pa.Table) -> pa.Array:
        """One import document a row. The rows that carry a consent record (``_recorded``)
        are built by a template that has one, the others by one that has none: the key is
        present with a whole record or absent, never null, whatever ``null_values`` says."""
        recorded = self._recorded(table)
        if recorded is None:
            return self._plain_docs(table)
        docs = pa.nulls(table.num_rows, pa.string())
        rest = table.filter(pc.invert(recorded))
        if rest.num_rows:
            plain = self._plain_docs(rest)
            if isinstance(plain, pa.ChunkedArray):
                plain = plain.combine_chunks()
            docs = pc.replace_with_mask(docs, pc.invert(recorded), plain)
        with_record = table.filter(recorded)
        built = self._builder(with_record, consent_field=True, record=True).build(with_record)
        return pc.replace_with_mask(docs, recorded, built)

    def _plain_docs(self, table: pa.Table) -> pa.Array:
        """Documents without a consent record."""
        docs = self._builder(table, consent_field=True).build(table)
        if self.consent_mode != "data_field" or self.sync.null_values == "skip":
            return docs  # a kept consent's NULL is left out of the document
        # null_values: clear sends NULLs, which would clear the consent data field of the
        # rows whose consent is kept: those rows' documents leave the field out instead
        kept = flagged(table, KEPT)
        if not pc.any(kept).as_py():
            return docs
        bare = self._builder(table, consent_field=False).build(table)
        return pc.if_else(kept, bare, docs)

    def _builder(self, table: pa.Table, *, consent_field: bool, record: bool = False) -> RowJson:
        key = (*(f in table.column_names for f in (KEPT, HELD, NEW)), consent_field, record)
        if key not in self._json:
            template = self._template(table, consent_field=consent_field, record=record)
            self._json[key] = RowJson(template, drop_nulls=self.sync.null_values == "skip")
        return self._json[key]

    def import_bodies(self, table: pa.Table) -> Iterator[tuple[int, int, bytes]]:
        docs = self._docs(table)
        head, tail = b'{"mergeOption":"overwrite","contacts":[', b"]}"
        return bodies(docs, head, tail, self.import_size, MAX_IMPORT_BYTES)

    def requests(self, table: pa.Table) -> Iterator[Request]:
        table, _ = self._without_email(table)
        if table.num_rows == 0:
            return
        for start, end, body in self.import_bodies(table):
            yield Request("PUT", IMPORT_PATH, body, end - start)

    # ------------------------------------------------------------------ sending

    def prepare(self) -> None:
        for name in filter(None, (self.sync.destination.list, self.unsubscribed_list)):
            self.list_ids[name] = self.client.find_or_create_address_book(name)

    def consent_account(self) -> str | None:
        """Opt-outs are read back where consent is the email status (``consent_mode:
        channel``); a consent data field (``data_field``) subscribes nobody."""
        if self.consent_mode != "channel" or not self.sync.consent.email:
            return None
        password = self.conn.password.get_secret_value()
        return account_key("dotdigital", self.conn.url(), self.conn.username, password)

    def read_back(self, memory: ConsentMemory) -> None:
        readback.read_back(self.client, memory)
        self._memory, self._opt_ins_read = memory, False

    def consent_standing(self, channel: str, persons: Sequence[str]) -> pa.Table | None:
        """Email opt-ins dated by a consent record (``readback.read_opt_ins``), read once a
        run and only by a run that has an unsubscribe to weigh; SMS ones are not known."""
        if channel != "email" or self._memory is None:
            return None
        if not self._opt_ins_read:
            readback.read_opt_ins(self.client, self._memory)
            self._opt_ins_read = True
        return self._memory.opt_ins(channel, persons)

    def before_import(self, table: pa.Table) -> None:
        """Create missing data fields with the type their values have; refuse a type clash."""
        if self._fields_ready:
            return
        existing = self.client.data_fields()
        wanted = {
            name.upper(): _field_type(table.schema.field(name).type)
            for name in table.column_names
            if not name.startswith(("__", "consent.")) and name not in df.IDENTIFIERS
        }
        if self.consent_mode == "data_field" and "consent.email" in table.column_names:
            wanted[self.consent_field.upper()] = "String"
        for name, type_ in wanted.items():
            have = existing.get(name) or self.client.create_data_field(name, type_)
            if have != type_ and name not in df.STANDARD:
                raise DestinationError(
                    f"Dotdigital data field {name} is {have} but this sync sends {type_} values; "
                    "change the mapping's type or the column, or rename the field"
                )
        self._fields_ready = True

    def split(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        return self._without_email(table)

    def submit(self, table: pa.Table) -> Any:
        """Record the unsubscribes the batch carries as ours before they are sent (an intent:
        ``consent/newest.py``), so a run killed after Dotdigital applied them but before they
        were acknowledged does not mistake them for the person's next run; then import."""
        if self._memory is not None:  # read back: a real run with consent as the channel
            record_intent(self._memory, table, self.sync.consent.columns())
        return super().submit(table)

    def complete(self, item: Any, tally: Tally) -> None:
        """Count the batch's imports; then, with ``consent_mode: data_field`` and an
        ``unsubscribed_list``, take those whose consent was withdrawn out of
        ``destination.list`` (the subscribers' book): a NO data field alone leaves them
        mailable there. The import already put them in ``unsubscribed_list``."""
        super().complete(item, tally)
        if self.consent_mode != "data_field" or not self.unsubscribed_list:
            return
        name = self.sync.destination.list
        table = item.table
        if not name or "consent.email" not in table.column_names or table.num_rows == 0:
            return
        withdrawn = pc.and_(
            pc.fill_null(pc.equal(table["consent.email"], "unsubscribed"), False), written(table)
        )
        if not pc.any(withdrawn).as_py():
            return
        leaving = table.filter(withdrawn)
        members = pa.table(
            {"__row": leaving["__row"], "__id": leaving["__id"], "key": leaving["email"]}
        )
        book = self.list_ids.get(name) or self.client.find_address_book(name)
        if book:
            tally.reported(
                Membership(self.client, self.email_column, waits=self.imports.waits)
                .remove(book, members)
                .errors
            )

    def account(self, table: pa.Table, imp: Import, report: dict[str, Any], tally: Tally) -> None:
        summary = report.get("summary") or {}
        failures = report.get("failures") or []
        # a failure with a contactId was imported, only part of its data refused: it counts
        # as new or updated, and is reported but not counted as failed
        failed = len(
            {f.get("identifiers", {}).get("email") for f in failures if not f.get("contactId")}
        )
        # contacts suppressed at the account level "can't be updated" (the report's
        # summary.globallySuppressed): failed, each with a row error naming why
        suppressed = _suppressed(table, imp, report) if summary.get("globallySuppressed") else []
        tally.landed(
            len(imp),
            created=int(summary.get("newContacts", 0)),
            failed=failed + len(suppressed),
        )
        tally.reported(suppressed)
        if not failures:
            return
        by_email = dict(zip(table["email"].to_pylist(), table["__row"].to_pylist(), strict=True))
        for failure in failures:
            email = failure.get("identifiers", {}).get("email")
            reasons = "; ".join(
                f"{r.get('failureCode')}: {r.get('description')}"
                for r in failure.get("failures", [])
            )
            tally.reported(
                [
                    RowError(
                        by_email.get(email, 0),
                        email,
                        "(contact)",
                        email,
                        "destination_rejected",
                        f"Dotdigital: {reasons}",
                    )
                ]
            )

    # ------------------------------------------------------------------ mode: mirror

    def remove(self, members: pa.Table) -> Removed:
        """Take ``members`` out of ``destination.list`` (``membership.py``); the contacts, their
        consent and the ``unsubscribed_list`` book stay as they are."""
        name = self.sync.destination.list
        book = self.list_ids.get(name) if name else None
        if book is None and name:
            book = self.client.find_address_book(name)
        if book is None or members.num_rows == 0:  # no book: nobody is in it
            return Removed(ids=members["__id"].to_pylist())
        return Membership(self.client, self.email_column, waits=self.imports.waits).remove(
            book, members
        )

    def removal_requests(self, members: pa.Table) -> Iterator[Request]:
        book = self._list_ref(self.sync.destination.list) or 0
        return Membership(self.client, self.email_column, waits=self.imports.waits).requests(
            book, members
        )

    def close(self) -> None:
        super().close()
        for builder in self._json.values():
            builder.close()


def _suppressed(table: pa.Table, imp: Import, report: dict[str, Any]) -> list[RowError]:
    """Rows of ``imp`` the report counts in ``summary.globallySuppressed``: those no list of
    the report names (not created, updated or failed; which list, if any, Dotdigital names
    them in is UNCONFIRMED, so a row named anywhere is left to that list)."""
    named = {
        str(ref.get("identifiers", {}).get("email", "")).lower()
        for key in ("created", "updated", "failures")
        for ref in report.get(key) or ()
    }
    rows = table.filter(pc.is_in(table["__row"], value_set=imp.rows))
    return [
        RowError(
            row,
            ident,
            "(contact)",
            email,
            "globally_suppressed",
            "Dotdigital: the contact is suppressed at the account level (bounced, complained "
            "or suppressed), so the import could not update it",
        )
        for row, ident, email in zip(
            rows["__row"].to_pylist(),
            rows["__id"].to_pylist(),
            rows["email"].to_pylist(),
            strict=True,
        )
        if str(email).lower() not in named
    ]


def _field_type(dtype: pa.DataType) -> str:
    if pa.types.is_boolean(dtype):
        return "Boolean"
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return "Numeric"
    if pa.types.is_timestamp(dtype) or pa.types.is_date(dtype):
        return "Date"
    return "String"


def _ip_addresses(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Whether each value is an IPv4 or IPv6 address (null: false); each distinct value is
    parsed once."""
    distinct = pc.unique(values).drop_null().to_pylist()
    good = pa.array([v for v in distinct if evidence_ip(v)], pa.string())
    return pc.fill_null(pc.is_in(values, value_set=good), False)

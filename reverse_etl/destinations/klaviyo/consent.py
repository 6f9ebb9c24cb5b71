"""Email and SMS consent as Klaviyo subscriptions, for profiles that have landed.

Only the consent columns say anything about consent (list membership never implies it):

* ``subscribed`` with a ``consented_at`` → bulk subscribe with ``historical_import: true`` and
  that time, so Klaviyo records consent already given and sends no double opt-in email and
  starts no "added to list" flow for back-filled consent;
* ``subscribed`` without a time → bulk subscribe without ``historical_import`` (Klaviyo asks
  for ``consented_at`` with it): the account's opt-in process applies, which is the safe
  reading of consent whose moment is unknown;
* ``unsubscribed`` → bulk unsubscribe, without a list, so it is the global unsubscribe the
  column means;
* NULL or ``never_subscribed`` → no call: the profile's subscription is left alone.

Email consent needs the row's email and SMS consent its phone number (Klaviyo finds the
subscription by it): ``subscribed`` without one is a row error found by ``screen``, which takes
that consent off the row (set to NULL) and leaves the profile to be imported;
``unsubscribed`` without one makes no call and no error, as a row without a phone number
holds no SMS subscription to revoke (the common case: SMS "no" for customers who never gave
a number). No list goes with the calls: membership comes
from the profile import, and a list here would add (or, unsubscribing, remove) members.
Payloads are built in DuckDB for the whole batch (``RowJson``): one flag column per channel
and call kind, computed in Arrow, decides which rows and channels go in which call.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.config import Sync
from reverse_etl.consent import cleared, without_kept
from reverse_etl.destinations.base import Request
from reverse_etl.destinations.klaviyo import bulk
from reverse_etl.destinations.klaviyo.client import (
    MAX_BODY_BYTES,
    MAX_SUBSCRIBE,
    MAX_UNSUBSCRIBE,
    KlaviyoClient,
)
from reverse_etl.destinations.klaviyo.destination import any_true, column_or_null, row_errors
from reverse_etl.destinations.klaviyo.readback import OURS
from reverse_etl.destinations.rowjson import Expr, RowJson
from reverse_etl.sql import ident
from reverse_etl.transform.consent import SUBSCRIBED, UNSUBSCRIBED
from reverse_etl.transform.rowerrors import RowError

# where Klaviyo can collect SMS consent and text (help.klaviyo.com/hc/en-us/articles/4402914866843,
# "Where is Klaviyo SMS available?"); the US without Puerto Rico and the other territories,
# which phonenumbers tells apart (PR, GU, VI ... share +1); the UK's +44 numbers include the
# Crown Dependencies' (GG, JE, IM), which UK sending numbers reach
SMS_REGIONS = frozenset(
    "US CA GB GG JE IM IE AU NZ DE NL FR BE AT ES CH DK SE NO FI IT PT".split()  # noqa: SIM905
)


class _Textable:
    """Whether Klaviyo can text an E.164 number, without parsing most of them: a calling code
    whose countries are all textable (+44: GB, GG, IM, JE) or none (+52) decides alone; a
    NANP number's country is its area code's (+1 787 is Puerto Rico), parsed once a code; the
    few codes shared by a textable country and another (+47 Norway and Svalbard, +39 Italy
    and the Vatican) are parsed a number (16 us each, on a first run's every SMS subscribe
    otherwise: 5 s a million rows)."""

    def __init__(self) -> None:
        self.area: dict[str, bool] = {}

    def __call__(self, number: str) -> bool:
        import phonenumbers

        for size in (1, 2, 3):
            code = number[1 : 1 + size]
            regions = (
                phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(int(code)) if code.isdigit() else None
            )
            if regions:
                break
        else:
            return False
        textable = {r in SMS_REGIONS for r in regions}
        if textable == {True} and code != "1":
            return True
        if textable == {False}:
            return False
        key = number[:5] if code == "1" else number
        known = self.area.get(key)
        if known is None:
            try:
                region = phonenumbers.region_code_for_number(phonenumbers.parse(number))
            except phonenumbers.NumberParseException:
                return False
            known = region in SMS_REGIONS
            if region is not None and code == "1":  # an invalid number says nothing of its code
                self.area[key] = known
        return known


# channel -> the profile field holding its address
CHANNELS: dict[str, str] = {"email": "email", "sms": "phone_number"}
# call kinds: (flag prefix, endpoint builder)
HISTORICAL, CURRENT, REVOKED = "hist", "now", "unsub"


def _subscribe(historical: bool, source: str) -> bulk.Endpoint:
    attrs = orjson.dumps({"historical_import": historical, "custom_source": source})
    head = (
        b'{"data":{"type":"profile-subscription-bulk-create-job","attributes":'
        + attrs[:-1]
        + b',"profiles":{"data":['
    )
    return bulk.Endpoint(
        "bulk_subscribe_profiles",
        "/api/profile-subscription-bulk-create-jobs",
        head,
        b"]}}}}",
        MAX_SUBSCRIBE,
        MAX_BODY_BYTES,
        "bulk subscribe",
    )


UNSUBSCRIBE = bulk.Endpoint(
    "bulk_unsubscribe_profiles",
    "/api/profile-subscription-bulk-delete-jobs",
    b'{"data":{"type":"profile-subscription-bulk-delete-job","attributes":{"profiles":{"data":[',
    b"]}}}}",
    MAX_UNSUBSCRIBE,
    MAX_BODY_BYTES,
    "bulk unsubscribe",
)


def _channel_json(kind: str, at_column: str) -> str:
    """SQL for one channel's subscription parameters in a call of ``kind``."""
    if kind == HISTORICAL:
        # not after now: Klaviyo refuses a consent time in the future, and the transform lets
        # timestamps through up to max_future_skew_minutes ahead (clock skew)
        at = (
            f"strftime(least(CAST(t.{ident(at_column)} AS TIMESTAMPTZ), now()) "
            "AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ')"
        )
        return f"{{'marketing': {{'consent': 'SUBSCRIBED', 'consented_at': {at}}}}}"
    if kind == CURRENT:
        return "{'marketing': {'consent': 'SUBSCRIBED'}}"
    return "{'marketing': {'consent': 'UNSUBSCRIBED'}}"


class Consent:
    """Builds and sends the subscription calls for a batch of landed profiles."""

    def __init__(self, sync: Sync):
        self.columns = {ch: c for ch, c in sync.consent.columns().items() if ch in CHANNELS}
        self.mapped = {target.field for target in sync.fields().values()}
        self.endpoints = {
            # the custom_source by which a read-back knows a subscribe as ours (readback.OURS)
            HISTORICAL: _subscribe(True, f"{OURS}{sync.name}"),
            CURRENT: _subscribe(False, f"{OURS}{sync.name}"),
            REVOKED: UNSUBSCRIBE,
        }
        self._json = {
            kind: RowJson(self._template(kind), drop_nulls=True) for kind in self.endpoints
        }

    def __bool__(self) -> bool:
        return bool(self.columns)

    def _template(self, kind: str) -> dict[str, object]:
        attrs: dict[str, object] = {}
        subscriptions: dict[str, object] = {}
        for channel, spec in self.columns.items():
            flag = ident(f"__{kind}_{channel}")
            field = CHANNELS[channel]
            if field not in self.mapped or (kind == HISTORICAL and not spec.consented_at):
                continue  # never flagged for this kind: no address, or no consent time
            attrs[field] = Expr(f"CASE WHEN t.{flag} THEN t.{ident(field)} END")
            params = _channel_json(kind, f"consent.{channel}.consented_at")
            subscriptions[channel] = Expr(f"CASE WHEN t.{flag} THEN {params} END")
        return {"type": "profile", "attributes": {**attrs, "subscriptions": subscriptions}}

    def _without_address(self, table: pa.Table, channel: str) -> tuple[pa.Array, list[RowError]]:
        """The rows subscribing ``channel`` without its address, and their row errors."""
        spec = self.columns[channel]
        sub = pc.fill_null(pc.equal(table[f"consent.{channel}"], SUBSCRIBED), False)
        missing = pc.and_(sub, pc.invert(pc.is_valid(column_or_null(table, CHANNELS[channel]))))
        if not any_true(missing):
            return missing, []
        need = "an email address" if channel == "email" else "a phone number (phone_number)"
        errors = row_errors(
            table,
            missing,
            spec.column,
            "missing_consent_address",
            f"{channel} consent needs {need}; the row has none, so its consent was not sent "
            "(the profile was)",
            value=f"consent.{channel}",
        )
        return missing, errors

    def _sms_elsewhere(self, table: pa.Table) -> tuple[pa.Array, list[RowError]]:
        """Rows subscribing to SMS with a number in a country Klaviyo cannot text, and their
        row notes (``sms_region_unsupported``). Only those rows' numbers are looked at."""
        sub = pc.fill_null(pc.equal(table["consent.sms"], SUBSCRIBED), False)
        phones = column_or_null(table, "phone_number", pa.string())
        sub = pc.and_(sub, pc.is_valid(phones))
        out = np.zeros(table.num_rows, dtype=bool)
        notes: list[RowError] = []
        if not any_true(sub):
            return pa.array(out), notes
        where = np.flatnonzero(sub.to_numpy(zero_copy_only=False))
        numbers = phones.take(pa.array(where)).to_pylist()
        textable = _Textable()
        for i, number in zip(where.tolist(), numbers, strict=True):
            if not textable(number):
                out[i] = True
        flagged = pa.array(out)
        if out.any():
            notes = row_errors(
                table,
                flagged,
                self.columns["sms"].column,
                "sms_region_unsupported",
                "SMS consent not sent: Klaviyo cannot text numbers in this country "
                f"(it texts {', '.join(sorted(SMS_REGIONS))})",
                value="phone_number",
            )
        return flagged, notes

    def screen(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """Consent that cannot be sent, taken off its row (the channel's consent set to NULL,
        so the profile still goes and its subscription is left alone), with a row error; and
        consent unchanged since Klaviyo acknowledged it (``consent.kept``), taken off too."""
        errors: list[RowError] = []
        table = without_kept(table)  # consent Klaviyo holds from us is not sent again
        if "sms" in self.columns and "consent.sms" in table.column_names:
            elsewhere, notes = self._sms_elsewhere(table)
            if notes:
                table = cleared(table, "consent.sms", elsewhere)
                errors += notes
        for channel in self.columns:
            missing, found = self._without_address(table, channel)
            if found:
                table = cleared(table, f"consent.{channel}", missing)
                errors += found
        return table, errors

    def plan(
        self, table: pa.Table
    ) -> tuple[list[tuple[bulk.Endpoint, bulk.Records]], list[RowError]]:
        """The calls ``table`` needs, and the rows whose consent cannot be sent (none in a
        screened batch: ``screen`` took that consent off)."""
        if not self.columns or table.num_rows == 0:
            return [], []
        errors: list[RowError] = []
        flags: dict[str, pa.Array] = {}
        wanted = {kind: pa.array(np.zeros(table.num_rows, bool)) for kind in self.endpoints}
        for channel in self.columns:
            consent = table[f"consent.{channel}"]
            address = column_or_null(table, CHANNELS[channel])
            at = column_or_null(table, f"consent.{channel}.consented_at", pa.timestamp("us", "UTC"))
            has_address = pc.is_valid(address)
            sub = pc.fill_null(pc.equal(consent, SUBSCRIBED), False)
            unsub = pc.fill_null(pc.equal(consent, UNSUBSCRIBED), False)
            errors += self._without_address(table, channel)[1]
            sub = pc.and_(sub, has_address)
            dated = pc.is_valid(at)
            flags[f"__{HISTORICAL}_{channel}"] = pc.and_(sub, dated)
            flags[f"__{CURRENT}_{channel}"] = pc.and_(sub, pc.invert(dated))
            flags[f"__{REVOKED}_{channel}"] = pc.and_(unsub, has_address)
            for kind in self.endpoints:
                wanted[kind] = pc.or_(wanted[kind], flags[f"__{kind}_{channel}"])
        flagged = table
        for name, values in flags.items():
            flagged = flagged.append_column(name, values)
        calls = []
        for kind, endpoint in self.endpoints.items():
            if not any_true(wanted[kind]):
                continue
            rows = flagged.filter(wanted[kind])
            docs = self._json[kind].build(rows)
            calls.append(
                (
                    endpoint,
                    bulk.Records(
                        docs, rows["__row"].combine_chunks(), rows["__id"].combine_chunks()
                    ),
                )
            )
        return calls, errors

    def requests(self, table: pa.Table) -> Iterator[Request]:
        calls, _ = self.plan(table)
        for endpoint, records in calls:
            yield from bulk.requests(endpoint, records, counted=False)

    def send(self, client: KlaviyoClient, table: pa.Table) -> list[RowError]:
        """Send the batch's consent; return the row errors (no address, refused by Klaviyo)."""
        calls, errors = self.plan(table)
        for endpoint, records in calls:
            errors += bulk.send(client, endpoint, records)
        return errors

    def close(self) -> None:
        for builder in self._json.values():
            builder.close()

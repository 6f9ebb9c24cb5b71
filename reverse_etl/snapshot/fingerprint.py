"""What a snapshot fingerprints: the sync's definition (the salt) and, per row, its mapped
values (``payload``) and its consent values (``consent``), as SQL for the engine that computes
them: DuckDB (the local snapshot, and a DuckDB warehouse) or PostgreSQL.

A fingerprint is only ever compared with fingerprints the same engine computed for the same
sync (the local snapshot with its DuckDB file, a warehouse snapshot with its own table), so
the two spellings need not agree with each other, only each with itself: a deterministic JSON
text of the values in a fixed order, salted, hashed to 64 bits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from reverse_etl.config import Sync
from reverse_etl.sql import ident, literal
from reverse_etl.transform.transformer import TransformSpec

# PostgreSQL's json_build_object takes at most 100 arguments (FUNC_MAX_ARGS): 50 pairs
_PG_PAIRS = 50


def definition(sync: Sync, destination_type: str) -> str:
    """A digest of everything that decides what a row becomes at the destination, besides
    its values: the salt of every fingerprint."""
    data = sync.model_dump(
        mode="json",
        include={
            "object",
            "identifier",
            "destination",
            "mapping",
            "consent",
            "null_values",
            "default_phone_region",
            "phone_region_column",
            "phone_validation",
            "naive_timezone",
        },
    )
    data["type"] = destination_type
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


# the field holding the address each consent channel needs
ADDRESSES = {"consent.email": ("email",), "consent.sms": ("phone_number", "mobileNumber")}


@dataclass(frozen=True)
class Fingerprint:
    """Which source columns make up a row's payload and its consent. The consent fingerprint
    also holds whether each consented channel's address is there (``present``), not the
    address itself: consent that could not be sent for want of an address counts as changed
    once the address comes, and an address that changes does not resend consent."""

    identifier: str
    payload: tuple[str, ...]
    consent: tuple[str, ...]
    salt: str
    present: tuple[str, ...] = ()

    @classmethod
    def of(cls, spec: TransformSpec, salt: str) -> Fingerprint:
        payload: list[str] = []
        consent: list[str] = []
        for f in spec.fields:
            side = consent if f.field.startswith("consent.") else payload
            if f.column not in side:
                side.append(f.column)
        if spec.phone_region_column and spec.phone_region_column not in payload:
            payload.append(spec.phone_region_column)
        channels = {f.field.split(".")[1] for f in spec.fields if f.field.startswith("consent.")}
        wanted = {a for ch in channels for a in ADDRESSES.get(f"consent.{ch}", ())}
        present = tuple(dict.fromkeys(f.column for f in spec.fields if f.field in wanted))
        return cls(spec.identifier, tuple(payload), tuple(consent), salt, present)

    # ------------------------------------------------------------------ DuckDB

    @staticmethod
    def doc(columns: Sequence[str], alias: str = "b", present: Sequence[str] = ()) -> str:
        """DuckDB: ``columns`` of row ``alias`` as JSON text, NULL-safe, in a fixed order;
        then, for each of ``present``, whether it is there (``"<column>?": true``)."""
        if not columns and not present:
            return "'{}'"
        fields = [f"{ident(c)} := {alias}.{ident(c)}" for c in columns]
        fields += [f"{ident(c + '?')} := {alias}.{ident(c)} IS NOT NULL" for c in present]
        return f"CAST(to_json(struct_pack({', '.join(fields)})) AS VARCHAR)"

    def hash(self, doc: str) -> str:
        """DuckDB: 64 bits of the salted doc's MD5 (a UBIGINT), stable across releases."""
        return f"md5_number_lower({literal(self.salt)} || {doc})"

    # ------------------------------------------------------------------ PostgreSQL

    @staticmethod
    def pg_doc(columns: Sequence[str], alias: str = "r", present: Sequence[str] = ()) -> str:
        """PostgreSQL: ``columns`` of row ``alias`` as JSON text (``json_build_object``, whose
        text keeps the columns' order and renders times as ISO 8601 in the session's time
        zone, UTC for the source); past 50 columns, the parts are merged as ``jsonb``."""
        pairs = [f"{literal(c)}, {alias}.{ident(c)}" for c in columns]
        pairs += [f"{literal(c + '?')}, {alias}.{ident(c)} IS NOT NULL" for c in present]
        if not pairs:
            return "'{}'"
        parts = [", ".join(pairs[i : i + _PG_PAIRS]) for i in range(0, len(pairs), _PG_PAIRS)]
        if len(parts) == 1:
            return f"CAST(json_build_object({parts[0]}) AS text)"
        merged = " || ".join(f"jsonb_build_object({p})" for p in parts)
        return f"CAST(({merged}) AS text)"

    def pg_hash(self, doc: str) -> str:
        """PostgreSQL: the first 64 bits of the salted doc's MD5, as a (signed) bigint."""
        digest = f"md5({literal(self.salt)} || {doc})"
        return f"CAST(CAST('x' || substr({digest}, 1, 16) AS bit(64)) AS bigint)"

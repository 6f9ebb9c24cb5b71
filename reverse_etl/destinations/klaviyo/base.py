"""What every Klaviyo destination shares: one paced client per run, the config checks common
to all objects (custom fields under one prefix, identifier fields, options), and row errors
built from a mask over the batch so only failing rows touch Python.

The objects are subclasses: profiles (``profiles.py``, with consent from ``consent.py``),
orders as events (``events.py``) and the catalog (``catalog.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.config import KlaviyoConnection, Sync
from reverse_etl.destinations.base import Destination
from reverse_etl.destinations.klaviyo.client import KlaviyoClient
from reverse_etl.transform.rowerrors import RowError


class KlaviyoBase(Destination):
    type = "klaviyo"
    object_name: ClassVar[str]
    custom_prefix: ClassVar[str]  # custom fields are written <prefix>.<Name>
    identifier_fields: ClassVar[tuple[str, ...]]  # fields the sync's identifier may map to
    takes_list: ClassVar[bool] = False  # destination.list is meaningful
    takes_consent: ClassVar[bool] = False  # a consent: section is meaningful
    bool_options: ClassVar[tuple[str, ...]] = ()  # options under destination: that are booleans
    poll_interval = 0.2  # first wait before polling a job; backs off to 5 s
    job_attempts = 3  # submissions of a job Klaviyo keeps cancelling
    # The client's rate limiters run this many times faster than the published limits: 1 in
    # production; tests and benchmarks raise it together with the sandbox's speedup.
    client_speedup: ClassVar[float] = 1.0

    def __init__(self, conn: KlaviyoConnection, sync: Sync, *, speedup: float | None = None):
        self.conn = conn
        self.sync = sync
        self.client = KlaviyoClient(conn, speedup=speedup or self.client_speedup)

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        prefix = cls.custom_prefix + "."
        return name.startswith(prefix) and len(name) > len(prefix)

    @classmethod
    def custom_field_hint(cls) -> str:
        return f"custom {cls.object_name} fields are written {cls.custom_prefix}.<Name>"

    @classmethod
    def check_sync(cls, sync: Sync) -> list[str]:
        problems = super().check_sync(sync)
        target = sync.fields().get(sync.identifier)
        if target is not None and target.field not in cls.identifier_fields:
            allowed = cls.identifier_fields
            which = allowed[0] if len(allowed) == 1 else f"one of {', '.join(allowed)}"
            problems.append(
                f"identifier {sync.identifier!r} maps to {target.field!r}; the identifier of "
                f"Klaviyo {cls.object_name} must map to {which}"
            )
        if sync.destination.list and not cls.takes_list:
            problems.append(
                f"destination.list: Klaviyo {cls.object_name} do not go into lists; remove it "
                "(lists hold profiles: use a profiles sync)"
            )
        if sync.consent.columns() and not cls.takes_consent:
            problems.append(
                f"consent: Klaviyo {cls.object_name} carry no consent; remove it (consent is "
                "synced with profiles)"
            )
        opts = sync.destination.options()
        for name in cls.bool_options:
            if name in opts and not isinstance(opts[name], bool):
                problems.append(f"destination.{name}: true or false (got {opts[name]!r})")
        return problems

    def option(self, name: str, default: Any) -> Any:
        return self.sync.destination.options().get(name, default)

    def close(self) -> None:
        self.client.close()


def row_errors(
    table: pa.Table,
    mask: pa.Array | pa.ChunkedArray,
    column: str,
    reason: str,
    message: str,
    value: str | None = None,
) -> list[RowError]:
    """One row error for each row of ``table`` where ``mask`` is true; ``value`` names the
    column whose value the error file shows."""
    bad = table.filter(mask)
    if bad.num_rows == 0:
        return []
    values = bad[value].to_pylist() if value else [None] * bad.num_rows
    return [
        RowError(row, ident, column, v, reason, message)
        for row, ident, v in zip(
            bad["__row"].to_pylist(), bad["__id"].to_pylist(), values, strict=True
        )
    ]


def any_true(mask: pa.Array | pa.ChunkedArray) -> bool:
    return bool(pc.any(mask).as_py())


def column_or_null(table: pa.Table, name: str, dtype: pa.DataType | None = None) -> pa.ChunkedArray:
    """The column ``name``, or all nulls (of ``dtype``, default text) when it is not mapped."""
    if name in table.column_names:
        return table[name]
    return pa.chunked_array([pa.nulls(table.num_rows, dtype or pa.string())])

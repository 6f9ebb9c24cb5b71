"""Consent is sent only when it changed in the warehouse.

A row goes to the destination when any of its mapped values changed (or a lookback, a
``--full-refresh`` or ``--resend`` read it again), but its consent columns say something only
when they changed: re-sending an unchanged "subscribed" would resubscribe a person who has
since unsubscribed inside the vendor (Klaviyo's bulk subscribe "will remove any UNSUBSCRIBE,
SPAM_REPORT or USER_SUPPRESSED suppressions"; Dotdigital's import resubscribes by default), and
re-sending an unchanged "unsubscribed" would undo a subscription the person gave in the
vendor's own form since. So a row whose consent values and times (the snapshot's ``consent``
fingerprint) are what the destination acknowledged last is flagged ``KEPT``, and each
destination leaves its consent alone: no subscription call, no status, no consent data field.
Even ``--resend`` does not resend consent: repairing a profile must never re-subscribe anyone.

The row flags every consent step reads (``KEPT`` here, ``HELD`` set by ``newest.py``, ``NEW``)
and the few ways they are read (``flagged``, ``written``, ``flag_sql``, ``cleared``) live here.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.sql import ident

KEPT = "__consent_kept"  # bool: the row's consent is what the destination holds from us
NEW = "__consent_new"  # bool: the snapshot holds no record of the row (a first send)
HELD = "__consent_held"  # bool: the row's consent was held back (newest.py; column NULL)


def flagged(table: pa.Table, name: str) -> pa.Array | pa.ChunkedArray:
    """The rows of ``table`` whose flag ``name`` is set (none for a table without it)."""
    if name not in table.column_names:
        return pa.array([False] * table.num_rows, pa.bool_())
    return pc.fill_null(table[name], False)


def written(table: pa.Table) -> pa.Array | pa.ChunkedArray:
    """The rows whose consent the batch writes: neither kept nor held back."""
    return pc.invert(pc.or_(flagged(table, KEPT), flagged(table, HELD)))


def flag_sql(schema: pa.Schema, name: str, alias: str = "t") -> str:
    """SQL: the row's flag ``name`` (FALSE for a batch without it)."""
    return f"COALESCE({alias}.{ident(name)}, FALSE)" if name in schema.names else "FALSE"


def cleared(table: pa.Table, name: str, rows: pa.Array | pa.ChunkedArray) -> pa.Table:
    """``table`` with column ``name`` NULL on ``rows``: that consent is left alone."""
    nulls = pa.scalar(None, table.schema.field(name).type)
    return table.set_column(
        table.column_names.index(name), name, pc.if_else(rows, nulls, table[name])
    )


def mark_kept(good: pa.Table, prints: pa.Table | None) -> pa.Table:
    """``good`` (transformed rows, with ``__row``) with ``KEPT`` where the diff found the
    row's consent unchanged, and ``NEW`` where the snapshot knew nothing of the row
    (``prints``: the changed rows' fingerprints, ``consent_same``, ``known``)."""
    if prints is None or "consent_same" not in prints.column_names:
        return good
    if not any(name.startswith("consent.") for name in good.column_names):
        return good
    rows = good.schema.field("__row").type
    same = prints.filter(pc.fill_null(prints["consent_same"], False))["__row"]
    kept = pc.is_in(good["__row"], value_set=pc.cast(same, rows))
    known = prints.filter(pc.fill_null(prints["known"], False))["__row"]
    new = pc.invert(pc.is_in(good["__row"], value_set=pc.cast(known, rows)))
    return good.append_column(KEPT, kept).append_column(NEW, new)


def without_kept(table: pa.Table) -> pa.Table:
    """``table`` with the consent of its ``KEPT`` rows taken off (NULL: leave it alone)."""
    kept = flagged(table, KEPT)
    if not pc.any(kept).as_py():
        return table
    for name in table.column_names:
        if name.startswith("consent."):
            table = cleared(table, name, kept)
    return table

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
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.sql import ident

KEPT = "__consent_kept"  # bool: the row's consent is what the destination holds from us
NEW = "__consent_new"  # bool: the snapshot holds no record of the row (a first send)


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
    if KEPT not in table.column_names:
        return table
    kept = pc.fill_null(table[KEPT], False)
    if not pc.any(kept).as_py():
        return table
    for i, name in enumerate(table.column_names):
        if name.startswith("consent."):
            nulls = pa.scalar(None, table.schema.field(i).type)
            table = table.set_column(i, name, pc.if_else(kept, nulls, table[name]))
    return table


def kept_sql(schema: pa.Schema, alias: str = "t") -> str:
    """SQL: the row's consent is kept (FALSE for a batch without the flag)."""
    if KEPT not in schema.names:
        return "FALSE"
    return f"COALESCE({alias}.{ident(KEPT)}, FALSE)"

"""The consent read back from a destination, written where analysts can join it.

``optouts_table: schema.table`` on a sync: after each run's read-back (and each ``reverse-etl
optouts``), the table in the sync's own warehouse holds every statement read back from the
sync's destination account (person, channel, status, at, reason, source), replaced whole in
one transaction, so a view can leave out who opted out at the vendor (the two-way pattern of
the BigCommerce integration, ``../shared/seeds/001_596cbdf24110c389.txt``). Every warehouse
type writes it its own way (``Source.replace_table``): DuckDB ``CREATE OR REPLACE``,
PostgreSQL ``COPY`` in a transaction, Snowflake ``INSERT``s in a transaction, BigQuery a
``WRITE_TRUNCATE`` load job.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from reverse_etl.consent.memory import Seen
from reverse_etl.sources.base import Source


def as_table(seen: Sequence[Seen], source: str) -> pa.Table:
    return pa.table(
        {
            "person": pa.array([s.person for s in seen], pa.string()),
            "channel": pa.array([s.channel for s in seen], pa.string()),
            "status": pa.array([s.status for s in seen], pa.string()),
            "at": pa.array([s.at for s in seen], pa.timestamp("us", "UTC")),
            "reason": pa.array([s.reason for s in seen], pa.string()),
            "source": pa.array([source] * len(seen), pa.string()),
        }
    )


def write(source: Source, name: str, rows: pa.Table) -> None:
    """Replace the table ``name`` (``schema.table`` or ``table``) in ``source``, the sync's
    open warehouse (a DuckDB one opened for writing), with ``rows``."""
    source.replace_table(name.split("."), rows)

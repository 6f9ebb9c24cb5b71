"""The read-and-transform path that a run, a dry run and ``validate`` all share.

Everything knowable before sending is decided here, the same way for all three: the view's
fit to the mapping (``preflight``), then per batch the transform's row checks and the
destination's offline ``screen``. So ``validate`` and ``--dry-run`` report exactly the rows a
run would refuse, and ``failed`` is left to mean only "the API refused it".
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.types as pt

from reverse_etl.consent import mark_kept
from reverse_etl.consent.newest import NewestWins
from reverse_etl.destinations.base import Destination, LoadBatch, Screened
from reverse_etl.extract import IncrementalQuery, batch_watermark
from reverse_etl.snapshot import Diff, SnapshotStore
from reverse_etl.sources import Source
from reverse_etl.state import RunCounts, Watermark
from reverse_etl.transform.rowerrors import ErrorFileWriter, RowError
from reverse_etl.transform.transformer import (
    StreamTransformer,
    TransformResult,
    TransformSpec,
    schema_problems,
)
from reverse_etl.util.prefetch import close


def cursor_problems(sync_name: str, cursor: str, dtype: pa.DataType) -> list[str]:
    """A cursor must order as time or as a counter: text compares character by character
    ('9' > '10', '2025-1-9' > '2025-1-10'), so a watermark over text skips rows silently."""
    if pt.is_timestamp(dtype) or pt.is_date(dtype) or pt.is_integer(dtype):
        return []
    if pt.is_decimal(dtype) and dtype.scale == 0:
        return []
    return [
        f"sync {sync_name!r}: cursor column {cursor!r} is {dtype} in the view; a cursor must be a "
        "timestamp, a date or an integer (text compares in string order, so rows would be "
        f"skipped). Cast it in the view's SQL, e.g. CAST({cursor} AS TIMESTAMP) AS {cursor}"
    ]


def watermark_problems(
    sync_name: str, cursor: str, dtype: pa.DataType, mark: Watermark | None
) -> list[str]:
    """The stored watermark must be of the cursor's kind: after the cursor column (or its
    type) changed, comparing the old value with the new column is meaningless or an error."""
    if mark is None or mark.cursor is None:
        return []
    if mark.column is not None and mark.column != cursor:
        return [
            f"sync {sync_name!r}: its stored watermark was read from cursor column "
            f"{mark.column!r}, but the sync's cursor is now {cursor!r}. Run `reverse-etl run "
            f"{sync_name} --full-refresh` to read the whole view from the new cursor (upserts "
            "make re-sending safe)"
        ]
    value = mark.cursor
    if pt.is_timestamp(dtype):
        fits = isinstance(value, datetime)
    elif pt.is_date(dtype):
        fits = isinstance(value, date) and not isinstance(value, datetime)
    else:  # integer or whole decimal (cursor_problems refused the rest)
        fits = isinstance(value, int | float | Decimal) and not isinstance(value, bool)
    if fits:
        return []
    shown = value.isoformat() if isinstance(value, date) else repr(value)
    return [
        f"sync {sync_name!r}: its stored watermark ({shown}, a {type(value).__name__}) does not "
        f"fit cursor column {cursor!r} ({dtype}): the cursor column or its type changed since "
        f"the last run. Run `reverse-etl run {sync_name} --full-refresh` to read the whole view "
        "from the new cursor (upserts make re-sending safe)"
    ]


def preflight(
    sync_name: str, spec: TransformSpec, schema: pa.Schema, mark: Watermark | None = None
) -> list[str]:
    """Everything wrong with the view before a row is read: mapped columns missing or of the
    wrong type, a cursor that cannot order rows, a watermark from another cursor."""
    problems = schema_problems(spec, schema)
    if spec.cursor in schema.names:
        dtype = schema.field(spec.cursor).type
        problems += cursor_problems(sync_name, spec.cursor, dtype)
        if not problems:
            problems += watermark_problems(sync_name, spec.cursor, dtype, mark)
    return problems


@dataclass
class Earned:
    """What acknowledging a batch earns: the watermark past it, and the fingerprints of the
    rows it sent for the snapshot (None without one)."""

    mark: Watermark | None
    prints: pa.Table | None = None


def transformed_batches(
    source: Source,
    query: IncrementalQuery,
    spec: TransformSpec,
    destination: Destination,
    *,
    batch_size: int,
    errors: ErrorFileWriter,
    counts: RunCounts,
    stop: Callable[[], bool] = lambda: False,
    snapshot: SnapshotStore | None = None,
    resend: bool = False,
    newest: NewestWins | None = None,
) -> Iterator[LoadBatch]:
    """Read, diff, transform and screen the query's batches; each comes with what it earns
    once acknowledged (``Earned``). With a ``snapshot``, rows the destination already holds as
    they are now are counted ``unchanged`` and go no further (a warehouse snapshot's read
    flags them itself, and its diff takes its columns off the batch). ``stop()`` is asked
    before each read (a signal, a lost lock): what was read is still handed on, so it can be
    acknowledged and committed. ``newest``: consent read back from the destination, against
    which older subscribes are held back (``consent/newest.py``)."""
    transformer = StreamTransformer(spec)
    nothing: TransformResult | None = None  # a transform's empty result, for an empty batch
    read = _numbered(source.stream(query.sql, query.params, batch_size))
    whole = query.where == "TRUE"  # no watermark: the whole view is read
    diffs = (
        snapshot.diffs(read, resend=resend, whole=whole)
        if snapshot is not None
        else _no_diffs(read)
    )
    try:
        for batch, diff in diffs:
            counts.read += batch.num_rows
            prints = None
            held: list[RowError] = []
            todo = batch
            if diff is not None:
                counts.unchanged += diff.unchanged
                prints = diff.prints
                todo = batch.filter(diff.changed) if diff.unchanged else batch
            if todo.num_rows == 0 and nothing is not None:
                # every row unchanged: no transform, no screen (two queries a batch saved)
                out, screened = nothing, Screened(nothing.good)
            else:
                out = transformer.transform(todo)
                good = mark_kept(out.good, prints)
                if newest is not None:  # subscribes older than an opt-out there: held back
                    good, held = newest.apply(good)
                    counts.consent_held += len(held)
                screened = destination.screen(good)
                if nothing is None:
                    nothing = TransformResult(out.good.slice(0, 0))
            counts.rejected += out.rejected + screened.rejected
            errors.write([*out.errors, *held, *screened.errors])  # one write: in row order
            skip = out.future
            if diff is not None and todo is not batch:  # the transform saw the changed rows
                where = np.flatnonzero(diff.changed.to_numpy(zero_copy_only=False))
                skip = frozenset(int(where[p]) for p in out.future)
            mark = batch_watermark(batch, spec.cursor, spec.identifier, skip)
            yield LoadBatch(screened.table, Earned(mark, prints))
            if stop():
                return
        if snapshot is not None:
            snapshot.read_complete = True
    finally:
        diffs.close()
        transformer.close()


def _numbered(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Each batch with ``__row``, its rows' places in the run (a CSV's read has its lines)."""
    next_row = 1
    try:
        for batch in batches:
            if "__row" not in batch.schema.names:
                numbers = np.arange(next_row, next_row + batch.num_rows, dtype=np.int64)
                batch = batch.append_column("__row", pa.array(numbers))
            next_row += batch.num_rows
            yield batch
    finally:
        close(batches)


def _no_diffs(
    batches: Iterator[pa.RecordBatch],
) -> Generator[tuple[pa.RecordBatch, Diff | None], None, None]:
    for batch in batches:
        yield batch, None

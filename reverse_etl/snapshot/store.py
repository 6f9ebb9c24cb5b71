"""What the engine asks of a synced-state snapshot, wherever it lives (``SnapshotStore``), and
what its diff of a batch returns (``Diff``)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc


def as_text(values: pa.ChunkedArray | pa.Array) -> pa.Array:
    """``values`` as text, as the snapshot keeps identifiers and keys: a cast where Arrow has
    one, else each value's ``str``."""
    try:
        return pc.cast(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values.to_pylist()], pa.string())


# the fingerprint of a member the destination may or may not hold: no row's fingerprint is 0
# (64 bits of MD5), so it always counts as changed
UNSETTLED = 0


@dataclass
class Diff:
    """One batch against the snapshot: ``changed`` (aligned with the batch) says which rows to
    send; ``prints`` holds those rows' fingerprints (``__row``, ``id``, ``payload``,
    ``consent``) to record once they are acknowledged. ``batch``: the batch to go on with,
    when the read carried the snapshot's own columns (a warehouse snapshot), without them."""

    changed: pa.Array  # bool, one per row of the batch
    prints: pa.Table  # also: known (the snapshot holds the id), doc (mapped values), old
    unchanged: int
    batch: pa.RecordBatch | None = None


class SnapshotStore(Protocol):
    """The synced-state snapshot of one sync: the local DuckDB file (``Snapshot``) or a table
    in the warehouse itself (``WarehouseSnapshot``). ``diff`` runs on the read-ahead thread,
    everything else on the thread that commits."""

    mirror: bool  # note every identifier read, to find who left the view
    read_complete: bool  # the read ran to its end (not stopped, not failed)
    keep_old: bool  # the diff also returns each changed row's remembered doc (plan)

    def in_read(self, *, resend: bool) -> Callable[[str], str] | None:
        """For a snapshot the read itself joins (in the warehouse): what wraps the read's
        ranked SELECT (see ``extract.build_query``). None: ``diffs`` joins the read's stream."""
        ...

    def diffs(
        self, batches: Iterator[pa.RecordBatch], *, resend: bool = False, whole: bool = True
    ) -> Generator[tuple[pa.RecordBatch, Diff], None, None]:
        """Each batch of the read (numbered: ``__row``) as it goes on, with its ``Diff``.
        ``resend``: every row counts as changed (their fingerprints are still taken).
        ``whole``: the read is the whole view (no watermark), not a small share of it. A
        mirror run notes every identifier read."""
        ...

    def record(self, prints: pa.Table, acked: pa.Table) -> None:
        """Remember the rows the destination took (``acked``: ``__row`` (int64) and ``key``
        (text)), with their fingerprints from the batch's ``Diff`` (``prints``)."""
        ...

    def reserve(self, members: pa.Table) -> None:
        """Before a batch is handed to the destination (``id``, ``key`` and the ``payload``
        and ``consent`` fingerprints sent): the destination may hold them from then on. Should
        the run die before they are recorded, a mirror run still removes them when they leave
        the view, and a read sends them again unless what it reads is what was sent and what
        the snapshot holds: a change undone before the next run must reach the destination."""
        ...

    def unsettle(self, ids: Sequence[Any]) -> None:
        """Before their removal is sent: the members' fingerprints are cleared, so if the run
        dies after the destination removed them and they come back, they count as changed and
        are added again, not skipped as unchanged."""
        ...

    def begin_mirror(self) -> None: ...

    def departed_count(self) -> int: ...

    def departed(self, limit: int) -> pa.Table: ...

    def forget(self, ids: Sequence[Any]) -> None: ...

    def count(self) -> int: ...

    def close(self) -> None: ...

"""One in-process DuckDB for the engine's own vectorised work (transforms, JSON building).

Every user gets a cursor of the same database, so they share one buffer pool and one memory
limit instead of each connection paying for its own.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pt

# execute() is the faster path for the engine's per-batch queries; DuckDB's note that its Arrow
# output makes an extra copy is known and accepted (filtered once here: catch_warnings is not
# thread-safe next to the read-ahead thread).
warnings.filterwarnings("ignore", message="Arrow output on a DB-API result", category=UserWarning)

_lock = threading.Lock()
_db: duckdb.DuckDBPyConnection | None = None


def cursor() -> duckdb.DuckDBPyConnection:
    """A new connection to the shared scratch database (UTC session, one thread)."""
    global _db
    from reverse_etl.util import memory

    budget = memory.current()  # never under our lock: configure() takes its own, then ours
    with _lock:
        opened = _db is None
        if _db is None:
            limit = memory.duckdb_size(budget.scratch)
            _db = duckdb.connect(
                config={"threads": 1, "memory_limit": limit, "temp_directory": memory.spill_dir()}
            )
        con = _db.cursor()
    if opened and memory.current() != budget:  # the budget changed while it opened
        set_memory_limit(memory.current().scratch)
    con.execute("SET TimeZone = 'UTC'")
    return con


def set_memory_limit(size: int) -> None:
    """The scratch database's share of the process's budget (``util/memory.py``); a cap, not
    a reservation, past which its joins spill."""
    from reverse_etl.util import memory

    with _lock:
        if _db is not None:
            _db.execute(f"SET memory_limit = '{memory.duckdb_size(size)}'")


@contextlib.contextmanager
def registered(cur: duckdb.DuckDBPyConnection, name: str, data: Any) -> Iterator[None]:
    """``data`` (an Arrow table, batch or reader) visible to ``cur`` as ``name`` for the
    block, on any DuckDB connection (this one's or another's)."""
    cur.register(name, data)
    try:
        yield
    finally:
        cur.unregister(name)


# Bytes of values one JSON query takes: DuckDB's JSON functions hold several copies of a
# vector's values in 16 MB arenas, so 2 MB of long strings in one query outgrew the scratch
# database's 64 MB (an OutOfMemoryException); a batch of long values goes in slices instead.
CHUNK_BYTES = 4_000_000


def row_slices(table: pa.Table, limit: int = CHUNK_BYTES) -> list[pa.Table]:
    """``table`` in consecutive row slices of about ``limit`` bytes of values each (a row
    larger than that alone); one slice when it is small, the common case."""
    if table.nbytes <= limit:
        return [table]
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        if (
            pt.is_string(column.type)
            or pt.is_large_string(column.type)
            or pt.is_binary(column.type)
        ):
            sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)
        else:  # fixed width or nested: its share of the column's bytes
            sizes += max(column.nbytes // table.num_rows, 8)
    ends = np.cumsum(sizes)
    cuts = np.unique(np.searchsorted(ends, np.arange(limit, int(ends[-1]), limit), side="right"))
    bounds = [0, *(int(c) for c in cuts if 0 < c < table.num_rows), table.num_rows]
    return [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

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

# execute() is the faster path for the engine's per-batch queries; DuckDB's note that its Arrow
# output makes an extra copy is known and accepted (filtered once here: catch_warnings is not
# thread-safe next to the read-ahead thread).
warnings.filterwarnings("ignore", message="Arrow output on a DB-API result", category=UserWarning)

# a cap, not a reservation: JSON over long values needs about 12 times their size at once
# (rowjson builds a batch in slices of about 1 MB), so one value of up to ~15 MB fits
MEMORY_LIMIT = "256MB"
_lock = threading.Lock()
_db: duckdb.DuckDBPyConnection | None = None


def cursor() -> duckdb.DuckDBPyConnection:
    """A new connection to the shared scratch database (UTC session, one thread)."""
    global _db
    with _lock:
        if _db is None:
            _db = duckdb.connect(config={"threads": 1, "memory_limit": MEMORY_LIMIT})
        con = _db.cursor()
    con.execute("SET TimeZone = 'UTC'")
    return con


@contextlib.contextmanager
def registered(cur: duckdb.DuckDBPyConnection, name: str, data: Any) -> Iterator[None]:
    """``data`` (an Arrow table, batch or reader) visible to ``cur`` as ``name`` for the
    block, on any DuckDB connection (this one's or another's)."""
    cur.register(name, data)
    try:
        yield
    finally:
        cur.unregister(name)

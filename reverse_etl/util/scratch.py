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

_lock = threading.Lock()
_db: duckdb.DuckDBPyConnection | None = None


def cursor() -> duckdb.DuckDBPyConnection:
    """A new connection to the shared scratch database (UTC session, one thread)."""
    global _db
    from reverse_etl.util import memory

    limit = memory.duckdb_size(memory.current().scratch)  # before the lock: it may set it
    with _lock:
        if _db is None:
            _db = duckdb.connect(
                config={"threads": 1, "memory_limit": limit, "temp_directory": memory.spill_dir()}
            )
        con = _db.cursor()
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

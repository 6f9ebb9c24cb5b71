"""One memory budget for what a run holds as the view grows, split between its holders.

A run holds data that grows with the view in three places: the DuckDB warehouse's read (its
sort spills to disk past its limit), the snapshot's DuckDB file (the diff's join and the
records written but not yet checkpointed) and the batches read ahead of the sender. Each
DuckDB instance keeps its buffers up to its own ``memory_limit``, so three instances with a
generous limit each (256 MB, as before) added up to about a gigabyte of resident memory
whatever the view's size. Here one figure, ``memory_limit`` in the project file or
``REVERSE_ETL_MEMORY_LIMIT`` (default ``DEFAULT``), is the budget: what the interpreter and
its libraries take (``BASELINE``, measured) is set aside, and the rest is shared out. Past
their share, DuckDB's sorts, joins and aggregates spill to disk (``spill_dir``); the
read-ahead waits instead.

It is not a hard cap on the process: the scratch DuckDB that builds transforms and request
bodies holds one batch's work at a time (``SCRATCH``, transient), and the batches in flight at
the destination (each with its request bodies) come on top, about 300 MB with batches of
20,000 rows (README, "Memory", has the measured figures).

Each share has a floor below which DuckDB cannot run the engine's queries at all (the read's
duplicate ranking and sort of 10M rows failed at 96 MB: its merge pins a block per sorted
run): a budget too small for the floors is raised to them, and the log says so once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from reverse_etl.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "REVERSE_ETL_MEMORY_LIMIT"
DEFAULT = "512MiB"
MIB = 1 << 20
# resident memory of `reverse-etl run` before it reads a row: Python, pyarrow, DuckDB, httpx,
# SQLAlchemy and the engine's modules (measured: 161 MB with every extra importable)
BASELINE = 160 * MIB

# shares of what is left after the baseline, and each one's floor: the parts that hold more as
# the view grows (the read's sort, the snapshot's records, the batches read ahead)
_SHARES = {"source": 0.5, "snapshot": 0.3, "read_ahead": 0.2}
_FLOORS = {"source": 160 * MIB, "snapshot": 64 * MIB, "read_ahead": 24 * MIB}
# The scratch database holds nothing between batches: what it takes is one batch's transform
# or JSON at a time (about 12 times a batch's long values at once, see scratch.CHUNK_BYTES), a
# cap that does not grow with the view, so it is not a share: a batch of 90 KB values needs
# more than a share of a small budget would give, and a normal batch uses a few MB of it.
SCRATCH = 256 * MIB
# the warehouse read sorts with two threads from this size on: one thread needs less memory
# (10M rows: one thread sorted in 160 MB, two failed in 96 MB and passed in 256 MB)
TWO_THREADS_FROM = 256 * MIB

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
_UNITS |= {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}  # DuckDB's short forms
_UNITS |= {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
SMALLEST = 16 * MIB  # below this DuckDB cannot run a query at all


def parse_size(text: str) -> int:
    """``'400MB'``, ``'2G'``, ``'1.5GiB'``, ``'512 MiB'``, ``'25%'`` (of the machine's memory)
    or a byte count, as bytes (DuckDB's spellings: MB and M are 1000², MiB 1024²); at least
    ``SMALLEST``. A percentage is above 0% and at most 100%."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z%]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or (unit not in _UNITS and unit != "%"):
        raise ValueError(
            f"memory_limit {text!r} is not a size: write it as e.g. 400MB, 1GB, 512MiB or 25%"
        )
    number = float(match.group(1))
    if unit == "%" and not 0 < number <= 100:
        raise ValueError(
            f"memory_limit {text!r} is not a share of the machine's memory: a percentage runs "
            "from above 0% to 100%; write e.g. 25%, or a size such as 1GB"
        )
    size = int(number / 100 * _physical()) if unit == "%" else int(number * _UNITS[unit])
    if size < SMALLEST:
        raise ValueError(
            f"memory_limit {text!r} is too small: DuckDB needs at least {SMALLEST // MIB}MiB"
        )
    return size


def _physical() -> int:
    """The machine's memory, for a limit given as a share of it."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: a share of 4 GiB
        return 4 << 30


def duckdb_size(size: int) -> str:
    """A byte count as DuckDB's ``memory_limit`` takes it."""
    return f"{max(size // MIB, 1)}MiB"


@dataclass(frozen=True)
class Budget:
    """The process's memory budget and its shares, in bytes."""

    total: int

    def _share(self, part: str) -> int:
        rest = max(self.total - BASELINE, 0)
        return max(int(rest * _SHARES[part]), _FLOORS[part])

    @property
    def source(self) -> int:
        """The DuckDB warehouse's ``memory_limit`` (its read's ranking and sort)."""
        return self._share("source")

    @property
    def snapshot(self) -> int:
        """The snapshot file's ``memory_limit`` (the diff's join, the records written)."""
        return self._share("snapshot")

    @property
    def scratch(self) -> int:
        """The scratch DuckDB's ``memory_limit`` (transforms and request bodies, one batch at
        a time): ``SCRATCH``, or the whole budget's remainder if that is smaller."""
        return max(min(SCRATCH, self.total - BASELINE), 64 * MIB)

    @property
    def read_ahead(self) -> int:
        """Bytes of batches the read may hold ahead of the sender."""
        return self._share("read_ahead")

    @property
    def floor(self) -> int:
        """The smallest total whose shares all clear their floors."""
        return BASELINE + max(int(f / _SHARES[p]) for p, f in _FLOORS.items())


def threads_for(limit: int) -> int:
    """Threads for a DuckDB read of ``limit`` bytes: two sort faster but need more memory."""
    return 2 if limit >= TWO_THREADS_FROM and (os.cpu_count() or 1) > 1 else 1


_lock = threading.Lock()
_budget: Budget | None = None


def configure(limit: str | None) -> Budget:
    """Set the process's budget from the project file's ``memory_limit`` (the environment's
    ``REVERSE_ETL_MEMORY_LIMIT`` wins, so one run can be given more without editing it)."""
    global _budget
    from_env = os.environ.get(ENV)
    text = from_env or limit or DEFAULT
    try:
        budget = Budget(parse_size(text))
    except ValueError as exc:
        if not from_env:
            raise  # the project file's value was checked when it loaded
        raise ConfigError(f"{ENV}: {exc}") from None
    with _lock:  # set and applied together: two threads configuring cannot cross
        if _budget == budget:
            return budget
        _apply(budget)
        _budget = budget
    if budget.total < budget.floor:
        log.warning(
            "memory_limit %s is below what the engine's queries need (%d MiB): its parts "
            "use their minimums, so the process may take more",
            text,
            budget.floor // MIB,
        )
    return budget


def current() -> Budget:
    """The budget ``configure`` set, or the default one."""
    with _lock:
        budget = _budget
    return budget if budget is not None else configure(None)


def _apply(budget: Budget) -> None:
    """A budget set after the scratch database opened (a second project in one process)
    reaches it too; the warehouse and snapshot connections are opened per run."""
    from reverse_etl.util import scratch

    scratch.set_memory_limit(budget.scratch)


def spill_dir() -> str:
    """Where DuckDB's queries spill past their share: one folder in the system's temp dir
    (DuckDB makes it when it first spills)."""
    return str(Path(tempfile.gettempdir()) / "reverse_etl_duckdb_spill")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, if it has glibc's ``malloc_trim``."""
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release() -> None:
    """Hand memory freed since the last call back to the system. glibc keeps freed blocks in
    per-thread arenas for reuse, and with DuckDB's and Arrow's threads allocating and freeing
    batch-sized buffers the process's RSS grew by hundreds of MB it no longer used; called
    once per acknowledged batch (a few milliseconds). No-op where ``malloc_trim`` is absent."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

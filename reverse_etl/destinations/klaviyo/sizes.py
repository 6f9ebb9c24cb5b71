"""Upper bounds on how large each row's JSON can be, from Arrow lengths, without building it.

Klaviyo refuses a profile over 100 KB, an event entry or a catalog job over 5 MB; a row that
breaks such a limit is a row error found before sending (``screen``). Building every row's
JSON twice (to screen it, then to send it) would double the heaviest work of a batch, so
``screen`` bounds each row's size here, with a few Arrow kernels over the batch, and builds
the JSON only of the rows whose bound passes the limit (in practice none: a bound reaches
100 KB only for a row holding some 16 KB of text).

The bound holds for any JSON the destinations write: every character of a string escapes to
at most six bytes (``\\u00XX``), numbers, dates and timestamps have a longest text form, and
every key and bracket is counted. A type the bound does not know is unbounded (``UNKNOWN``),
so its rows are always measured exactly.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pt

ESCAPE = 6  # bytes a character takes at most in a JSON string (\u00XX)
NULL = 4  # "null"
UNKNOWN = np.iinfo(np.int64).max // 4  # a type the bound cannot size: measure the row exactly
_SCALAR_BOUND = (  # longest JSON text of a value of these types (quotes included)
    (pt.is_boolean, 5),
    (pt.is_integer, 21),
    (pt.is_floating, 32),
    (pt.is_date, 14),
    (pt.is_time, 20),
    (pt.is_timestamp, 40),
    (pt.is_null, NULL),
)


def key_bound(name: str) -> int:
    """A key with its quotes, colon and the comma after it."""
    return ESCAPE * len(name) + 4


def row_bound(table: pa.Table, columns: list[str]) -> np.ndarray:
    """Per row, at least the JSON length of ``columns`` written as one object."""
    total = np.full(table.num_rows, 2, dtype=np.int64)
    for name in columns:
        total = np.minimum(total + key_bound(name) + value_bound(table[name]), UNKNOWN)
    return total


def value_bound(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per value, at least the length of its JSON text."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return _bound(values)


def _bound(arr: pa.Array) -> np.ndarray:
    dtype = arr.type
    if pt.is_dictionary(dtype):
        return _bound(arr.dictionary_decode())
    if pt.is_string(dtype) or pt.is_large_string(dtype) or pt.is_binary(dtype):
        lengths = pc.fill_null(pc.binary_length(arr), 0).to_numpy(zero_copy_only=False)
        return _nulls(arr, ESCAPE * lengths.astype(np.int64) + 2)
    if pt.is_decimal(dtype):
        return _nulls(arr, np.full(len(arr), dtype.precision + 3, dtype=np.int64))
    for is_kind, size in _SCALAR_BOUND:
        if is_kind(dtype):
            return _nulls(arr, np.full(len(arr), size, dtype=np.int64))
    if pt.is_map(dtype):
        entry = pa.struct(
            [pa.field("key", dtype.key_type, nullable=False), pa.field("value", dtype.item_type)]
        )
        return _bound(arr.cast(pa.list_(entry)))
    if pt.is_list(dtype) or pt.is_large_list(dtype) or pt.is_fixed_size_list(dtype):
        items = _bound(arr.flatten()) + 1  # each item and its comma
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        sums = np.bincount(parents, weights=items, minlength=len(arr))  # float: no overflow
        return _nulls(arr, np.minimum(sums + 2, UNKNOWN).astype(np.int64))
    if pt.is_struct(dtype):
        total = np.full(len(arr), 2, dtype=np.int64)
        for i, child in enumerate(arr.flatten()):
            field_size = key_bound(dtype.field(i).name) + _bound(child)
            total = np.minimum(total + field_size, UNKNOWN)
        return _nulls(arr, total)
    return np.full(len(arr), UNKNOWN, dtype=np.int64)


def _nulls(arr: pa.Array, sizes: np.ndarray) -> np.ndarray:
    """``sizes``, with at least the room of ``null`` where the value is null."""
    if arr.null_count:
        sizes = np.where(arr.is_null().to_numpy(zero_copy_only=False), NULL, sizes)
    return np.maximum(sizes, NULL)

"""Which kind of value each mapped column holds, and so how it is normalised and validated.

A kind comes from, in order: the ``type`` the user gave in the mapping, the destination's
standard field (Klaviyo's ``email`` is an email), then the column's Arrow type.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.types as pt


def kind_of_arrow(dtype: pa.DataType) -> str:
    if pt.is_timestamp(dtype):
        return "datetime"
    if pt.is_date(dtype):
        return "date"
    if pt.is_boolean(dtype):
        return "boolean"
    if pt.is_integer(dtype):
        return "integer"
    if pt.is_floating(dtype) or pt.is_decimal(dtype):
        return "number"
    if pt.is_list(dtype) or pt.is_large_list(dtype) or pt.is_struct(dtype) or pt.is_map(dtype):
        return "json"
    return "string"


# Arrow types a kind can be read from; anything else is a schema mismatch caught before sending.
def compatible(kind: str, dtype: pa.DataType) -> bool:
    if pt.is_string(dtype) or pt.is_large_string(dtype) or pt.is_null(dtype):
        return kind != "json"
    if kind in {"string", "email", "phone", "consent"}:
        return not (pt.is_list(dtype) or pt.is_struct(dtype) or pt.is_map(dtype))
    if kind == "datetime":
        return pt.is_timestamp(dtype) or pt.is_date(dtype)
    if kind == "date":
        return pt.is_timestamp(dtype) or pt.is_date(dtype)
    if kind in {"integer", "number"}:
        return pt.is_integer(dtype) or pt.is_floating(dtype) or pt.is_decimal(dtype)
    if kind == "boolean":
        return pt.is_boolean(dtype) or pt.is_integer(dtype)
    return kind == "json"

"""Insight data rules, checked before sending, and the SQL that applies them to a whole batch.

What the v3 insight data spec publishes, and how it is enforced here:

* Collection names: ``^[-A-Za-z_][-A-Za-z0-9_]{1,255}$`` and at most 255 characters
  (``collectionName``) — checked when the project file is loaded.
* Record keys (``key``) are strings; the sync's identifier, so one record a row.
* A record's ``json`` is an object. Its key names: the spec lists ``JsonKeyTooLong`` and
  ``JsonKeyInvalidCharacters`` as failure reasons without the rule; the one naming rule it
  does publish is the collection name's, so keys are held to the same characters (letters,
  digits, ``_``, ``-``, not starting with a digit) and length (255). The v2 reasons add
  ``JsonContainsDashUnderscoreClash``: ``a-b`` and ``a_b`` side by side are refused.
* ``JsonContainsNestedArray``: an array may hold objects or scalars but never directly another
  array (``[[1, 2]]``); arrays of objects that hold arrays are fine.
* No nesting depth, value length or number size is published; the API's verdict on those
  comes back per record and becomes a row error (``destination_rejected``).

Key names fixed by the mapping are checked at config time. Names inside nested columns are
known from the batch's Arrow schema (struct fields) or only per row (map keys), so they and
nested arrays are checked by one DuckDB expression per column over the batch, and only the
offending rows become row errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.types as pt

from reverse_etl.sql import literal

COLLECTION_RE = re.compile(r"^[-A-Za-z_][-A-Za-z0-9_]{1,255}$")
KEY_PATTERN = r"[-A-Za-z_][-A-Za-z0-9_]{0,254}"
KEY_RE = re.compile(f"^{KEY_PATTERN}$")
KEY_RULE = "letters, digits, _ and - (not starting with a digit), at most 255 characters"


def collection_problem(name: object) -> str | None:
    if not isinstance(name, str) or not COLLECTION_RE.match(name) or len(name) > 255:
        return (
            f"collection name {name!r} does not fit Dotdigital's pattern: 2-255 letters, digits, "
            f"_ or -, not starting with a digit; try {propose_key(str(name), minimum=2)!r}"
        )
    return None


def propose_key(name: str, *, minimum: int = 1) -> str:
    """A valid key for ``name``: ``Unit Price`` → ``Unit_Price``, ``2nd`` → ``_2nd``."""
    key = re.sub(r"[^-A-Za-z0-9_]+", "_", name).strip("_") or "field"
    if key[0].isdigit():
        key = "_" + key
    return key[:255].ljust(minimum, "_")


def key_problem(name: str) -> str | None:
    if KEY_RE.match(name):
        return None
    return f"{name!r} is not an insight data key ({KEY_RULE}); try {propose_key(name)!r}"


def clashes(names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of sibling keys that differ only by ``-`` against ``_``."""
    seen: dict[str, str] = {}
    out = []
    for name in names:
        folded = name.replace("-", "_")
        if folded in seen:
            out.append((seen[folded], name))
        else:
            seen[folded] = name
    return out


def bad_struct_keys(dtype: pa.DataType, path: str = "") -> list[str]:
    """Where the type holds object keys the API refuses, as readable paths (for messages)."""
    out: list[str] = []
    if pt.is_struct(dtype):
        names = [dtype.field(i).name for i in range(dtype.num_fields)]
        out += [f"{path}.{n}" if path else n for n in names if not KEY_RE.match(n)]
        out += [f"{path}: {a!r} and {b!r} clash" for a, b in clashes(names)]
        for i in range(dtype.num_fields):
            f = dtype.field(i)
            out += bad_struct_keys(f.type, f"{path}.{f.name}" if path else f.name)
    elif _is_list(dtype):
        out += bad_struct_keys(dtype.value_type, f"{path}[]")
    elif pt.is_map(dtype):
        out += bad_struct_keys(dtype.item_type, f"{path}{{}}")
    return out


# --------------------------------------------------------------------------- SQL over a batch


def _is_list(dtype: pa.DataType) -> bool:
    return pt.is_list(dtype) or pt.is_large_list(dtype) or pt.is_fixed_size_list(dtype)


def _field(expr: str, name: str) -> str:
    return f"struct_extract({expr}, {literal(name)})"


def _any(expr: str, element: str, depth: int) -> str:
    """TRUE when ``element`` (a predicate over ``x{depth}``) holds for an item of list ``expr``."""
    return f"COALESCE(list_bool_or(list_transform({expr}, lambda x{depth}: {element})), FALSE)"


def nested_array_sql(expr: str, dtype: pa.DataType, depth: int = 0) -> str | None:
    """SQL that is TRUE for a value holding an array directly inside an array; None when the
    type cannot hold one."""
    var = f"x{depth}"
    if _is_list(dtype):
        if _is_list(dtype.value_type):
            return _any(expr, f"{var} IS NOT NULL", depth)
        inner = nested_array_sql(var, dtype.value_type, depth + 1)
        return None if inner is None else _any(expr, inner, depth)
    if pt.is_struct(dtype):
        parts = [
            nested_array_sql(_field(expr, dtype.field(i).name), dtype.field(i).type, depth)
            for i in range(dtype.num_fields)
        ]
        found = [p for p in parts if p is not None]
        return None if not found else "(" + " OR ".join(found) + ")"
    if pt.is_map(dtype):
        inner = nested_array_sql(var, dtype.item_type, depth + 1)
        return None if inner is None else _any(f"map_values({expr})", inner, depth)
    return None


def bad_key_sql(expr: str, dtype: pa.DataType, depth: int = 0) -> str | None:
    """SQL that is TRUE for a value holding an object key the API refuses; None when the type
    cannot hold one. Struct field names are known up front (any non-null value fails); map
    keys are checked row by row."""
    var = f"x{depth}"
    if pt.is_struct(dtype):
        names = [dtype.field(i).name for i in range(dtype.num_fields)]
        if clashes(names) or not all(KEY_RE.match(n) for n in names):
            return f"({expr} IS NOT NULL)"
        parts = [
            bad_key_sql(_field(expr, n), dtype.field(i).type, depth) for i, n in enumerate(names)
        ]
        found = [p for p in parts if p is not None]
        return None if not found else "(" + " OR ".join(found) + ")"
    if _is_list(dtype):
        inner = bad_key_sql(var, dtype.value_type, depth + 1)
        return None if inner is None else _any(expr, inner, depth)
    if pt.is_map(dtype):
        keys = f"map_keys({expr})"
        own = (
            f"({_any(keys, f'NOT regexp_full_match(CAST({var} AS VARCHAR), {literal(KEY_PATTERN)})', depth)} "
            f"OR COALESCE(len(list_distinct(list_transform({keys}, lambda {var}: "
            f"replace(CAST({var} AS VARCHAR), '-', '_')))) < len({keys}), FALSE))"
        )
        inner = bad_key_sql(var, dtype.item_type, depth + 1)
        return own if inner is None else f"({own} OR {_any(f'map_values({expr})', inner, depth)})"
    return None


def _needs_rewrite(dtype: pa.DataType) -> bool:
    if pt.is_timestamp(dtype) or pt.is_date(dtype) or pt.is_time(dtype):
        return True
    if _is_list(dtype):
        return _needs_rewrite(dtype.value_type)
    if pt.is_struct(dtype):
        return any(_needs_rewrite(dtype.field(i).type) for i in range(dtype.num_fields))
    if pt.is_map(dtype):
        return _needs_rewrite(dtype.item_type)
    return False


def json_value_sql(expr: str, dtype: pa.DataType, depth: int = 0) -> str:
    """``expr`` rewritten so its JSON is what the API reads: timestamps as ISO 8601 (UTC with
    ``Z`` when the column has a zone), dates as ``YYYY-MM-DD``, decimals as exact numbers, at
    any depth. Values that need nothing are passed through untouched."""
    if not _needs_rewrite(dtype):
        return expr
    var = f"x{depth}"
    if pt.is_timestamp(dtype):
        if dtype.tz is None:
            return f"strftime({expr}, '%Y-%m-%dT%H:%M:%S')"
        return f"strftime(CAST({expr} AS TIMESTAMPTZ) AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ')"
    if pt.is_date(dtype) or pt.is_time(dtype):
        return f"CAST({expr} AS VARCHAR)"
    if _is_list(dtype):
        return f"list_transform({expr}, lambda {var}: {json_value_sql(var, dtype.value_type, depth + 1)})"
    if pt.is_struct(dtype):
        return struct_sql(
            expr,
            {dtype.field(i).name: dtype.field(i).name for i in range(dtype.num_fields)},
            dtype,
            depth,
        )
    # a map whose values need rewriting
    value = json_value_sql(_field(var, "value"), dtype.item_type, depth + 1)
    entry = f"{{'key': {_field(var, 'key')}, 'value': {value}}}"
    return f"map_from_entries(list_transform(map_entries({expr}), lambda {var}: {entry}))"


def struct_sql(expr: str, keys: dict[str, str], dtype: pa.StructType, depth: int = 0) -> str:
    """A struct with ``keys`` (output key → field of ``expr``), each value JSON-ready; NULL when
    ``expr`` is."""
    parts = []
    for key, name in keys.items():
        value = json_value_sql(_field(expr, name), dtype.field(name).type, depth)
        parts.append(f"{literal(key)}: {value}")
    return f"CASE WHEN {expr} IS NULL THEN NULL ELSE {{{', '.join(parts)}}} END"

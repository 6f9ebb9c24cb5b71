"""SQL expressions (DuckDB) that normalise and check one column of a whole batch at once.

Each kind yields a pair: the normalised value and an error code (NULL when the value is
fine). Codes ending in ``?`` mark values the fast vectorised rule could not accept, which the
slow path (email-validator, phonenumbers) then decides one by one: only failing rows pay for
per-row Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.types as pt

from reverse_etl.sql import ident as q
from reverse_etl.sql import literal as lit

# A conservative ASCII address; anything else (IDN, quoted local parts) goes to email-validator.
EMAIL_RE = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*@([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}"
E164_RE = r"\+[1-9][0-9]{6,14}"


def region_table(regions: dict[str, tuple[str, str]]) -> pa.Table:
    """Region → calling code and trunk prefix, joined once per batch to read national numbers."""
    return pa.table(
        {
            "region": list(regions),
            "cc": [v[0] for v in regions.values()],
            "np": [v[1] for v in regions.values()],
        }
    )


@dataclass(frozen=True)
class Checks:
    """Run-wide bounds, rendered into the SQL as literals."""

    naive_timezone: str
    min_timestamp: str  # ISO, e.g. 1990-01-01T00:00:00Z
    max_timestamp: str  # now + skew, ISO


def _holds_floats(dtype: pa.DataType) -> bool:
    if pt.is_floating(dtype):
        return True
    if pt.is_list(dtype) or pt.is_large_list(dtype) or pt.is_fixed_size_list(dtype):
        return _holds_floats(dtype.value_type)
    if pt.is_struct(dtype):
        return any(_holds_floats(dtype.field(i).type) for i in range(dtype.num_fields))
    if pt.is_map(dtype):
        return _holds_floats(dtype.key_type) or _holds_floats(dtype.item_type)
    return False


def _blank_to_null(col: str, dtype: pa.DataType) -> str:
    if pt.is_string(dtype) or pt.is_large_string(dtype):
        return f"NULLIF(TRIM({col}), '')"
    return col


# A JSON number is read as a binary double by the receiving APIs: more significant digits than
# this are not kept exactly, so text holding more is refused rather than rounded.
MAX_EXACT_DIGITS = 15


def _number(kind: str, col: str, src: str, dtype: pa.DataType) -> tuple[str, str]:
    """Numbers are sent exactly or refused, never rounded: integer and DECIMAL columns keep
    their type (DuckDB's ``to_json`` writes HUGEINT, UBIGINT and DECIMAL(38,x) digit for digit);
    NaN and ±Infinity, which JSON cannot carry, are ``invalid_number``; a fraction where an
    integer is wanted is ``invalid_number``, not a rounded value; text with more significant
    digits than a double keeps is ``number_out_of_range``."""
    if pt.is_integer(dtype):
        return col, "NULL"
    if pt.is_decimal(dtype):
        if kind == "number" or dtype.scale == 0:
            return col, "NULL"
        v = f"CASE WHEN {col} = trunc({col}) THEN CAST({col} AS DECIMAL(38, 0)) END"
        return v, f"CASE WHEN {col} IS NOT NULL AND {v} IS NULL THEN 'invalid_number' END"
    if pt.is_floating(dtype):
        # REAL widened to DOUBLE would read 1.1 as 1.100000023841858: go through its shortest text.
        x = f"CAST(CAST({col} AS VARCHAR) AS DOUBLE)" if pt.is_float32(dtype) else col
        if kind == "number":
            v = f"CASE WHEN isfinite({x}) THEN {x} END"
        else:
            v = (
                f"CASE WHEN isfinite({x}) AND {x} = trunc({x}) AND abs({x}) < 9.2e18 "
                f"THEN CAST({x} AS BIGINT) END"
            )
        return v, f"CASE WHEN {col} IS NOT NULL AND {v} IS NULL THEN 'invalid_number' END"
    t = f"TRIM(CAST({src} AS VARCHAR))"
    if kind == "integer":
        whole = f"regexp_full_match({t}, '[+-]?[0-9]+([.]0*)?')"
        v = f"CASE WHEN {whole} THEN TRY_CAST(regexp_replace({t}, '[.]0*$', '') AS BIGINT) END"
        err = (
            f"CASE WHEN {src} IS NULL THEN NULL WHEN {v} IS NOT NULL THEN NULL "
            f"WHEN {whole} THEN 'number_out_of_range' ELSE 'invalid_number' END"
        )
        return v, err
    parsed = f"TRY_CAST({t} AS DOUBLE)"
    mantissa = f"regexp_replace({t}, '[eE].*$', '')"
    digits = f"length(trim(regexp_replace({mantissa}, '[^0-9]', '', 'g'), '0'))"
    v = f"CASE WHEN isfinite({parsed}) AND {digits} <= {MAX_EXACT_DIGITS} THEN {parsed} END"
    err = (
        f"CASE WHEN {src} IS NULL THEN NULL WHEN {v} IS NOT NULL THEN NULL "
        f"WHEN isfinite({parsed}) THEN 'number_out_of_range' ELSE 'invalid_number' END"
    )
    return v, err


def instant(col: str, dtype: pa.DataType, naive_timezone: str) -> str:
    """A TIMESTAMP, TIMESTAMPTZ or DATE column as a TIMESTAMPTZ; naive values are read in
    ``naive_timezone``."""
    if pt.is_timestamp(dtype) and dtype.tz is not None:
        return f"CAST({col} AS TIMESTAMPTZ)"
    return f"timezone({lit(naive_timezone)}, CAST({col} AS TIMESTAMP))"


def value_and_error(kind: str, column: str, dtype: pa.DataType, checks: Checks) -> tuple[str, str]:
    """Phone rules read ``b.__cc`` / ``b.__np``: the row's region's calling code and trunk
    prefix, joined in by the transformer."""
    col = f"b.{q(column)}"
    is_text = pt.is_string(dtype) or pt.is_large_string(dtype) or pt.is_null(dtype)
    src = _blank_to_null(col, dtype)
    if kind == "email":
        v = f"LOWER(CAST({src} AS VARCHAR))"
        return (
            v,
            # the pattern has no overall length: a longer address than 254 characters (RFC
            # 5321) goes to email-validator too, which refuses it in its own words
            f"CASE WHEN {v} IS NOT NULL AND (NOT regexp_full_match({v}, {lit(EMAIL_RE)}) "
            f"OR length({v}) > 254) THEN 'email?' END",
        )
    if kind == "phone":
        cleaned = f"regexp_replace(CAST({src} AS VARCHAR), '[\\s().\\-/]', '', 'g')"
        international = (
            f"(CASE WHEN starts_with({cleaned}, '00') THEN '+' || substr({cleaned}, 3) "
            f"WHEN starts_with({cleaned}, '+') THEN {cleaned} END)"
        )
        national = (
            f"(CASE WHEN b.__cc IS NOT NULL AND regexp_full_match({cleaned}, '[0-9]+') THEN "
            f"'+' || b.__cc || CASE WHEN b.__np <> '' AND starts_with({cleaned}, b.__np) "
            f"THEN substr({cleaned}, length(b.__np) + 1) ELSE {cleaned} END END)"
        )
        v = f"COALESCE({international}, {national})"
        return v, (
            f"CASE WHEN {src} IS NOT NULL AND NOT COALESCE(regexp_full_match({v}, "
            f"{lit(E164_RE)}), FALSE) THEN 'phone?' END"
        )
    if kind == "consent":  # words are mapped in Arrow (transformer._consent)
        if pt.is_boolean(dtype):
            return (
                # "false" is an ambiguous no: what it means is the column's no_means
                f"CASE WHEN {col} THEN 'subscribed' WHEN NOT {col} THEN 'false' END",
                "NULL",
            )
        return f"CAST({col} AS VARCHAR)", "NULL"
    if kind == "datetime":
        if pt.is_timestamp(dtype) or pt.is_date(dtype):
            v = instant(col, dtype, checks.naive_timezone)
        else:
            s = f"CAST({src} AS VARCHAR)"
            v = (
                f"(CASE WHEN regexp_matches({s}, '[0-9]:[0-9]{{2}}(:[0-9]{{2}}([.,][0-9]+)?)?\\s*(Z|z|[+-][0-9]{{2}}(:?[0-9]{{2}})?)$') "
                f"THEN TRY_CAST(UPPER({s}) AS TIMESTAMPTZ) "
                f"ELSE timezone({lit(checks.naive_timezone)}, TRY_CAST({s} AS TIMESTAMP)) END)"
            )
        err = (
            f"CASE WHEN {src} IS NULL THEN NULL WHEN {v} IS NULL THEN 'invalid_timestamp' "
            f"WHEN {v} < TIMESTAMPTZ {lit(checks.min_timestamp)} THEN 'timestamp_too_old' "
            f"WHEN {v} > TIMESTAMPTZ {lit(checks.max_timestamp)} THEN 'timestamp_in_future' END"
        )
        return v, err
    if kind == "date":
        if pt.is_date(dtype) or pt.is_timestamp(dtype):
            v = f"CAST({col} AS DATE)"
        else:
            s = f"CAST({src} AS VARCHAR)"
            v = f"COALESCE(TRY_CAST({s} AS DATE), CAST(TRY_CAST({s} AS TIMESTAMP) AS DATE))"
        # DuckDB takes 'infinity' and years 0 or 10000+ as dates, which no destination (nor
        # Python) reads as one: they were sent as the text "infinity" or "10000-01-01"
        return v, (
            f"CASE WHEN {src} IS NOT NULL AND ({v} IS NULL OR NOT isfinite({v}) OR "
            f"year({v}) NOT BETWEEN 1 AND 9999) THEN 'invalid_date' END"
        )
    if kind in {"integer", "number"}:
        return _number(kind, col, src, dtype)
    if kind == "boolean":
        if pt.is_boolean(dtype):
            return col, "NULL"
        if pt.is_integer(dtype):
            return f"({col} <> 0)", "NULL"
        w = f"LOWER(CAST({src} AS VARCHAR))"
        v = (
            f"CASE WHEN {w} IN ('true','t','yes','y','1') THEN TRUE "
            f"WHEN {w} IN ('false','f','no','n','0') THEN FALSE END"
        )
        return v, f"CASE WHEN {w} IS NOT NULL AND ({v}) IS NULL THEN 'invalid_boolean' END"
    if kind == "json":
        if not _holds_floats(dtype):
            return col, "NULL"
        # JSON has no NaN or Infinity; DuckDB's to_json writes them bare. Rows whose text shows
        # one (or a string that looks like one) are decided exactly by the slow path.
        return col, (
            f"CASE WHEN regexp_matches(CAST(to_json({col}) AS VARCHAR), "
            f"'(^|[\\[,:])-?(NaN|Infinity)([,\\]}}]|$)') THEN 'json?' END"
        )
    # string
    if is_text:
        return src, "NULL"
    return f"CAST({col} AS VARCHAR)", "NULL"

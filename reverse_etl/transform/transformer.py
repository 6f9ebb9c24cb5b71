"""Turn one warehouse batch into destination-ready columns plus row errors.

The whole batch goes through one generated DuckDB query (normalise and check every mapped
column at once); only rows flagged there touch Python. The output table has one column per
destination field (named as the field), ``__row`` (1-based position in the run) and ``__id``
(the normalised identifier), and holds only rows that passed every check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.extract import DUP_RANK
from reverse_etl.transform.consent import AMBIGUOUS_NO, WORDS
from reverse_etl.transform.kinds import compatible, kind_of_arrow
from reverse_etl.transform.rowerrors import RowError, cell_text
from reverse_etl.transform.slowpath import PossibleLength, check_email, check_phone, region_codes
from reverse_etl.transform.sqlgen import (
    Checks,
    instant,
    lit,
    q,
    region_table,
    value_and_error,
)
from reverse_etl.util import scratch
from reverse_etl.util.scratch import registered

MIN_TIMESTAMP = "1990-01-01T00:00:00Z"


def _arrow(result: duckdb.DuckDBPyConnection) -> pa.Table:
    # execute() binds a prepared statement without the relation layer: faster per batch here
    # than con.sql(), whose note about an extra copy does not outweigh that.
    return result.to_arrow_table()


MESSAGES = {
    "missing_identifier": "the identifier column is empty",
    "duplicate_identifier": "another row with this identifier has a later cursor value; that row was sent instead",
    "missing_cursor": "the cursor column is empty",
    "invalid_cursor": "the cursor value is not a timestamp that can be read",
    "cursor_in_future": "the cursor value lies in the future (beyond now + max_future_skew_minutes); the row is held back and the watermark does not pass it",
    "invalid_email": "not a valid email address",
    "invalid_phone": "not a valid phone number",
    "invalid_consent": "not a recognised consent value",
    "invalid_timestamp": "not a timestamp that can be read",
    "timestamp_too_old": "before 1990-01-01",
    "timestamp_in_future": "in the future",
    "invalid_date": "not a date that can be read (years 0001 to 9999)",
    "invalid_number": "not a number (NaN and Infinity included), or not a whole number where an integer is needed",
    "number_out_of_range": "more digits than the destination keeps exactly (15 significant digits, or beyond 64-bit for integers)",
    "invalid_boolean": "not a true/false value",
}


@dataclass(frozen=True)
class FieldSpec:
    """One mapped column: where it goes and what kind of value it must be."""

    column: str
    field: str
    kind: str | None = None  # None: inferred from the column's Arrow type


@dataclass(frozen=True)
class TransformSpec:
    sync: str
    identifier: str  # source column
    cursor: str  # source column
    fields: tuple[FieldSpec, ...]
    default_phone_region: str | None = None
    phone_region_column: str | None = None  # per-row ISO country for national phone numbers
    strict_phones: bool = False  # validate every number with phonenumbers, not the fast rule
    naive_timezone: str = "UTC"
    max_future_skew: timedelta = timedelta(minutes=10)
    # A column holding the cursor as the user wrote it (CSV files), so a value that could not
    # be read is reported as itself (``invalid_cursor``) rather than as an empty cursor.
    cursor_text: str | None = None
    # consent fields (consent.email, ...) whose ambiguous "no" means no change (no_means:
    # not_subscribed): the word becomes NULL, the destination's consent is left as it is
    no_change_on_no: frozenset[str] = frozenset()

    def identifier_field(self) -> FieldSpec:
        for f in self.fields:
            if f.column == self.identifier:
                return f
        raise KeyError(self.identifier)


@dataclass
class TransformResult:
    good: pa.Table
    errors: list[RowError] = field(default_factory=list)
    rejected: int = 0
    # positions in the batch of rows whose cursor lies in the future: the watermark skips them
    future: frozenset[int] = frozenset()


def schema_problems(spec: TransformSpec, schema: pa.Schema) -> list[str]:
    """Mapped columns missing from the view, or of a type their field cannot take."""
    problems = []
    names = set(schema.names)
    for col in {spec.identifier, spec.cursor} | {f.column for f in spec.fields}:
        if col not in names:
            close = [n for n in schema.names if n.lower() == col.lower()]
            hint = f" (the view has {close[0]!r}: names are case-sensitive)" if close else ""
            problems.append(
                f"column {col!r} is not in the view{hint}; the view's columns are: "
                + ", ".join(schema.names)
            )
    for f in spec.fields:
        if f.column in names and f.kind:
            dtype = schema.field(f.column).type
            if not compatible(f.kind, dtype):
                problems.append(
                    f"column {f.column!r} is {dtype} in the view but field {f.field!r} needs a "
                    f"{f.kind}; cast it in the view's SQL or change the mapping's type"
                )
    return problems


class Transformer:
    """Compiles the batch query once for a schema; ``transform`` runs it on each batch."""

    def __init__(self, spec: TransformSpec, schema: pa.Schema, *, now: datetime | None = None):
        missing = schema_problems(spec, schema)
        if spec.phone_region_column and spec.phone_region_column not in schema.names:
            missing.append(f"phone_region_column {spec.phone_region_column!r} is not in the view")
        if missing:
            raise ValueError("; ".join(missing))
        self.spec = spec
        self.fields = spec.fields
        self.id_field = spec.identifier_field().field
        self.kinds = {
            f.column: f.kind or kind_of_arrow(schema.field(f.column).type) for f in spec.fields
        }
        checks = cursor_checks(spec, now)
        self._possible = PossibleLength()
        self.con = scratch.cursor()
        self.con.register("__phone_region", region_table(region_codes()))
        self._errs = [(f"__e{i}", f.column) for i, f in enumerate(spec.fields)]
        self.row_err_cols = ["__e_id", "__e_cursor", "__e_dup"]
        selects = ["b.__row AS __row", "b.__pos AS __pos"]
        for (ecol, column), f in zip(self._errs, spec.fields, strict=True):
            value, err = value_and_error(
                self.kinds[column], column, schema.field(column).type, checks
            )
            selects += [f"{value} AS {q(f.field)}", f"{err} AS {ecol}"]
        selects.append(f"{self._cursor_check(schema, checks)} AS __e_cursor")
        dup = (
            f"CASE WHEN b.{q(DUP_RANK)} > 1 THEN 'duplicate_identifier' END"
            if DUP_RANK in schema.names
            else "CAST(NULL AS VARCHAR)"
        )
        rows = "SELECT * FROM batch"
        if "phone" in self.kinds.values():
            rows = (
                "SELECT b0.*, pr.cc AS __cc, pr.np AS __np FROM batch AS b0 "
                f"LEFT JOIN __phone_region AS pr ON pr.region = {self._region_sql()}"
            )
        idf = q(self.id_field)

        self.sql = (
            f"SELECT t.*, t.{idf} AS __id, CASE WHEN t.{idf} IS NULL THEN 'missing_identifier' "
            f"END AS __e_id FROM (SELECT {', '.join(selects)}, {dup} AS __e_dup "
            f"FROM ({rows}) AS b) AS t"
        )

    def _cursor_check(self, schema: pa.Schema, checks: Checks) -> str:
        """SQL for the cursor's error: empty, unreadable (CSV text), or in the future. A future
        cursor would carry the watermark past every change made until then."""
        cursor = f"b.{q(self.spec.cursor)}"
        dtype = schema.field(self.spec.cursor).type
        missing = "'missing_cursor'"
        if self.spec.cursor_text and self.spec.cursor_text in schema.names:
            text = f"NULLIF(TRIM(b.{q(self.spec.cursor_text)}), '')"
            missing = f"CASE WHEN {text} IS NULL THEN 'missing_cursor' ELSE 'invalid_cursor' END"
        future = future_cursor_sql(cursor, dtype, checks)
        return (
            f"CASE WHEN {cursor} IS NULL THEN {missing} WHEN {future} THEN 'cursor_in_future' END"
        )

    def _region_sql(self) -> str:
        """SQL for each row's ISO region, used to read national phone numbers."""
        default = (
            lit(self.spec.default_phone_region.upper())
            if self.spec.default_phone_region
            else "NULL"
        )
        if not self.spec.phone_region_column:
            return default
        return f"COALESCE(UPPER(TRIM(CAST(b0.{q(self.spec.phone_region_column)} AS VARCHAR))), {default})"

    def transform(self, batch: pa.RecordBatch, first_row: int = 1) -> TransformResult:
        if "__row" not in batch.schema.names:  # a CSV brings its own line numbers
            rows = pa.array(np.arange(first_row, first_row + batch.num_rows, dtype=np.int64))
            batch = batch.append_column("__row", rows)
        batch = batch.append_column("__pos", pa.array(np.arange(batch.num_rows, dtype=np.int64)))
        with registered(self.con, "batch", batch):
            out = _arrow(self.con.execute(self.sql))
        details: dict[tuple[int, str], str] = {}
        for (ecol, column), f in zip(self._errs, self.fields, strict=True):
            kind = self.kinds[column]
            if kind == "consent":
                out = self._consent(out, f.field, ecol)
            elif kind == "phone":
                out = self._flag_impossible_phones(out, f.field, ecol)
            if kind in {"email", "phone"}:
                out = self._slow_path(out, batch, f, ecol, column, kind, details)
            elif kind == "json":
                out = self._non_finite(out, f.field, ecol, column, details)
        future = pc.fill_null(pc.equal(out["__e_cursor"], "cursor_in_future"), False)
        future_positions = (
            frozenset(out["__pos"].filter(future).to_pylist())
            if pc.any(future).as_py()
            else frozenset()
        )
        bad_mask = pc.is_valid(out["__e_id"])
        for c in [c for c, _ in self._errs] + ["__e_cursor", "__e_dup"]:
            bad_mask = pc.or_(bad_mask, pc.is_valid(out[c]))
        errors: list[RowError] = []
        rejected = 0
        if pc.any(bad_mask).as_py():
            bad = out.filter(bad_mask)
            rejected = bad.num_rows
            errors = self._row_errors(bad, batch, details)
            out = out.filter(pc.invert(bad_mask))
        keep = ["__row", "__id"] + [f.field for f in self.fields]
        return TransformResult(
            good=out.select(keep), errors=errors, rejected=rejected, future=future_positions
        )

    # ------------------------------------------------------------------ vectorised steps

    @staticmethod
    def _set(out: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
        return out.set_column(out.schema.get_field_index(name), name, values)

    def _consent(self, out: pa.Table, field_name: str, ecol: str) -> pa.Table:
        """Consent words to canonical values (Arrow: trims every kind of whitespace, as
        ``consent.canonical`` does); a non-empty unknown word is ``invalid_consent``."""
        raw = out[field_name]
        if not pa.types.is_string(raw.type):
            return out  # booleans were mapped in SQL
        words = pc.utf8_lower(pc.utf8_trim_whitespace(raw))
        words = pc.if_else(pc.equal(words, ""), pa.scalar(None, pa.string()), words)
        idx = pc.index_in(words, value_set=_CONSENT_WORDS)
        canonical = pc.take(_CONSENT_VALUES, idx)
        if field_name in self.spec.no_change_on_no:  # a box never ticked: leave it as it is
            ambiguous = pc.fill_null(pc.is_in(words, value_set=_AMBIGUOUS_NO), False)
            canonical = pc.if_else(ambiguous, pa.scalar(None, pa.string()), canonical)
        invalid = pc.and_(pc.is_valid(words), pc.is_null(idx))
        out = self._set(out, field_name, canonical)
        return self._set(out, ecol, pc.if_else(invalid, pa.scalar("invalid_consent"), out[ecol]))

    def _flag_impossible_phones(self, out: pa.Table, field_name: str, ecol: str) -> pa.Table:
        """E.164-shaped numbers of impossible length for their calling code go to phonenumbers."""
        shaped = pc.and_(pc.is_null(out[ecol]), pc.is_valid(out[field_name]))
        if self.spec.strict_phones:
            return self._set(out, ecol, pc.if_else(shaped, pa.scalar("phone?"), out[ecol]))
        impossible = pc.fill_null(
            pc.and_(shaped, pc.invert(self._possible(out[field_name]))), False
        )
        return self._set(out, ecol, pc.if_else(impossible, pa.scalar("phone?"), out[ecol]))

    def _slow_path(
        self,
        out: pa.Table,
        batch: pa.RecordBatch,
        f: FieldSpec,
        ecol: str,
        column: str,
        kind: str,
        details: dict[tuple[int, str], str],
    ) -> pa.Table:
        """Decide ``email?`` / ``phone?`` values one by one; patch rescued values back in."""
        suspect = pc.fill_null(pc.equal(out[ecol], f"{kind}?"), False)
        if not pc.any(suspect).as_py():
            return out
        idx = pc.indices_nonzero(suspect)
        positions = out["__pos"].take(idx)
        raw = batch.column(column).take(positions).to_pylist()
        row_numbers = out["__row"].take(idx).to_pylist()
        regions = self._regions(batch, positions, len(raw))
        fixed_values: list[str | None] = []
        codes: list[str | None] = []
        for value, rown, region in zip(raw, row_numbers, regions, strict=True):
            text = str(value).strip()
            fixed, why = check_email(text) if kind == "email" else check_phone(text, region)
            fixed_values.append(fixed)
            codes.append(None if fixed else f"invalid_{kind}")
            if why:
                details[(rown, column)] = why
        values = _scatter(out[f.field], idx, pa.array(fixed_values, pa.string()))
        out = self._set(out, f.field, values)
        out = self._set(out, ecol, _scatter(out[ecol], idx, pa.array(codes, pa.string())))
        if f.field == self.id_field:
            out = self._set(out, "__id", values)
            missing = pc.if_else(
                pc.is_null(values), pa.scalar("missing_identifier"), pa.scalar(None, pa.string())
            )
            out = self._set(out, "__e_id", missing)
        return out

    def _non_finite(
        self, out: pa.Table, field_name: str, ecol: str, column: str, details: dict
    ) -> pa.Table:
        """Nested values the SQL flagged: ``invalid_number`` where a NaN or Infinity really is
        inside (JSON cannot carry it), else fine (a string that only looked like one)."""
        suspect = pc.fill_null(pc.equal(out[ecol], "json?"), False)
        if not pc.any(suspect).as_py():
            return out
        idx = pc.indices_nonzero(suspect)
        codes: list[str | None] = []
        for value, rown in zip(
            out[field_name].take(idx).to_pylist(), out["__row"].take(idx).to_pylist(), strict=True
        ):
            bad = _first_non_finite(value)
            codes.append(None if bad is None else "invalid_number")
            if bad is not None:
                details[(rown, column)] = f"holds {bad}, which JSON cannot carry"
        return self._set(out, ecol, _scatter(out[ecol], idx, pa.array(codes, pa.string())))

    def _regions(self, batch: pa.RecordBatch, positions: pa.Array, n: int) -> list[str | None]:
        default = self.spec.default_phone_region
        if not self.spec.phone_region_column:
            return [default] * n
        values = batch.column(self.spec.phone_region_column).take(positions).to_pylist()
        return [
            v.strip().upper() if isinstance(v, str) and len(v.strip()) == 2 else default
            for v in values
        ]

    # ------------------------------------------------------------------ per bad row

    def _row_errors(
        self, bad: pa.Table, batch: pa.RecordBatch, details: dict[tuple[int, str], str]
    ) -> list[RowError]:
        raw_ids = batch.column(self.spec.identifier)
        cursor = batch.column(self.spec.cursor)
        text = self.spec.cursor_text
        cursor_text = batch.column(text) if text and text in batch.schema.names else None
        emails = [f.column for f in self.fields if self.kinds[f.column] == "email"]
        email = batch.column(emails[0]) if emails else None
        errors: list[RowError] = []
        rows = bad["__row"].to_pylist()
        positions = bad["__pos"].to_pylist()
        codes = {c: bad[c].to_pylist() for c, _ in self._errs}
        row_codes = {c: bad[c].to_pylist() for c in self.row_err_cols}
        for n, (rown, pos) in enumerate(zip(rows, positions, strict=True)):
            ident = _py(raw_ids, pos)
            # what else finds the row in the warehouse, above all when its identifier is empty
            where = {
                "cursor": _py(cursor_text or cursor, pos),
                "email": _py(email, pos) if email is not None else None,
            }
            id_failed = False
            said: set[tuple[str, str]] = set()  # one column read by two fields: one line
            for ecol, column in self._errs:
                code = codes[ecol][n]
                if not code or (column, code) in said:
                    continue
                said.add((column, code))
                value = _py(batch.column(column), pos)
                msg = details.get((rown, column)) or MESSAGES.get(code, code)
                errors.append(
                    RowError(rown, ident, column, value, code, f"{column}: {msg}", **where)
                )
                id_failed = id_failed or column == self.spec.identifier
            for ecol in self.row_err_cols:
                code = row_codes[ecol][n]
                if not code or (code == "missing_identifier" and id_failed):
                    continue
                on_cursor = ecol == "__e_cursor"
                column = self.spec.cursor if on_cursor else self.spec.identifier
                value = where["cursor"] if on_cursor else _py(raw_ids, pos)
                errors.append(
                    RowError(
                        rown, ident, column, value, code, f"{column}: {MESSAGES[code]}", **where
                    )
                )
        return errors

    def close(self) -> None:
        self.con.close()


def _py(column: pa.Array | pa.ChunkedArray, pos: int) -> Any:
    """A bad row's value as Python, for its error line. DuckDB's ``infinity`` timestamps and
    dates (the int64/int32 extremes in Arrow) and years past 9999 have no Python value:
    ``as_py`` raised OverflowError and the run stopped on the row it was reporting."""
    scalar = column[pos]
    try:
        return scalar.as_py()
    except (OverflowError, ValueError):
        # date32 casts only to int32 (days); timestamps and date64 to int64
        raw = scalar.cast(pa.int32() if pa.types.is_date32(scalar.type) else pa.int64()).as_py()
        if abs(raw) in (2**63 - 1, 2**31 - 1):
            return "infinity" if raw > 0 else "-infinity"
        return f"{raw} ({scalar.type}, beyond the years 1 to 9999)"


class StreamTransformer:
    """Transforms the batches of one read, numbered across the read (``__row``: the pipeline
    numbers them, a CSV brings its lines): compiles a Transformer for the first batch's
    schema. The caller closes it when the read is over (after any thread that reads has
    stopped)."""

    def __init__(self, spec: TransformSpec):
        self.spec = spec
        self._transformer: Transformer | None = None

    def transform(self, batch: pa.RecordBatch) -> TransformResult:
        if self._transformer is None:
            self._transformer = Transformer(self.spec, batch.schema)
        return self._transformer.transform(batch)

    def close(self) -> None:
        if self._transformer is not None:
            self._transformer.close()


_CONSENT_WORDS = pa.array(list(WORDS), pa.string())
_CONSENT_VALUES = pa.array(list(WORDS.values()), pa.string())
_AMBIGUOUS_NO = pa.array(sorted(AMBIGUOUS_NO), pa.string())


def future_cursor_sql(cursor: str, dtype: pa.DataType, checks: Checks) -> str:
    """SQL true when the cursor value ``cursor`` (an expression of type ``dtype``) lies beyond
    ``checks.max_timestamp``; only times and dates can be in the future."""
    if pa.types.is_timestamp(dtype) or pa.types.is_date(dtype):
        moment = instant(cursor, dtype, checks.naive_timezone)
        return f"{moment} > TIMESTAMPTZ {lit(checks.max_timestamp)}"
    return "FALSE"


def cursor_checks(spec: TransformSpec, now: datetime | None = None) -> Checks:
    """The bounds a run checks timestamps and its cursor against, fixed when it starts."""
    moment = (now or datetime.now(UTC)) + spec.max_future_skew
    return Checks(spec.naive_timezone, MIN_TIMESTAMP, moment.isoformat())


def _first_non_finite(value: object) -> str | None:
    """The first NaN or ±Infinity inside a nested value, as text; None if there is none."""
    if isinstance(value, float) and not math.isfinite(value):
        return cell_text(value)
    items: Iterable[object]
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return None
    for item in items:
        found = _first_non_finite(item[1] if isinstance(item, tuple) else item)
        if found:
            return found
    return None


def _scatter(target: pa.ChunkedArray | pa.Array, idx: pa.Array, values: pa.Array) -> pa.Array:
    """``target`` with ``values`` written at positions ``idx`` (a vectorised patch)."""
    target = target.combine_chunks() if isinstance(target, pa.ChunkedArray) else target
    mask = np.zeros(len(target), dtype=bool)
    mask[idx.to_numpy(zero_copy_only=False)] = True
    return pc.replace_with_mask(target, pa.array(mask), pc.cast(values, target.type))

"""Turn one warehouse batch into destination-ready columns plus row errors.

The whole batch goes through one generated DuckDB query (normalise and check every mapped
column at once); only rows flagged there touch Python. The output table has one column per
destination field (named as the field), ``__row`` (1-based position in the run) and ``__id``
(the normalised identifier), and holds only rows that passed every check.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl import scratch
from reverse_etl.transform.kinds import compatible, kind_of_arrow
from reverse_etl.transform.rowerrors import RowError
from reverse_etl.transform.slowpath import PossibleLength, check_email, check_phone, region_codes
from reverse_etl.transform.sqlgen import (
    Checks,
    lit,
    q,
    region_table,
    value_and_error,
)

MIN_TIMESTAMP = "1990-01-01T00:00:00Z"


def _arrow(result: duckdb.DuckDBPyConnection) -> pa.Table:
    # execute() binds a prepared statement without the relation layer: faster per batch here
    # than con.sql(), whose note about an extra copy does not outweigh that.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return result.to_arrow_table()

MESSAGES = {
    "missing_identifier": "the identifier column is empty",
    "duplicate_identifier": "another row with this identifier has a later cursor value; that row was sent instead",
    "missing_cursor": "the cursor column is empty",
    "invalid_email": "not a valid email address",
    "invalid_phone": "not a valid phone number",
    "invalid_consent": "not a recognised consent value",
    "invalid_timestamp": "not a timestamp that can be read",
    "timestamp_too_old": "before 1990-01-01",
    "timestamp_in_future": "in the future",
    "invalid_date": "not a date that can be read",
    "invalid_number": "not a number",
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
    naive_timezone: str = "UTC"
    max_future_skew: timedelta = timedelta(minutes=10)

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
    def __init__(self, spec: TransformSpec, schema: pa.Schema, *, now: datetime | None = None):
        missing = schema_problems(spec, schema)
        if spec.phone_region_column and spec.phone_region_column not in schema.names:
            missing.append(f"phone_region_column {spec.phone_region_column!r} is not in the view")
        if missing:
            raise ValueError("; ".join(missing))
        self.spec = spec
        self.kinds = {f.column: f.kind or kind_of_arrow(schema.field(f.column).type) for f in spec.fields}
        moment = (now or datetime.now(UTC)) + spec.max_future_skew
        checks = Checks(spec.naive_timezone, MIN_TIMESTAMP, moment.isoformat())
        self._possible = PossibleLength()
        self.con = scratch.cursor()
        self._phone_macro()
        selects = ["b.__row AS __row", "b.__pos AS __pos"]
        self._errs: list[tuple[str, str]] = []  # (error column alias, source column)
        if spec.phone_region_column:
            region = f"UPPER(TRIM(CAST(b0.{q(spec.phone_region_column)} AS VARCHAR)))"
            if spec.default_phone_region:
                region = f"COALESCE({region}, {lit(spec.default_phone_region.upper())})"
        elif spec.default_phone_region:
            region = lit(spec.default_phone_region.upper())
        else:
            region = "NULL"
        has_phone = any(k == "phone" for k in self.kinds.values())
        rows = (
            f"SELECT b0.*, pr.cc AS __cc, pr.np AS __np FROM batch AS b0 "
            f"LEFT JOIN __phone_region AS pr ON pr.region = {region}"
            if has_phone
            else "SELECT * FROM batch"
        )
        for i, f in enumerate(spec.fields):
            dtype = schema.field(f.column).type
            value, err = value_and_error(self.kinds[f.column], f.column, dtype, checks)
            selects.append(f"{value} AS {q(f.field)}")
            selects.append(f"{err} AS __e{i}")
            self._errs.append((f"__e{i}", f.column))
        id_field = spec.identifier_field().field
        selects.append(f"{q(id_field)} AS __id")  # re-aliased below; placeholder
        cursor = f"b.{q(spec.cursor)}"
        ident = f"b.{q(spec.identifier)}"
        row_checks = [
            f"CASE WHEN {cursor} IS NULL THEN 'missing_cursor' END AS __e_cursor",
            f"CASE WHEN EXISTS (SELECT 1 FROM superseded AS s WHERE s.id = {ident} AND s.c = {cursor}) "
            "THEN 'duplicate_identifier' END AS __e_dup",
        ]
        self.set_superseded(pa.table({"id": pa.array([], schema.field(spec.identifier).type),
                                      "c": pa.array([], schema.field(spec.cursor).type)}))
        inner = ", ".join(s for s in selects if not s.endswith("AS __id"))
        self.sql = (
            f"SELECT t.*, t.{q(id_field)} AS __id, "
            f"CASE WHEN t.{q(id_field)} IS NULL THEN 'missing_identifier' END AS __e_id "
            f"FROM (SELECT {inner}, {', '.join(row_checks)} FROM ({rows}) AS b) AS t"
        )
        self.id_field = id_field
        self.fields = spec.fields
        self.row_err_cols = ["__e_id", "__e_cursor", "__e_dup"]

    def set_superseded(self, rows: pa.Table) -> None:
        """(id, cursor) pairs of this read that a later row with the same identifier replaces."""
        self._superseded = rows
        self.con.register("superseded", rows)

    def _phone_macro(self) -> None:
        self.con.register("__phone_region", region_table(region_codes()))

    def transform(self, batch: pa.RecordBatch, first_row: int) -> TransformResult:
        if "__row" not in batch.schema.names:  # a CSV brings its own line numbers
            rows = pa.array(range(first_row, first_row + batch.num_rows), pa.int64())
            batch = batch.append_column("__row", rows)
        batch = batch.append_column("__pos", pa.array(range(batch.num_rows), pa.int64()))
        self.con.register("batch", batch)
        try:
            out = _arrow(self.con.execute(self.sql))
        finally:
            self.con.unregister("batch")
        out, details = self._slow_path(out, batch)
        err_cols = [c for c, _ in self._errs] + self.row_err_cols
        bad_mask = None
        for c in err_cols:
            valid = pc.is_valid(out[c])
            bad_mask = valid if bad_mask is None else pc.or_(bad_mask, valid)
        errors: list[RowError] = []
        rejected = 0
        if bad_mask is not None and pc.any(bad_mask).as_py():
            bad = out.filter(bad_mask)
            rejected = bad.num_rows
            errors = self._row_errors(bad, batch, details)
        good = out.filter(pc.invert(bad_mask)) if bad_mask is not None else out
        keep = ["__row", "__id"] + [f.field for f in self.fields]
        return TransformResult(good=good.select(keep), errors=errors, rejected=rejected)

    def _slow_path(
        self, out: pa.Table, batch: pa.RecordBatch
    ) -> tuple[pa.Table, dict[tuple[int, str], str]]:
        """Decide ``email?`` / ``phone?`` values one by one; patch rescued values back in."""
        details: dict[tuple[int, str], str] = {}
        for (ecol, column), f in zip(self._errs, self.fields, strict=True):
            kind = self.kinds[column]
            if kind not in {"email", "phone"}:
                continue
            if kind == "phone":  # E.164-shaped but of impossible length: let phonenumbers decide
                shaped = pc.and_(pc.is_null(out[ecol]), pc.is_valid(out[f.field]))
                impossible = pc.and_(shaped, pc.invert(self._possible(out[f.field])))
                impossible = pc.fill_null(impossible, False)
                codes = pc.if_else(impossible, pa.scalar("phone?"), out[ecol])
                out = out.set_column(out.schema.get_field_index(ecol), ecol, codes)
            suspect = pc.fill_null(pc.equal(out[ecol], f"{kind}?"), False)
            if not pc.any(suspect).as_py():
                continue
            idx = pc.indices_nonzero(suspect).to_pylist()
            positions = out["__pos"].take(pa.array(idx))
            raw = batch.column(column).take(positions).to_pylist()
            row_numbers = out["__row"].take(pa.array(idx)).to_pylist()
            regions = self._regions(batch, positions, len(idx))
            values = out[f.field].to_pylist()
            codes = out[ecol].to_pylist()
            for i, value, rown, region in zip(idx, raw, row_numbers, regions, strict=True):
                text = str(value).strip()
                if kind == "email":
                    fixed, why = check_email(text)
                else:
                    fixed, why = check_phone(text, region)
                values[i] = fixed
                codes[i] = None if fixed else f"invalid_{kind}"
                if why:
                    details[(rown, column)] = why
            out = out.set_column(out.schema.get_field_index(f.field), f.field, pa.array(values, out[f.field].type))
            out = out.set_column(out.schema.get_field_index(ecol), ecol, pa.array(codes, pa.string()))
            if f.field == self.id_field:
                out = out.set_column(out.schema.get_field_index("__id"), "__id", pa.array(values, out["__id"].type))
                ids_missing = pc.if_else(pc.is_null(out["__id"]), "missing_identifier", pa.scalar(None, pa.string()))
                out = out.set_column(out.schema.get_field_index("__e_id"), "__e_id", ids_missing)
        return out, details

    def _regions(self, batch: pa.RecordBatch, positions: pa.Array, n: int) -> list[str | None]:
        default = self.spec.default_phone_region
        if not self.spec.phone_region_column:
            return [default] * n
        values = batch.column(self.spec.phone_region_column).take(positions).to_pylist()
        return [
            v.strip().upper() if isinstance(v, str) and len(v.strip()) == 2 else default
            for v in values
        ]

    def _row_errors(
        self, bad: pa.Table, batch: pa.RecordBatch, details: dict[tuple[int, str], str]
    ) -> list[RowError]:
        raw_ids = batch.column(self.spec.identifier)
        cursor = batch.column(self.spec.cursor)
        errors: list[RowError] = []
        rows = bad["__row"].to_pylist()
        positions = bad["__pos"].to_pylist()
        codes = {c: bad[c].to_pylist() for c, _ in self._errs}
        row_codes = {c: bad[c].to_pylist() for c in self.row_err_cols}
        for n, (rown, pos) in enumerate(zip(rows, positions, strict=True)):
            ident = raw_ids[pos].as_py()
            id_failed = False
            for ecol, column in self._errs:
                code = codes[ecol][n]
                if not code:
                    continue
                value = batch.column(column)[pos].as_py()
                msg = details.get((rown, column)) or MESSAGES.get(code, code)
                errors.append(RowError(rown, ident, column, value, code, f"{column}: {msg}"))
                id_failed = id_failed or column == self.spec.identifier
            for ecol in self.row_err_cols:
                code = row_codes[ecol][n]
                if not code or (code == "missing_identifier" and id_failed):
                    continue
                column = self.spec.cursor if code == "missing_cursor" else self.spec.identifier
                value = (cursor if code == "missing_cursor" else raw_ids)[pos].as_py()
                errors.append(RowError(rown, ident, column, value, code, f"{column}: {MESSAGES[code]}"))
        return errors

    def close(self) -> None:
        self.con.close()

"""Insight data: records into a named collection through ``PUT /insightData/v3/import``.

Each row becomes one record ``{key, json}`` (plus ``contactIdentity`` in a contact-scoped
collection); the key is the sync's identifier, mapped to the field ``id``, and ``json`` holds
every mapped field under its name. The API creates the collection on first import and upserts
records by key, so a resent row replaces its record.

Rows that break the insight data rules (``insight_rules``) are left out by ``screen`` before
sending, as row errors, by one DuckDB query over the batch (its own cursor: ``screen`` runs on
the read-ahead thread). ``load`` and ``requests`` take screened batches: the rest are packed
into imports of up to ``import_size`` records, at most five of the account's insight imports
unfinished at a time, each polled to its end. Records the API refuses come back in the
import's ``failures`` and become row errors (``destination_rejected``) with the API's reason.
A batch that was not screened still cannot send a record without its owner (``load`` checks
that cheaply: one such record would void the whole import); the other rules are then left to
the API's verdict on each record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.config import Sync
from reverse_etl.destinations.base import Request, Screened, Tally
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.destinations.dotdigital import insight_rules as rules
from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.destinations.dotdigital.destination import (
    MAX_IMPORT_BYTES,
    MAX_IMPORT_RECORDS,
    DotdigitalBase,
)
from reverse_etl.destinations.dotdigital.imports import Import, ImportApi
from reverse_etl.destinations.rowjson import Col, Expr, RowJson, bodies
from reverse_etl.errors import DestinationError
from reverse_etl.sql import ident
from reverse_etl.transform.rowerrors import RowError
from reverse_etl.util import scratch
from reverse_etl.util.scratch import registered

IMPORT_PATH = "/insightData/v3/import"
INSIGHT_IMPORTS = ImportApi(
    IMPORT_PATH,
    "insight data import",
    # the spec's status enum says Complete; its own example says Finished
    finished=frozenset({"Complete", "Finished"}),
    failed=frozenset({"Failed"}),
    max_active=5,  # 429 insightData:tooManyActiveImports beyond
    # the status enum of the insight-data service's two import reports
    running=frozenset({"NotStarted", "Processing", "NotFinished"}),
)


@dataclass(frozen=True)
class Check:
    """A rule over the batch: ``sql`` is TRUE for a row that breaks it."""

    field: str  # the destination field whose value breaks it
    sql: str
    reason: str
    message: str


class InsightDestination(DotdigitalBase):
    scope: ClassVar[str]  # account | contact
    collection_type: ClassVar[str]  # the spec's collectionType: catalog, orders ...
    import_api = INSIGHT_IMPORTS

    def __init__(self, conn: DotdigitalConnection, sync: Sync):
        super().__init__(conn, sync)
        self.collection = self.collection_name(sync)
        self.column_of = {t.field: c for c, t in sync.fields().items()}  # field → view column
        self._rules: _Rules | None = None  # screen's
        self._schema: pa.Schema | None = None
        self._json: RowJson | None = None  # load's and requests'
        head = orjson.dumps(
            {
                "collectionName": self.collection,
                "collectionScope": self.scope,
                "collectionType": self.collection_type,
            }
        )
        self._head, self._tail = head[:-1] + b',"records":[', b"]}"

    # ------------------------------------------------------------------ config checks

    @classmethod
    def default_collection(cls, sync: Sync) -> str:
        raise NotImplementedError

    @classmethod
    def collection_name(cls, sync: Sync) -> str:
        return str(sync.destination.options().get("collection") or cls.default_collection(sync))

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        return not name.startswith("__") and rules.key_problem(name) is None

    @classmethod
    def custom_field_hint(cls) -> str:
        return f"an insight data key: {rules.KEY_RULE}"

    @classmethod
    def check_options(cls, sync: Sync) -> list[str]:
        problems = super().check_options(sync)
        problem = rules.collection_problem(cls.collection_name(sync))
        if problem:
            problems.append(f"destination.collection: {problem}")
        return problems

    @classmethod
    def check_sync(cls, sync: Sync) -> list[str]:
        fields = sync.fields()
        # a field that is neither standard nor a valid key: the rule and a valid name to use,
        # in place of the generic message
        bad = {
            f"mapping.{column}: ": rules.key_problem(target.field)
            or f"{target.field!r}: names starting with __ are the engine's own"
            for column, target in fields.items()
            if target.field not in cls.capabilities.standard_fields
            and not cls.is_custom_field(target.field)
        }
        replaced = (*bad, f"identifier {sync.identifier!r} must also be mapped")
        problems = [p for p in super().check_sync(sync) if not p.startswith(replaced)]
        problems += [f"{prefix}{problem}" for prefix, problem in bad.items()]
        for a, b in rules.clashes(t.field for t in fields.values()):
            problems.append(
                f"mapping: fields {a!r} and {b!r} differ only by - and _, which Dotdigital "
                "refuses side by side in a record (JsonContainsDashUnderscoreClash); rename one"
            )
        target = fields.get(sync.identifier)
        if target is None or target.field != "id":
            now = "it is not mapped" if target is None else f"it is mapped to {target.field!r}"
            problems.append(
                f"identifier {sync.identifier!r} must be mapped to `id`, the record's key "
                f"({now}); e.g. mapping: {{{sync.identifier}: id}}"
            )
        return problems

    # ------------------------------------------------------------------ per-object hooks

    def value_sql(self, name: str, dtype: pa.DataType) -> Any:
        """The template leaf for field ``name`` (a column of the batch)."""
        if pa.types.is_list(dtype) or pa.types.is_struct(dtype) or pa.types.is_map(dtype):
            return Expr(rules.json_value_sql(f"t.{ident(name)}", dtype))
        return Col(name)

    def extra_checks(self, schema: pa.Schema) -> list[Check]:
        """Object-specific rules over the batch (orders: email, status)."""
        return []

    def json_fields(self, schema: pa.Schema) -> list[str]:
        return [n for n in schema.names if not n.startswith(("__", "consent."))]

    def record_template(self, schema: pa.Schema) -> dict[str, Any]:
        doc: dict[str, Any] = {"key": Col("id")}
        if self.scope == "contact":
            doc["contactIdentity"] = {"identifier": "email", "value": Col("email")}
        doc["json"] = {
            name: self.value_sql(name, schema.field(name).type) for name in self.json_fields(schema)
        }
        return doc

    # ------------------------------------------------------------------ checks and payloads

    def screen(self, table: pa.Table) -> Screened:
        """Rows that break an insight data rule (or an object's own: orders' email and
        status), left out with their row errors."""
        if self._rules is None:
            self._rules = _Rules(self)
        kept, errors = self._rules.checked(table)
        kept, too_large = self.too_large(kept)
        errors = sorted(errors + too_large, key=lambda e: e.row_number)
        return Screened(kept, errors, rejected=table.num_rows - kept.num_rows)

    def _with_owner(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """A contact-scoped record needs its owner's email; a screened batch has it always."""
        if self.scope != "contact":
            return table, []
        missing = pc.is_null(table["email"])
        if not pc.any(missing).as_py():
            return table, []
        bad = table.filter(missing)
        column = self.column_of.get("email", "email")
        errors = [
            RowError(
                row,
                ident,
                column,
                None,
                "missing_email",
                f"{column}: empty; the record belongs to the contact with its email",
            )
            for row, ident in zip(bad["__row"].to_pylist(), bad["__id"].to_pylist(), strict=True)
        ]
        return table.filter(pc.invert(missing)), errors

    def _builder(self, schema: pa.Schema) -> RowJson:
        """The record template for this schema, compiled once."""
        if self._json is None or not schema.equals(self._schema):
            if self._json is not None:
                self._json.close()
            drop = self.sync.null_values == "skip"
            self._json = RowJson(self.record_template(schema), drop_nulls=drop)
            self._schema = schema
        return self._json

    def import_bodies(self, table: pa.Table) -> Iterator[tuple[int, int, bytes]]:
        docs = self._builder(table.schema).build(table)
        return bodies(docs, self._head, self._tail, self.import_size, MAX_IMPORT_BYTES)

    def requests(self, table: pa.Table) -> Iterator[Request]:
        table, _ = self._with_owner(table)
        if table.num_rows == 0:
            return
        for start, end, body in self.import_bodies(table):
            yield Request("PUT", IMPORT_PATH, body, end - start)

    # ------------------------------------------------------------------ sending

    def prepare(self) -> None:
        """Refuse to write into an existing collection of the other scope (the import would be
        refused as a whole): say so before anything is sent."""
        for coll in self.client.json("GET", "/insightData/v3/collections") or []:
            if str(coll.get("collectionName", "")).lower() != self.collection.lower():
                continue
            scope = coll.get("collectionScope")
            if scope and scope != self.scope:
                raise DestinationError(
                    f"Dotdigital insight collection {coll['collectionName']!r} is {scope}-scoped, but "
                    f"{self.sync.object} need a {self.scope}-scoped one; set destination.collection "
                    "to another name"
                )

    def split(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        return self._with_owner(table)

    def account(self, table: pa.Table, imp: Import, report: dict[str, Any], tally: Tally) -> None:
        failures = report.get("failures") or []
        summary = report.get("summary") or {}
        rejected = int(summary.get("totalRejected", len(failures)))
        # the import does not tell a new record from a replaced one: upserts count as updated
        tally.landed(len(imp), failed=rejected)
        if not failures:
            return
        by_key = {
            str(k): (r, str(c))
            for k, r, c in zip(
                table["id"].to_pylist(),
                table["__row"].to_pylist(),
                table["__id"].to_pylist(),
                strict=True,
            )
        }
        tally.reported(self._failure_error(failure, by_key) for failure in failures)

    def _failure_error(
        self, failure: dict[str, Any], by_key: dict[str, tuple[int, str]]
    ) -> RowError:
        key = str(failure.get("key", ""))
        row, ident = by_key.get(key, (0, key))
        owner = (failure.get("collectionOwner") or {}).get("contactIdentity") or {}
        details = "; ".join(str(d) for d in failure.get("details") or [])
        reason = failure.get("failureReason", "Unknown")
        about_contact = reason.startswith("Contact") or reason == "InvalidContactIdentifier"
        column = self.column_of.get("email", "(record)") if about_contact else "(record)"
        value = owner.get("value") if about_contact else key
        message = f"Dotdigital: {reason}" + (f": {details}" if details else "")
        if reason in CONTACT_MISSING:  # the contact may come with a later run: it is queued
            return RowError(row, ident, column, value, "contact_missing", message)
        return RowError(row, ident, column, value, "destination_rejected", message)

    def close(self) -> None:
        super().close()
        if self._json is not None:
            self._json.close()
        if self._rules is not None:
            self._rules.close()


# failureReason values of an insight import for a record whose contact does not exist (the
# insight data service's getImportStatus schema, shared/api-specs/dotdigital)
CONTACT_MISSING = frozenset({"ContactEmailDoesNotExist", "ContactIdDoesNotExist"})


class _Rules:
    """The insight data rules as one query over a batch, compiled once per schema, with a
    DuckDB cursor of their own (``screen`` runs on the read-ahead thread, beside ``load``).
    Only the rows that break a rule touch Python."""

    def __init__(self, dest: InsightDestination):
        self.dest = dest
        self._con = scratch.cursor()
        self._schema: pa.Schema | None = None
        self._checks: list[Check] = []
        self._sql = ""

    def checked(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """``table`` without the rows that break a rule, and their row errors (in row order)."""
        self._compile(table)
        if not self._checks or table.num_rows == 0:
            return table, []
        with registered(self._con, "tbl", table):
            flags: pa.Table = self._con.execute(self._sql).to_arrow_table()
        bad: pa.ChunkedArray | None = None
        errors: list[RowError] = []
        for i, check in enumerate(self._checks):
            hit = flags.column(f"c{i}")
            if not pc.any(hit).as_py():
                continue
            bad = hit if bad is None else pc.or_(bad, hit)
            errors += self._errors(table, check, pc.indices_nonzero(hit))
        if bad is None:
            return table, []
        return table.filter(pc.invert(bad)), sorted(errors, key=lambda e: e.row_number)

    def _errors(self, table: pa.Table, check: Check, idx: pa.Array) -> list[RowError]:
        rows = table["__row"].take(idx).to_pylist()
        ids = table["__id"].take(idx).to_pylist()
        values = table[check.field].take(idx).to_pylist()
        column = self.dest.column_of.get(check.field, check.field)
        return [
            RowError(row, ident, column, value, check.reason, check.message)
            for row, ident, value in zip(rows, ids, values, strict=True)
        ]

    def _compile(self, table: pa.Table) -> None:
        """Once per schema: every rule as one boolean column of one query."""
        if self._schema is not None and table.schema.equals(self._schema):
            return
        schema = table.schema
        checks = self.dest.extra_checks(schema)
        for name, leaf in self.dest.record_template(schema)["json"].items():
            if isinstance(leaf, Expr):
                checks += self._value_checks(name, leaf, table)
        self._checks = checks
        self._sql = (
            "SELECT "
            + ", ".join(f"COALESCE({c.sql}, FALSE) AS c{i}" for i, c in enumerate(checks))
            + " FROM tbl AS t"
        )
        self._schema = schema

    def _value_checks(self, name: str, leaf: Expr, table: pa.Table) -> list[Check]:
        """The rules on a nested value, as it will be sent: no array directly in an array, no
        key outside the naming rule."""
        dtype = self._type_of(leaf.sql, table)
        column = self.dest.column_of.get(name, name)
        checks = []
        nested = rules.nested_array_sql(f"({leaf.sql})", dtype)
        if nested:
            checks.append(
                Check(
                    name,
                    nested,
                    "insight_nested_array",
                    f"{column}: holds an array directly inside an array, which insight data "
                    "refuses (JsonContainsNestedArray); flatten it or wrap the inner arrays in "
                    "records",
                )
            )
        bad = rules.bad_key_sql(f"({leaf.sql})", dtype)
        if bad:
            where = ", ".join(rules.bad_struct_keys(dtype)) or "a map key"
            checks.append(
                Check(
                    name,
                    bad,
                    "insight_invalid_key",
                    f"{column}: {where}: not an insight data key ({rules.KEY_RULE}, no - and _ "
                    "twins); rename it in the view",
                )
            )
        return checks

    def _type_of(self, sql: str, table: pa.Table) -> pa.DataType:
        """The type of ``sql`` over the batch (the value as it will be sent)."""
        with registered(self._con, "tbl", table.slice(0, 0)):
            result: pa.Table = self._con.execute(
                f"SELECT {sql} AS v FROM tbl AS t"
            ).to_arrow_table()
        return result.schema.field("v").type

    def close(self) -> None:
        self._con.close()


def capabilities(label: str, standard_fields: dict[str, str], *options: str) -> Capabilities:
    """What an insight data object takes: any valid key besides its standard fields, keyed by
    ``id``, no list and no consent."""
    return Capabilities(
        label=label,
        standard_fields=standard_fields,
        options=("collection", "import_size", *options),
        list_instead="they go to an insight data collection: use destination.collection",
        consent_instead="consent is synced with contacts",
        batch_records=MAX_IMPORT_RECORDS,
        batch_bytes=MAX_IMPORT_BYTES,
        max_in_flight=4,
    )

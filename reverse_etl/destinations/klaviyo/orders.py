"""Orders into Klaviyo as events: one "Placed Order" per order and, with
``destination.ordered_product_events: true``, one "Ordered Product" per order line, through
bulk event calls (1,000 events, 5 MB a call).

* ``unique_id`` is the order id (``<order id>:<line number>`` for a line), so an order sent
  again (a re-run, a lookback, a changed row) is not counted twice: Klaviyo drops an event
  whose profile, metric and unique_id it has seen. The flip side: a later change to an order
  already sent (its status, say) does not reach Klaviyo; events are history, not state.
* ``time`` is the order's timestamp, ``value`` its total and ``value_currency`` its currency.
* The profile is found by the email, phone_number and external_id the sync maps; a row with
  none of them is a row error (``missing_required_field``). ``destination.backfill: true``
  marks the events as backfill (recorded without triggering flows), for loading past orders.
* Placed Order properties: ``OrderId``, ``Status``, ``Items`` (the view's list as it is),
  ``ItemNames`` (each line's name, when its lines have one) and every ``properties.*`` field.
  An Ordered Product event's properties are its line plus ``OrderId`` and ``ProductName``; its
  value is quantity × unit price when the line has both.

Every event is its own entry (profile + one event), so calls pack by event count and a
refused event names exactly one row. Klaviyo checks a bulk call whole: a refused event's row
becomes a row error and the call is sent again without that row's events (``bulk.py``).
Events are new records, so a landed row counts as ``created``. Payloads are built in DuckDB
for the whole batch (``RowJson``; order lines unnested there too) and joined into entries
with Arrow string kernels.

``screen`` leaves out, before anything is sent, an order without a profile identifier, one
holding a string over Klaviyo's 100 KB and one with an event larger than a call may carry
(``value_too_large``; measured only for rows whose size bound passes the limit, see
``sizes.py``). ``load`` and ``requests`` take screened batches; the same cheap checks run
there as a safety net (a batch that was not screened: such rows count as sent and failed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pt

from reverse_etl.config import Sync
from reverse_etl.destinations.base import Request, Screened, Tally
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.destinations.klaviyo import bulk, sizes
from reverse_etl.destinations.klaviyo.client import MAX_BODY_BYTES, MAX_EVENTS
from reverse_etl.destinations.klaviyo.configuration import KlaviyoConnection
from reverse_etl.destinations.klaviyo.destination import KlaviyoBase, any_true, row_errors
from reverse_etl.destinations.rowjson import Col, Expr, RowJson
from reverse_etl.sql import ident
from reverse_etl.transform.rowerrors import RowError
from reverse_etl.util import scratch
from reverse_etl.util.scratch import registered

STANDARD_FIELDS = {
    "order_id": "string",
    "email": "email",
    "phone_number": "phone",
    "external_id": "string",
    "value": "number",
    "value_currency": "string",
    "time": "datetime",
    "status": "string",
    "items": "json",
}
PROFILE_FIELDS = ("email", "phone_number", "external_id")
PLACED_ORDER = "Placed Order"
ORDERED_PRODUCT = "Ordered Product"
# field names an order line's struct may use, in order of preference
LINE_NAME = ("name", "product_name", "title", "ProductName")
LINE_QUANTITY = ("quantity", "qty", "Quantity")
LINE_PRICE = ("unit_price", "price", "item_price", "ItemPrice")

EVENTS = bulk.Endpoint(
    "bulk_create_events",
    "/api/event-bulk-create-jobs",
    b'{"data":{"type":"event-bulk-create-job","attributes":{"events-bulk-create":{"data":[',
    b"]}}}}",
    MAX_EVENTS,
    MAX_BODY_BYTES,
    "bulk event",
)
MAX_ENTRY_BYTES = MAX_BODY_BYTES - len(EVENTS.head) - len(EVENTS.tail)
MAX_STRING_BYTES = 100_000  # "A single string cannot exceed 100KB" (read strictly)


def _pick(names: tuple[str, ...], fields: set[str]) -> str | None:
    return next((n for n in names if n in fields), None)


def _line_fields(schema: pa.Schema) -> tuple[set[str], bool]:
    """The field names of an order line, and whether lines are plain values (not structs)."""
    if "items" not in schema.names or not pt.is_list(schema.field("items").type):
        return set(), False
    line = schema.field("items").type.value_type
    if not pt.is_struct(line):
        return set(), True
    return {line.field(i).name for i in range(line.num_fields)}, False


class KlaviyoOrders(KlaviyoBase):
    capabilities = Capabilities(
        label="Klaviyo orders",
        standard_fields=STANDARD_FIELDS,
        custom_prefix="properties",
        identifier_fields=("order_id",),
        options=("ordered_product_events", "backfill"),
        bool_options=("ordered_product_events", "backfill"),
        batch_records=MAX_EVENTS,
        batch_bytes=MAX_BODY_BYTES,
    )

    def __init__(self, conn: KlaviyoConnection, sync: Sync, *, speedup: float | None = None):
        super().__init__(conn, sync, speedup=speedup)
        self.fields = {t.field for t in sync.fields().values()}
        self.products = bool(self.option("ordered_product_events", False))
        backfill = ',"backfill":true' if self.option("backfill", False) else ""
        self.entry = (
            '{"type":"event-bulk-create","attributes":{"profile":{"data":{"type":"profile",'
            '"attributes":',
            '}},"events":{"data":[{"type":"event","attributes":',
            "}]}" + backfill + "}}",
        )
        self._events = _Events(self)  # load's and requests'
        self._screen_events: _Events | None = None  # screen's own: it runs on another thread

    @classmethod
    def check_sync(cls, sync: Sync) -> list[str]:
        problems = super().check_sync(sync)
        mapped = {t.field for t in sync.fields().values()}
        if not mapped & set(PROFILE_FIELDS):
            problems.append(
                "mapping: an order event needs its customer's profile; map a column to email, "
                "phone_number or external_id"
            )
        products = sync.destination.options().get("ordered_product_events")
        if products is True and "items" not in mapped:
            problems.append(
                "destination.ordered_product_events: map the order lines (a LIST column) to items"
            )
        return problems

    # ------------------------------------------------------------------ checks

    def screen(self, table: pa.Table) -> Screened:
        """Orders that cannot become events, left out with their row errors: no profile
        identifier, a string over 100 KB, an event larger than a call may carry."""
        kept, errors = self._checked(table)
        suspects = self._size_bound(kept) > MAX_ENTRY_BYTES
        if suspects.any():
            if self._screen_events is None:
                self._screen_events = _Events(self)
            _, too_big = self._screen_events.records(kept.filter(pa.array(suspects)))
            if too_big:
                gone = pa.array([e.row_number for e in too_big], pa.int64())
                kept = kept.filter(pc.invert(pc.is_in(kept["__row"], value_set=gone)))
                errors += too_big
        errors.sort(key=lambda e: e.row_number)
        return Screened(kept, errors, rejected=table.num_rows - kept.num_rows)

    def _size_bound(self, table: pa.Table) -> np.ndarray:
        """At least the size of each row's largest event entry: every mapped value (an Ordered
        Product event holds a subset of its order's), the order id and the lines twice
        (``OrderId`` and ``unique_id``; ``Items`` and ``ItemNames``) and the envelope."""
        fields = [c for c in table.column_names if not c.startswith("__")]
        bound = sizes.row_bound(table, fields) + sum(len(part) for part in self.entry) + 500
        for twice in ("order_id", "items"):
            if twice in fields:
                bound = bound + sizes.value_bound(table[twice])
        return bound

    def _checked(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """Rows with a profile identifier and no string Klaviyo refuses, and the row errors of
        the others."""
        errors: list[RowError] = []
        known = [pc.is_valid(table[f]) for f in PROFILE_FIELDS if f in table.column_names]
        has_profile = known[0]
        for k in known[1:]:
            has_profile = pc.or_(has_profile, k)
        if not pc.all(has_profile).as_py():
            errors += row_errors(
                table,
                pc.invert(has_profile),
                "(order)",
                "missing_required_field",
                "an order event needs its customer's email, phone_number or external_id; "
                "the row has none",
                value="order_id",
            )
            table = table.filter(has_profile)
        table, long = self._without_long_strings(table)
        return table, errors + long

    def _records(self, table: pa.Table) -> tuple[bulk.Records, list[RowError]]:
        """Every event of the batch's orders, grouped by row, and the orders that cannot go
        (none in a screened batch)."""
        table, errors = self._checked(table)
        records, too_big = self._events.records(table)
        return records, errors + too_big

    def _without_long_strings(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """Rows whose mapped text values Klaviyo takes: it refuses a whole call holding a
        string over 100 KB, so such a row is a row error before anything is sent."""
        errors: list[RowError] = []
        for column, target in self.sync.fields().items():
            values = table[target.field]
            if not (pt.is_string(values.type) or pt.is_large_string(values.type)):
                continue
            long = pc.fill_null(pc.greater(pc.binary_length(values), MAX_STRING_BYTES), False)
            if any_true(long):
                bad = table.filter(long)
                shown = pc.utf8_slice_codeunits(bad[target.field], 0, 100).to_pylist()
                message = (
                    f"longer than the {MAX_STRING_BYTES} bytes Klaviyo takes in one string "
                    "(the value shown is its start)"
                )
                errors += [
                    RowError(row, ident, column, value, "value_too_large", message)
                    for row, ident, value in zip(
                        bad["__row"].to_pylist(), bad["__id"].to_pylist(), shown, strict=True
                    )
                ]
                table = table.filter(pc.invert(long))
        return table, errors

    # ------------------------------------------------------------------ sending

    def requests(self, table: pa.Table) -> Iterator[Request]:
        records, _ = self._records(table)
        yield from bulk.requests(EVENTS, records, counted=True)

    def split(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        return self._checked(table)

    def submit(self, table: pa.Table) -> tuple[int, list[RowError], list[RowError]]:
        """The batch's events are sent here, before the next batch is read on: the bulk event
        call has no job to wait for, so there is nothing to overlap but the read-ahead."""
        records, too_big = self._events.records(table)
        return table.num_rows, too_big, bulk.send(self.client, EVENTS, records)

    def complete(self, work: tuple[int, list[RowError], list[RowError]], tally: Tally) -> None:
        rows, too_big, refused = work
        tally.refused(too_big)
        sent = rows - len({e.row_number for e in too_big})
        failed = len({e.row_number for e in refused})
        tally.landed(sent, created=sent - failed, failed=failed)  # events are new records
        tally.reported(refused)

    def close(self) -> None:
        super().close()
        self._events.close()
        if self._screen_events is not None:
            self._screen_events.close()


class _Events:
    """The event JSON builders of one thread (load's, or screen's): each holds DuckDB cursors,
    which threads do not share. Templates are made once the batch's types are known: the
    order lines' fields decide the item names and a line's value."""

    def __init__(self, dest: KlaviyoOrders):
        self.fields = dest.fields
        self.products = dest.products
        self.is_custom = dest.is_custom_field
        self.entry = dest.entry
        self.profile = RowJson(
            {f: Col(f) for f in PROFILE_FIELDS if f in self.fields}, drop_nulls=True
        )
        self._con = scratch.cursor()
        self._schema: pa.Schema | None = None
        self._placed: RowJson | None = None
        self._ordered: RowJson | None = None

    def _compile(self, schema: pa.Schema) -> tuple[RowJson, RowJson]:
        """Event templates for this schema: the order lines' fields decide the item names and
        a line's value, so the templates are made once the batch's types are known."""
        if self._placed is None or self._ordered is None or not schema.equals(self._schema):
            self._close_templates()
            fields, scalar = _line_fields(schema)
            name = _pick(LINE_NAME, fields)
            self._placed = RowJson(self._placed_event(name, scalar), drop_nulls=True)
            self._ordered = RowJson(self._ordered_event(fields, name, scalar), drop_nulls=True)
            self._schema = schema
        return self._placed, self._ordered

    def _common(self, metric: str) -> dict[str, Any]:
        event: dict[str, Any] = {
            "metric": {"data": {"type": "metric", "attributes": {"name": metric}}}
        }
        for f in ("value_currency", "time"):
            if f in self.fields:
                event[f] = Col(f)
        return event

    def _placed_event(self, name: str | None, scalar: bool) -> dict[str, Any]:
        props: dict[str, Any] = {"OrderId": Col("order_id")}
        if "status" in self.fields:
            props["Status"] = Col("status")
        if "items" in self.fields:
            props["Items"] = Col("items")
            if name or scalar:
                pick = f"x.{ident(name)}" if name else "x"
                props["ItemNames"] = Expr(f"list_transform(t.items, lambda x: {pick})")
        for field in sorted(self.fields):
            if self.is_custom(field):
                props[field.partition(".")[2]] = Col(field)
        event = self._common(PLACED_ORDER)
        event.update(properties=props, unique_id=Col("order_id"))
        if "value" in self.fields:
            event["value"] = Col("value")
        return event

    def _ordered_event(self, fields: set[str], name: str | None, scalar: bool) -> dict[str, Any]:
        if scalar:
            props = Expr("to_json({'OrderId': t.order_id, 'ProductName': t.line})")
        else:
            extra = "'OrderId': t.order_id"
            if name:
                extra += f", 'ProductName': t.line.{ident(name)}"
            props = Expr(f"json_merge_patch(to_json(t.line), to_json({{{extra}}}))")
        event = self._common(ORDERED_PRODUCT)
        event.update(
            properties=props, unique_id=Expr("t.order_id || ':' || CAST(t.line_no AS VARCHAR)")
        )
        quantity, price = _pick(LINE_QUANTITY, fields), _pick(LINE_PRICE, fields)
        if quantity and price:
            event["value"] = Expr(
                f"CAST(t.line.{ident(quantity)} * t.line.{ident(price)} AS DOUBLE)"
            )
        return event

    def _lines(self, table: pa.Table) -> pa.Table:
        """One row per order line (``line``, 1-based ``line_no``), with its order's columns."""
        with registered(self._con, "orders", table):
            lines: pa.Table = self._con.execute(
                "SELECT o.*, unnest(o.items) AS line, generate_subscripts(o.items, 1) AS line_no "
                "FROM orders AS o"
            ).to_arrow_table()
        return lines

    def _entries(self, table: pa.Table, events: pa.Array) -> pa.Array:
        """Bulk entries: each row's profile and one event, joined with Arrow string kernels."""
        head, middle, tail = (pa.scalar(s) for s in self.entry)
        profiles = (
            table["__profile"].combine_chunks() if table.num_rows else pa.array([], pa.string())
        )
        return pc.binary_join_element_wise(head, profiles, middle, events, tail, "")

    def records(self, table: pa.Table) -> tuple[bulk.Records, list[RowError]]:
        """Every event of the batch's orders, grouped by row, minus the orders with an event
        larger than a call may carry (``value_too_large``)."""
        errors: list[RowError] = []
        placed, ordered = self._compile(table.schema)
        table = table.append_column("__profile", self.profile.build(table))
        parts = [(table, placed.build(table), pa.array(np.zeros(table.num_rows, np.int64)))]
        if self.products and table.num_rows:
            lines = self._lines(table)
            parts.append((lines, ordered.build(lines), lines["line_no"].combine_chunks()))
        events = pa.table(
            {
                "doc": pa.concat_arrays([self._entries(t, e) for t, e, _ in parts]),
                "row": pa.concat_arrays([t["__row"].combine_chunks() for t, _, _ in parts]),
                "id": pa.concat_arrays([t["__id"].combine_chunks() for t, _, _ in parts]),
                "seq": pa.concat_arrays([s.cast(pa.int64()) for _, _, s in parts]),
            }
        ).sort_by([("row", "ascending"), ("seq", "ascending")])
        too_big = pc.greater(pc.binary_length(events["doc"]), MAX_ENTRY_BYTES)
        if any_true(too_big):
            big = pc.unique(events.filter(too_big)["row"])
            errors += row_errors(
                table,
                pc.is_in(table["__row"], value_set=big),
                "(order)",
                "value_too_large",
                f"an event of this order is larger than the {MAX_BODY_BYTES} bytes Klaviyo "
                "takes in a call",
                value="order_id",
            )
            events = events.filter(pc.invert(pc.is_in(events["row"], value_set=big)))
        records = bulk.Records(
            events["doc"].combine_chunks(),
            events["row"].combine_chunks(),
            events["id"].combine_chunks(),
        )
        return records, errors

    def _close_templates(self) -> None:
        for builder in (self._placed, self._ordered):
            if builder is not None:
                builder.close()

    def close(self) -> None:
        self._close_templates()
        self.profile.close()
        self._con.close()

"""Orders into Klaviyo as events, as Klaviyo's guide to integrating a platform without a
pre-built integration lays them out (https://developers.klaviyo.com/en/docs/guide-to-integrating-a-platform-without-a-pre-built-klaviyo-integration):
"Placed Order", "Fulfilled Order", "Cancelled Order", "Refunded Order" per order and, with
``destination.ordered_product_events: true``, one "Ordered Product" per order line, through
bulk event calls (1,000 events, 5 MB a call).

* Status → metric. The order's ``status`` picks its metric, ignoring case and surrounding
  blanks: placed/pending/paid/open/confirmed/authorized/processing/unfulfilled/new → Placed
  Order; fulfilled/shipped/delivered/complete/completed → Fulfilled Order;
  cancelled/canceled/voided/void → Cancelled Order; refunded → Refunded Order (Shopify's and
  commercetools' words; commercetools' Klaviyo connector counts "Confirmed" as fulfilled, here
  it is placed: paid, not yet shipped). ``destination.order_statuses: {metric: [status, ...]}``
  adds words or moves them to another (or a new) metric. An empty status is Placed Order (so is
  every order when no status is mapped); a status no metric lists is a row error
  (``unknown_order_status``), never guessed: a cancellation word we do not know would
  otherwise count as revenue.
* A Cancelled order is not Placed Order revenue: a row whose status is cancelled sends only
  Cancelled Order (an order first seen cancelled never gets a Placed Order; one placed
  earlier keeps its Placed Order, which Klaviyo offsets with the Cancelled Order). Any other
  status also sends the Placed Order (and its Ordered Product events): an order first seen
  fulfilled or refunded (a backfill of history) was placed, and Placed Order is the metric
  Klaviyo counts revenue by.
* ``unique_id`` is the order id for all four order metrics (``<order id>:<line number>`` for a
  line). Klaviyo keeps one event per profile, metric and unique_id (the spec's
  ``unique_id``; https://github.com/elbwalker/walkerOS/pull/709 probed it live), so a re-sent
  row is one event, a new status is a new event once, and the id matches the Placed Order's
  as Klaviyo asks for Cancelled and Refunded orders to count in customer lifetime value
  (https://community.klaviyo.com/custom-integrations-29/fulfilled-order-cancelled-order-and-refunded-order-529;
  Klaviyo's own commercetools connector does the same: klaviyo/commercetools-klaviyo,
  DefaultOrderMapper.ts). Placed Order's unique_id is what it was before statuses mapped, so
  events already sent dedup.
* What keeps known events from being re-sent is the synced-state snapshot: a row unchanged
  since it was acknowledged is not sent again. A changed row is sent whole, so a placed order
  that becomes fulfilled re-sends its Placed Order next to the new Fulfilled Order; Klaviyo
  drops it (or, per the bulk spec's strict wording, refuses the call naming it: ``bulk.py``
  then leaves that event out and sends the call again, the row counting as landed). Within a
  batch no two events share profile, metric and unique_id (the last row's is kept), as the
  bulk spec says a repeat in a call fails the whole call.
* ``time`` is the order's timestamp for Placed Order and Ordered Product; Fulfilled,
  Cancelled and Refunded Order carry ``status_time`` when it is mapped, else none (Klaviyo
  stamps them when it receives them, about when the change was noticed). ``value`` is the
  order's total on every order metric (Klaviyo offsets a cancelled or refunded value),
  ``value_currency`` its currency.
* The profile is found by the email, phone_number and external_id the sync maps; a row with
  none of them is a row error (``missing_required_field``). ``destination.backfill: true``
  marks the events as backfill (recorded without triggering flows), for loading past orders.
* Order properties: ``OrderId``, ``Status``, ``Items``, ``ItemNames``, ``Categories`` and
  ``Brands`` (distinct, over the lines), and every ``properties.*`` field. Each line in
  ``Items`` and each Ordered Product event carries the names Klaviyo's templates and catalog
  read: ``ProductID``, ``SKU``, ``ProductName``, ``Quantity``, ``ItemPrice``, ``RowTotal``,
  ``ProductURL``, ``ImageURL``, ``Categories``, ``Brand``, taken from the line's fields
  product_id/id, sku, name/product_name/title, quantity/qty, unit_price/price/item_price,
  row_total/line_total/total (else quantity × price), url/product_url, image_url/image,
  categories, brand (first found), or as ``destination.item_fields: {ProductID: my_field}``
  says; the line's other fields travel under their own names. An Ordered Product event also
  carries ``OrderId``; its value is the line's RowTotal.

Every event is its own entry (profile + one event), so calls pack by event count and a
refused event names exactly one row. Klaviyo checks a bulk call whole: a refused event's row
becomes a row error and the call is sent again without that row's events (``bulk.py``).
Events are new records, so a landed row counts as ``created``. Payloads are built in DuckDB
for the whole batch (``RowJson``; order lines unnested there too), metrics are picked and
duplicates dropped with Arrow kernels, and entries joined with Arrow string kernels.

``screen`` leaves out, before anything is sent, an order without a profile identifier, one
with an unknown status, one holding a string over Klaviyo's 100 KB and one with an event
larger than a call may carry (``value_too_large``; measured only for rows whose size bound
passes the limit, see ``sizes.py``). ``load`` and ``requests`` take screened batches; the same
cheap checks run there as a safety net (a batch that was not screened: such rows count as
sent and failed).
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
from reverse_etl.sql import ident, literal
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
    "status_time": "datetime",
    "items": "json",
}
PROFILE_FIELDS = ("email", "phone_number", "external_id")
PLACED_ORDER = "Placed Order"
FULFILLED_ORDER = "Fulfilled Order"
CANCELLED_ORDER = "Cancelled Order"
REFUNDED_ORDER = "Refunded Order"
ORDERED_PRODUCT = "Ordered Product"
#: status words (lower case) of each metric, as Shopify and commercetools spell them
DEFAULT_STATUSES: dict[str, tuple[str, ...]] = {
    PLACED_ORDER: (
        "placed", "pending", "paid", "open", "confirmed", "authorized", "processing",
        "unfulfilled", "new",
    ),
    FULFILLED_ORDER: ("fulfilled", "shipped", "delivered", "complete", "completed"),
    CANCELLED_ORDER: ("cancelled", "canceled", "voided", "void"),
    REFUNDED_ORDER: ("refunded",),
}  # fmt: skip
MAX_METRIC_NAME = 127  # "must be shorter than 128 characters"
#: Klaviyo's item property -> the line fields it is taken from, first found
ITEM_FIELDS: dict[str, tuple[str, ...]] = {
    "ProductID": ("product_id", "id"),
    "SKU": ("sku",),
    "ProductName": ("name", "product_name", "title"),
    "Quantity": ("quantity", "qty"),
    "ItemPrice": ("unit_price", "price", "item_price"),
    "RowTotal": ("row_total", "line_total", "total"),
    "ProductURL": ("url", "product_url"),
    "ImageURL": ("image_url", "image"),
    "Categories": ("categories",),
    "Brand": ("brand",),
}
STATUS_SEQ = 1 << 40  # a status event's place among its row's events: after the lines

EVENTS = bulk.Endpoint(
    "bulk_create_events",
    "/api/event-bulk-create-jobs",
    b'{"data":{"type":"event-bulk-create-job","attributes":{"events-bulk-create":{"data":[',
    b"]}}}}",
    MAX_EVENTS,
    MAX_BODY_BYTES,
    "bulk event",
    repeats_held=True,
)
MAX_ENTRY_BYTES = MAX_BODY_BYTES - len(EVENTS.head) - len(EVENTS.tail)
MAX_STRING_BYTES = 100_000  # "A single string cannot exceed 100KB" (read strictly)


def status_metrics(options: dict[str, Any]) -> dict[str, str]:
    """Lower-cased status word -> metric name: the defaults, then ``order_statuses`` (a word
    it lists moves to its metric)."""
    table = {w: metric for metric, words in DEFAULT_STATUSES.items() for w in words}
    for metric, words in (options.get("order_statuses") or {}).items():
        for w in words:
            table[str(w).strip().lower()] = metric
    return table


def check_statuses(value: Any) -> str | None:
    """What is wrong with ``destination.order_statuses``, if anything."""
    shape = (
        "destination.order_statuses: a mapping of Klaviyo metric name to a list of status "
        "words, e.g. {Fulfilled Order: [shipped, delivered]}"
    )
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k.strip() and isinstance(v, list) and v
        and all(isinstance(w, str) and w.strip() for w in v)
        for k, v in value.items()
    ):  # fmt: skip
        return f"{shape} (got {value!r})"
    long = [k for k in value if len(k) > MAX_METRIC_NAME]
    if long:
        return f"destination.order_statuses: metric name {long[0][:40]!r}... is over {MAX_METRIC_NAME} characters"
    owner: dict[str, str] = {}
    for metric, words in value.items():
        for w in words:
            key = w.strip().lower()
            if owner.setdefault(key, metric) != metric:
                return (
                    f"destination.order_statuses: status {w!r} is listed under both "
                    f"{owner[key]!r} and {metric!r}; keep it under one metric"
                )
    return None


def _line_fields(schema: pa.Schema) -> tuple[dict[str, pa.DataType], bool]:
    """The fields (name -> type) of an order line, and whether lines are plain values."""
    if "items" not in schema.names or not pt.is_list(schema.field("items").type):
        return {}, False
    line = schema.field("items").type.value_type
    if not pt.is_struct(line):
        return {}, True
    return {line.field(i).name: line.field(i).type for i in range(line.num_fields)}, False


def item_sources(fields: dict[str, pa.DataType], chosen: dict[str, str]) -> dict[str, str]:
    """Klaviyo item property -> the line field it comes from: ``chosen``
    (``destination.item_fields``) first, else the first of ``ITEM_FIELDS`` the line has."""
    out: dict[str, str] = {}
    for name, candidates in ITEM_FIELDS.items():
        pick = chosen.get(name) or next((c for c in (*candidates, name) if c in fields), None)
        if pick in fields:
            out[name] = pick
    return out


def item_sql(
    var: str,
    fields: dict[str, pa.DataType],
    sources: dict[str, str],
    first: dict[str, str] | None = None,
) -> str:
    """SQL: the struct of Klaviyo's item properties for one line ``var`` (a line struct), after
    ``first`` (name -> SQL), with RowTotal as quantity × price where the line has no total, and
    the line's other fields under their own names (DuckDB struct keys ignore case, so a name
    taken is not repeated)."""
    parts = dict(first or {})
    parts.update({name: f"{var}.{ident(src)}" for name, src in sources.items()})
    if "RowTotal" not in parts and "Quantity" in parts and "ItemPrice" in parts:
        parts["RowTotal"] = f"CAST({parts['Quantity']} * {parts['ItemPrice']} AS DOUBLE)"
    taken = {n.lower() for n in parts} | {s.lower() for s in sources.values()}
    for f in fields:
        if f.lower() not in taken:
            parts[f] = f"{var}.{ident(f)}"
            taken.add(f.lower())
    return "{" + ", ".join(f"{literal(k)}: {v}" for k, v in parts.items()) + "}"


class KlaviyoOrders(KlaviyoBase):
    capabilities = Capabilities(
        label="Klaviyo orders",
        standard_fields=STANDARD_FIELDS,
        custom_prefix="properties",
        identifier_fields=("order_id",),
        options=("ordered_product_events", "backfill", "order_statuses", "item_fields"),
        bool_options=("ordered_product_events", "backfill"),
        batch_records=MAX_EVENTS,
        batch_bytes=MAX_BODY_BYTES,
    )

    def __init__(self, conn: KlaviyoConnection, sync: Sync, *, speedup: float | None = None):
        super().__init__(conn, sync, speedup=speedup)
        self.fields = {t.field for t in sync.fields().values()}
        self.products = bool(self.option("ordered_product_events", False))
        self.statuses = status_metrics(sync.destination.options())
        self.item_fields: dict[str, str] = dict(self.option("item_fields", None) or {})
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
        options = sync.destination.options()
        products = options.get("ordered_product_events")
        if products is True and "items" not in mapped:
            problems.append(
                "destination.ordered_product_events: map the order lines (a LIST column) to items"
            )
        if "order_statuses" in options:
            wrong = check_statuses(options["order_statuses"])
            if wrong:
                problems.append(wrong)
            elif "status" not in mapped:
                problems.append(
                    "destination.order_statuses: map the order's status column to status"
                )
        chosen = options.get("item_fields")
        if chosen is not None and not (
            isinstance(chosen, dict)
            and all(k in ITEM_FIELDS and isinstance(v, str) and v for k, v in chosen.items())
        ):
            problems.append(
                "destination.item_fields: a mapping of Klaviyo item property "
                f"({', '.join(ITEM_FIELDS)}) to the order line's field (got {chosen!r})"
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
        Product event holds a subset of its order's), the order id twice (``OrderId`` and
        ``unique_id``), the lines three times (``Items``; ``ItemNames``; ``Categories`` and
        ``Brands``) and the envelope."""
        fields = [c for c in table.column_names if not c.startswith("__")]
        bound = sizes.row_bound(table, fields) + sum(len(part) for part in self.entry) + 500
        for twice in ("order_id", "items", "items"):
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
        table, unknown = self._without_unknown_status(table)
        table, long = self._without_long_strings(table)
        return table, errors + unknown + long

    def metric(self, table: pa.Table) -> pa.Array:
        """Each row's order metric, from its status (Placed Order where it has none); null
        where the status is one no metric lists."""
        if "status" not in table.column_names or table.num_rows == 0:
            return pa.array([PLACED_ORDER] * table.num_rows, pa.string())
        status = pc.cast(table["status"], pa.string()).combine_chunks()
        words = pc.utf8_lower(pc.utf8_trim_whitespace(status))
        known = pa.array(list(self.statuses), pa.string())
        picked = pc.take(
            pa.array(list(self.statuses.values()), pa.string()), pc.index_in(words, value_set=known)
        )
        return pc.if_else(pc.is_null(status), pa.scalar(PLACED_ORDER), picked)

    def _without_unknown_status(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """Rows whose status names a metric; a status no metric lists is a row error (a
        cancellation word we do not know must not count as revenue)."""
        if "status" not in table.column_names:
            return table, []
        unknown = pc.is_null(self.metric(table))
        if not any_true(unknown):
            return table, []
        column = next((c for c, t in self.sync.fields().items() if t.field == "status"), "status")
        errors = row_errors(
            table,
            unknown,
            column,
            "unknown_order_status",
            "no Klaviyo order metric lists this status; add it to destination.order_statuses "
            "under the metric it stands for, e.g. {Fulfilled Order: [shipped]}",
            value="status",
        )
        return table.filter(pc.invert(unknown)), errors

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
            if pt.is_string(values.type) or pt.is_large_string(values.type):
                long = pc.fill_null(pc.greater(pc.binary_length(values), MAX_STRING_BYTES), False)
                # the value's start
                shown = pc.utf8_slice_codeunits(values, 0, 100)
                what = f"longer than the {MAX_STRING_BYTES} bytes Klaviyo takes in one string "
                what += "(the value shown is its start)"
            else:
                nested = _longest_nested_string(values.combine_chunks())
                if nested is None:
                    continue
                long, shown = pc.greater(nested, MAX_STRING_BYTES), nested  # its length
                what = f"holds a string longer than the {MAX_STRING_BYTES} bytes Klaviyo takes "
                what += "in one string (the value shown is its length in bytes)"
            if not any_true(long):
                continue
            bad = table.filter(long)
            errors += [
                RowError(row, ident, column, value, "value_too_large", what)
                for row, ident, value in zip(
                    bad["__row"].to_pylist(),
                    bad["__id"].to_pylist(),
                    shown.filter(long).to_pylist(),
                    strict=True,
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
    order lines' fields decide the item properties and a line's value."""

    def __init__(self, dest: KlaviyoOrders):
        self.metric = dest.metric
        self.fields = dest.fields
        self.products = dest.products
        self.is_custom = dest.is_custom_field
        self.entry = dest.entry
        self.item_fields = dest.item_fields
        self.profile = RowJson(
            {f: Col(f) for f in PROFILE_FIELDS if f in self.fields}, drop_nulls=True
        )
        self._con = scratch.cursor()
        self._schema: pa.Schema | None = None
        self._builders: tuple[RowJson, RowJson, RowJson] | None = None

    def _compile(self, schema: pa.Schema) -> tuple[RowJson, RowJson, RowJson]:
        """The Placed Order, status (Fulfilled/Cancelled/Refunded ...) and Ordered Product
        templates for this schema."""
        if self._builders is None or not schema.equals(self._schema):
            self._close_templates()
            fields, scalar = _line_fields(schema)
            sources = item_sources(fields, self.item_fields)
            props = self._properties(fields, sources, scalar)
            placed = self._order_event(props, PLACED_ORDER, "time")
            status = self._order_event(props, Col("__metric"), "status_time")
            ordered = self._ordered_event(fields, sources, scalar)
            self._builders = (
                RowJson(placed, drop_nulls=True),
                RowJson(status, drop_nulls=True),
                RowJson(ordered, drop_nulls=True),
            )
            self._schema = schema
        return self._builders

    def _common(self, metric: str | Col, time: str) -> dict[str, Any]:
        event: dict[str, Any] = {
            "metric": {"data": {"type": "metric", "attributes": {"name": metric}}}
        }
        if "value_currency" in self.fields:
            event["value_currency"] = Col("value_currency")
        if time in self.fields:
            event["time"] = Col(time)
        return event

    def _properties(
        self, fields: dict[str, pa.DataType], sources: dict[str, str], scalar: bool
    ) -> dict[str, Any]:
        """An order event's properties: OrderId, Status, Items (Klaviyo's item names),
        ItemNames, Categories and Brands over the lines, and the custom properties."""
        props: dict[str, Any] = {"OrderId": Col("order_id")}
        if "status" in self.fields:
            props["Status"] = Col("status")
        if "items" in self.fields and scalar:
            props["Items"] = Expr("list_transform(t.items, lambda x: {'ProductName': x})")
            props["ItemNames"] = Col("items")
        elif "items" in self.fields:
            if fields:
                item = item_sql("x", fields, sources)
                props["Items"] = Expr(f"list_transform(t.items, lambda x: {item})")
            else:
                props["Items"] = Col("items")
            if "ProductName" in sources:
                pick = f"x.{ident(sources['ProductName'])}"
                props["ItemNames"] = Expr(f"list_transform(t.items, lambda x: {pick})")
            if "Categories" in sources:
                pick = f"x.{ident(sources['Categories'])}"
                every = f"list_transform(t.items, lambda x: {pick})"
                if pt.is_list(fields[sources["Categories"]]):
                    every = f"flatten({every})"
                props["Categories"] = Expr(f"list_distinct({every})")
            if "Brand" in sources:
                pick = f"x.{ident(sources['Brand'])}"
                props["Brands"] = Expr(f"list_distinct(list_transform(t.items, lambda x: {pick}))")
        for field in sorted(self.fields):
            if self.is_custom(field):
                props[field.partition(".")[2]] = Col(field)
        return props

    def _order_event(self, props: dict[str, Any], metric: str | Col, time: str) -> dict[str, Any]:
        event = self._common(metric, time)
        event.update(properties=props, unique_id=Col("order_id"))
        if "value" in self.fields:
            event["value"] = Col("value")
        return event

    def _ordered_event(
        self, fields: dict[str, pa.DataType], sources: dict[str, str], scalar: bool
    ) -> dict[str, Any]:
        if scalar:
            props = Expr("{'OrderId': t.order_id, 'ProductName': t.line}")
        elif fields:
            props = Expr(item_sql("t.line", fields, sources, first={"OrderId": "t.order_id"}))
        else:
            props = Expr("{'OrderId': t.order_id}")
        event = self._common(ORDERED_PRODUCT, "time")
        event.update(
            properties=props, unique_id=Expr("t.order_id || ':' || CAST(t.line_no AS VARCHAR)")
        )
        if "RowTotal" in sources:
            event["value"] = Expr(f"CAST(t.line.{ident(sources['RowTotal'])} AS DOUBLE)")
        elif "Quantity" in sources and "ItemPrice" in sources:
            quantity, price = ident(sources["Quantity"]), ident(sources["ItemPrice"])
            event["value"] = Expr(f"CAST(t.line.{quantity} * t.line.{price} AS DOUBLE)")
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
        table = table.append_column("__metric", self.metric(table))
        table = table.append_column("__profile", self.profile.build(table))
        placed_b, status_b, ordered_b = self._compile(table.schema)
        metric = table["__metric"]
        order_id = pc.cast(table["order_id"], pa.string())
        table = table.append_column("__uid", order_id)
        placed = table.filter(pc.fill_null(pc.not_equal(metric, CANCELLED_ORDER), True))
        status = table.filter(pc.fill_null(pc.not_equal(metric, PLACED_ORDER), True))
        parts = [
            _Part(placed, placed_b.build(placed), 0, PLACED_ORDER),
            _Part(status, status_b.build(status), STATUS_SEQ, None),
        ]
        if self.products and placed.num_rows:
            lines = self._lines(placed)
            number = pc.cast(lines["line_no"], pa.string())
            lines = lines.set_column(
                lines.schema.get_field_index("__uid"),
                "__uid",
                pc.binary_join_element_wise(lines["__uid"], number, ":"),
            )
            parts.append(_Part(lines, ordered_b.build(lines), None, ORDERED_PRODUCT))
        events = pa.table(
            {
                "doc": pa.concat_arrays([self._entries(p.table, p.docs) for p in parts]),
                "row": pa.concat_arrays([_col(p.table, "__row") for p in parts]),
                "id": pa.concat_arrays([_col(p.table, "__id") for p in parts]),
                "seq": pa.concat_arrays([p.seq() for p in parts]),
                "key": pa.concat_arrays([p.key() for p in parts]),
            }
        ).sort_by([("row", "ascending"), ("seq", "ascending")])
        events = _last_of_each(events)
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
        for builder in self._builders or ():
            builder.close()
        self._builders = None

    def close(self) -> None:
        self._close_templates()
        self.profile.close()
        self._con.close()


def _col(table: pa.Table, name: str) -> pa.Array:
    return (
        table[name].combine_chunks()
        if table.num_rows
        else pa.array([], table.schema.field(name).type)
    )


class _Part:
    """One kind of event of the batch: its rows, their docs, their place among a row's events
    (``seq``; None: the line number) and metric (None: the row's status metric)."""

    def __init__(self, table: pa.Table, docs: pa.Array, seq: int | None, metric: str | None):
        self.table, self.docs, self._seq, self._metric = table, docs, seq, metric

    def seq(self) -> pa.Array:
        if self._seq is None:
            return pc.cast(_col(self.table, "line_no"), pa.int64())
        return pa.array(np.full(self.table.num_rows, self._seq, np.int64))

    def key(self) -> pa.Array:
        """Profile, metric and unique_id, joined: what Klaviyo keeps one event of."""
        metric = self._metric if self._metric is not None else _col(self.table, "__metric")
        return pc.binary_join_element_wise(
            _col(self.table, "__profile"), metric, _col(self.table, "__uid"), "\x00"
        )


def _last_of_each(events: pa.Table) -> pa.Table:
    """``events`` (in row order) keeping, of events with the same key, the last row's: a bulk
    call with a unique_id repeated for a profile and metric fails whole."""
    if events.num_rows < 2 or pc.count_distinct(events["key"]).as_py() == events.num_rows:
        return events
    at = events.append_column("i", pa.array(np.arange(events.num_rows, dtype=np.int64)))
    last = at.group_by("key").aggregate([("i", "max")])["i_max"]
    return events.filter(pc.is_in(at["i"], value_set=last))


def _longest_nested_string(values: pa.Array) -> pa.Array | None:
    """Per row, the byte length of the longest string anywhere inside a list or struct value
    (an order's items: a line's name), 0 where there is none; None for a type holding no
    strings. Klaviyo refuses a whole call for one string over 100 KB inside an event's
    properties as much as at its top (https://developers.klaviyo.com/en/reference/
    bulk_create_events: "A single string cannot exceed 100KB")."""
    rows = len(values)
    if pt.is_string(values.type) or pt.is_large_string(values.type):
        return pc.fill_null(pc.binary_length(values), 0).cast(pa.int64())
    if pt.is_struct(values.type):
        # flatten, not field(): it applies the array's offset and the struct's nulls
        found = [_longest_nested_string(child) for child in values.flatten()]
        longest = [f for f in found if f is not None]
        if not longest:
            return None
        out = longest[0]
        for more in longest[1:]:
            out = pc.max_element_wise(out, more)
        return out
    if pt.is_list(values.type) or pt.is_large_list(values.type):
        inner = _longest_nested_string(pc.list_flatten(values))
        if inner is None:
            return None
        parents = pc.list_parent_indices(values)
        per_row = np.zeros(rows, dtype=np.int64)
        np.maximum.at(per_row, parents.to_numpy(), inner.to_numpy(zero_copy_only=False))
        return pa.array(per_row)
    return None

"""Orders into Dotdigital's contact-scoped ``orders`` insight collection, one record an order.

The record is keyed by the order id and owned by the contact with the order's email; its
fields are Dotdigital's order schema (``id``, ``order_total``, ``order_subtotal``,
``currency``, ``purchase_date``, ``order_status``, ``products[name, price, sku, qty]``) plus
any custom key. Decisions:

* Status: mapped through ``destination.order_status_map``, added to (or overriding)
  commercetools' table Open→Pending, Confirmed→Paid, Complete→Completed, Cancelled→Cancelled,
  matched ignoring case. A status the table does not know is a row error
  (``unknown_order_status``), not passed through: Dotdigital's order reports and segments
  group by these words, and an unmapped "OnHold" would quietly split them. Add it to the map.
* Products: the view's line items are a list of records; their fields are renamed to
  Dotdigital's (``name`` ← name/product_name/title, ``price`` ← price/unit_price, ``sku``,
  ``qty`` ← qty/quantity, or as ``destination.product_fields`` says); other fields travel
  under their own names.
* An order without an email is a row error (``missing_email``). An order whose contact does
  not exist is refused by the API and reported as ``destination_rejected``: run the contact
  sync first (the order is sent again when it next changes, or with ``--full-refresh``).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from reverse_etl.config import Sync
from reverse_etl.destinations.dotdigital import insight
from reverse_etl.destinations.dotdigital import insight_rules as rules
from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.destinations.dotdigital.insight import Check, InsightDestination
from reverse_etl.destinations.rowjson import Expr
from reverse_etl.errors import DestinationError
from reverse_etl.sql import literal

# commercetools' mapping, as its Dotdigital integration documents it
DEFAULT_STATUS_MAP = {
    "Open": "Pending",
    "Confirmed": "Paid",
    "Complete": "Completed",
    "Cancelled": "Cancelled",
}
# Dotdigital's product key → the line-item fields read for it, first present wins
PRODUCT_KEYS: dict[str, tuple[str, ...]] = {
    "name": ("name", "product_name", "title"),
    "price": ("price", "unit_price"),
    "sku": ("sku",),
    "qty": ("qty", "quantity"),
}


class DotdigitalOrders(InsightDestination):
    scope = "contact"
    collection_type = "orders"
    capabilities = insight.capabilities(
        "orders records",
        {
            "id": "string",
            "email": "email",
            "order_total": "number",
            "order_subtotal": "number",
            "currency": "string",
            "purchase_date": "datetime",
            "order_status": "string",
            "products": "json",
        },
        "order_status_map",
        "product_fields",
    )

    def __init__(self, conn: DotdigitalConnection, sync: Sync):
        super().__init__(conn, sync)
        self.status_map = self.status_table(sync)
        self.product_fields: dict[str, str] = dict(
            sync.destination.options().get("product_fields") or {}
        )

    @classmethod
    def default_collection(cls, sync: Sync) -> str:
        return "orders"

    @classmethod
    def status_table(cls, sync: Sync) -> dict[str, str]:
        """Lower-cased warehouse status → Dotdigital status."""
        table = {k.lower(): v for k, v in DEFAULT_STATUS_MAP.items()}
        for k, v in (sync.destination.options().get("order_status_map") or {}).items():
            table[str(k).strip().lower()] = v
        return table

    @classmethod
    def check_options(cls, sync: Sync) -> list[str]:
        problems = super().check_options(sync)
        opts = sync.destination.options()
        statuses = opts.get("order_status_map")
        if statuses is not None and not (
            isinstance(statuses, dict)
            and all(
                isinstance(k, str) and isinstance(v, str) and k.strip() and v.strip()
                for k, v in statuses.items()
            )
        ):
            problems.append(
                "destination.order_status_map: a mapping of warehouse status to Dotdigital status, "
                "both words, e.g. {OnHold: Pending, Shipped: Completed}"
            )
        products = opts.get("product_fields")
        if products is not None:
            if not isinstance(products, dict) or not all(
                isinstance(v, str) for v in products.values()
            ):
                problems.append(
                    "destination.product_fields: a mapping such as {qty: quantity, price: unit_price}"
                )
            else:
                unknown = sorted(set(products) - set(PRODUCT_KEYS))
                if unknown:
                    problems.append(
                        f"destination.product_fields: {', '.join(map(repr, unknown))} is not a Dotdigital "
                        f"product key; use {', '.join(PRODUCT_KEYS)}"
                    )
        return problems

    @classmethod
    def check_sync(cls, sync: Sync) -> list[str]:
        problems = super().check_sync(sync)
        if "email" not in {t.field for t in sync.fields().values()}:
            problems.append(
                "map a column to `email`: each order belongs to the contact with that email"
            )
        return problems

    # ------------------------------------------------------------------ record

    def json_fields(self, schema: pa.Schema) -> list[str]:
        return [n for n in super().json_fields(schema) if n != "email"]  # the owner, not data

    def value_sql(self, name: str, dtype: pa.DataType) -> Any:
        if name == "order_status":
            return Expr(self._status_sql())
        if name == "products":
            return Expr(self._products_sql(dtype))
        return super().value_sql(name, dtype)

    def _status_sql(self) -> str:
        cases = " ".join(f"WHEN {literal(k)} THEN {literal(v)}" for k, v in self.status_map.items())
        return f'CASE lower(t."order_status") {cases} END'

    def _products_sql(self, dtype: pa.DataType) -> str:
        item = (
            dtype.value_type if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) else None
        )
        if item is None or not pa.types.is_struct(item):
            raise DestinationError(
                f"column {self.column_of.get('products', 'products')!r} (products) is "
                f"{'a list of ' + str(item) if item is not None else str(dtype)}; it must be "
                "a list of records, e.g. list({'name': product_name, 'price': unit_price, 'sku': sku, "
                "'qty': quantity}) in the view"
            )
        names = [item.field(i).name for i in range(item.num_fields)]
        keys: dict[str, str] = {}
        for key, candidates in PRODUCT_KEYS.items():
            wanted = self.product_fields.get(key)
            if wanted is not None and wanted not in names:
                raise DestinationError(
                    f"destination.product_fields.{key}: the line items have no field {wanted!r}; "
                    f"they have {', '.join(names)}"
                )
            source = wanted or next((c for c in candidates if c in names), None)
            if source is not None:
                keys[key] = source
        used = set(keys.values())
        for name in names:  # every other line-item field under its own name
            if name not in used and name not in keys:
                keys[name] = name
        return f'list_transform(t."products", lambda x0: {rules.struct_sql("x0", keys, item, depth=1)})'

    def extra_checks(self, schema: pa.Schema) -> list[Check]:
        email = self.column_of.get("email", "email")
        checks = [
            Check(
                "email",
                't."email" IS NULL',
                "missing_email",
                f"{email}: empty; an order belongs to the contact with its email",
            ),
        ]
        if "order_status" in schema.names:
            known = ", ".join(
                sorted(
                    {k for k in DEFAULT_STATUS_MAP}
                    | {
                        str(k)
                        for k in (self.sync.destination.options().get("order_status_map") or {})
                    }
                )
            )
            checks.append(
                Check(
                    "order_status",
                    f't."order_status" IS NOT NULL AND ({self._status_sql()}) IS NULL',
                    "unknown_order_status",
                    f"{self.column_of.get('order_status')}: not a status destination.order_status_map "
                    f"knows ({known}); add it there with the Dotdigital status it stands for",
                )
            )
        return checks

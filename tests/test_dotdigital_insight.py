"""Dotdigital insight data end to end: orders into the contact-scoped ``orders`` collection and
the product catalog into an account-scoped one, through the real engine, client and
destinations against the Dotdigital sandbox over loopback HTTP. Every test ends with the
sandbox holding no violation (the rig's fixture checks)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from reverse_etl.errors import EXIT_FAILED, EXIT_OK, EXIT_ROW_ERRORS
from reverse_etl.state import Watermark
from tests.helpers import at, create_table, execute
from tests.sandboxes import (
    Rig,
    assert_counts,
    dotdigital_config_error,
    email_of,
    error_rows,
    fast_clients,
    profile_rows,
    sync_entry,
)

INSIGHT = "/insightData/v3/import"

ORDER_COLUMNS: dict[str, str] = {
    "order_id": "VARCHAR",
    "email": "VARCHAR",
    "status": "VARCHAR",
    "currency": "VARCHAR",
    "ordered_at": "TIMESTAMPTZ",
    "subtotal": "DECIMAL(12,2)",
    "order_total": "DECIMAL(12,2)",
    "shipping": "DECIMAL(10,2)",
    "items": "STRUCT(sku VARCHAR, product_id VARCHAR, name VARCHAR, quantity INTEGER, "
    "unit_price DECIMAL(10,2))[]",
    "modified_at": "TIMESTAMPTZ",
}
ORDER_MAPPING: dict[str, Any] = {
    "order_id": "id",
    "email": "email",
    "status": "order_status",
    "currency": "currency",
    "ordered_at": "purchase_date",
    "subtotal": "order_subtotal",
    "order_total": "order_total",
    "shipping": "delivery_total",  # a custom key
    "items": "products",
}
STATUSES = ("Open", "Confirmed", "Complete", "Cancelled")

CATALOG_COLUMNS: dict[str, str] = {
    "product_id": "VARCHAR",
    "sku": "VARCHAR",
    "title": "VARCHAR",
    "url": "VARCHAR",
    "image_url": "VARCHAR",
    "price": "DECIMAL(10,2)",
    "special_price": "DECIMAL(10,2)",
    "currency": "VARCHAR",
    "category": "VARCHAR",
    "stock": "INTEGER",
    "published": "BOOLEAN",
    "modified_at": "TIMESTAMPTZ",
}
CATALOG_MAPPING: dict[str, Any] = {
    "product_id": "id",
    "sku": "sku",
    "title": "name",
    "url": "url",
    "image_url": "image_path",
    "price": "price",
    "special_price": "sale_price",
    "currency": "currency",
    "category": "category",
    "stock": "stock",
    "published": "is_published",  # a custom key
}


def order_row(n: int, **overrides: Any) -> tuple[Any, ...]:
    """Order ``O{n}`` of customer ``n % 10``, two lines; ``modified_at`` is ``at(n)``."""
    values: dict[str, Any] = {
        "order_id": f"O{n:05d}",
        "email": email_of(n % 10),
        "status": STATUSES[n % 4],
        "currency": "USD",
        "ordered_at": at(n - 3600),
        "subtotal": Decimal(f"{20 + n}.50"),
        "order_total": Decimal(f"{25 + n}.50"),
        "shipping": Decimal("5.00"),
        "items": [
            {
                "sku": f"SKU-{n}",
                "product_id": f"P{n}",
                "name": f"Hat {n}",
                "quantity": 1,
                "unit_price": Decimal(f"{n}.50"),
            },
            {
                "sku": "SKU-0",
                "product_id": "P0",
                "name": "Scarf",
                "quantity": 2,
                "unit_price": Decimal("10.00"),
            },
        ],
        "modified_at": at(n),
    }
    values.update(overrides)
    return tuple(values[c] for c in ORDER_COLUMNS)


def catalog_row(n: int, **overrides: Any) -> tuple[Any, ...]:
    values: dict[str, Any] = {
        "product_id": f"P{n:04d}",
        "sku": f"SKU-{n}",
        "title": f"Product {n}",
        "url": f"https://shop.example.com/p/{n}",
        "image_url": f"https://cdn.example.com/{n}.jpg",
        "price": Decimal(f"{n}.99"),
        "special_price": None if n % 2 else Decimal(f"{n}.49"),
        "currency": "GBP",
        "category": "Hats",
        "stock": n * 3,
        "published": n % 5 != 0,
        "modified_at": at(n),
    }
    values.update(overrides)
    return tuple(values[c] for c in CATALOG_COLUMNS)


def orders_sync(name: str = "orders", **extra: Any) -> dict[str, Any]:
    mapping = dict(extra.pop("mapping", ORDER_MAPPING))
    return sync_entry(
        name, "dotdigital", mapping, table="orders", object="orders", identifier="order_id", **extra
    )


def catalog_sync(name: str = "catalog", **extra: Any) -> dict[str, Any]:
    mapping = dict(extra.pop("mapping", CATALOG_MAPPING))
    return sync_entry(
        name,
        "dotdigital",
        mapping,
        table="products",
        object="catalog",
        identifier="product_id",
        **extra,
    )


def contacts_sync() -> dict[str, Any]:
    return sync_entry("contacts", "dotdigital", {"email": "email", "first_name": "FIRSTNAME"})


def records(rig: Rig, collection: str) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in rig.sandbox.insight(collection)}


# --------------------------------------------------------------------------- orders


def test_orders_land_in_the_contact_scoped_collection_with_mapped_statuses(dotdigital):
    rig = dotdigital()
    rig.table(profile_rows(range(10)))
    rows = [order_row(n) for n in range(12)] + [
        order_row(12, status="OnHold"),  # not in the status table
        order_row(13, email=email_of(99)),  # no such contact
        order_row(14, email=None),  # no owner at all
    ]
    create_table(rig.db, "orders", ORDER_COLUMNS, rows)
    rig.configure([contacts_sync(), orders_sync()])
    assert rig.run("contacts").exit_code == EXIT_OK

    result = rig.run("orders")

    # the status and the missing owner are found before sending (screen): rejected; the
    # unknown contact only the API can tell: sent and failed
    assert_counts(result, EXIT_ROW_ERRORS, read=15, rejected=2, sent=13, updated=12, failed=1)
    errors = {e["row_number"]: e for e in error_rows(result)}
    assert {n: e["reason"] for n, e in errors.items()} == {
        "13": "unknown_order_status",
        "14": "contact_missing",  # queued: sent again by the next runs
        "15": "missing_email",
    }
    assert (errors["13"]["column"], errors["13"]["value"]) == ("status", "OnHold")
    assert "Cancelled, Complete, Confirmed, Open" in errors["13"]["message"]
    assert errors["14"]["identifier"] == "O00013"
    assert (errors["14"]["column"], errors["14"]["value"]) == ("email", email_of(99))
    assert "ContactEmailDoesNotExist" in errors["14"]["message"]
    assert (errors["15"]["column"], errors["15"]["identifier"]) == ("email", "O00014")

    landed = records(rig, "orders")
    assert sorted(landed) == [f"O{n:05d}" for n in range(12)]
    contact_ids = {c["identifiers"]["email"]: c["contactId"] for c in rig.sandbox.contacts()}
    assert {k: r["ownerContactId"] for k, r in landed.items()} == {
        f"O{n:05d}": contact_ids[email_of(n % 10)] for n in range(12)
    }
    assert [landed[f"O{n:05d}"]["json"]["order_status"] for n in range(4)] == [
        "Pending",
        "Paid",
        "Completed",
        "Cancelled",
    ]
    assert landed["O00005"]["json"] == {
        "id": "O00005",
        "order_status": "Paid",
        "currency": "USD",
        "purchase_date": "2025-03-01T11:00:05Z",
        "order_subtotal": 25.5,
        "order_total": 30.5,
        "delivery_total": 5.0,
        "products": [
            {"name": "Hat 5", "price": 5.5, "sku": "SKU-5", "qty": 1, "product_id": "P5"},
            {"name": "Scarf", "price": 10.0, "sku": "SKU-0", "qty": 2, "product_id": "P0"},
        ],
    }
    [collection] = [
        c
        for c in httpx.get(
            f"{rig.base_url}/insightData/v3/collections",
            auth=(rig.sandbox.settings.username, rig.sandbox.settings.password),
        ).json()
        if c["collectionName"] == "orders"
    ]
    assert (collection["collectionScope"], collection["collectionType"]) == ("contact", "orders")
    assert len(rig.requests("PUT", INSIGHT)) == 1
    assert rig.watermark("orders") == Watermark(at(14), "O00014")

    # the missing contact arrives; the order is sent again when it next changes
    rig.table(profile_rows(range(10)) + profile_rows([99]))
    assert rig.run("contacts").exit_code == EXIT_OK
    rows[13] = order_row(13, email=email_of(99), modified_at=at(100))
    create_table(rig.db, "orders", ORDER_COLUMNS, rows)
    again = rig.run("orders")
    assert again.exit_code == EXIT_OK and again.record.counts.read == 1
    owner = rig.sandbox.contact(email_of(99))["contactId"]
    assert records(rig, "orders")["O00013"]["ownerContactId"] == owner


def test_order_status_map_extends_the_default_ignoring_case(dotdigital):
    rig = dotdigital()
    rig.table(profile_rows(range(10)))
    rows = [
        order_row(0, status="open"),
        order_row(1, status="ONHOLD"),
        order_row(2, status="Complete"),
        order_row(3, status=None),
    ]
    create_table(rig.db, "orders", ORDER_COLUMNS, rows)
    options = {"order_status_map": {"OnHold": "Pending", "Complete": "Shipped"}}
    rig.configure([contacts_sync(), orders_sync(destination=options)])
    assert rig.run("contacts").exit_code == EXIT_OK

    assert rig.run("orders").exit_code == EXIT_OK

    landed = records(rig, "orders")
    assert [landed[f"O{n:05d}"]["json"].get("order_status") for n in range(4)] == [
        "Pending",
        "Pending",
        "Shipped",
        None,  # no status: the key is left out
    ]


def test_line_item_fields_can_be_named_explicitly(dotdigital):
    rig = dotdigital()
    rig.table(profile_rows(range(2)))
    execute(
        rig.db,
        "CREATE TABLE orders AS SELECT 'O' || i AS order_id, 'customer0000' || i || '@example.com' "
        "AS email, TIMESTAMPTZ '2025-03-01 12:00:00+00' + i * INTERVAL 1 SECOND AS modified_at, "
        "[{'code': 'A-' || i, 'label': 'Thing', 'n': 3, 'cost': 1.25, 'price': 9.0}] AS lines "
        "FROM range(2) t(i)",
    )
    options = {"product_fields": {"sku": "code", "name": "label", "qty": "n", "price": "cost"}}
    mapping = {"order_id": "id", "email": "email", "lines": "products"}
    rig.configure([contacts_sync(), orders_sync(mapping=mapping, destination=options)])
    assert rig.run("contacts").exit_code == EXIT_OK

    assert rig.run("orders").exit_code == EXIT_OK

    # the line's own `price` is dropped: `price` is read from `cost` as configured
    assert records(rig, "orders")["O1"]["json"]["products"] == [
        {"name": "Thing", "price": 1.25, "sku": "A-1", "qty": 3}
    ]


def test_products_that_are_not_records_stop_the_run_with_a_clear_message(dotdigital):
    rig = dotdigital()
    execute(
        rig.db,
        "CREATE TABLE orders AS SELECT 'O1' AS order_id, 'a@example.com' AS email, "
        "TIMESTAMPTZ '2025-03-01 12:00:00+00' AS modified_at, ['SKU-1', 'SKU-2'] AS skus",
    )
    rig.configure([orders_sync(mapping={"order_id": "id", "email": "email", "skus": "products"})])

    result = rig.run("orders")

    assert result.exit_code == EXIT_FAILED
    assert "'skus' (products) is a list of string;" in result.record.message
    assert "must be a list of records" in result.record.message
    assert rig.requests("PUT", INSIGHT) == []


def test_orders_collection_of_the_other_scope_stops_the_run_before_sending(dotdigital):
    rig = dotdigital()
    auth = (rig.sandbox.settings.username, rig.sandbox.settings.password)
    body = {
        "collectionName": "orders",
        "collectionScope": "account",
        "collectionType": "orders",
        "records": [{"key": "x", "json": {"a": 1}}],
    }
    assert httpx.put(f"{rig.base_url}{INSIGHT}", json=body, auth=auth).status_code == 202
    create_table(rig.db, "orders", ORDER_COLUMNS, [order_row(1)])
    rig.configure([orders_sync()])

    result = rig.run("orders")

    assert result.exit_code == EXIT_FAILED
    assert "'orders' is account-scoped, but orders need a contact-scoped one" in (
        result.record.message
    )
    assert len(rig.requests("PUT", INSIGHT)) == 1  # only the test's own


def test_orders_dry_run_writes_the_imports_it_would_send(dotdigital):
    rig = dotdigital()
    create_table(rig.db, "orders", ORDER_COLUMNS, [order_row(n) for n in range(3)])
    rig.configure([orders_sync(destination={"import_size": 2})])

    result = rig.run("orders", dry_run=True)

    lines = [line for line in Path(result.dry_run_file).read_text().splitlines() if line]
    assert len(lines) == 2 and rig.sandbox.request_log == []
    first = orjson.loads(lines[0])
    assert (first["method"], first["path"], first["rows"]) == ("PUT", INSIGHT, 2)
    assert first["body"]["collectionName"] == "orders"
    assert first["body"]["records"][0]["contactIdentity"] == {
        "identifier": "email",
        "value": email_of(0),
    }


# --------------------------------------------------------------------------- catalog


def test_catalog_lands_in_an_account_scoped_collection(dotdigital):
    rig = dotdigital()
    create_table(rig.db, "products", CATALOG_COLUMNS, [catalog_row(n) for n in range(1, 8)])
    rig.configure([catalog_sync("shop.catalog")])

    result = rig.run("shop.catalog")

    assert result.exit_code == EXIT_OK
    c = result.record.counts
    assert (c.read, c.sent, c.updated, c.failed) == (7, 7, 7, 0)
    landed = records(rig, "catalog_shop_catalog")  # the default name, from the sync's
    assert sorted(landed) == [f"P{n:04d}" for n in range(1, 8)]
    assert all("ownerContactId" not in r for r in landed.values())
    assert landed["P0002"]["json"] == {
        "id": "P0002",
        "sku": "SKU-2",
        "name": "Product 2",
        "url": "https://shop.example.com/p/2",
        "image_path": "https://cdn.example.com/2.jpg",
        "price": 2.99,
        "sale_price": 2.49,
        "currency": "GBP",
        "category": "Hats",
        "stock": 6,
        "is_published": True,
    }
    assert "sale_price" not in landed["P0003"]["json"]  # null: left out

    create_table(
        rig.db,
        "products",
        CATALOG_COLUMNS,
        [catalog_row(n) for n in range(1, 8)]
        + [catalog_row(3, price=Decimal("1.00"), modified_at=at(50))],
    )
    second = rig.run("shop.catalog")
    assert second.record.counts.read == 1
    assert records(rig, "catalog_shop_catalog")["P0003"]["json"]["price"] == 1.0
    assert len(records(rig, "catalog_shop_catalog")) == 7  # upserted by key


def test_catalog_collection_name_is_configurable(dotdigital):
    rig = dotdigital()
    create_table(rig.db, "products", CATALOG_COLUMNS, [catalog_row(n) for n in range(3)])
    rig.configure([catalog_sync(destination={"collection": "catalog_estar"})])

    assert rig.run("catalog").exit_code == EXIT_OK

    assert len(records(rig, "catalog_estar")) == 3
    assert rig.sandbox.insight("catalog_catalog") == []


def test_nested_arrays_and_invalid_keys_are_row_errors_before_sending(dotdigital):
    rig = dotdigital()
    execute(
        rig.db,
        """CREATE TABLE products AS SELECT
               'P' || i AS product_id,
               TIMESTAMPTZ '2025-03-01 12:00:00+00' + i * INTERVAL 1 SECOND AS modified_at,
               CASE WHEN i = 1 THEN [['red', 'blue'], ['s']] WHEN i = 2 THEN [] END AS sizes,
               CASE WHEN i = 3 THEN {'unit price': 1.5, 'ok': 1} END AS odd,
               CASE WHEN i = 4 THEN MAP {'fine': 1, 'not fine': 2}
                    WHEN i = 5 THEN MAP {'a-b': 1, 'a_b': 2}
                    ELSE MAP {'fine': 3} END AS attrs,
               [{'name': 'x', 'dims': [1, 2]}] AS parts
           FROM range(7) t(i)""",
    )
    mapping = {
        "product_id": "id",
        "sizes": "size_groups",
        "odd": "odd",
        "attrs": "attributes",
        "parts": "parts",
    }
    rig.configure([catalog_sync(mapping=mapping)])

    result = rig.run("catalog")

    # found before sending (screen): rejected, never sent
    assert_counts(result, EXIT_ROW_ERRORS, read=7, rejected=4, sent=3, updated=3, failed=0)
    errors = {e["identifier"]: e for e in error_rows(result)}
    assert {k: e["reason"] for k, e in errors.items()} == {
        "P1": "insight_nested_array",
        "P3": "insight_invalid_key",
        "P4": "insight_invalid_key",
        "P5": "insight_invalid_key",
    }
    assert (
        errors["P1"]["column"] == "sizes" and "JsonContainsNestedArray" in errors["P1"]["message"]
    )
    assert "odd: unit price" in errors["P3"]["message"]
    assert errors["P4"]["column"] == "attrs"
    landed = records(rig, "catalog_catalog")
    assert sorted(landed) == ["P0", "P2", "P6"]
    # an array of records holding an array is allowed; an empty list of lists has no array in it
    assert landed["P0"]["json"]["parts"] == [{"name": "x", "dims": [1, 2]}]
    assert landed["P2"]["json"]["size_groups"] == []


def test_at_most_five_insight_imports_are_unfinished_at_once(dotdigital):
    rig = dotdigital(job_seconds=10.0)  # 0.2 s each at the fixture's speedup
    create_table(rig.db, "products", CATALOG_COLUMNS, [catalog_row(n) for n in range(240)])
    rig.configure([catalog_sync(batch_size=60, destination={"import_size": 20})])

    result = rig.run("catalog")

    assert result.exit_code == EXIT_OK
    assert len(rig.requests("PUT", INSIGHT)) == 12
    assert rig.sandbox.counters["too_many_active_imports"] == 0
    assert len(records(rig, "catalog_catalog")) == 240


def test_failed_insight_imports_are_resubmitted(dotdigital, monkeypatch):
    fast_clients(monkeypatch, max_attempts=10)
    # failed_job is drawn on imports only, so the faults fall the same way every run
    rig = dotdigital(fault_rate=0.25, fault_kinds=("failed_job",), seed=2)
    create_table(rig.db, "products", CATALOG_COLUMNS, [catalog_row(n) for n in range(200)])
    rig.configure([catalog_sync(batch_size=50, destination={"import_size": 25})])

    result = rig.run("catalog")

    assert result.exit_code == EXIT_OK, result.record.message
    assert len(records(rig, "catalog_catalog")) == 200
    assert rig.sandbox.counters["fault_failed_job"] >= 1


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("sync", "expected"),
    [
        (
            catalog_sync(destination={"collection": "2024 catalog"}),
            ["destination.collection", "'2024 catalog'", "try '_2024_catalog'"],
        ),
        (catalog_sync(destination={"collection": "x"}), ["destination.collection", "2-255"]),
        (
            catalog_sync(mapping={**CATALOG_MAPPING, "title": "Product Name"}),
            ["mapping.title", "'Product Name' is not an insight data key", "try 'Product_Name'"],
        ),
        (
            catalog_sync(mapping={**CATALOG_MAPPING, "title": "image-path"}),
            ["'image-path' and 'image_path' differ only by - and _"],
        ),
        (
            catalog_sync(mapping={**CATALOG_MAPPING, "product_id": "sku", "sku": "code"}),
            ["identifier 'product_id' must be mapped to `id`"],
        ),
        (
            catalog_sync(mapping={k: v for k, v in CATALOG_MAPPING.items() if k != "product_id"}),
            ["identifier 'product_id' must be mapped to `id`", "it is not mapped"],
        ),
        (catalog_sync(destination={"list": "Products"}), ["destination.list", "collection"]),
        (catalog_sync(destination={"import_size": 6000}), ["import_size", "1 to 5000"]),
        (
            orders_sync(mapping={k: v for k, v in ORDER_MAPPING.items() if k != "email"}),
            ["map a column to `email`"],
        ),
        (
            orders_sync(destination={"order_status_map": ["Open", "Pending"]}),
            ["destination.order_status_map: a mapping"],
        ),
        (
            orders_sync(destination={"order_status_map": {"Open": ""}}),
            ["destination.order_status_map"],
        ),
        (
            orders_sync(destination={"product_fields": {"quantity": "qty"}}),
            ["'quantity' is not a Dotdigital product key; use name, price, sku, qty"],
        ),
        (
            orders_sync(destination={"order_staus_map": {}}),
            ["unknown option for dotdigital; did you mean 'order_status_map'?"],
        ),
        (orders_sync(consent={"email": "status"}), ["consent: orders records carry no consent"]),
    ],
    ids=[
        "collection-pattern",
        "collection-too-short",
        "bad-key",
        "dash-underscore-clash",
        "identifier-not-id",
        "identifier-not-mapped",
        "list",
        "import-size",
        "orders-without-email",
        "status-map-not-a-mapping",
        "status-map-empty-value",
        "product-key",
        "typo",
        "consent",
    ],
)
def test_insight_config_errors(tmp_path, sync, expected):
    message = dotdigital_config_error(tmp_path, sync)
    for fragment in expected:
        assert fragment in message, message

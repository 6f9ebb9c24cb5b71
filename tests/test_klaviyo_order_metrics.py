"""Klaviyo orders follow Klaviyo's e-commerce metrics: the order's status picks Placed,
Fulfilled, Cancelled or Refunded Order (a cancelled order is not Placed Order revenue), lines
carry Klaviyo's item property names, and a re-sent event is harmless even where Klaviyo
refuses a bulk call over a repeated unique_id (the sandbox's ``klaviyo_duplicate_events:
"refuse_call"``, on in every test here). The rig checks that no request was off-spec."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pytest

from reverse_etl.destinations.base import Tally
from reverse_etl.destinations.klaviyo.orders import KlaviyoOrders
from reverse_etl.engine import make_destination
from reverse_etl.errors import EXIT_OK, EXIT_ROW_ERRORS, ConfigError
from tests.helpers import execute
from tests.sandboxes import Rig, assert_counts, error_rows
from tests.test_klaviyo_orders import EVENTS, ORDER_MAPPING, orders_sync

STRICT = {"klaviyo_duplicate_events": "refuse_call"}


def orders(rig: Rig, *rows: tuple[str, str | None], modified: int = 0) -> None:
    """One order per (order id, status), each with two lines; ``modified`` moves every
    modified_at later (a re-export)."""
    values = ", ".join(
        f"('{oid}', {'NULL' if status is None else repr(status)}, {n})"
        for n, (oid, status) in enumerate(rows)
    )
    execute(
        rig.db,
        f"""
        CREATE OR REPLACE TABLE orders AS
        SELECT
            oid AS order_id, 'c' || n AS customer_id, 'buyer' || n || '@example.com' AS email,
            status, 'USD' AS currency,
            TIMESTAMPTZ '2025-03-01 10:00:00+00' + to_minutes(CAST(n AS BIGINT)) AS ordered_at,
            TIMESTAMPTZ '2025-03-02 12:00:00+00' + to_seconds(CAST(n + {modified} AS BIGINT))
                AS modified_at,
            CAST(40.5 AS DECIMAL(12, 2)) AS order_total, 'web' AS channel,
            [
                {{'sku': 'SKU-1', 'product_id': 'p1', 'name': 'Mug', 'quantity': 2,
                  'unit_price': CAST(5.25 AS DECIMAL(12, 2)), 'url': 'https://shop/mug',
                  'image_url': 'https://img/mug.png', 'categories': ['Kitchen', 'Gifts'],
                  'brand': 'Acme', 'colour': 'red'}},
                {{'sku': 'SKU-2', 'product_id': 'p2', 'name': 'Pan', 'quantity': 1,
                  'unit_price': CAST(30.0 AS DECIMAL(12, 2)), 'url': 'https://shop/pan',
                  'image_url': 'https://img/pan.png', 'categories': ['Kitchen'],
                  'brand': 'Brava', 'colour': 'black'}}
            ] AS items
        FROM (VALUES {values}) AS v(oid, status, n)
        """,
    )


def landed(rig: Rig) -> Counter[tuple[str, str]]:
    """(metric, unique_id) of every event Klaviyo holds, counted."""
    return Counter((e["metric"], e["unique_id"]) for e in rig.sandbox.events())


def test_each_status_sends_its_metric_and_a_cancelled_order_no_placed_revenue(klaviyo):
    rig = klaviyo(**STRICT)
    orders(
        rig,
        ("o1", "Placed"),
        ("o2", " CANCELED "),
        ("o3", "shipped"),
        ("o4", "Refunded"),
        ("o5", None),
    )
    rig.configure([orders_sync(destination={"ordered_product_events": True})])

    result = rig.run("orders")

    assert_counts(result, EXIT_OK, read=5, sent=5, created=5, failed=0)
    lines = {(m, u) for m, u in landed(rig) if m == "Ordered Product"}
    orders_ = {(m, u) for m, u in landed(rig) if m != "Ordered Product"}
    assert orders_ == {
        ("Placed Order", "o1"),
        ("Cancelled Order", "o2"),  # no Placed Order: a cancelled order is no revenue
        ("Placed Order", "o3"),  # first seen fulfilled: it was placed
        ("Fulfilled Order", "o3"),
        ("Placed Order", "o4"),
        ("Refunded Order", "o4"),
        ("Placed Order", "o5"),  # no status: placed
    }
    assert lines == {
        ("Ordered Product", f"{o}:{n}") for o in ("o1", "o3", "o4", "o5") for n in (1, 2)
    }
    assert max(landed(rig).values()) == 1
    by = {(e["metric"], e["unique_id"]): e for e in rig.sandbox.events()}
    cancelled = by[("Cancelled Order", "o2")]
    # the value Klaviyo offsets, the order's time only on Placed Order (no status_time mapped)
    assert cancelled["value"] == 40.5 and cancelled["properties"]["Status"] == "CANCELED"
    assert by[("Placed Order", "o3")]["time"] == "2025-03-01T10:02:00Z"
    assert by[("Fulfilled Order", "o3")]["time"] != "2025-03-01T10:02:00Z"
    revenue = sum(e["value"] for e in rig.sandbox.events() if e["metric"] == "Placed Order")
    assert revenue == 4 * 40.5


def test_a_status_change_sends_the_new_metric_once_over_runs(klaviyo):
    rig = klaviyo(**STRICT)
    orders(rig, ("o1", "paid"), ("o2", "paid"))
    rig.configure([orders_sync()])
    assert rig.run("orders").exit_code == EXIT_OK
    assert landed(rig) == {("Placed Order", "o1"): 1, ("Placed Order", "o2"): 1}

    orders(rig, ("o1", "Delivered"), ("o2", "paid"), modified=60)
    rig.sandbox.reset_log()
    second = rig.run("orders")

    # o1's row goes again, whole: its Placed Order is refused as held already (the call
    # names it), left out, and the call sent again with the Fulfilled Order alone
    c = second.record.counts
    assert second.exit_code == EXIT_OK
    assert (c.read, c.unchanged, c.sent, c.created, c.failed) == (2, 1, 1, 1, 0)
    assert len(rig.requests("POST", EVENTS)) == 2
    assert rig.sandbox.counters["duplicate_events"] == 1
    assert landed(rig) == {
        ("Placed Order", "o1"): 1,
        ("Placed Order", "o2"): 1,
        ("Fulfilled Order", "o1"): 1,
    }

    # every row sent again (the snapshot ignored): every event is held, nothing is new
    rig.sandbox.reset_log()
    third = rig.run("orders", full_refresh=True, resend=True)
    assert_counts(third, EXIT_OK, read=2, sent=2, failed=0)
    assert rig.sandbox.counters["duplicate_events"] == 3
    assert len(rig.requests("POST", EVENTS)) == 1  # refused whole; nothing left to send
    assert sum(landed(rig).values()) == 3


def test_unknown_status_is_a_row_error_until_the_sync_maps_it(klaviyo):
    rig = klaviyo(**STRICT)
    orders(rig, ("o1", "OnHold"), ("o2", "open"), ("o3", "returned"))
    rig.configure([orders_sync()])

    result = rig.run("orders")

    assert_counts(result, EXIT_ROW_ERRORS, read=3, rejected=2, sent=1, created=1, failed=0)
    errors = {e["identifier"]: e for e in error_rows(result)}
    assert {k: (e["reason"], e["column"], e["value"]) for k, e in errors.items()} == {
        "o1": ("unknown_order_status", "status", "OnHold"),
        "o3": ("unknown_order_status", "status", "returned"),
    }
    assert "destination.order_statuses" in errors["o1"]["how_to_fix"]
    assert set(landed(rig)) == {("Placed Order", "o2")}

    mapped = {"Placed Order": ["onhold"], "Returned Order": ["Returned"]}
    rig.configure([orders_sync(destination={"order_statuses": mapped})])
    assert rig.run("orders", full_refresh=True, resend=True).exit_code == EXIT_OK
    assert set(landed(rig)) == {
        ("Placed Order", "o1"),
        ("Placed Order", "o2"),
        ("Placed Order", "o3"),  # a status metric other than cancelled: placed too
        ("Returned Order", "o3"),
    }


def test_lines_carry_klaviyos_item_properties(klaviyo):
    rig = klaviyo(**STRICT)
    orders(rig, ("o1", "placed"))
    rig.configure(
        [
            orders_sync(
                destination={"ordered_product_events": True, "item_fields": {"SKU": "product_id"}}
            )
        ]
    )
    assert rig.run("orders").exit_code == EXIT_OK

    by = {(e["metric"], e["unique_id"]): e for e in rig.sandbox.events()}
    props = by[("Placed Order", "o1")]["properties"]
    mug = {
        "ProductID": "p1",
        "SKU": "p1",  # item_fields: SKU from product_id
        "ProductName": "Mug",
        "Quantity": 2,
        "ItemPrice": 5.25,
        "RowTotal": 10.5,
        "ProductURL": "https://shop/mug",
        "ImageURL": "https://img/mug.png",
        "Categories": ["Kitchen", "Gifts"],
        "Brand": "Acme",
        "colour": "red",  # another field travels under its own name; "sku" cannot, as
        # Klaviyo's "SKU" differs only in case (DuckDB struct keys ignore case): it is left out
    }
    assert props["Items"][0] == mug
    assert props["ItemNames"] == ["Mug", "Pan"]
    assert sorted(props["Categories"]) == ["Gifts", "Kitchen"]
    assert sorted(props["Brands"]) == ["Acme", "Brava"]
    line = by[("Ordered Product", "o1:1")]
    assert line["properties"] == {"OrderId": "o1", **mug}
    assert line["value"] == 10.5


def test_a_repeated_event_in_one_batch_does_not_fail_the_call(klaviyo):
    """A batch that was not screened for duplicate identifiers (the transform leaves one row
    an identifier): the last row's event goes, alone, and the call is taken."""
    rig = klaviyo(**STRICT)
    orders(rig, ("o1", "placed"))
    mapping = {"order_id": "order_id", "email": "email", "order_total": "value", "status": "status"}
    project = rig.configure([orders_sync(mapping=mapping)])
    dest = make_destination(project, project.sync("orders"))
    assert isinstance(dest, KlaviyoOrders)
    try:
        table = pa.table(
            {
                "order_id": ["o1", "o2", "o1"],
                "email": ["a@example.com", "b@example.com", "a@example.com"],
                "value": [10.0, 20.0, 11.0],
                "status": ["placed", "placed", "shipped"],
                "__row": pa.array([2, 3, 4], pa.int64()),
                "__id": ["o1", "o2", "o1"],
            }
        )
        kept, errors = dest.split(table)
        tally = Tally()
        dest.complete(dest.submit(kept), tally)
    finally:
        dest.close()
    assert rig.sandbox.wait_idle(10)
    assert errors == [] and tally.failed == 0 and tally.created == 3
    assert len(rig.requests("POST", EVENTS)) == 1
    placed = {
        e["unique_id"]: e["value"] for e in rig.sandbox.events() if e["metric"] == "Placed Order"
    }
    assert placed == {"o1": 11.0, "o2": 20.0}  # the last row's
    assert landed(rig)[("Fulfilled Order", "o1")] == 1


@pytest.mark.parametrize(
    ("statuses", "message"),
    [
        ({"Fulfilled Order": "shipped"}, "a mapping of Klaviyo metric name to a list"),
        (["shipped"], "a mapping of Klaviyo metric name to a list"),
        ({"Fulfilled Order": ["shipped"], "Shipped Order": ["Shipped"]}, "listed under both"),
        ({"x" * 130: ["shipped"]}, "over 127 characters"),
    ],
)
def test_order_statuses_config_errors(klaviyo, statuses, message):
    rig = klaviyo()
    orders(rig, ("o1", "placed"))
    with pytest.raises(ConfigError) as info:
        rig.configure([orders_sync(destination={"order_statuses": statuses})])
    assert message in str(info.value)


def test_order_statuses_need_the_status_mapped_and_item_fields_known_names(klaviyo):
    rig = klaviyo()
    orders(rig, ("o1", "placed"))
    no_status = {k: v for k, v in ORDER_MAPPING.items() if v != "status"}
    with pytest.raises(ConfigError, match="map the order's status column to status"):
        rig.configure(
            [orders_sync(mapping=no_status, destination={"order_statuses": {"A": ["b"]}})]
        )
    with pytest.raises(ConfigError, match="destination.item_fields"):
        rig.configure([orders_sync(destination={"item_fields": {"Sku": "sku"}})])


def _settings_check() -> Any:
    """Kept out of the fixtures: an unknown duplicate mode is refused at start."""
    from reverse_etl.sandbox import KlaviyoSandbox, SandboxSettings

    return KlaviyoSandbox(SandboxSettings(klaviyo_duplicate_events="maybe"))


def test_the_sandbox_refuses_an_unknown_duplicate_mode():
    with pytest.raises(ValueError, match="klaviyo_duplicate_events"):
        _settings_check()

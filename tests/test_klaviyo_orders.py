"""Klaviyo orders end to end: the real engine, client and orders destination against the
Klaviyo sandbox over loopback. Orders become "Placed Order" events, a cancelled one a
"Cancelled Order" (and "Ordered Product" per line when asked), identified by the order id so a
re-sent order is one event (tests/test_klaviyo_order_metrics.py: every status metric).
What every destination object must do (incremental runs, dry run, resume, faults,
size limits, config checks) is in tests/contract/; here is what is particular to
Klaviyo orders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from reverse_etl.errors import EXIT_OK, EXIT_ROW_ERRORS, ConfigError
from reverse_etl.sandbox import KlaviyoSandbox, SandboxSettings
from tests.helpers import execute
from tests.sandboxes import (
    Rig,
    assert_counts,
    assert_counts_add_up,
    error_rows,
    fast_clients,
    served,
)
from tests.test_klaviyo_support import klaviyo_speed, klaviyo_sync

EVENTS = "/api/event-bulk-create-jobs"
ORDER_MAPPING: dict[str, Any] = {
    "order_id": "order_id",
    "email": "email",
    "customer_id": "external_id",
    "order_total": "value",
    "currency": "value_currency",
    "ordered_at": "time",
    "status": "status",
    "items": "items",
    "channel": "properties.Channel",
}


def orders_table(rig: Rig, count: int, *, first: int = 0, shift: int = 0) -> None:
    """``count`` orders o<first>..; order n has n % 3 + 1 lines; order 4 is a guest checkout
    (no customer id); ``shift`` moves every modified_at later (a re-export)."""
    execute(
        rig.db,
        f"""
        CREATE OR REPLACE TABLE orders AS
        SELECT
            'o' || n AS order_id,
            CASE WHEN n = 4 THEN NULL ELSE 'c' || (n % 7) END AS customer_id,
            'buyer' || (n % 7) || '@example.com' AS email,
            CASE WHEN n % 5 = 0 THEN 'Cancelled' ELSE 'Placed' END AS status,
            'USD' AS currency,
            TIMESTAMPTZ '2025-03-01 10:00:00+00' + to_minutes(CAST(n AS BIGINT)) AS ordered_at,
            TIMESTAMPTZ '2025-03-01 12:00:00+00' + to_seconds(CAST(n + {shift} AS BIGINT))
                AS modified_at,
            CAST(10 * (n % 3 + 1) + 0.5 AS DECIMAL(12, 2)) AS order_total,
            'web' AS channel,
            list_transform(range(n % 3 + 1), lambda i: {{
                'sku': 'SKU-' || i,
                'product_id': 'p' || i,
                'name': 'Product ' || i,
                'quantity': CAST(i + 1 AS INTEGER),
                'unit_price': CAST(5.25 AS DECIMAL(12, 2))
            }}) AS items
        FROM range({first}, {first + count}) AS r(n)
        """,
    )


def orders_sync(name: str = "orders", **extra: Any) -> dict[str, Any]:
    entry = {"table": "orders", "object": "orders", "identifier": "order_id", **extra}
    return klaviyo_sync(name, mapping=entry.pop("mapping", ORDER_MAPPING), **entry)


def placed(rig: Rig) -> list[dict[str, Any]]:
    return [e for e in rig.sandbox.events() if e["metric"] == "Placed Order"]


def order_ids(rig: Rig) -> list[str]:
    """The orders that landed: a Placed Order, or a Cancelled Order (o0, o5, ...)."""
    metrics = ("Placed Order", "Cancelled Order")
    return sorted(e["unique_id"] for e in rig.sandbox.events() if e["metric"] in metrics)


def test_orders_land_as_placed_order_events(klaviyo):
    rig = klaviyo()
    orders_table(rig, 6)
    rig.configure([orders_sync()])

    result = rig.run("orders")

    assert_counts(result, EXIT_OK, read=6, sent=6, created=6, failed=0)
    events = {e["unique_id"]: e for e in placed(rig)}
    assert set(events) == {"o1", "o2", "o3", "o4"}  # o0 and o5 are cancelled
    cancelled = {e["unique_id"]: e for e in rig.sandbox.events() if e["metric"] != "Placed Order"}
    assert {(k, e["metric"]) for k, e in cancelled.items()} == {
        ("o0", "Cancelled Order"),
        ("o5", "Cancelled Order"),
    }
    assert (
        cancelled["o5"]["value"] == 30.5 and cancelled["o5"]["properties"]["Status"] == "Cancelled"
    )
    o2 = events["o2"]
    assert o2["email"] == "buyer2@example.com"
    assert o2["value"] == 30.5 and o2["value_currency"] == "USD"
    assert o2["time"] == "2025-03-01T10:02:00Z"
    assert o2["properties"]["OrderId"] == "o2" and o2["properties"]["Status"] == "Placed"
    assert o2["properties"]["Channel"] == "web"
    assert o2["properties"]["ItemNames"] == ["Product 0", "Product 1", "Product 2"]
    assert o2["properties"]["Items"][1] == {
        "SKU": "SKU-1",
        "ProductID": "p1",
        "ProductName": "Product 1",
        "Quantity": 2,
        "ItemPrice": 5.25,
        "RowTotal": 10.5,
    }
    assert not any(e["backfill"] for e in events.values())
    # the profile is found by the mapped identifiers: the guest order by its email alone
    profiles = {p["email"]: p for p in rig.sandbox.profiles()}
    assert profiles["buyer2@example.com"]["external_id"] == "c2"
    assert events["o4"]["email"] == "buyer4@example.com"


def test_ordered_product_events_one_per_line_and_backfill(klaviyo):
    rig = klaviyo()
    orders_table(rig, 4)
    rig.configure([orders_sync(destination={"ordered_product_events": True, "backfill": True})])

    result = rig.run("orders")

    assert result.exit_code == EXIT_OK
    assert result.record.counts.created == 4  # rows, not events
    products = [e for e in rig.sandbox.events() if e["metric"] == "Ordered Product"]
    assert sorted(e["unique_id"] for e in products) == [
        "o1:1",
        "o1:2",
        "o2:1",
        "o2:2",
        "o2:3",
        "o3:1",
    ]  # fmt: skip: o0 is cancelled, so none of its lines was ordered
    line = next(e for e in products if e["unique_id"] == "o2:3")
    assert line["value"] == 15.75  # quantity 3 x 5.25
    assert line["time"] == "2025-03-01T10:02:00Z"
    assert line["properties"] == {
        "OrderId": "o2",
        "SKU": "SKU-2",
        "ProductID": "p2",
        "ProductName": "Product 2",
        "Quantity": 3,
        "ItemPrice": 5.25,
        "RowTotal": 15.75,
    }
    assert all(e["backfill"] for e in rig.sandbox.events())

    orders_table(rig, 4, shift=1000)
    rig.run("orders")
    assert len(rig.sandbox.events()) == 4 + 6  # nothing counted twice


def test_events_are_packed_1000_to_a_call(klaviyo):
    rig = klaviyo()
    # 900 orders + 1,800 lines, less the 360 lines of the 180 cancelled orders: 2,340 events
    orders_table(rig, 900)
    rig.configure([orders_sync(destination={"ordered_product_events": True})])
    assert rig.run("orders").exit_code == EXIT_OK
    assert len(rig.requests("POST", EVENTS)) == 3
    assert len(rig.sandbox.events()) == 2340


def test_order_without_a_profile_or_with_an_overlong_value_is_a_row_error(klaviyo):
    rig = klaviyo()
    orders_table(rig, 6)
    execute(
        rig.db,
        "UPDATE orders SET email = NULL, customer_id = NULL WHERE order_id = 'o1'",
        # Klaviyo refuses a whole call holding a string over 100 KB: caught before sending
        "UPDATE orders SET channel = repeat('x', 100001) WHERE order_id = 'o3'",
    )
    rig.configure([orders_sync()])

    result = rig.run("orders")

    # found before sending (screen): rejected, never sent
    assert_counts(result, EXIT_ROW_ERRORS, read=6, rejected=2, sent=4, created=4, failed=0)
    errors = {e["identifier"]: e for e in error_rows(result)}
    assert {k: e["reason"] for k, e in errors.items()} == {
        "o1": "missing_required_field",
        "o3": "value_too_large",
    }
    assert errors["o3"]["column"] == "channel" and errors["o3"]["value"] == "x" * 100
    assert order_ids(rig) == ["o0", "o2", "o4", "o5"]


def test_an_overlong_string_inside_an_order_line_is_a_row_error_before_sending(klaviyo):
    """Klaviyo refuses a whole event call for one string over 100 KB anywhere in an event:
    an item's name too, not only a top-level value. Once, the call was refused three times
    before the order became a row error carrying the whole 200 KB event as its value."""
    rig = klaviyo()
    orders_table(rig, 4)
    execute(
        rig.db,
        "UPDATE orders SET items = list_transform(items, lambda it: {'sku': it.sku, "
        "'product_id': it.product_id, 'name': repeat('n', 100001), 'quantity': it.quantity, "
        "'unit_price': it.unit_price}) WHERE order_id = 'o2'",
    )
    rig.configure([orders_sync()])

    result = rig.run("orders")

    assert_counts(result, EXIT_ROW_ERRORS, read=4, rejected=1, sent=3, failed=0)
    [error] = error_rows(result)
    assert (error["identifier"], error["column"], error["reason"]) == (
        "o2",
        "items",
        "value_too_large",
    )
    assert error["value"] == "100001"
    assert "o2" not in order_ids(rig)
    assert not [r for r in rig.requests("POST", EVENTS) if r.status >= 400]


def test_event_klaviyo_refuses_is_a_row_error_and_the_call_is_resent(tmp_path, monkeypatch):
    fast_clients(monkeypatch)
    klaviyo_speed(monkeypatch)
    # Klaviyo takes event times up to a year ahead; the sync lets a later one through
    sandbox = KlaviyoSandbox(SandboxSettings(speedup=50.0))
    with served(sandbox, tmp_path) as rig:
        orders_table(rig, 5)
        execute(
            rig.db,
            "UPDATE orders SET ordered_at = now() + INTERVAL 800 DAY WHERE order_id = 'o2'",
        )
        rig.configure([orders_sync(max_future_skew_minutes=2_000_000)])

        result = rig.run("orders")

        assert result.exit_code == EXIT_ROW_ERRORS
        assert_counts_add_up(result)
        [error] = error_rows(result)
        assert (error["identifier"], error["reason"]) == ("o2", "destination_rejected")
        assert error["column"].endswith("/attributes/time")
        assert "a year ahead" in error["message"]
        assert order_ids(rig) == ["o0", "o1", "o3", "o4"]
        assert len(rig.requests("POST", EVENTS)) == 2  # refused, resent
        # the one refusal Klaviyo answered, and nothing else off-spec
        assert [(v.status, v.pointer) for v in sandbox.violations] == [
            (
                400,
                "/data/attributes/events-bulk-create/data/2/attributes/events/data/0/attributes/time",
            )
        ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"mapping": {"order_id": "order_id", "order_total": "value"}},
            "map a column to email, phone_number or external_id",
        ),
        (
            {"mapping": {**ORDER_MAPPING, "status": "Status"}},
            "'Status' is neither a standard klaviyo field",
        ),
        ({"identifier": "email"}, "must map to order_id"),
        ({"destination": {"list": "Buyers"}}, "do not go into lists"),
        ({"destination": {"ordered_product_events": "yes"}}, "true or false"),
        ({"destination": {"backfil": True}}, "did you mean 'backfill'?"),
        ({"consent": {"email": "status"}}, "carry no consent"),
        (
            {
                "mapping": {k: v for k, v in ORDER_MAPPING.items() if v != "items"},
                "destination": {"ordered_product_events": True},
            },
            "map the order lines",
        ),
    ],
)
def test_order_config_errors(klaviyo, change, message):
    rig = klaviyo()
    orders_table(rig, 1)
    with pytest.raises(ConfigError) as info:
        rig.configure([orders_sync(**change)])
    assert message in str(info.value)


def test_dry_run_writes_the_event_calls_and_sends_nothing(klaviyo):
    rig = klaviyo()
    orders_table(rig, 3)
    rig.configure([orders_sync(destination={"ordered_product_events": True})])

    result = rig.run("orders", dry_run=True)

    assert result.record.status == "dry_run" and result.record.counts.sent == 3
    [line] = [orjson.loads(x) for x in Path(result.dry_run_file).read_bytes().splitlines()]
    assert (line["method"], line["path"], line["rows"]) == ("POST", EVENTS, 3)
    entries = line["body"]["data"]["attributes"]["events-bulk-create"]["data"]
    assert len(entries) == 3 + 5  # 3 orders, 2 + 3 lines (o0 is cancelled: no lines)
    assert rig.sandbox.request_log == [] and rig.watermark("orders") is None

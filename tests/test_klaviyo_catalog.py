"""Klaviyo catalog end to end: products become catalog items through bulk create and update
jobs, create versus update decided by what the catalog holds, against the sandbox over
loopback. What every destination object must do (incremental runs, dry run, resume, faults,
size limits, config checks) is in tests/contract/; this file holds what is particular to the
catalog."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from reverse_etl.destinations.klaviyo import catalog, jobs
from reverse_etl.destinations.klaviyo.catalog import KlaviyoCatalog
from reverse_etl.engine import make_destination
from reverse_etl.errors import EXIT_OK, EXIT_ROW_ERRORS, ConfigError, DestinationError
from tests.helpers import execute
from tests.sandboxes import (
    Rig,
    assert_counts,
    assert_created_once,
    error_rows,
    fast_clients,
    set_faults,
)
from tests.test_klaviyo_support import klaviyo_sync

CREATE = "/api/catalog-item-bulk-create-jobs"
UPDATE = "/api/catalog-item-bulk-update-jobs"
CATALOG_MAPPING: dict[str, Any] = {
    "product_id": "external_id",
    "title": "title",
    "description": "description",
    "url": "url",
    "image_url": "image_full_url",
    "price": "price",
    "published": "published",
    "category": "custom_metadata.Category",
    "stock": "custom_metadata.Stock",
}


def products_table(rig: Rig, numbers: range, *, price: float = 9.5, shift: int = 0) -> None:
    execute(
        rig.db,
        f"""
        CREATE OR REPLACE TABLE products AS
        SELECT
            'P' || n AS product_id,
            'Product ' || n AS title,
            'About product ' || n AS description,
            'https://shop.example.com/p/' || n AS url,
            'https://cdn.example.com/p/' || n || '.jpg' AS image_url,
            CAST({price} + n AS DECIMAL(10, 2)) AS price,
            n % 4 <> 3 AS published,
            ['shoes', 'hats'][n % 2 + 1] AS category,
            CAST(n * 3 AS INTEGER) AS stock,
            TIMESTAMPTZ '2025-03-01 12:00:00+00' + to_seconds(CAST(n + {shift} AS BIGINT))
                AS modified_at
        FROM range({numbers.start}, {numbers.stop}) AS r(n)
        """,
    )


def catalog_sync(name: str = "catalog", **extra: Any) -> dict[str, Any]:
    entry = {"table": "products", "object": "catalog", "identifier": "product_id", **extra}
    return klaviyo_sync(name, mapping=entry.pop("mapping", CATALOG_MAPPING), **entry)


def items(rig: Rig) -> dict[str, dict[str, Any]]:
    return {i["external_id"]: i for i in rig.sandbox.catalog_items()}


def test_products_are_created_then_updated(klaviyo):
    rig = klaviyo()
    products_table(rig, range(250))
    rig.configure([catalog_sync()])

    first = rig.run("catalog")

    assert_counts(first, EXIT_OK, read=250, sent=250, created=250, updated=0, failed=0)
    assert len(rig.requests("POST", CREATE)) == 3  # 100 + 100 + 50
    assert rig.requests("POST", UPDATE) == []
    p7 = items(rig)["P7"]
    assert p7["id"] == "$custom:::$default:::P7"
    assert (p7["title"], p7["description"], p7["url"]) == (
        "Product 7",
        "About product 7",
        "https://shop.example.com/p/7",
    )
    assert p7["image_full_url"] == "https://cdn.example.com/p/7.jpg"
    assert p7["price"] == 16.5 and p7["published"] is False
    assert p7["custom_metadata"] == {"Category": "hats", "Stock": 21}

    products_table(rig, range(200, 300), price=100.0, shift=1000)  # 50 known, 50 new
    rig.sandbox.reset_log()
    second = rig.run("catalog")

    assert second.exit_code == EXIT_OK
    c = second.record.counts
    assert (c.sent, c.created, c.updated, c.failed) == (100, 50, 50, 0)
    assert len(rig.requests("POST", CREATE)) == 1 and len(rig.requests("POST", UPDATE)) == 1
    assert len(rig.requests("GET", "/api/catalog-items")) == 1  # one look-up per 100 items
    catalog = items(rig)
    assert len(catalog) == 300
    assert catalog["P210"]["price"] == 310.0 and catalog["P10"]["price"] == 19.5


def test_item_created_by_someone_else_meanwhile_is_updated(klaviyo, monkeypatch):
    from reverse_etl.destinations.klaviyo.catalog import KlaviyoCatalog

    rig = klaviyo()
    products_table(rig, range(5))
    rig.configure([catalog_sync()])
    assert rig.run("catalog").exit_code == EXIT_OK

    # the look-up misses the items (as if they were created between the look-up and the job)
    monkeypatch.setattr(KlaviyoCatalog, "_existing", lambda self, ids: set())
    products_table(rig, range(5), price=50.0, shift=100)
    result = rig.run("catalog")

    assert result.exit_code == EXIT_OK
    c = result.record.counts
    assert (c.created, c.updated, c.failed) == (0, 5, 0)
    assert {i["price"] for i in items(rig).values()} == {50.0, 51.0, 52.0, 53.0, 54.0}


def test_rows_missing_a_required_field_are_row_errors(klaviyo):
    rig = klaviyo()
    products_table(rig, range(6))
    execute(
        rig.db,
        "UPDATE products SET title = NULL WHERE product_id = 'P1'",
        "UPDATE products SET url = '  ', description = NULL WHERE product_id = 'P4'",
    )
    rig.configure([catalog_sync()])

    result = rig.run("catalog")

    # found before sending (screen): rejected, never sent
    assert_counts(result, EXIT_ROW_ERRORS, read=6, rejected=2, sent=4, created=4, failed=0)
    found = {(e["identifier"], e["column"], e["reason"]) for e in error_rows(result)}
    assert found == {
        ("P1", "title", "missing_required_field"),
        ("P4", "description", "missing_required_field"),
        ("P4", "url", "missing_required_field"),
    }
    assert sorted(items(rig)) == ["P0", "P2", "P3", "P5"]


def test_null_values_skip_leaves_fields_and_clear_clears_them(klaviyo):
    rig = klaviyo()
    products_table(rig, range(3))
    rig.configure(
        [catalog_sync("skip", null_values="skip"), catalog_sync("clear", null_values="clear")]
    )
    assert rig.run("skip").exit_code == EXIT_OK
    execute(rig.db, "UPDATE products SET price = NULL, modified_at = modified_at + INTERVAL 1 HOUR")
    assert rig.run("skip").record.counts.updated == 3
    assert items(rig)["P1"]["price"] == 10.5
    assert rig.run("clear").record.counts.updated == 3
    assert "price" not in items(rig)["P1"]


@pytest.mark.parametrize("kind", ["timeout", "reset", "500"])
def test_create_job_whose_answer_is_lost_is_not_sent_twice(klaviyo, monkeypatch, kind):
    # A held create job (timeout) is applied after the client gave up: its items are looked up
    # and found, so the job is done without a second one. After a reset or a 500 nothing ran:
    # the items never show and the job is sent again, and faulted again, until the client
    # gives up; the next run creates them.
    fast_clients(monkeypatch, timeout=0.5, settle_margin=10.0 if kind == "timeout" else 0.2)
    rig = klaviyo(fault_rate=1.0, fault_kinds=(kind,), fault_timeout_seconds=1.0)
    products_table(rig, range(3))
    project = rig.configure([catalog_sync()])
    destination = make_destination(project, project.sync("catalog"))
    assert isinstance(destination, KlaviyoCatalog)
    job = jobs.Job(
        catalog.CREATE,
        orjson.dumps(
            {
                "data": {
                    "type": "catalog-item-bulk-create-job",
                    "attributes": {"items": {"data": [_item(n) for n in range(2)]}},
                }
            }
        ),
        2,
        landed_check=destination._all_exist(["P0", "P1"]),
    )
    try:
        if kind == "timeout":
            jobs.submit(destination.client, job)
            assert job.landed
            done = jobs.wait(destination.client, job, attempts=1, poll_interval=0.01)
            assert done["data"]["attributes"]["completed_count"] == 2
        else:
            with pytest.raises(DestinationError, match="creating a Klaviyo catalog item create"):
                jobs.submit(destination.client, job)
    finally:
        destination.close()
    assert len(rig.requests("POST", CREATE)) == (1 if kind == "timeout" else 3)
    set_faults(rig.sandbox, 0.0)

    result = rig.run("catalog")

    landed = 2 if kind == "timeout" else 0
    assert_counts(result, EXIT_OK, read=3, created=3 - landed, updated=landed, failed=0)
    assert sorted(items(rig)) == ["P0", "P1", "P2"]
    assert_created_once(rig.sandbox)


def _item(n: int) -> dict[str, Any]:
    return {
        "type": "catalog-item",
        "attributes": {
            "external_id": f"P{n}",
            "title": f"Product {n}",
            "description": f"About product {n}",
            "url": f"https://shop.example.com/p/{n}",
            "integration_type": "$custom",
            "catalog_type": "$default",
        },
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"mapping": {"product_id": "external_id", "title": "title"}},
            "map a column to description, url",
        ),
        ({"mapping": {**CATALOG_MAPPING, "stock": "stock"}}, "custom_metadata.<Name>"),
        ({"identifier": "title"}, "must map to external_id"),
        ({"destination": {"list": "Products"}}, "do not go into lists"),
    ],
)
def test_catalog_config_errors(klaviyo, change, message):
    rig = klaviyo()
    products_table(rig, range(1))
    with pytest.raises(ConfigError) as info:
        rig.configure([catalog_sync(**change)])
    assert message in str(info.value)


def test_item_gone_since_the_look_up_is_created(klaviyo, monkeypatch):
    from reverse_etl.destinations.klaviyo.catalog import KlaviyoCatalog

    rig = klaviyo()
    products_table(rig, range(3))
    rig.configure([catalog_sync()])
    # the look-up sees items that are gone by the time the update job runs
    monkeypatch.setattr(KlaviyoCatalog, "_existing", lambda self, ids: set(ids))

    result = rig.run("catalog")

    assert result.exit_code == EXIT_OK
    c = result.record.counts
    assert (c.created, c.updated, c.failed) == (3, 0, 0)
    assert sorted(items(rig)) == ["P0", "P1", "P2"]

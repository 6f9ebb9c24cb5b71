"""Dotdigital destinations' ``screen``, offline: rows Dotdigital would refuse are found on a
transformed batch before anything is sent, and what ``screen`` leaves is what ``load`` and
``requests`` take, with nothing reported twice. No sandbox: nothing here touches the network.
(End to end through the engine: test_destination_dotdigital, test_dotdigital_insight.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from reverse_etl.config import load_project
from reverse_etl.destinations.base import Destination
from reverse_etl.destinations.dotdigital.orders import DotdigitalOrders
from reverse_etl.destinations.dotdigital.profiles import DotdigitalProfiles
from reverse_etl.engine import make_destination
from tests.helpers import write_project
from tests.sandboxes import dotdigital_project, sync_entry


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[Any]:
    """``destination(name, mapping, **sync)``: a Dotdigital destination pointed nowhere."""
    made: list[Destination] = []

    def make(name: str, mapping: dict[str, Any], **entry: Any) -> Destination:
        write_project(
            tmp_path, dotdigital_project([sync_entry(name, "dotdigital", mapping, **entry)])
        )
        project = load_project(None, tmp_path, env={})
        made.append(make_destination(project, project.sync(name)))
        return made[-1]

    yield make
    for dest in made:
        dest.close()


def batch(identifier: str, **columns: Any) -> pa.Table:
    """A transformed batch: destination fields, ``__row`` from 2, ``__id`` the identifier's."""
    n = len(next(iter(columns.values())))
    ids = [str(v) for v in columns[identifier]]
    return pa.table({**columns, "__row": pa.array(range(2, n + 2), pa.int64()), "__id": ids})


def test_contacts_without_an_email_are_rejected(destination):
    dest = destination("contacts", {"email": "email", "zip": "POSTCODE"}, identifier="zip")
    assert isinstance(dest, DotdigitalProfiles)
    table = batch(
        "POSTCODE", email=["a@example.com", None, "c@example.com"], POSTCODE=["1", "2", "3"]
    )

    screened = dest.screen(table)

    assert screened.rejected == 1 and screened.table["POSTCODE"].to_pylist() == ["1", "3"]
    [error] = screened.errors
    assert (error.row_number, error.identifier, error.column, error.reason) == (
        3,
        "2",
        "email",
        "missing_email",
    )
    assert dest.screen(screened.table).errors == []
    [request] = dest.requests(screened.table)
    assert request.rows == 2


ORDER_MAPPING = {
    "order_id": "id",
    "email": "email",
    "status": "order_status",
    "sizes": "size_groups",
}


def order_batch() -> pa.Table:
    return batch(
        "id",
        id=["O0", "O1", "O2", "O3"],
        email=["a@example.com", None, "c@example.com", "d@example.com"],
        order_status=["complete", "Open", "OnHold", "cancelled"],
        size_groups=pa.array([[["s"]], [], [], None], pa.list_(pa.list_(pa.string()))),
    )


def test_orders_breaking_a_rule_are_rejected_with_every_reason(destination):
    dest = destination(
        "orders", ORDER_MAPPING, table="orders", object="orders", identifier="order_id"
    )
    assert isinstance(dest, DotdigitalOrders)

    screened = dest.screen(order_batch())

    assert screened.rejected == 3 and screened.table["id"].to_pylist() == ["O3"]
    assert [(e.identifier, e.column, e.reason) for e in screened.errors] == [
        ("O0", "sizes", "insight_nested_array"),
        ("O1", "email", "missing_email"),
        ("O2", "status", "unknown_order_status"),
    ]
    assert dest._json is None  # screen has its own cursor and builds no record: load's is untouched
    assert dest.screen(screened.table).errors == []
    [request] = dest.requests(screened.table)
    [record] = orjson.loads(request.body)["records"]
    assert (record["key"], record["json"]["order_status"]) == ("O3", "Cancelled")


def test_orders_load_never_sends_a_record_without_its_owner(destination):
    # load and requests assume screened batches, but a record without its contact would void
    # the whole import: that cheap check stays
    dest = destination(
        "orders", ORDER_MAPPING, table="orders", object="orders", identifier="order_id"
    )
    kept, errors = dest._with_owner(order_batch())
    assert kept["id"].to_pylist() == ["O0", "O2", "O3"]
    assert [(e.identifier, e.reason) for e in errors] == [("O1", "missing_email")]

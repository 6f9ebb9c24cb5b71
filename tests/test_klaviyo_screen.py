"""Klaviyo destinations' ``screen``, offline: the rows Klaviyo would refuse are found on a
transformed batch before anything is sent, and what ``screen`` leaves is what ``load`` and
``requests`` take, with nothing reported twice. No sandbox: nothing here touches the network.
(End to end through the engine: test_destination_klaviyo, test_klaviyo_consent,
test_klaviyo_catalog, test_klaviyo_orders.)"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from reverse_etl.config import load_project
from reverse_etl.destinations.base import Destination
from reverse_etl.destinations.klaviyo.catalog import KlaviyoCatalog
from reverse_etl.destinations.klaviyo.orders import KlaviyoOrders
from reverse_etl.destinations.klaviyo.profiles import KlaviyoProfiles
from reverse_etl.engine import make_destination
from tests.helpers import write_project
from tests.test_klaviyo_support import klaviyo_sync


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[Any]:
    """``destination(**sync)``: a Klaviyo destination for one sync, pointed nowhere."""
    made: list[Destination] = []

    def make(**entry: Any) -> Destination:
        name = entry.pop("name", "sync")
        write_project(
            tmp_path,
            {
                "connections": {
                    "warehouse": {"type": "duckdb", "path": "warehouse.duckdb"},
                    "klaviyo": {
                        "type": "klaviyo",
                        "api_key": "pk_offline",
                        "base_url": "http://127.0.0.1:9",
                    },
                },
                "syncs": [klaviyo_sync(name, **entry)],
            },
        )
        project = load_project(None, tmp_path, env={})
        made.append(make_destination(project, project.sync(name)))
        return made[-1]

    yield make
    for dest in made:
        dest.close()


def batch(**columns: list[Any]) -> pa.Table:
    """A transformed batch: destination fields, ``__row`` from 2 and ``__id`` = the first."""
    n = len(next(iter(columns.values())))
    first = next(iter(columns.values()))
    return pa.table(
        {**columns, "__row": pa.array(range(2, n + 2), pa.int64()), "__id": [str(v) for v in first]}
    )


# --------------------------------------------------------------------------- profiles

PROFILE_MAPPING = {"email": "email", "phone": "phone_number", "notes": "properties.Notes"}
CONSENT = {"email": "email_consent", "sms": "sms_consent"}


def profile_batch(**overrides: list[Any]) -> pa.Table:
    columns: dict[str, list[Any]] = {
        "email": ["a@example.com", None, "c@example.com"],
        "phone_number": [None, "+14155550001", "+14155550002"],
        "properties.Notes": ["short", None, "short"],
        "consent.email": ["subscribed", "subscribed", "unsubscribed"],
        "consent.sms": ["subscribed", "subscribed", None],
    }
    columns.update(overrides)
    return batch(**columns)


def test_consent_without_its_address_is_taken_off_the_row_and_the_profile_stays(destination):
    dest = destination(
        mapping=PROFILE_MAPPING,
        consent=CONSENT,
        destination={"sms_without_consent_time": True},
    )
    assert isinstance(dest, KlaviyoProfiles)

    screened = dest.screen(profile_batch())

    assert screened.rejected == 0 and screened.table.num_rows == 3
    found = [(e.row_number, e.column, e.reason) for e in screened.errors]
    assert found == [
        (2, "sms_consent", "missing_consent_address"),  # row 2: SMS yes, no phone number
        (3, "email_consent", "missing_consent_address"),  # row 3: email yes, no email
    ]
    assert screened.table["consent.sms"].to_pylist() == [None, "subscribed", None]
    assert screened.table["consent.email"].to_pylist() == [
        "subscribed",
        None,
        "unsubscribed",
    ]
    # what screen leaves is clean: screening it again, or planning its calls, reports nothing
    assert dest.screen(screened.table).errors == []
    calls, errors = dest.consent.plan(screened.table)
    assert errors == []
    sent = {
        (profile["attributes"].get("email"), channel)
        for _, records in calls
        for doc in records.docs.to_pylist()
        for profile in [orjson.loads(doc)]
        for channel in profile["attributes"]["subscriptions"]
    }
    assert sent == {("a@example.com", "email"), (None, "sms"), ("c@example.com", "email")}


def test_profile_over_100kb_is_rejected_and_only_suspects_are_built(destination):
    dest = destination(mapping=PROFILE_MAPPING)
    small = dest.screen(profile_batch())
    assert small.errors == [] and small.rejected == 0
    assert dest._screen_json is None  # no row could reach 100 KB: no JSON was built

    notes = ["x" * 120_000, "y" * 90_000, "short"]
    screened = dest.screen(profile_batch(**{"properties.Notes": notes}))

    assert screened.rejected == 1
    assert screened.table["__row"].to_pylist() == [3, 4]
    [error] = screened.errors
    # the view's column holding the largest value: the one to shorten or stop mapping
    assert (error.row_number, error.reason, error.column) == (2, "value_too_large", "notes")
    assert "its largest value is in column 'notes' (120000 characters)" in error.message
    # requests (a dry run) take the screened batch whole: one import job, two profiles
    [job] = [r for r in dest.requests(screened.table) if r.path.endswith("import-jobs")]
    assert job.rows == 2


def test_profile_load_still_refuses_an_oversized_profile_it_was_handed(destination):
    # load and requests assume screened batches, but do not send what Klaviyo refuses if not
    dest = destination(mapping=PROFILE_MAPPING)
    table = profile_batch(**{"properties.Notes": ["x" * 120_000, "short", "short"]})
    sent, docs, errors = dest._docs(table)
    assert [e.reason for e in errors] == ["value_too_large"] and len(docs) == 2


# --------------------------------------------------------------------------- catalog

CATALOG_MAPPING = {
    "product_id": "external_id",
    "title": "title",
    "description": "description",
    "url": "url",
    "blurb": "custom_metadata.Blurb",
}


def catalog_batch(**overrides: list[Any]) -> pa.Table:
    columns: dict[str, list[Any]] = {
        "external_id": ["P0", "P1", "P2"],
        "title": ["Zero", None, "Two"],
        "description": ["d", "d", None],
        "url": ["https://x/0", "https://x/1", None],
        "custom_metadata.Blurb": ["b", "b", "b"],
    }
    columns.update(overrides)
    return batch(**columns)


def catalog_destination(destination: Any) -> KlaviyoCatalog:
    dest = destination(
        table="products", object="catalog", identifier="product_id", mapping=CATALOG_MAPPING
    )
    assert isinstance(dest, KlaviyoCatalog)
    return dest


def test_catalog_rows_missing_a_required_field_are_rejected(destination):
    dest = catalog_destination(destination)

    screened = dest.screen(catalog_batch())

    assert screened.rejected == 2 and screened.table["external_id"].to_pylist() == ["P0"]
    assert [(e.row_number, e.column, e.reason) for e in screened.errors] == [
        (3, "title", "missing_required_field"),
        (4, "description", "missing_required_field"),
        (4, "url", "missing_required_field"),
    ]
    assert dest.screen(screened.table).errors == []
    [job] = dest.requests(screened.table)
    assert job.rows == 1
    assert dest._screen_metadata is None  # no metadata near 100 KB: no JSON built


def test_catalog_item_with_custom_metadata_over_100kb_is_rejected(destination):
    # custom_metadata "May not exceed 100kb" (Klaviyo's catalogs spec)
    dest = catalog_destination(destination)
    complete = {"title": ["Zero", "One", "Two"], "description": ["d"] * 3, "url": ["u"] * 3}
    blurbs = ["b" * 100_001, "b" * 99_000, "b"]

    screened = dest.screen(catalog_batch(**complete, **{"custom_metadata.Blurb": blurbs}))

    assert screened.rejected == 1 and screened.table["external_id"].to_pylist() == ["P1", "P2"]
    [error] = screened.errors
    assert (error.identifier, error.column, error.reason) == (
        "P0",
        "(custom_metadata)",
        "value_too_large",
    )


# --------------------------------------------------------------------------- orders (events)

ORDER_MAPPING = {
    "order_id": "order_id",
    "email": "email",
    "customer_id": "external_id",
    "total": "value",
    "ordered_at": "time",
    "channel": "properties.Channel",
}


def order_batch(**overrides: list[Any]) -> pa.Table:
    when = datetime(2025, 3, 1, 12, tzinfo=UTC)
    columns: dict[str, list[Any]] = {
        "order_id": ["o0", "o1", "o2", "o3"],
        "email": ["a@example.com", None, "c@example.com", None],
        "external_id": ["c0", None, "c2", "c3"],
        "value": [10.0, 11.0, 12.0, 13.0],
        "time": pa.array([when] * 4, pa.timestamp("us", "UTC")),
        "properties.Channel": ["web", "web", "x" * 100_001, "web"],
    }
    columns.update(overrides)
    return batch(**columns)


def test_orders_without_a_profile_or_with_an_overlong_string_are_rejected(destination):
    dest = destination(
        table="orders", object="orders", identifier="order_id", mapping=ORDER_MAPPING
    )
    assert isinstance(dest, KlaviyoOrders)

    screened = dest.screen(order_batch())

    assert screened.rejected == 2
    assert screened.table["order_id"].to_pylist() == ["o0", "o3"]  # o3: its external_id will do
    assert [(e.identifier, e.column, e.reason) for e in screened.errors] == [
        ("o1", "(order)", "missing_required_field"),
        ("o2", "channel", "value_too_large"),
    ]
    assert dest._screen_events is None  # no event near 5 MB: no JSON built to screen
    assert dest.screen(screened.table).errors == []
    [call] = dest.requests(screened.table)
    assert call.rows == 2


def test_sms_consent_for_a_country_klaviyo_cannot_text_is_a_row_note(destination):
    """Klaviyo texts the US (not Puerto Rico), Canada, the UK, much of Europe, Australia and
    New Zealand: SMS consent for a number elsewhere is taken off with a note, not sent to
    vanish; the profile and its email consent go."""
    dest = destination(
        mapping=PROFILE_MAPPING,
        consent=CONSENT,
        destination={"sms_without_consent_time": True},
    )
    table = profile_batch(
        email=["a@example.com", "b@example.com", "c@example.com"],
        phone_number=["+447400123456", "+525512345678", "+17875550123"],  # UK, Mexico, PR
        **{"consent.sms": ["subscribed", "subscribed", "subscribed"]},
    )
    screened = dest.screen(table)
    assert screened.rejected == 0
    found = [(e.row_number, e.column, e.reason) for e in screened.errors]
    assert found == [  # rows from 2: Mexico and Puerto Rico
        (3, "sms_consent", "sms_region_unsupported"),
        (4, "sms_consent", "sms_region_unsupported"),
    ]
    assert screened.table["consent.sms"].to_pylist() == ["subscribed", None, None]
    assert screened.table["consent.email"].to_pylist() == [
        "subscribed",
        "subscribed",
        "unsubscribed",
    ]


def test_sms_consent_needs_a_time_or_an_explicit_choice(destination):
    from reverse_etl.errors import ConfigError

    with pytest.raises(ConfigError, match="SMS consent needs a consented_at column"):
        destination(mapping=PROFILE_MAPPING, consent=CONSENT)
    timed = {"email": "email_consent", "sms": {"column": "sms_consent", "consented_at": "at"}}
    assert isinstance(destination(mapping=PROFILE_MAPPING, consent=timed), KlaviyoProfiles)

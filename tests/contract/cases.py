"""One small case per (destination type, object) for the destination contract suite.

A case is what the generic tests need to run a sync of that object against its sandbox: a
table with a few columns (an identifier, a free-text ``note`` mapped to a field that takes a
long string, the cursor ``modified_at``), the sync's mapping and options, and how to read back
from the sandbox what landed (records counted by identifier, and each record's note). Row ``n``
has cursor ``at(n)``. A destination object the registry lists without a case here fails
``test_every_destination_object_has_a_case``; once its case is added, every contract test
runs for it.

Per destination type (not per object): ``PACING`` holds the client speed-ups a type needs
beside ``fast_clients`` (Klaviyo's rate limiters follow the sandbox's clock).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any

import httpx
import pytest

from reverse_etl.destinations import registry
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.sandbox.faults import FaultInjector
from tests.helpers import at, create_table
from tests.sandboxes import FAULT_SEEDS, Rig, email_of
from tests.test_klaviyo_support import klaviyo_speed

SYNC = "contract"  # the name of every case's sync


@dataclass(frozen=True)
class Case:
    type: str  # the destination type, as the registry lists it
    object: str
    table: str
    columns: dict[str, str]  # column -> DuckDB type; ``identifier``, note, modified_at among them
    identifier: str  # the identifier column
    mapping: dict[str, str]  # column -> destination field; ``note`` maps to a free-text field
    values: Callable[[int], dict[str, Any]]  # row n's values, cursor and note aside
    key: Callable[[int], str]  # row n's identifier value, which the sandbox keys its record by
    landed: Callable[[Any], Counter[str]]  # the sandbox's records, counted by identifier
    notes: Callable[[Any], dict[str, Any]]  # each record's note, by identifier
    destination: dict[str, Any] = field(default_factory=dict)  # options under destination:
    extra: dict[str, Any] = field(default_factory=dict)  # more sync keys (consent ...)
    # a re-sent row replaces its record's values; False where the first one stays (events)
    updates: bool = True
    setup: Callable[[Rig], None] | None = None  # what must exist before a run (owners)
    # destination-specific read-back after rows ``numbers`` landed (list members, consent)
    verify: Callable[[Rig, Sequence[int]], None] | None = None
    # the fault run: rows, sync overrides, seeds (a subset keeps the suite's time) and rate
    fault_rows: int = 1000
    fault_sync: dict[str, Any] = field(default_factory=lambda: {"batch_size": 100})
    fault_seeds: tuple[int, ...] = FAULT_SEEDS[:2]
    fault_rate: float = 0.1
    fault_settle: float | None = None  # the settle margin of lost creates (None: the default)
    # contract tests this destination object is known to fail: test name -> the bug; run as
    # strict xfail, so the fix shows (and the entry must go)
    known_issues: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.type}-{self.object}"

    @property
    def capabilities(self) -> Capabilities:
        return registry.destination_for(self.type, self.object).capabilities

    def row(self, n: int, **overrides: Any) -> tuple[Any, ...]:
        values = {"note": f"note {n}", "modified_at": at(n), **self.values(n)}
        unknown = set(overrides) - set(self.columns)
        if unknown:
            raise KeyError(f"not a column of {self.id}: {sorted(unknown)}")
        values.update(overrides)
        return tuple(values[c] for c in self.columns)

    def rows(self, numbers: Sequence[int] | range, **overrides: Any) -> list[tuple[Any, ...]]:
        return [self.row(n, **overrides) for n in numbers]

    def write(self, rig: Rig, rows: Sequence[Sequence[Any]]) -> None:
        create_table(rig.db, self.table, self.columns, rows)

    def sync(self, **overrides: Any) -> dict[str, Any]:
        """The case's sync entry; ``overrides`` replace its keys (``destination`` replaces the
        case's options, the connection stays)."""
        entry: dict[str, Any] = {
            "name": SYNC,
            "source": {"connection": "warehouse", "table": self.table},
            "object": self.object,
            "identifier": self.identifier,
            "cursor": "modified_at",
            "destination": {"connection": self.type, **self.destination},
            "mapping": dict(self.mapping),
            **self.extra,
        }
        destination = overrides.pop("destination", None)
        if destination is not None:
            entry["destination"] = {"connection": self.type, **destination}
        entry.update(overrides)
        return entry

    def prepare(self, rig: Rig) -> None:
        """Create what the case's records need (with faults off for the while), then clear the
        sandbox's log so a test sees only its runs' requests."""
        if self.setup is None:
            return
        faults = rig.sandbox.faults
        rig.sandbox.faults = FaultInjector(0.0, (), 0)
        try:
            self.setup(rig)
            assert rig.sandbox.wait_idle(10)
            assert rig.sandbox.violations == [], rig.sandbox.violations
        finally:
            rig.sandbox.faults = faults
        rig.sandbox.reset_log()


# --------------------------------------------------------------------------- Klaviyo


def _klaviyo_profile(n: int) -> dict[str, Any]:
    return {
        "email": email_of(n),
        "first_name": f"First{n}",
        "email_consent": ("yes", "no", None)[n % 3],
    }


def _klaviyo_profiles_verify(rig: Rig, numbers: Sequence[int]) -> None:
    """Every landed profile is in the sync's list, and its email consent arrived (a NULL
    consent leaves the subscription alone)."""
    sandbox = rig.sandbox
    assert [lst["name"] for lst in sandbox.lists()] == ["VIP Club"]
    members = {p["email"] for p in sandbox.list_members("VIP Club")}
    assert members == {email_of(n) for n in numbers}
    consent = {s["email"]: s["consent"] for s in sandbox.subscriptions() if s["channel"] == "email"}
    assert consent == {
        email_of(n): ("SUBSCRIBED", "UNSUBSCRIBED")[n % 3] for n in numbers if n % 3 != 2
    }


def _placed_orders(sandbox: Any) -> list[dict[str, Any]]:
    return [e for e in sandbox.events() if e["metric"] == "Placed Order"]


KLAVIYO_PROFILES = Case(
    type="klaviyo",
    object="profiles",
    table="people",
    columns={
        "email": "VARCHAR",
        "first_name": "VARCHAR",
        "email_consent": "VARCHAR",
        "note": "VARCHAR",
        "modified_at": "TIMESTAMPTZ",
    },
    identifier="email",
    mapping={"email": "email", "first_name": "first_name", "note": "properties.Note"},
    values=_klaviyo_profile,
    key=email_of,
    landed=lambda s: Counter(p["email"] for p in s.profiles()),
    notes=lambda s: {p["email"]: p["properties"].get("Note") for p in s.profiles()},
    destination={"list": "VIP Club"},
    extra={"consent": {"email": "email_consent"}},
    verify=_klaviyo_profiles_verify,
    fault_rows=3000,
    fault_seeds=FAULT_SEEDS,
)

KLAVIYO_ORDERS = Case(
    type="klaviyo",
    object="orders",
    table="orders",
    columns={
        "order_id": "VARCHAR",
        "email": "VARCHAR",
        "order_total": "DECIMAL(12,2)",
        "currency": "VARCHAR",
        "ordered_at": "TIMESTAMPTZ",
        "note": "VARCHAR",
        "modified_at": "TIMESTAMPTZ",
    },
    identifier="order_id",
    mapping={
        "order_id": "order_id",
        "email": "email",
        "order_total": "value",
        "currency": "value_currency",
        "ordered_at": "time",
        "note": "properties.Note",
    },
    values=lambda n: {
        "order_id": f"o{n}",
        "email": f"buyer{n % 7}@example.com",
        "order_total": Decimal(f"{n}.50"),
        "currency": "USD",
        "ordered_at": at(n - 3600),
    },
    key=lambda n: f"o{n}",
    landed=lambda s: Counter(e["unique_id"] for e in _placed_orders(s)),
    notes=lambda s: {e["unique_id"]: e["properties"].get("Note") for e in _placed_orders(s)},
    updates=False,  # an event sent again is dropped: the first one stays
    # one call a batch, one batch at a time (no jobs to poll): 50 small batches at a higher
    # rate meet enough
    fault_rows=500,
    fault_sync={"batch_size": 10},
    fault_rate=0.25,
)

KLAVIYO_CATALOG = Case(
    type="klaviyo",
    object="catalog",
    table="products",
    columns={
        "product_id": "VARCHAR",
        "title": "VARCHAR",
        "description": "VARCHAR",
        "url": "VARCHAR",
        "price": "DECIMAL(10,2)",
        "note": "VARCHAR",
        "modified_at": "TIMESTAMPTZ",
    },
    identifier="product_id",
    mapping={
        "product_id": "external_id",
        "title": "title",
        "description": "description",
        "url": "url",
        "price": "price",
        "note": "custom_metadata.Note",
    },
    values=lambda n: {
        "product_id": f"P{n}",
        "title": f"Product {n}",
        "description": f"About product {n}",
        "url": f"https://shop.example.com/p/{n}",
        "price": Decimal(f"{n}.99"),
    },
    key=lambda n: f"P{n}",
    landed=lambda s: Counter(i["external_id"] for i in s.catalog_items()),
    notes=lambda s: {
        i["external_id"]: (i.get("custom_metadata") or {}).get("Note") for i in s.catalog_items()
    },
    # a catalog run makes few calls (100 items a job): twice the usual rate meets enough; a
    # create job whose answer was lost and that lands late comes back as conflicts, which go
    # to update jobs, so a short margin keeps the futile look-ups (after a reset) short
    fault_rows=1500,
    fault_sync={"batch_size": 500},
    fault_rate=0.2,
    fault_settle=0.5,
)

# --------------------------------------------------------------------------- Dotdigital


def _dotdigital_contacts_verify(rig: Rig, numbers: Sequence[int]) -> None:
    """Every landed contact is in the sync's address book, created once, with its data fields
    created with the types of their values."""
    sandbox = rig.sandbox
    assert [b["name"] for b in sandbox.address_books()] == ["Customers"]
    members = {c["identifiers"]["email"] for c in sandbox.address_book_members("Customers")}
    assert members == {email_of(n) for n in numbers}
    types = {f["name"]: f["type"] for f in sandbox.data_fields()}
    assert (types["NOTE"], types["BIRTHDAY"]) == ("String", "Date")
    for n in numbers[:3]:
        assert sandbox.contact(email_of(n))["dataFields"]["BIRTHDAY"] == f"1980-01-{1 + n % 28:02d}"


def _insight(collection: str) -> Callable[[Any], list[dict[str, Any]]]:
    return lambda sandbox: sandbox.insight(collection)


def _owners(rig: Rig) -> None:
    """The contacts orders belong to (Dotdigital refuses an order whose contact is unknown)."""
    settings = rig.sandbox.settings
    body = {
        "contacts": [
            {"matchIdentifier": "email", "identifiers": {"email": email_of(n)}} for n in range(10)
        ]
    }
    answer = httpx.put(
        f"{rig.base_url}/contacts/v3/import",
        json=body,
        auth=(settings.username, settings.password),
    )
    assert answer.status_code == 202, answer.text


# A record larger than the 10 MB an import takes is sent alone in an import of its own, over
# the limit the destination declares (capabilities.batch_bytes), instead of being refused as
# value_too_large before sending (rowjson.pack never splits a single record).
_DOTDIGITAL_ISSUES: dict[str, str] = {}

_orders = _insight("orders")
_catalog = _insight(f"catalog_{SYNC}")

DOTDIGITAL_PROFILES = Case(
    type="dotdigital",
    object="profiles",
    table="people",
    columns={
        "email": "VARCHAR",
        "first_name": "VARCHAR",
        "birthday": "DATE",
        "note": "VARCHAR",
        "modified_at": "TIMESTAMPTZ",
    },
    identifier="email",
    mapping={"email": "email", "first_name": "FIRSTNAME", "birthday": "BIRTHDAY", "note": "NOTE"},
    values=lambda n: {
        "email": email_of(n),
        "first_name": f"First{n}",
        "birthday": date(1980, 1, 1 + n % 28),
    },
    key=email_of,
    landed=lambda s: Counter(c["identifiers"]["email"] for c in s.contacts()),
    notes=lambda s: {c["identifiers"]["email"]: c["dataFields"].get("NOTE") for c in s.contacts()},
    destination={"list": "Customers"},
    verify=_dotdigital_contacts_verify,
    # the one-off creates at the start (address book, data fields) meet the faults as much as
    # the imports do
    fault_rows=3000,
    fault_sync={"batch_size": 100, "destination": {"list": "Customers", "import_size": 50}},
    fault_seeds=FAULT_SEEDS,
    known_issues=_DOTDIGITAL_ISSUES,
)

DOTDIGITAL_ORDERS = Case(
    type="dotdigital",
    object="orders",
    table="orders",
    columns={
        "order_id": "VARCHAR",
        "email": "VARCHAR",
        "currency": "VARCHAR",
        "order_total": "DECIMAL(12,2)",
        "ordered_at": "TIMESTAMPTZ",
        "note": "VARCHAR",
        "modified_at": "TIMESTAMPTZ",
    },
    identifier="order_id",
    mapping={
        "order_id": "id",
        "email": "email",
        "currency": "currency",
        "order_total": "order_total",
        "ordered_at": "purchase_date",
        "note": "note",
    },
    values=lambda n: {
        "order_id": f"O{n:05d}",
        "email": email_of(n % 10),
        "currency": "GBP",
        "order_total": Decimal(f"{20 + n}.50"),
        "ordered_at": at(n - 3600),
    },
    key=lambda n: f"O{n:05d}",
    landed=lambda s: Counter(r["key"] for r in _orders(s)),
    notes=lambda s: {r["key"]: r["json"].get("note") for r in _orders(s)},
    setup=_owners,
    # an insight run makes few calls (20 imports): twice the usual rate meets enough
    fault_sync={"batch_size": 100, "destination": {"import_size": 50}},
    fault_rate=0.2,
    known_issues=_DOTDIGITAL_ISSUES,
)

DOTDIGITAL_CATALOG = Case(
    type="dotdigital",
    object="catalog",
    table="products",
    columns={
        "product_id": "VARCHAR",
        "title": "VARCHAR",
        "price": "DECIMAL(10,2)",
        "published": "BOOLEAN",
        "note": "VARCHAR",
        "modified_at": "TIMESTAMPTZ",
    },
    identifier="product_id",
    mapping={
        "product_id": "id",
        "title": "name",
        "price": "price",
        "published": "is_published",
        "note": "note",
    },
    values=lambda n: {
        "product_id": f"P{n:04d}",
        "title": f"Product {n}",
        "price": Decimal(f"{n}.99"),
        "published": n % 5 != 0,
    },
    key=lambda n: f"P{n:04d}",
    landed=lambda s: Counter(r["key"] for r in _catalog(s)),
    notes=lambda s: {r["key"]: r["json"].get("note") for r in _catalog(s)},
    fault_sync={"batch_size": 100, "destination": {"import_size": 50}},
    fault_rate=0.2,
    known_issues=_DOTDIGITAL_ISSUES,
)

CASES: dict[tuple[str, str], Case] = {
    (c.type, c.object): c
    for c in (
        KLAVIYO_PROFILES,
        KLAVIYO_ORDERS,
        KLAVIYO_CATALOG,
        DOTDIGITAL_PROFILES,
        DOTDIGITAL_ORDERS,
        DOTDIGITAL_CATALOG,
    )
}

# Client speed-ups a destination type needs beside ``fast_clients``, keyed by type.
PACING: dict[str, Callable[[pytest.MonkeyPatch], None]] = {"klaviyo": klaviyo_speed}


def registered() -> list[tuple[str, str]]:
    """Every (destination type, object) the registry lists."""
    return [(t, o) for t, plugin in registry.plugins().items() for o in plugin.objects]

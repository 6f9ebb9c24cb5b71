"""Destination classes by connection type and object. A third destination (or a new object
for an existing one) is one more entry here and a ``Destination`` subclass."""

from __future__ import annotations

from importlib import import_module

from reverse_etl.destinations.base import Destination

_DESTINATIONS: dict[str, dict[str, str]] = {
    "klaviyo": {
        "profiles": "reverse_etl.destinations.klaviyo.destination:KlaviyoDestination",
        "orders": "reverse_etl.destinations.klaviyo.events:KlaviyoOrdersDestination",
        "catalog": "reverse_etl.destinations.klaviyo.catalog:KlaviyoCatalogDestination",
    },
    "dotdigital": {
        "profiles": "reverse_etl.destinations.dotdigital.contacts:DotdigitalContacts",
        "orders": "reverse_etl.destinations.dotdigital.orders:DotdigitalOrders",
        "catalog": "reverse_etl.destinations.dotdigital.catalog:DotdigitalCatalog",
    },
}


class UnsupportedObject(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def objects_for(type_: str) -> tuple[str, ...]:
    return tuple(_DESTINATIONS.get(type_, {}))


def destination_for(type_: str, obj: str = "profiles") -> type[Destination]:
    """The class that writes ``obj`` (profiles, orders, catalog) to a ``type_`` connection."""
    if type_ not in _DESTINATIONS:
        raise UnsupportedObject(
            f"unknown destination type {type_!r}; known: {', '.join(_DESTINATIONS)}"
        )
    try:
        module, _, name = _DESTINATIONS[type_][obj].partition(":")
    except KeyError:
        raise UnsupportedObject(
            f"object {obj!r} is not supported by {type_}; supported: {', '.join(objects_for(type_))}"
        ) from None
    return getattr(import_module(module), name)

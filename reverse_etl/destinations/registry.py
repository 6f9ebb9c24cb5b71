"""Destination types by name. A third destination is one more line here."""

from __future__ import annotations

from importlib import import_module

from reverse_etl.destinations.base import Destination

_DESTINATIONS = {
    "klaviyo": "reverse_etl.destinations.klaviyo.destination:KlaviyoDestination",
    "dotdigital": "reverse_etl.destinations.dotdigital.destination:DotdigitalDestination",
}


def destination_for(type_: str) -> type[Destination]:
    try:
        module, _, name = _DESTINATIONS[type_].partition(":")
    except KeyError:
        raise KeyError(f"unknown destination type {type_!r}; known: {', '.join(_DESTINATIONS)}") from None
    return getattr(import_module(module), name)

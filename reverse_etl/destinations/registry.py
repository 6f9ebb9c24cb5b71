"""Destinations are found, not listed: each package under ``destinations/`` declares itself
with a ``DESTINATION = DestinationPlugin(...)`` in its ``__init__.py`` (its connection model,
its objects, its reason codes), and so may a package outside this project through the
``reverse_etl.destinations`` entry point group, as dbt finds its adapter plugins.

The config builds its connection models from here, so nothing outside a destination's folder
names it. Only a destination's ``__init__`` and ``configuration`` modules are imported to
find it; its objects' classes are imported when a sync uses them.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from reverse_etl.errors import ConfigError

if TYPE_CHECKING:
    from reverse_etl.destinations.base import Destination
    from reverse_etl.destinations.configuration import DestinationConnection

ENTRY_POINT_GROUP = "reverse_etl.destinations"


@dataclass(frozen=True)
class DestinationPlugin:
    """One destination, as its package declares it."""

    type: str  # the connection's ``type:`` in profiles.yml
    title: str  # "Klaviyo", for messages
    connection: builtins.type[DestinationConnection]
    objects: Mapping[str, str]  # object (profiles, orders, catalog) -> "module:Class"
    reasons: Mapping[str, str] = field(default_factory=dict)  # reason code -> how to fix it
    # its local emulator ("module:Class", a reverse_etl.sandbox.base.Sandbox) and the
    # connection settings that point at one served at a base URL, for the demo and the tests
    sandbox: str | None = None
    sandbox_connection: Any = None  # Callable[[SandboxSettings, str], dict[str, Any]]

    def object_class(self, obj: str) -> builtins.type[Destination]:
        try:
            target = self.objects[obj]
        except KeyError:
            raise UnsupportedObject(
                f"object {obj!r} is not supported by {self.type}; supported: "
                f"{', '.join(self.objects)}"
            ) from None
        return _load(target)

    def sandbox_class(self) -> Any:
        if self.sandbox is None:
            raise UnsupportedObject(f"{self.title} has no sandbox")
        return _load(self.sandbox)


class UnsupportedObject(ConfigError):
    """A sync names a destination type or an object that no destination provides."""


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def plugins() -> dict[str, DestinationPlugin]:
    """Every destination: the packages under ``reverse_etl/destinations/`` that declare one,
    then the entry point plugins (a built-in type is not replaced)."""
    found: dict[str, DestinationPlugin] = {}
    package = importlib.import_module(__package__ or "reverse_etl.destinations")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        plugin = getattr(module, "DESTINATION", None)
        if isinstance(plugin, DestinationPlugin):
            found[plugin.type] = plugin
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        plugin = ep.load()
        if isinstance(plugin, DestinationPlugin):
            found.setdefault(plugin.type, plugin)
    return found


def plugin_for(type_: str) -> DestinationPlugin:
    try:
        return plugins()[type_]
    except KeyError:
        raise UnsupportedObject(
            f"unknown destination type {type_!r}; known: {', '.join(plugins())}"
        ) from None


def objects_for(type_: str) -> tuple[str, ...]:
    return tuple(plugin_for(type_).objects)


def destination_for(type_: str, obj: str = "profiles") -> type[Destination]:
    """The class that writes ``obj`` (profiles, orders, catalog) to a ``type_`` connection."""
    return plugin_for(type_).object_class(obj)


def reasons() -> dict[str, str]:
    """Reason code -> how to fix it, of every destination."""
    out: dict[str, str] = {}
    for plugin in plugins().values():
        out.update(plugin.reasons)
    return out

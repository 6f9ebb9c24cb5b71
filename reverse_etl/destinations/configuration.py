"""The base of every destination's connection model. A leaf module: the registry imports a
destination's ``configuration.py`` (which builds on this) while the config is being built."""

from __future__ import annotations

from reverse_etl.strict import Strict


class DestinationConnection(Strict):
    """A destination's connection settings. Subclasses set ``type`` to a ``Literal`` (the
    discriminator in profiles.yml) and hold the base URL, so one project file runs against
    the real API, the sandbox or any fake."""

    type: str

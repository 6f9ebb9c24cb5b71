"""The base models every part of the project file shares. A leaf module: a destination's
``configuration.py`` imports it without pulling in the rest of the config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors; loaded config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DestinationConnection(Strict):
    """A destination's connection settings. Subclasses set ``type`` to a ``Literal`` (the
    discriminator in profiles.yml) and hold the base URL, so one project file runs against
    the real API, the sandbox or any fake."""

    type: str

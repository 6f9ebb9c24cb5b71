"""The base model of every part of the project file. A leaf module (pydantic only): a
destination's ``configuration.py`` builds on it without importing the config, which imports
the destinations."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors; loaded config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

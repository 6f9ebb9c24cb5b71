"""The ``type: dotdigital`` connection in profiles.yml."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import SecretStr

from reverse_etl.destinations.configuration import DestinationConnection


class DotdigitalConnection(DestinationConnection):
    type: Literal["dotdigital"]
    username: str
    password: SecretStr
    region: Literal["r1", "r2", "r3"] = "r1"
    base_url: str | None = None  # defaults to https://{region}-api.dotdigital.com

    def url(self) -> str:
        return (self.base_url or f"https://{self.region}-api.dotdigital.com").rstrip("/")


def sandbox_connection(settings: Any, base_url: str) -> dict[str, Any]:
    """Connection settings that point at a Dotdigital sandbox served at ``base_url``."""
    return {
        "type": "dotdigital",
        "username": settings.username,
        "password": settings.password,
        "base_url": base_url,
    }

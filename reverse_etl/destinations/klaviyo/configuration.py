"""The ``type: klaviyo`` connection in profiles.yml."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import SecretStr

from reverse_etl.destinations.configuration import DestinationConnection


class KlaviyoConnection(DestinationConnection):
    type: Literal["klaviyo"]
    api_key: SecretStr
    base_url: str = "https://a.klaviyo.com"
    revision: str = "2026-07-15"


def sandbox_connection(settings: Any, base_url: str) -> dict[str, Any]:
    """Connection settings that point at a Klaviyo sandbox served at ``base_url``."""
    return {"type": "klaviyo", "api_key": settings.api_key, "base_url": base_url}

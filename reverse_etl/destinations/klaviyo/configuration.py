"""The ``type: klaviyo`` connection in profiles.yml."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import ConfigDict, Field, SecretStr, model_validator

from reverse_etl.destinations.configuration import DestinationConnection
from reverse_etl.secrets import credential_fields, refuse_bad_credentials

# the key goes verbatim into the Authorization header: checked as it is resolved from the
# environment (a trailing newline would otherwise fail every request, see secrets.py)
CREDENTIALS = credential_fields("klaviyo", api_key="token")


class KlaviyoConnection(DestinationConnection):
    # a validation error built in code must not quote the key as its input
    model_config = ConfigDict(hide_input_in_errors=True)

    type: Literal["klaviyo"]
    api_key: SecretStr
    base_url: str = "https://a.klaviyo.com"
    revision: str = "2026-07-15"
    # each attempt's whole budget, connect to last byte (http.py); past it, a timeout retried.
    # None: the HTTP client's own default, 60 s
    call_timeout_seconds: float | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _credentials_can_be_sent(self) -> Self:
        refuse_bad_credentials(self, CREDENTIALS)
        return self


def sandbox_connection(settings: Any, base_url: str) -> dict[str, Any]:
    """Connection settings that point at a Klaviyo sandbox served at ``base_url``."""
    return {"type": "klaviyo", "api_key": settings.api_key, "base_url": base_url}

"""The ``type: dotdigital`` connection in profiles.yml."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import ConfigDict, Field, SecretStr, model_validator

from reverse_etl.destinations.configuration import DestinationConnection
from reverse_etl.secrets import credential_fields, refuse_bad_credentials

#: the default regional endpoint; account info answers there for every account
R1 = "https://r1-api.dotdigital.com"
# Basic auth encodes both before sending, so a space inside a password is allowed; whitespace
# at either end or a control character is refused as they are resolved (see secrets.py)
CREDENTIALS = credential_fields("dotdigital", username="text", password="text")


class DotdigitalConnection(DestinationConnection):
    """``region: auto`` asks ``GET /v2/account-info`` on r1 (or ``base_url``) once for the
    account's ``ApiEndpoint`` and uses it (``client.resolve_endpoint``).

    The waits are minutes because Dotdigital's are: ``import_slot_wait_minutes`` bounds the
    wait for one of the account's import slots, which other integrations share;
    ``import_timeout_minutes`` bounds how long one import may run (imports can take hours);
    polls back off from ``Destination.poll_interval`` to ``poll_max_seconds``;
    ``call_timeout_seconds`` is the HTTP timeout of an import's submit (Dotdigital: "your
    client permits 121 seconds call duration before considering the call timed out",
    https://developer-loyalty.dotdigital.com/docs/api-endpoints)."""

    # a validation error built in code must not quote the credentials as its input
    model_config = ConfigDict(hide_input_in_errors=True)

    type: Literal["dotdigital"]
    username: str
    password: SecretStr
    region: Literal["r1", "r2", "r3", "auto"] = "r1"
    base_url: str | None = None  # defaults to https://{region}-api.dotdigital.com
    import_slot_wait_minutes: float = Field(30.0, gt=0)
    import_timeout_minutes: float = Field(360.0, gt=0)
    poll_max_seconds: float = Field(60.0, gt=0)
    call_timeout_seconds: float = Field(150.0, ge=1)

    @model_validator(mode="after")
    def _credentials_can_be_sent(self) -> Self:
        refuse_bad_credentials(self, CREDENTIALS)
        return self

    def url(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        return R1 if self.region == "auto" else f"https://{self.region}-api.dotdigital.com"


def sandbox_connection(settings: Any, base_url: str) -> dict[str, Any]:
    """Connection settings that point at a Dotdigital sandbox served at ``base_url``."""
    return {
        "type": "dotdigital",
        "username": settings.username,
        "password": settings.password,
        "base_url": base_url,
    }

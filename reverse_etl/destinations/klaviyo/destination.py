"""The Klaviyo profiles destination, under the name the registry and callers have used from
the start; the code lives in ``profiles.py``."""

from reverse_etl.destinations.klaviyo.profiles import (
    IDENTIFIER_FIELDS,
    STANDARD_FIELDS,
    KlaviyoDestination,
)

__all__ = ["IDENTIFIER_FIELDS", "STANDARD_FIELDS", "KlaviyoDestination"]

"""Klaviyo: profiles through bulk import jobs (list membership through the job's list) with
consent as subscriptions (``profiles.py``, ``consent.py``); orders as Placed Order / Ordered
Product events (``orders.py``); products as catalog items (``catalog.py``). ``destination.py``
holds what they share, ``client.py`` the API, its limits and pacing."""

from reverse_etl.destinations.klaviyo import configuration
from reverse_etl.destinations.klaviyo.reasons import REASONS
from reverse_etl.destinations.registry import DestinationPlugin

DESTINATION = DestinationPlugin(
    type="klaviyo",
    title="Klaviyo",
    connection=configuration.KlaviyoConnection,
    objects={
        "profiles": "reverse_etl.destinations.klaviyo.profiles:KlaviyoProfiles",
        "orders": "reverse_etl.destinations.klaviyo.orders:KlaviyoOrders",
        "catalog": "reverse_etl.destinations.klaviyo.catalog:KlaviyoCatalog",
    },
    reasons=REASONS,
    sandbox="reverse_etl.sandbox.klaviyo:KlaviyoSandbox",
    sandbox_connection=configuration.sandbox_connection,
)

"""Dotdigital: contacts through v3 contact imports, with data fields and address books
through v2 (``profiles.py``); orders and product catalogs as v3 insight data (``orders.py``,
``catalog.py``, both on ``insight.py``). ``destination.py`` holds what they share,
``client.py`` the API and its call budget."""

from reverse_etl.destinations.dotdigital import configuration
from reverse_etl.destinations.dotdigital.reasons import REASONS
from reverse_etl.destinations.registry import DestinationPlugin

DESTINATION = DestinationPlugin(
    type="dotdigital",
    title="Dotdigital",
    connection=configuration.DotdigitalConnection,
    objects={
        "profiles": "reverse_etl.destinations.dotdigital.profiles:DotdigitalProfiles",
        "orders": "reverse_etl.destinations.dotdigital.orders:DotdigitalOrders",
        "catalog": "reverse_etl.destinations.dotdigital.catalog:DotdigitalCatalog",
    },
    reasons=REASONS,
    sandbox="reverse_etl.sandbox.dotdigital:DotdigitalSandbox",
    sandbox_connection=configuration.sandbox_connection,
)

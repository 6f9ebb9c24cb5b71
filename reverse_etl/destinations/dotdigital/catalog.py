"""A product catalog into an account-scoped insight collection, one record a product.

The collection is ``destination.collection``, by default ``catalog_<sync name>`` (Dotdigital's
own integrations name theirs ``catalog_<store>``); records are keyed by the product id. The
standard fields are the attributes Dotdigital's product recommendations read (``name``,
``price``, ``url``, ``sku``, ``image_path`` are the ones they need) plus the usual extras;
any other mapped field is a custom key. A product taken off sale stays a record: map a
status (or stock) so campaigns can leave it out.
"""

from __future__ import annotations

import re

from reverse_etl.config import Sync
from reverse_etl.destinations.dotdigital import insight
from reverse_etl.destinations.dotdigital.insight import InsightDestination


class DotdigitalCatalog(InsightDestination):
    scope = "account"
    collection_type = "catalog"
    capabilities = insight.capabilities(
        "catalog records",
        {
            "id": "string",
            "name": "string",
            "price": "number",
            "sale_price": "number",
            "sku": "string",
            "url": "string",
            "image_path": "string",
            "stock": "integer",
            "status": "string",
            "currency": "string",
            "brand": "string",
            "category": "string",
            "description": "string",
        },
    )

    @classmethod
    def default_collection(cls, sync: Sync) -> str:
        return "catalog_" + re.sub(r"[^-A-Za-z0-9_]", "_", sync.name)

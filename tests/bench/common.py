"""What the benchmarks share, so that they measure the same work: the demo's profile mapping,
and a destination that builds every request and sends none (the extract + transform figure)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

PROFILE_MAPPING = """    phone_region_column: country
    mapping:
      email: email
      phone: phone_number
      customer_id: external_id
      first_name: first_name
      last_name: last_name
      city: location.city
      country: location.country
      postcode: location.zip
      loyalty_tier: properties.Loyalty_Tier
      loyalty_points: properties.Loyalty_Balance
      lifetime_value: properties.Lifetime_Value
      birthday: properties.Birthday
      is_vip: properties.VIP
    consent:
      email: {column: email_consent, consented_at: consent_updated_at}
      sms: {column: sms_consent, consented_at: consent_updated_at}
"""


def unsent(totals: dict[str, int]) -> Callable[[Any, Any], Any]:
    """A destination factory for ``run_sync``: the real destination, whose ``load`` builds
    every request body (counted in ``totals``) and acknowledges without sending, and which
    reads no consent back."""
    from reverse_etl.destinations.base import LoadResult
    from reverse_etl.engine import make_destination

    def factory(project: Any, sync: Any) -> Any:
        dest = make_destination(project, sync)

        def load(batches: Iterator[Any]) -> Iterator[LoadResult]:
            for b in batches:
                for req in dest.requests(b.table):
                    totals["requests"] = totals.get("requests", 0) + 1
                    totals["bytes"] = totals.get("bytes", 0) + len(req.body)
                yield LoadResult(token=b.token, updated=b.table.num_rows)

        dest.load = load
        dest.prepare = lambda: None  # no list lookup: nothing leaves the process
        # nor any consent read-back (tests/bench/consent_readback.py measures that apart)
        dest.read_back = lambda memory: None
        dest.consent_standing = lambda channel, persons: None
        return dest

    return factory

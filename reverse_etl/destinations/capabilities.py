"""What one destination object can take, declared once and frozen.

The engine and the config checks read a destination's abilities from here instead of from
loose class attributes: the fields it knows, what the identifier may map to, its options, its
batch and record limits and how many batches it keeps in flight. ``Destination.check_sync``
turns them into config errors, so a new destination declares them and gets the checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Capabilities:
    label: str  # how messages name the object: "Klaviyo profiles"
    # standard field name -> value kind (config.FIELD_TYPES); other fields must be custom
    standard_fields: Mapping[str, str]
    # custom fields are written <prefix>.<Name> (Klaviyo's properties.Plan); None: the
    # destination's ``is_custom_field`` says
    custom_prefix: str | None = None
    # fields the sync's identifier may map to; empty: any mapped field
    identifier_fields: tuple[str, ...] = ()
    # keys under ``destination:`` besides connection and list; those in bool_options are
    # true/false
    options: tuple[str, ...] = ()
    bool_options: tuple[str, ...] = ()
    takes_list: bool = False  # destination.list is meaningful
    takes_consent: bool = False  # a consent: section is meaningful
    # ``mode: mirror`` works: members that left the view are taken out of the list (``remove``)
    removes: bool = False
    # the field whose value the destination finds a record by (Dotdigital contacts: email),
    # kept in the synced-state snapshot so a member who left the view can still be found;
    # None: the field the sync's identifier maps to
    match_field: str | None = None
    # what the config error suggests instead of a list or consent the object cannot take
    list_instead: str = "lists hold profiles: use a profiles sync"
    consent_instead: str = "consent is synced with profiles"
    batch_records: int = 10_000  # records one API call (or job) takes
    batch_bytes: int = 5_000_000  # bytes one API call (or job) takes
    record_bytes: int | None = None  # bytes one record may have, where the API says
    # batches submitted ahead of the one being acknowledged; results still come in order
    max_in_flight: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "standard_fields", MappingProxyType(dict(self.standard_fields)))
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")

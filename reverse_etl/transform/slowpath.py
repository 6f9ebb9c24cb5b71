"""Per-row checks for the few values the vectorised rules could not accept.

email-validator and phonenumbers cost tens of microseconds a value, so they only see values
that failed the fast rule: most such values are truly bad, and a few (internationalised
addresses, national phone formats) are rescued and normalised here.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc
from email_validator import EmailNotValidError, validate_email


def check_email(value: str) -> tuple[str | None, str | None]:
    """(normalised address, None) or (None, why it is not valid)."""
    try:
        info = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        return None, str(exc)
    return info.normalized.lower(), None


def check_phone(value: str, region: str | None) -> tuple[str | None, str | None]:
    """(E.164 number, None) or (None, why it is not valid). ``region`` in any case, as the
    config accepts it (phonenumbers knows only upper-case regions: "gb" failed every national
    number here while the fast path, which upper-cases it, passed them)."""
    try:
        number = phonenumbers.parse(value, region.upper() if region else region)
    except phonenumbers.NumberParseException as exc:
        hint = "" if region else " (no default_phone_region is set for national numbers)"
        return None, f"{exc._msg}{hint}"
    if not phonenumbers.is_valid_number(number):
        return None, "not a valid phone number for its country"
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


_DIALABLE = ("fixed_line", "mobile", "voip")  # what a customer profile holds


def number_types(kinds: tuple[str, ...]) -> Iterator[tuple[int, Any, Any]]:
    """(calling code, region metadata, number description) for each of ``kinds`` (fixed_line,
    mobile, ...) that a region of each calling code has a pattern for, from phonenumbers'
    metadata (non-geographic codes, region "001", included)."""
    for code, regions in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.items():
        for region in regions:
            meta = (
                phonenumbers.PhoneMetadata.metadata_for_nongeo_region(code)
                if region == "001"
                else phonenumbers.PhoneMetadata.metadata_for_region(region)
            )
            if meta is None:
                continue
            for kind in kinds:
                desc = getattr(meta, kind, None)
                if desc is not None and desc.national_number_pattern:
                    yield code, meta, desc


@cache
def possible_lengths() -> dict[str, list[int]]:
    """Calling code → possible total digit counts (code + national number) of dialable
    numbers, from phonenumbers' metadata; the vectorised E.164 rule refuses other lengths.
    Lengths of the number types a profile can hold (fixed line, mobile, VoIP, ...) are used,
    not the region's general ones, which also admit short codes such as '12345'."""
    lengths: dict[int, set[int]] = {}
    for code, meta, desc in number_types(_DIALABLE):
        possible = desc.possible_length
        if not possible and meta.general_desc is not None:
            possible = meta.general_desc.possible_length
        lengths.setdefault(code, set()).update(possible or ())
    return {
        str(code): sorted(len(str(code)) + n for n in found if n > 0)
        for code, found in lengths.items()
        if found
    }


@cache
def region_codes() -> dict[str, tuple[str, str]]:
    """Region → (calling code, national trunk prefix), e.g. GB → ('44', '0'), US → ('1', '1')."""
    out: dict[str, tuple[str, str]] = {}
    for region in phonenumbers.SUPPORTED_REGIONS:
        meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
        if meta is not None and meta.country_code:
            prefix = meta.national_prefix or ""
            out[region] = (str(meta.country_code), prefix if prefix.isdigit() else "")
    return out


class PossibleLength:
    """Vectorised check that an E.164-shaped number has a possible length for its calling
    code (phonenumbers' metadata), on a whole Arrow array at once."""

    def __init__(self) -> None:
        keys = [
            f"{code}:{total}" for code, totals in possible_lengths().items() for total in totals
        ]
        self._allowed = pa.array(keys, pa.string())

    def __call__(self, numbers: pa.Array) -> pa.Array:
        total = pc.cast(pc.subtract(pc.utf8_length(numbers), 1), pa.string())
        ok = None
        for width in (1, 2, 3):
            code = pc.utf8_slice_codeunits(numbers, 1, 1 + width)
            hit = pc.is_in(pc.binary_join_element_wise(code, total, ":"), value_set=self._allowed)
            ok = hit if ok is None else pc.or_(ok, hit)
        return ok

"""Phone numbers Klaviyo refuses, found before sending: numbers valid in E.164 shape but not in
their country's numbering plan.

Klaviyo checks numbering plans, not just the E.164 shape: a bulk subscribe whose profile has an
invalid number and no other identifier is refused whole (400), and with another identifier the
number is dropped ("If a request includes a valid identifier (such as email address) but an
invalid phone number, the API will now: Process the request based on the email. Ignore the
invalid phone number (instead of returning a 400)"; "If the request only includes a phone
number and the phone number is invalid, the request will still fail with a 400",
https://community.klaviyo.com/developer-group-64/api-validation-improvements-for-phone-number-handling-18034).
So one bad number could refuse a whole 1,000-profile subscribe: each number is checked here
with phonenumbers' ``is_valid_number`` (the numbering plans libphonenumber keeps, as Klaviyo's
own validation is built on).

Cheap on the hot path: the transform's fast rule only checks shape and length, so this is the
one strict check. Numbers matching their calling code's plan (one RE2 expression a calling
code, from phonenumbers' metadata, over the batch's distinct numbers in Arrow) pass without
Python; only the rest are parsed (cached, so a number is parsed once a process), which decides
them exactly.
"""

from __future__ import annotations

from functools import cache, lru_cache

import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.transform.slowpath import number_types

# the number types is_valid_number accepts (any but UNKNOWN), by their metadata names
_TYPES = (
    "fixed_line",
    "mobile",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "personal_number",
    "voip",
    "pager",
    "uan",
    "voicemail",
)


@lru_cache(maxsize=1 << 18)
def valid(number: str) -> bool:
    """Whether the E.164 ``number`` is valid in its country's numbering plan (exact)."""
    try:
        return bool(phonenumbers.is_valid_number(phonenumbers.parse(number)))
    except phonenumbers.NumberParseException:
        return False


@cache
def _plans() -> dict[str, str]:
    """Calling code -> an anchored expression a number with that code matches when one of the
    code's regions has a number type it fits (a number it matches is valid; one it misses is
    decided by ``valid``)."""
    patterns: dict[int, set[str]] = {}
    for code, _, desc in number_types(_TYPES):
        patterns.setdefault(code, set()).add(desc.national_number_pattern)
    return {
        str(code): rf"^\+{code}(?:{'|'.join(sorted(found))})$" for code, found in patterns.items()
    }


def _fit_plans(numbers: pa.Array) -> pa.Array:
    """True where a distinct E.164 number fits its calling code's plan expression."""
    fits = pa.array([False] * len(numbers))
    plans = _plans()
    for width in (1, 2, 3):  # calling codes are prefix-free: one width matches a number
        codes = pc.utf8_slice_codeunits(numbers, 1, 1 + width)
        for code in pc.unique(codes).to_pylist():
            plan = plans.get(code) if code is not None else None
            if plan is None:
                continue
            mine = pc.fill_null(pc.equal(codes, code), False)
            try:
                hit = pc.match_substring_regex(numbers, plan)
            except pa.ArrowInvalid:  # an expression RE2 cannot take: Python decides those
                continue
            fits = pc.or_(fits, pc.fill_null(pc.and_(mine, hit), False))
    return fits


def invalid(phones: pa.Array | pa.ChunkedArray) -> pa.Array:
    """True where ``phones`` holds a number that is not valid (false for nulls)."""
    if isinstance(phones, pa.ChunkedArray):
        phones = phones.combine_chunks() if phones.num_chunks else pa.array([], pa.string())
    distinct = pc.unique(phones.drop_null())
    if len(distinct) == 0:
        return pa.array([False] * len(phones))
    suspects = distinct.filter(pc.invert(_fit_plans(distinct)))
    bad = [n for n in suspects.to_pylist() if not valid(n)]
    if not bad:
        return pa.array([False] * len(phones))
    return pc.fill_null(pc.is_in(phones, value_set=pa.array(bad, pa.string())), False)

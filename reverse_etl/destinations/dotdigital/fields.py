"""Dotdigital data fields: naming rules, the name proposed for a column, and value types.

Names are at most 20 characters of letters, digits, ``_`` and ``-``, unique whatever their
case. The standard fields exist in every account and are mapped, never created.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}$")
STANDARD = ("FIRSTNAME", "LASTNAME", "FULLNAME", "GENDER", "POSTCODE")
IDENTIFIERS = {"email": "email", "mobileNumber": "phone"}

# our value kind -> Dotdigital data field type
TYPES = {
    "string": "String",
    "email": "String",
    "phone": "String",
    "json": "String",
    "number": "Numeric",
    "integer": "Numeric",
    "date": "Date",
    "datetime": "Date",
    "boolean": "Boolean",
}


def propose_name(column: str) -> str:
    """A valid data field name for a column: ``billing_address_1`` → ``BILLING_ADDRESS_1``."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", column).strip("_").upper()
    return name[:20] or "FIELD"


def name_problem(name: str) -> str | None:
    if not NAME_RE.match(name):
        why = (
            "longer than 20 characters"
            if len(name) > 20
            else "made of other than letters, digits, _ and -"
        )
        return f"data field name {name!r} is {why}; try {propose_name(name)!r}"
    return None

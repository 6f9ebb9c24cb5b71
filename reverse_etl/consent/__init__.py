"""Consent that stays true: what decides whether a row's consent is sent at all.

``kept.py``: consent the destination already holds from us (the snapshot's consent
fingerprint is unchanged) is not sent again, whatever else about the row changed.
``memory.py``: what destinations said about people's consent, read back into the state store.
``newest.py``: a subscribe older than the person's opt-out at the destination is held back.
"""

from reverse_etl.consent.kept import (
    HELD,
    KEPT,
    NEW,
    cleared,
    flag_sql,
    flagged,
    mark_kept,
    without_kept,
    written,
)

__all__ = [
    "HELD",
    "KEPT",
    "NEW",
    "cleared",
    "flag_sql",
    "flagged",
    "mark_kept",
    "without_kept",
    "written",
]

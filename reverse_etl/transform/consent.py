"""Consent spellings. List membership never implies consent: only these columns do."""

from __future__ import annotations

SUBSCRIBED = "subscribed"
UNSUBSCRIBED = "unsubscribed"
NEVER_SUBSCRIBED = "never_subscribed"

WORDS: dict[str, str] = {
    **dict.fromkeys(
        [
            "yes",
            "y",
            "true",
            "t",
            "1",
            "subscribed",
            "subscribe",
            "sub",
            "opt-in",
            "opt_in",
            "optin",
            "opt in",
            "opted-in",
            "opted_in",
            "opted in",
            "granted",
            "consented",
            "on",
        ],
        SUBSCRIBED,
    ),
    **dict.fromkeys(
        [
            "no",
            "n",
            "false",
            "f",
            "0",
            "unsubscribed",
            "unsubscribe",
            "unsub",
            "opt-out",
            "opt_out",
            "optout",
            "opt out",
            "opted-out",
            "opted_out",
            "opted out",
            "revoked",
            "withdrawn",
            "denied",
            "off",
        ],
        UNSUBSCRIBED,
    ),
    **dict.fromkeys(["never_subscribed", "never subscribed", "never-subscribed"], NEVER_SUBSCRIBED),
}


# words that say "no" without saying whether it is an opt-out or a box never ticked
AMBIGUOUS_NO = frozenset({"no", "n", "false", "f", "0", "off"})


def canonical(value: object) -> str | None:
    """The canonical value for one spelling, None for empty, KeyError for an unknown word."""
    if value is None:
        return None
    if isinstance(value, bool):
        return SUBSCRIBED if value else UNSUBSCRIBED
    text = str(value).strip().lower()
    if not text:
        return None
    return WORDS[text]

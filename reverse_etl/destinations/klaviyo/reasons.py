"""Reason codes only Klaviyo syncs report, with how to fix each (the error file's
``how_to_fix``). Codes every destination shares are in ``transform/rowerrors.py``."""

REASONS: dict[str, str] = {
    "missing_consent_address": "Email consent needs an email address and SMS consent a phone number: map and fill that column, or leave the consent empty (the subscription is then left as it is).",
}

"""Reason codes only Klaviyo syncs report, with how to fix each (the error file's
``how_to_fix``). Codes every destination shares are in ``transform/rowerrors.py``."""

REASONS: dict[str, str] = {
    # shared with Dotdigital (reason codes are one namespace): the text serves both
    "unknown_order_status": "Add the status to the sync's status map: for Klaviyo destination.order_statuses, under the metric it stands for ({Fulfilled Order: [shipped]}); for Dotdigital destination.order_status_map, with the Dotdigital status it stands for (Pending, Paid, Completed, Cancelled ...).",
    "phone_not_sent": "Fix the number in the warehouse (a number its country's numbering plan allows, in E.164): the profile was sent without it, and without its SMS consent.",
    "missing_consent_address": "Email consent needs an email address and SMS consent a phone number: map and fill that column, or leave the consent empty (the subscription is then left as it is).",
}

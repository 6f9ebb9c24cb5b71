"""Reason codes only Dotdigital syncs report, with how to fix each (the error file's
``how_to_fix``). Codes every destination shares are in ``transform/rowerrors.py``."""

REASONS: dict[str, str] = {
    "contact_missing": "Nothing to fix yet: the order's contact is not in Dotdigital (yet). The row is queued and sent again by the next runs (give the orders sync depends_on: [its contacts sync] so the contact goes first); if the contact never arrives it is given up (parent_missing_gave_up).",
    "missing_email": "Give the row an email address; Dotdigital matches contacts, and the owners of orders, by email.",
    "unknown_order_status": "Add the status to destination.order_status_map with the Dotdigital status it stands for (Pending, Paid, Completed, Cancelled ...).",
    "insight_nested_array": "Insight data refuses an array directly inside an array: flatten the column in the view, or wrap each inner array in a record ({'values': [...]}).",
    "globally_suppressed": "The contact is suppressed in Dotdigital (a hard bounce, a complaint or a suppression), so imports cannot update it; remove the suppression in Dotdigital (Audience > Suppressions) if the person asked to be contacted again, or leave the row out.",
    "insight_invalid_key": "Rename the field in the view: insight data keys are letters, digits, _ and - (not starting with a digit, at most 255 characters), and a-b beside a_b is refused.",
}

"""Klaviyo: profiles through bulk import jobs (list membership through the job's list) with
consent as subscriptions; orders as Placed Order / Ordered Product events; products as
catalog items. ``base.py`` holds what they share, ``client.py`` the API and its limits."""

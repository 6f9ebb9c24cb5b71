"""Klaviyo: profiles through bulk import jobs, list membership through the job's list."""

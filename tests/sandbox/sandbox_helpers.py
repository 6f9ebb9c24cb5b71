"""Small builders for the sandbox tests (plain functions, no fixtures)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from reverse_etl.sandbox import KlaviyoSandbox


class FakeTime:
    """A clock that moves only when a test (or a sleep on it) moves it; sleeps are recorded.

    Hand ``clock`` to a limiter instead of ``time.monotonic`` and what it allows depends on the
    steps the test takes, never on how fast a loaded machine gets through the calls.
    """

    def __init__(self, now: float = 0.0):
        self.now = now
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        # a sleep too short to move the clock means the caller would spin: fail, do not hang
        assert seconds == 0 or self.now + seconds > self.now, f"sleep {seconds!r}s at {self.now}"
        self.slept.append(seconds)
        self.now += seconds


def klaviyo_headers(sandbox: KlaviyoSandbox) -> dict[str, str]:
    return {
        "Authorization": f"Klaviyo-API-Key {sandbox.settings.api_key}",
        "revision": "2026-07-15",
        "Content-Type": "application/vnd.api+json",
        "Accept": "application/vnd.api+json",
    }


def poll(
    get: Callable[[], httpx.Response],
    done: Callable[[httpx.Response], bool],
    timeout: float = 30.0,
) -> httpx.Response:
    """Call ``get`` until ``done(response)``, honouring 429s; fail after ``timeout`` seconds.

    The timeout only turns a hang into a failure: a passing poll returns as soon as ``done``,
    so the deadline is generous enough for a machine running two test suites at once."""
    deadline = time.monotonic() + timeout
    while True:
        response = get()
        if response.status_code == 429:
            time.sleep(int(response.headers["X-Sandbox-Retry-After-Ms"]) / 1000)
        elif done(response):
            return response
        else:
            time.sleep(0.02)
        if time.monotonic() > deadline:
            raise AssertionError(
                f"gave up polling; last answer {response.status_code} {response.text[:300]}"
            )


def profile(email: str | None = None, **attrs: Any) -> dict[str, Any]:
    if email is not None:
        attrs["email"] = email
    return {"type": "profile", "attributes": attrs}


def import_body(profiles: list[dict[str, Any]], list_id: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": "profile-bulk-import-job",
        "attributes": {"profiles": {"data": profiles}},
    }
    if list_id is not None:
        data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id}]}}
    return {"data": data}


def marketing(consent: str, consented_at: str | None = None) -> dict[str, Any]:
    """One channel of a profile's ``subscriptions``, nested as Klaviyo nests it."""
    entry: dict[str, Any] = {"consent": consent}
    if consented_at is not None:
        entry["consented_at"] = consented_at
    return {"marketing": entry}


def subscriber(email: str, subscriptions: dict[str, Any], **attrs: Any) -> dict[str, Any]:
    """A profile in a subscription job; keys in the order Klaviyo's examples use."""
    return {
        "type": "profile",
        "attributes": {"email": email, **attrs, "subscriptions": subscriptions},
    }


def subscription_job(
    profiles: list[dict[str, Any]],
    *,
    delete: bool = False,
    historical_import: bool | None = None,
    list_id: str | None = None,
) -> dict[str, Any]:
    """A bulk subscribe (``delete``: unsubscribe) job body, so a test states only what varies."""
    attributes: dict[str, Any] = {}
    if historical_import is not None:
        attributes["historical_import"] = historical_import
    attributes["profiles"] = {"data": profiles}
    kind = "delete" if delete else "create"
    data: dict[str, Any] = {
        "type": f"profile-subscription-bulk-{kind}-job",
        "attributes": attributes,
    }
    if list_id is not None:
        data["relationships"] = {"list": {"data": {"type": "list", "id": list_id}}}
    return {"data": data}


def events_job(
    events: list[dict[str, Any]], email: str = "buyer@example.com", **profile_attrs: Any
) -> dict[str, Any]:
    """An event bulk-create job body: ``events`` for one profile, found by ``email``."""
    profile = {"type": "profile", "attributes": {"email": email, **profile_attrs}}
    return {
        "data": {
            "type": "event-bulk-create-job",
            "attributes": {
                "events-bulk-create": {
                    "data": [
                        {
                            "type": "event-bulk-create",
                            "attributes": {
                                "profile": {"data": profile},
                                "events": {"data": events},
                            },
                        }
                    ]
                }
            },
        }
    }

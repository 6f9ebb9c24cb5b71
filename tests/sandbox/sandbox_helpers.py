"""Small builders for the sandbox tests (plain functions, no fixtures)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from reverse_etl.sandbox import KlaviyoSandbox


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
    timeout: float = 5.0,
) -> httpx.Response:
    """Call ``get`` until ``done(response)``, honouring 429s; fail after ``timeout`` seconds."""
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

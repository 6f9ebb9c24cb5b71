"""Klaviyo's data as the sandbox keeps it: profiles, lists, consent, events and catalog items.

No HTTP here; ``klaviyo.py`` turns requests into these calls. The rules follow Klaviyo's docs:

* Identity: a profile is found by ``id``, else by the first of ``email``, ``phone_number``,
  ``external_id`` that matches (emails case-insensitively). An identifier that already belongs
  to *another* profile is a conflict (``duplicate_profile``) and that profile is not imported.
* Attributes: a key left out leaves the stored value unchanged; an explicit ``null`` clears it.
  ``location`` and ``properties`` are merged key by key (a ``null`` inside clears that key);
  ``properties: null`` leaves all custom properties as they are (Klaviyo clears custom
  properties only through ``meta.patch_properties.unset``, which is supported, as are
  ``append`` and ``unappend``).
* Emails must look like ``local@domain.tld`` and phone numbers be E.164 (``+`` and 7-15
  digits); the sandbox does not check numbering plans.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
PHONE_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")

IDENTIFIERS = ("email", "phone_number", "external_id")
STANDARD = (
    "email",
    "phone_number",
    "external_id",
    "_kx",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
)
_STANDARD = frozenset(STANDARD)
_MERGED = frozenset({"location", "properties"})
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class ProfileError(Exception):
    """A profile that cannot be imported: Klaviyo error code, text and where (JSON pointer)."""

    def __init__(self, code: str, detail: str, pointer: str = ""):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.pointer = pointer


def check_email(value: Any, pointer: str) -> None:
    if value is not None and EMAIL_RE.match(value) is None:
        raise ProfileError("invalid", f"Invalid email address: {value!r}.", pointer)


def check_phone(value: Any, pointer: str) -> None:
    if value is not None and PHONE_RE.match(value) is None:
        raise ProfileError(
            "invalid", f"Invalid phone number: {value!r}; use E.164 (e.g. +15005550006).", pointer
        )


@dataclass
class Ids:
    """Deterministic ids in Klaviyo's shapes (ULID-like profiles, 6-character lists)."""

    counter: itertools.count  # type: ignore[type-arg]

    def profile(self) -> str:
        return f"01{next(self.counter):024X}"

    def short(self) -> str:
        n = (next(self.counter) * 25214903917 + 11) % 62**6  # a bijection, so ids never repeat
        digits = []
        for _ in range(6):
            n, r = divmod(n, 62)
            digits.append(_BASE62[r])
        return "".join(reversed(digits))


class KlaviyoState:
    """All of one sandbox account's data. Callers hold the sandbox lock."""

    def __init__(self) -> None:
        self.ids = Ids(itertools.count(1))
        self.profiles: dict[str, dict[str, Any]] = {}
        self._index: dict[str, dict[str, str]] = {k: {} for k in IDENTIFIERS}
        self.lists: dict[str, dict[str, Any]] = {}
        self.members: dict[str, dict[str, str]] = {}  # list id -> profile id -> joined at
        self.subscriptions: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.metrics: dict[str, str] = {}  # name -> id
        self.events: list[dict[str, Any]] = []
        self._event_keys: set[tuple[str, str, str]] = set()
        self.catalog: dict[str, dict[str, Any]] = {}

    # --- profiles ----------------------------------------------------------------------------

    def find_by(self, identifier: str, value: str) -> str | None:
        """The profile holding this identifier (emails compare case-insensitively)."""
        return self._index[identifier].get(value.lower() if identifier == "email" else value)

    def upsert(
        self,
        attrs: Mapping[str, Any],
        *,
        profile_id: str | None = None,
        meta: Mapping[str, Any] | None = None,
        pointer: str = "",
        stamp: str | None = None,
    ) -> tuple[str, bool]:
        """Create or update one profile; return (id, created). Raise ProfileError."""
        email = attrs.get("email")
        if email is not None:
            check_email(email, f"{pointer}/attributes/email")
        phone = attrs.get("phone_number")
        if phone is not None:
            check_phone(phone, f"{pointer}/attributes/phone_number")
        if profile_id and profile_id not in self.profiles:
            raise ProfileError(
                "not_found", f"Profile {profile_id!r} does not exist.", f"{pointer}/id"
            )
        # Each identifier given: (name, index key, owner). The first owner found is the match.
        given = []
        pid = profile_id or None
        for identifier in IDENTIFIERS:
            value = attrs.get(identifier)
            if value is not None:
                key = value.lower() if identifier == "email" else value
                owner = self._index[identifier].get(key)
                given.append((identifier, value, owner))
                if pid is None:
                    pid = owner
        if pid is None and not given:
            raise ProfileError(
                "invalid",
                "A profile needs one of email, phone_number or external_id.",
                f"{pointer}/attributes",
            )
        for identifier, value, owner in given:
            if owner is not None and owner != pid:
                raise ProfileError(
                    "duplicate_profile",
                    f"{identifier} {value!r} already belongs to profile {owner}.",
                    f"{pointer}/attributes/{identifier}",
                )
        created = pid is None
        stamp = stamp or now_iso()
        if pid is None:
            pid = self.ids.profile()
            profile: dict[str, Any] = {
                "id": pid,
                "created": stamp,
                "location": {},
                "properties": {},
            }
            self.profiles[pid] = profile
        else:
            profile = self.profiles[pid]
        self._apply(profile, attrs)
        if meta:
            self._patch(profile["properties"], meta.get("patch_properties") or {})
        profile["updated"] = stamp
        return pid, created

    def _apply(self, profile: dict[str, Any], attrs: Mapping[str, Any]) -> None:
        for key, value in attrs.items():
            if key in _MERGED:
                if value is None:
                    if key == "location":
                        profile[key] = {}
                    continue
                merged = profile[key]
                for k, v in value.items():
                    if v is None:
                        merged.pop(k, None)
                    else:
                        merged[k] = v
                continue
            if key not in _STANDARD:
                continue
            index = self._index.get(key)
            if index is not None:
                old = profile.get(key)
                if old is not None:
                    index.pop(old.lower() if key == "email" else old, None)
                if value is not None:
                    index[value.lower() if key == "email" else value] = profile["id"]
            if value is None:
                profile.pop(key, None)
            else:
                profile[key] = value

    @staticmethod
    def _patch(props: dict[str, Any], patch: Mapping[str, Any]) -> None:
        unset = patch.get("unset")
        for k in [unset] if isinstance(unset, str) else unset or []:
            props.pop(k, None)
        for k, v in (patch.get("append") or {}).items():
            current = props.get(k)
            items = current if isinstance(current, list) else ([] if current is None else [current])
            props[k] = items + (v if isinstance(v, list) else [v])
        for k, v in (patch.get("unappend") or {}).items():
            drop = v if isinstance(v, list) else [v]
            if isinstance(props.get(k), list):
                props[k] = [x for x in props[k] if x not in drop]

    # --- lists -------------------------------------------------------------------------------

    def create_list(self, name: str, opt_in_process: str | None) -> dict[str, Any]:
        stamp = now_iso()
        lst = {
            "id": self.ids.short(),
            "name": name,
            "created": stamp,
            "updated": stamp,
            "opt_in_process": opt_in_process or "single_opt_in",
        }
        self.lists[lst["id"]] = lst
        self.members[lst["id"]] = {}
        return lst

    def add_members(self, list_id: str, profile_ids: Iterable[str]) -> None:
        members = self.members[list_id]
        stamp = now_iso()
        for pid in profile_ids:
            members.setdefault(pid, stamp)

    def remove_members(self, list_id: str, profile_ids: Iterable[str]) -> None:
        members = self.members[list_id]
        for pid in profile_ids:
            members.pop(pid, None)

    # --- consent -----------------------------------------------------------------------------

    def set_consent(
        self, profile_id: str, channel: str, kind: str, record: Mapping[str, Any]
    ) -> None:
        profile = self.profiles[profile_id]
        self.subscriptions[(profile_id, channel, kind)] = {
            "profile_id": profile_id,
            "email": profile.get("email"),
            "phone_number": profile.get("phone_number"),
            "channel": channel,
            "type": kind,
            "updated": now_iso(),
            **record,
        }

    # --- events ------------------------------------------------------------------------------

    def add_event(
        self, profile_id: str, metric: str, attrs: Mapping[str, Any], received: str
    ) -> bool:
        """Store one event unless (profile, metric, unique_id) was seen; True if stored."""
        unique = attrs.get("unique_id") or (attrs.get("time") or received)[:19]
        key = (profile_id, metric, unique)
        if key in self._event_keys:
            return False
        self._event_keys.add(key)
        metric_id = self.metrics.setdefault(metric, self.ids.short())
        profile = self.profiles[profile_id]
        self.events.append(
            {
                "id": self.ids.profile(),
                "metric": metric,
                "metric_id": metric_id,
                "profile_id": profile_id,
                "email": profile.get("email"),
                "phone_number": profile.get("phone_number"),
                "properties": attrs.get("properties") or {},
                "time": attrs.get("time") or received,
                "value": attrs.get("value"),
                "value_currency": attrs.get("value_currency"),
                "unique_id": attrs.get("unique_id"),
                "backfill": bool(attrs.get("backfill")),
            }
        )
        profile["last_event_date"] = attrs.get("time") or received
        return True

    # --- catalog -----------------------------------------------------------------------------

    @staticmethod
    def item_id(attrs: Mapping[str, Any]) -> str:
        integration = attrs.get("integration_type") or "$custom"
        catalog = attrs.get("catalog_type") or "$default"
        return f"{integration}:::{catalog}:::{attrs['external_id']}"

    def create_item(self, attrs: Mapping[str, Any], pointer: str) -> str:
        if (attrs.get("catalog_type") or "$default") != "$default":
            raise ProfileError(
                "invalid",
                "Only the $default catalog is supported.",
                f"{pointer}/attributes/catalog_type",
            )
        item_id = self.item_id(attrs)
        if item_id in self.catalog:
            raise ProfileError(
                "conflict",
                f"Catalog item {item_id!r} already exists.",
                f"{pointer}/attributes/external_id",
            )
        stamp = now_iso()
        item = {"published": True, **attrs, "id": item_id, "created": stamp, "updated": stamp}
        item.setdefault("integration_type", "$custom")
        item.setdefault("catalog_type", "$default")
        self.catalog[item_id] = item
        return item_id

    def update_item(self, item_id: str, attrs: Mapping[str, Any], pointer: str) -> str:
        item = self.catalog.get(item_id)
        if item is None:
            raise ProfileError(
                "not_found", f"Catalog item {item_id!r} does not exist.", f"{pointer}/id"
            )
        for k, v in attrs.items():
            if v is None:
                item.pop(k, None)
            else:
                item[k] = v
        item["updated"] = now_iso()
        return item_id

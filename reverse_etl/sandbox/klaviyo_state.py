"""Klaviyo's data as the sandbox keeps it: profiles, lists, consent, events and catalog items.

No HTTP here; ``klaviyo.py`` turns requests into these calls. The rules follow Klaviyo's docs:

* Identity: a profile is found by ``id``, else by the first of ``email``, ``phone_number``,
  ``external_id`` that matches (emails case-insensitively). An identifier that already belongs
  to *another* profile is a conflict (``duplicate_profile``) and that profile is not imported.
* Attributes: a key left out leaves the stored value unchanged. An explicit ``null`` clears it
  for the single-profile endpoints, but the *bulk import* ignores nulls (Klaviyo's Bulk Import
  Profiles guide: "does not support setting fields to null to clear them"), so there custom
  properties are removed only through ``meta.patch_properties.unset`` (supported, as are
  ``append`` and ``unappend``). ``location`` and ``properties`` are merged key by key;
  ``properties: null`` leaves all custom properties as they are.
* Emails must look like ``local@domain.tld`` and phone numbers be E.164 (``+`` and 7-15
  digits); numbering plans are checked only with ``klaviyo_strict_phone_numbers``
  (``check_phone_plan``, called by the endpoints).
* Consent: one record per (profile, channel, consent type), the latest given or revoked
  (``subscriptions``). Email marketing also has global *suppressions*, at most one per reason
  (``SUPPRESSION_REASONS``, the spec's ``EmailMarketingSuppression.reason`` enum), each with
  when it was made (``suppressions``); a profile can receive email marketing only when it is
  SUBSCRIBED and has none. ``person_acts`` plays the person inside Klaviyo (unsubscribe link,
  preference page, spam complaint); the API jobs' effects are in ``klaviyo_consent``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
PHONE_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")

IDENTIFIERS = ("email", "phone_number", "external_id")
#: Klaviyo's standard personal attributes: set like identifiers, and shown back on every profile.
PERSONAL = ("first_name", "last_name", "organization", "locale", "title", "image")
STANDARD = (*IDENTIFIERS, "_kx", *PERSONAL)
_STANDARD = frozenset(STANDARD)
_MERGED = frozenset({"location", "properties"})
_KNOWN = _STANDARD | _MERGED
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

MAX_CUSTOM_METADATA_BYTES = 100_000  # a catalog item's custom_metadata: "100kb"

#: profiles.json, EmailMarketingSuppression.reason.
SUPPRESSION_REASONS = (
    "HARD_BOUNCE",
    "INVALID_EMAIL",
    "SPAM_COMPLAINT",
    "UNSUBSCRIBE",
    "USER_SUPPRESSED",
)
#: What a subscribe lifts. bulk_subscribe_profiles: "This API will remove any UNSUBSCRIBE,
#: SPAM_REPORT or USER_SUPPRESSED suppressions from the provided profiles"; the reason enum
#: spells SPAM_REPORT as SPAM_COMPLAINT. HARD_BOUNCE and INVALID_EMAIL stay.
LIFTED_BY_SUBSCRIBE = frozenset({"UNSUBSCRIBE", "SPAM_COMPLAINT", "USER_SUPPRESSED"})
#: What the person can do inside Klaviyo (``KlaviyoState.person_acts``).
PERSON_ACTIONS = ("unsubscribe", "subscribe", "complain", "suppress")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def utc_iso(moment: datetime) -> str:
    """``moment`` in UTC, as the sandbox prints times (naive times are taken as UTC), so that
    stored times compare as strings."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="microseconds")


def _plain(attrs: Mapping[str, Any]) -> bool:
    """Only known keys and no nulls (at the top, in location or properties)?"""
    if not _KNOWN.issuperset(attrs) or None in attrs.values():
        return False
    location, properties = attrs.get("location"), attrs.get("properties")
    return (location is None or None not in location.values()) and (
        properties is None or None not in properties.values()
    )


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


@lru_cache(maxsize=1 << 16)
def _in_plan(value: str) -> bool:
    import phonenumbers

    try:
        return bool(phonenumbers.is_valid_number(phonenumbers.parse(value)))
    except phonenumbers.NumberParseException:
        return False


def check_phone_plan(value: Any, pointer: str) -> None:
    """A number valid in its country's numbering plan (libphonenumber's ``is_valid_number``),
    not only E.164 in shape. Klaviyo's wording for one that is not: "+2345678900 is not a
    valid phone number."
    (https://community.klaviyo.com/marketing-30/getting-invalid-phone-number-for-update-list-api-4682)."""
    if isinstance(value, str) and not _in_plan(value):
        raise ProfileError("invalid", f"{value} is not a valid phone number.", pointer)


@dataclass
class Ids:
    """Deterministic ids in Klaviyo's shapes (ULID-like profiles, 6-character lists)."""

    counter: itertools.count[int]

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
        # profile id -> (channel, type) -> its record in ``subscriptions`` (reads per profile)
        self._consents: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        # profile id -> suppression reason -> when (UTC ISO); one per reason
        self.suppressions: dict[str, dict[str, str]] = {}
        # profile id -> when its suppressions last changed (for email marketing's last_updated)
        self.suppressions_changed: dict[str, str] = {}
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
        nulls_clear: bool = True,
    ) -> tuple[str, bool]:
        """Create or update one profile; return (id, created). Raise ProfileError.

        Straight-line code: the bulk import applies every profile through here, tens of
        thousands a second in benchmarks.
        """
        email = attrs.get("email")
        phone = attrs.get("phone_number")
        external = attrs.get("external_id")
        if email is not None and EMAIL_RE.match(email) is None:
            check_email(email, f"{pointer}/attributes/email")
        if phone is not None and PHONE_RE.match(phone) is None:
            check_phone(phone, f"{pointer}/attributes/phone_number")
        if profile_id and profile_id not in self.profiles:
            raise ProfileError(
                "not_found", f"Profile {profile_id!r} does not exist.", f"{pointer}/id"
            )
        index = self._index
        e_owner = None if email is None else index["email"].get(email.lower())
        p_owner = None if phone is None else index["phone_number"].get(phone)
        x_owner = None if external is None else index["external_id"].get(external)
        # The profile named by id, else the first identifier (in IDENTIFIERS order) that has one.
        pid = profile_id or e_owner or p_owner or x_owner
        if pid is None and email is None and phone is None and external is None:
            raise ProfileError(
                "invalid",
                "A profile needs one of email, phone_number or external_id.",
                f"{pointer}/attributes",
            )
        for identifier, value, owner in (
            ("email", email, e_owner),
            ("phone_number", phone, p_owner),
            ("external_id", external, x_owner),
        ):
            if owner is not None and owner != pid:
                raise ProfileError(
                    "duplicate_profile",
                    f"{identifier} {value!r} already belongs to profile {owner}.",
                    f"{pointer}/attributes/{identifier}",
                )
        # A new email on a profile found by its phone number or external id that already has
        # another email is refused, not a re-keyed profile: Klaviyo answers such an upsert
        # "409 duplicate_profile: A profile already exists with one of these identifiers"
        # (klaviyo/klaviyo-api-node#75, klaviyo/klaviyo-api-php#63). A profile without an
        # email takes it: "if a phone-only profile adds an email ..., the two will merge"
        # (help.klaviyo.com/hc/en-us/articles/360035588012, How SMS affects profiles).
        if email is not None and e_owner is None and pid is not None and not profile_id:
            held = self.profiles[pid].get("email")
            if held is not None and held.lower() != email.lower():
                raise ProfileError(
                    "duplicate_profile",
                    "A profile already exists with one of these identifiers.",
                    f"{pointer}/attributes",
                )
        created = pid is None
        stamp = stamp or now_iso()
        if pid is None:
            pid = self.ids.profile()
            if _plain(attrs):  # the common case, without the key-by-key merge
                profile = self._create(pid, attrs, email, phone, external, stamp)
            else:
                profile = {"id": pid, "created": stamp, "location": {}, "properties": {}}
                self.profiles[pid] = profile
                self._apply(profile, attrs, nulls_clear)
        else:
            profile = self.profiles[pid]
            self._apply(profile, attrs, nulls_clear)
        if meta:
            self._patch(profile["properties"], meta.get("patch_properties") or {})
        profile["updated"] = stamp
        return pid, created

    def _create(
        self,
        pid: str,
        attrs: Mapping[str, Any],
        email: str | None,
        phone: str | None,
        external: str | None,
        stamp: str,
    ) -> dict[str, Any]:
        profile = dict(attrs)
        profile["location"] = dict(attrs.get("location") or {})
        profile["properties"] = dict(attrs.get("properties") or {})
        profile["id"] = pid
        profile["created"] = stamp
        if email is not None:
            self._index["email"][email.lower()] = pid
        if phone is not None:
            self._index["phone_number"][phone] = pid
        if external is not None:
            self._index["external_id"][external] = pid
        self.profiles[pid] = profile
        return profile

    def _apply(self, profile: dict[str, Any], attrs: Mapping[str, Any], nulls_clear: bool) -> None:
        for key, value in attrs.items():
            if key in _MERGED:
                if value is None:
                    if key == "location" and nulls_clear:
                        profile[key] = {}
                    continue
                merged = profile[key]
                for k, v in value.items():
                    if v is not None:
                        merged[k] = v
                    elif nulls_clear:
                        merged.pop(k, None)
                continue
            if key not in _STANDARD or (value is None and not nulls_clear):
                continue
            old = profile.get(key)
            if old == value:
                continue
            index = self._index.get(key)
            if index is not None:
                if old is not None:
                    index.pop(old.lower() if key == "email" else old, None)
                if value is not None:
                    index[value.lower() if key == "email" else value] = profile["id"]
            if value is None:
                del profile[key]
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
        self, profile_id: str, channel: str, kind: str, record: Mapping[str, Any], stamp: str
    ) -> None:
        profile = self.profiles[profile_id]
        rec = {
            "profile_id": profile_id,
            "email": profile.get("email"),
            "phone_number": profile.get("phone_number"),
            "channel": channel,
            "type": kind,
            "updated": stamp,
            **record,
        }
        self.subscriptions[(profile_id, channel, kind)] = rec
        self._consents.setdefault(profile_id, {})[(channel, kind)] = rec

    def consents(self, profile_id: str) -> dict[tuple[str, str], dict[str, Any]]:
        """The profile's consent records by (channel, type)."""
        return self._consents.get(profile_id, {})

    def suppress(self, profile_id: str, reason: str, at: str, stamp: str) -> None:
        """Add the email marketing suppression ``reason`` made ``at`` (UTC ISO), or move an
        existing one of that reason to ``at``: a profile has at most one per reason."""
        if reason not in SUPPRESSION_REASONS:
            raise ValueError(f"unknown suppression reason {reason!r}")
        self.suppressions.setdefault(profile_id, {})[reason] = at
        self.suppressions_changed[profile_id] = stamp

    def unsuppress(self, profile_id: str, reasons: Iterable[str], stamp: str) -> None:
        """Remove the profile's suppressions with these reasons (others stay)."""
        held = self.suppressions.get(profile_id)
        if not held:
            return
        gone = [r for r in reasons if r in held]
        for reason in gone:
            del held[reason]
        if gone:
            self.suppressions_changed[profile_id] = stamp
        if not held:
            del self.suppressions[profile_id]

    def latest_suppression(self, profile_id: str) -> str | None:
        """When the profile's newest suppression was made (UTC ISO), None without any."""
        held = self.suppressions.get(profile_id)
        return max(held.values()) if held else None

    def person_acts(self, profile_id: str, action: str, at: str, stamp: str) -> None:
        """The person does ``action`` (one of ``PERSON_ACTIONS``) inside Klaviyo ``at``.

        * ``unsubscribe`` (the unsubscribe link or preference page): email marketing consent
          UNSUBSCRIBED at ``at`` and an UNSUBSCRIBE suppression at ``at``;
        * ``subscribe`` (a sign-up form or the preference page): consent SUBSCRIBED at ``at``
          and the suppressions a subscribe lifts (``LIFTED_BY_SUBSCRIBE``) removed;
        * ``complain`` (marks a message as spam): a SPAM_COMPLAINT suppression at ``at`` and
          consent UNSUBSCRIBED;
        * ``suppress`` (suppressed in Klaviyo's UI): a USER_SUPPRESSED suppression at ``at``;
          consent unchanged.

        The profile's ``updated`` is left alone: whether Klaviyo bumps it for a consent change
        is not documented, so a client cannot rely on it and the sandbox does not offer it.
        ``method``/``method_detail`` are the sandbox's choice (Klaviyo's values for these
        actions are not in the spec).
        """
        if action not in PERSON_ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(PERSON_ACTIONS)}")
        consent = {"subscribe": "SUBSCRIBED", "unsubscribe": "UNSUBSCRIBED"}.get(action)
        if action == "complain":
            consent = "UNSUBSCRIBED"
        if consent is not None:
            record = {
                "consent": consent,
                "consented_at": at,
                "historical_import": False,
                "custom_source": None,
                "list_id": None,
                "method": "SPAM_COMPLAINT" if action == "complain" else "PREFERENCE_PAGE",
                "method_detail": f"sandbox act_as_person: {action}",
            }
            self.set_consent(profile_id, "email", "marketing", record, stamp)
        if action == "subscribe":
            self.unsuppress(profile_id, LIFTED_BY_SUBSCRIBE, stamp)
        else:
            reason = {
                "unsubscribe": "UNSUBSCRIBE",
                "complain": "SPAM_COMPLAINT",
                "suppress": "USER_SUPPRESSED",
            }[action]
            self.suppress(profile_id, reason, at, stamp)

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

    @staticmethod
    def _check_metadata(attrs: Mapping[str, Any], pointer: str) -> None:
        """custom_metadata "May not exceed 100kb" (the catalogs spec's CatalogItem; read
        strictly, as the other 100 KB limits): an item over it is refused."""
        metadata = attrs.get("custom_metadata")
        if metadata is not None and len(orjson.dumps(metadata)) > MAX_CUSTOM_METADATA_BYTES:
            raise ProfileError(
                "invalid",
                "custom_metadata may not exceed 100kb.",
                f"{pointer}/attributes/custom_metadata",
            )

    def create_item(self, attrs: Mapping[str, Any], pointer: str) -> str:
        self._check_metadata(attrs, pointer)
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
        self._check_metadata(attrs, pointer)
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

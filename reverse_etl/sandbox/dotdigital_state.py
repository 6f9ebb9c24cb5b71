"""Dotdigital's data as the sandbox keeps it: contacts, data fields, address books, insight data.

No HTTP here; ``dotdigital.py`` turns requests into these calls. The rules:

* Data fields: names of 1-20 letters, digits, ``_`` or ``-``, unique ignoring case and stored
  upper-cased (as Dotdigital shows them); types String, Numeric, Date, Boolean. The standard
  fields FIRSTNAME, LASTNAME, FULLNAME, GENDER and POSTCODE exist from the start. A second
  field or address book of an existing name is refused with 400 and the v2 code
  (``ERROR_NON_UNIQUE_DATAFIELD``, ``ERROR_ADDRESSBOOK_DUPLICATE``), as Dotdigital does; the
  sandbox counts it a violation (a client looks before it creates), which a client meets only
  if another writer creates the same name between its look-up and its create.
* A contact's data field values keep their field's type: String takes JSON strings, Numeric
  numbers, Boolean booleans, Date ISO 8601 dates or date-times; ``null`` clears. A contact keys
  its values by the field's stored name, whatever case the import used.
* An import row with a bad identifier (invalid email or mobile number, missing match value,
  repeated in the same import) is rejected whole. A row whose identifiers are fine is imported
  and any data field it could not take (unknown field, wrong type) is listed in ``failures``,
  as the spec says: "contacts are created or updated but if any associated data sets fail to
  import then details of these are included in the failures results".
* New contacts' email channel defaults to ``subscribed`` (spec); ``verifiedDouble`` opt-in makes
  it ``pendingOptIn``. The SMS channel of a new contact defaults to ``noSubscription`` (the
  spec defers to an account setting the sandbox does not have).
* Email status history: when a contact's email status becomes ``unsubscribed`` or a suppression
  status (``hardBounced``, ``ispComplained``, ``suppressed``, ...), the contact's removal is
  kept (``removals``): when (``dateRemoved``, UTC, to the millisecond, as v2 prints it) and why
  (``reason``, in v2's ``ApiContactStatuses`` spelling: ``Unsubscribed``, ``IspComplained``,
  ...), for ``GET /v2/contacts/unsubscribed-since|suppressed-since/{date}``. It is cleared when
  the status becomes ``subscribed`` again; an import that leaves the status as it is keeps the
  first date. A challenged resubscription (``pendingOptIn``) keeps it: the person has not
  confirmed yet (UNCONFIRMED: Dotdigital does not say what its suppression list shows then).
* Resubscribing by import (v3 ``PUT /contacts/v3/import`` and ``PATCH`` of one contact): asking
  for ``subscribed`` for an ``unsubscribed`` contact resubscribes it.
  ``channelProperties.email.resubscribeOptions.resubscribeWithNoChallenge`` defaults to true
  (v3 spec), so the status becomes ``subscribed``; with it false Dotdigital sends a challenge
  email and the status is ``pendingOptIn`` until the person confirms (``act_as_person``
  ``subscribe``). A ``verifiedDouble`` opt-in still makes it ``pendingOptIn``. A contact in a
  suppression status (``hardBounced``, ``ispComplained``, ``suppressed``, ...) keeps its email
  status whatever an import asks; the rest of the row is applied (v3 docs: "Updating a
  suppressed contact will succeed and the contacts channel statuses will remain unchanged";
  help centre: an import of suppressed contacts "will not be successful"). Whether Dotdigital
  also reports such a row (``globallySuppressed`` or a failure) is UNCONFIRMED; the sandbox
  counts it as updated, or, with ``dotdigital_report_suppressed``, leaves the contact as it is
  and counts it only in the report's ``summary.globallySuppressed`` ("Number of contacts that
  are suppressed at the account level, so can't be updated", contacts spec), listing it
  nowhere else (not in ``created``, ``updated`` or ``failures``: UNCONFIRMED which list, if
  any, names it; a client finds it as the row no list names).
* The person inside Dotdigital (``act_as_person``): ``unsubscribe`` (status ``unsubscribed``,
  reason ``Unsubscribed``), ``subscribe`` (``subscribed``, removal cleared, and a consent record
  dated then, as a signup form with consent text keeps one), ``complain`` (``ispComplained``,
  reason ``IspComplained``), at a given time; each also moves the contact's ``updated`` to now,
  when Dotdigital recorded it (UNCONFIRMED whether a status change moves it).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from reverse_etl.sandbox.jobs import iso, utcnow

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
MOBILE_RE = re.compile(r"^\+?[1-9][0-9]{6,14}$")
FIELD_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}$")
FIELD_TYPES = ("String", "Numeric", "Date", "Boolean")
STANDARD_FIELDS = ("FIRSTNAME", "LASTNAME", "FULLNAME", "GENDER", "POSTCODE")
MERGE_OPTIONS = ("overwrite", "overwriteIfNotEmpty", "overwriteIfEmpty")
_COUNTRY = {"44": "GB", "1": "US", "31": "NL", "32": "BE", "33": "FR", "49": "DE", "61": "AU"}
_CAPITAL = {"plainText": "PlainText", "verifiedDouble": "VerifiedDouble"}
#: v3 email channel statuses that take a contact off the channel, with the reason v2's
#: since-endpoints give (``ApiContactStatuses``); v3 statuses without a v2 spelling are left
#: out (the sandbox never sets them).
REMOVAL_REASONS = {
    "unsubscribed": "Unsubscribed",
    "hardBounced": "HardBounced",
    "ispComplained": "IspComplained",
    "directComplaint": "DirectComplaint",
    "suppressed": "Suppressed",
    "sharedsuppression": "SharedSuppression",
    "domainSuppressed": "DomainSuppression",
}
#: the v3 contact's top-level ``status`` enum; any other email status shows as ``suppressed``
CONTACT_STATUSES = frozenset(
    {
        "subscribed",
        "unsubscribed",
        "pendingOptIn",
        "deleted",
        "suppressed",
        "binned",
        "noSubscription",
    }
)
#: the consent record (ConsentInsight) a signup form keeps when the person subscribes there:
#: text, when, the form's URL, IP address and browser, with ``dateTimeCreated`` added
#: ("Record consent for your contacts", https://support.dotdigital.com/en/articles/8199471;
#: the sandbox's text, URL and browser are its own)
FORM_CONSENT = {
    "text": "Yes, send me news and offers (sandbox signup form).",
    "url": "https://sandbox.invalid/signup",
    "ipAddress": "127.0.0.1",
    "userAgent": "reverse-etl-sandbox/1.0",
}
#: what the person can do inside Dotdigital (``act_as_person``), and the email status it gives
PERSON_ACTIONS = {
    "unsubscribe": "unsubscribed",
    "subscribe": "subscribed",
    "complain": "ispComplained",
}


def _capital(word: str) -> str:
    return _CAPITAL.get(word, word[:1].upper() + word[1:])


class DotdigitalError(Exception):
    """A refused operation: Dotdigital error code (``ERROR_...`` for v2) and description."""

    def __init__(self, code: str, description: str, status: int = 400):
        super().__init__(description)
        self.code = code
        self.description = description
        self.status = status


def typed_value(kind: str, value: Any) -> tuple[bool, Any]:
    """(ok, stored value) for ``value`` in a data field of type ``kind``."""
    if value is None:
        return True, None
    if kind == "String":
        return isinstance(value, str), value
    if kind == "Numeric":
        return type(value) in (int, float), value
    if kind == "Boolean":
        return type(value) is bool, value
    if kind == "Date" and isinstance(value, str):
        try:
            if len(value) == 10:
                return True, date.fromisoformat(value).isoformat()
            return True, datetime.fromisoformat(value.replace("z", "Z")).isoformat()
        except ValueError:
            return False, value
    return False, value


def to_utc(moment: datetime) -> datetime:
    """``moment`` in UTC (a naive one taken as UTC), cut to the millisecond v2 prints."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def v2_time(moment: datetime) -> str:
    """A UTC time as v2 prints it: ``2020-01-01T09:40:18.527Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Removal:
    """When and why a contact's email channel was taken away (v2 ``ApiContactSuppression``)."""

    at: datetime  # UTC, to the millisecond
    reason: str  # ApiContactStatuses spelling

    def doc(self) -> dict[str, str]:
        return {"dateRemoved": v2_time(self.at), "reason": self.reason}


@dataclass
class ImportRow:
    """The outcome of one contact of an import."""

    outcome: str  # created | updated | invalid | duplicate | suppressed
    contact_id: int | None = None
    identifiers: dict[str, Any] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)


class DotdigitalState:
    """All of one sandbox account's data. Callers hold the sandbox lock."""

    def __init__(self) -> None:
        self._contact_ids = itertools.count(1_000_001)
        self._book_ids = itertools.count(101)
        self.contacts: dict[int, dict[str, Any]] = {}
        self.by_email: dict[str, int] = {}
        self.by_mobile: dict[str, int] = {}
        self.data_fields: dict[str, dict[str, Any]] = {
            name: {"name": name, "type": "String", "visibility": "Public", "defaultValue": None}
            for name in STANDARD_FIELDS
        }
        self.address_books: dict[int, dict[str, Any]] = {}
        self.members: dict[int, dict[int, str]] = {}  # book id -> contact id -> status
        self.collections: dict[str, dict[str, Any]] = {}
        self.removals: dict[int, Removal] = {}  # contact id -> its current removal

    # --- data fields -------------------------------------------------------------------------

    def create_data_field(
        self, name: str, kind: str | None, visibility: str | None, default: Any
    ) -> dict[str, Any]:
        if not FIELD_NAME_RE.match(name or ""):
            raise DotdigitalError(
                "ERROR_INVALID_DATAFIELD_NAME",
                "Data field names are 1-20 letters, digits, hyphens or underscores.",
            )
        if kind not in FIELD_TYPES:
            raise DotdigitalError(
                "ERROR_INVALID_DATAFIELD_TYPE", f"Data field type must be one of {FIELD_TYPES}."
            )
        if name.upper() in self.data_fields:
            # Dotdigital's answer, a 400 (not a 409): "Field already exists.
            # ERROR_NON_UNIQUE_DATAFIELD" (the v2 message as Dotdigital's Magento connector,
            # Apiconnector/Client.php, and the dotmailer gem's README quote it)
            raise DotdigitalError("ERROR_NON_UNIQUE_DATAFIELD", "Field already exists.")
        ok, stored = typed_value(kind, default)
        if not ok:
            raise DotdigitalError(
                "ERROR_INVALID_DATAFIELD_DEFAULT", f"The default value does not fit type {kind}."
            )
        df = {
            "name": name.upper(),
            "type": kind,
            "visibility": visibility or "Private",
            "defaultValue": stored,
        }
        self.data_fields[df["name"]] = df
        return df

    # --- address books -----------------------------------------------------------------------

    def create_address_book(self, name: str, visibility: str | None) -> dict[str, Any]:
        if not name or len(name) > 128:
            raise DotdigitalError(
                "ERROR_ADDRESSBOOK_INVALID", "An address book name is 1-128 characters."
            )
        if any(b["name"].lower() == name.lower() for b in self.address_books.values()):
            # the v2 message Dotdigital's Magento connector (Apiconnector/Client.php) quotes
            raise DotdigitalError(
                "ERROR_ADDRESSBOOK_DUPLICATE",
                "That name is in use already, please choose another.",
            )
        book_id = next(self._book_ids)
        book = {"id": book_id, "name": name, "visibility": visibility or "Private"}
        self.address_books[book_id] = book
        self.members[book_id] = {}
        return book

    # --- contacts ----------------------------------------------------------------------------

    def find(self, identifier: str, value: Any) -> int | None:
        if identifier == "email":
            return self.by_email.get(str(value).lower())
        if identifier == "mobileNumber":
            return self.by_mobile.get(str(value).lstrip("+"))
        if identifier == "contactId":
            try:
                cid = int(value)
            except (TypeError, ValueError):
                return None
            return cid if cid in self.contacts else None
        return None

    def import_contact(
        self,
        row: Mapping[str, Any],
        merge: str,
        seen: set[tuple[str, str]],
        stamp: str,
        *,
        skip_suppressed: bool = False,
    ) -> ImportRow:
        ids = dict(row["identifiers"])
        match = row["matchIdentifier"]
        result = ImportRow("invalid", identifiers=ids)
        value = ids.get(match)
        email, mobile = ids.get("email"), ids.get("mobileNumber")
        if value is None:
            return self._reject(
                result, "invalidIdentifier", f"No value for the match identifier '{match}'"
            )
        if email is not None and (not isinstance(email, str) or not EMAIL_RE.match(email)):
            return self._reject(result, "invalidEmail", "Invalid value for 'email'")
        if mobile is not None and (not isinstance(mobile, str) or not MOBILE_RE.match(mobile)):
            return self._reject(result, "invalidMobileNumber", "Invalid value for 'mobileNumber'")
        key = (match, str(value).lower())
        if key in seen:
            result.outcome = "duplicate"
            return self._reject(
                result,
                "duplicateIdentifier",
                f"Duplicate identifier detected for {match} '{value}'",
            )
        seen.add(key)
        cid = self.find(match, value)
        if match == "contactId" and cid is None:
            return self._reject(result, "contactNotFound", f"No contact with contactId {value}")
        for name, owner in (
            ("email", self.find("email", email)),
            ("mobileNumber", self.find("mobileNumber", mobile)),
        ):
            if owner is not None and owner != cid:
                return self._reject(
                    result,
                    "duplicateIdentifier",
                    f"The {name} '{ids[name]}' belongs to another contact",
                )
        created = cid is None
        if skip_suppressed and cid is not None and self.suppressed(cid):
            result.outcome, result.contact_id = "suppressed", cid
            return result
        if cid is None:
            cid = next(self._contact_ids)
            contact: dict[str, Any] = {
                "contactId": cid,
                "created": stamp,
                "identifiers": {},
                "dataFields": {},
                "channelProperties": {
                    "email": {"emailType": "Html", "optInType": "Unknown", "status": "subscribed"},
                },
                "consentRecords": [],
                "preferences": [],
            }
            self.contacts[cid] = contact
        else:
            contact = self.contacts[cid]
        result.contact_id = cid
        result.outcome = "created" if created else "updated"
        self._set_identifiers(contact, email, mobile, created)
        self._set_fields(contact, row.get("dataFields") or {}, merge, result)
        self._set_channels(
            contact, row.get("channelProperties") or {}, created, datetime.fromisoformat(stamp)
        )
        for list_id in row.get("lists") or ():
            self.members[list_id].setdefault(cid, "subscribed")
        for record in row.get("consentRecords") or ():
            contact["consentRecords"].append({**record, "dateTimeCreated": stamp})
        if row.get("preferences"):
            contact["preferences"] = list(row["preferences"])
        contact["updated"] = stamp
        result.identifiers = dict(contact["identifiers"])
        return result

    def field_failures(self, values: Mapping[str, Any]) -> list[dict[str, str]]:
        """What an import would list in ``failures`` for these data field values (no change)."""
        result = ImportRow("check")
        self._set_fields({"dataFields": {}}, values, "overwrite", result)
        return result.failures

    @staticmethod
    def _reject(result: ImportRow, code: str, description: str) -> ImportRow:
        result.failures.append({"failureCode": code, "description": description})
        return result

    def _set_identifiers(
        self, contact: dict[str, Any], email: Any, mobile: Any, created: bool
    ) -> None:
        ids = contact["identifiers"]
        cid = contact["contactId"]
        if email is not None:
            old = ids.get("email")
            if old is not None:
                self.by_email.pop(old.lower(), None)
            ids["email"] = email
            self.by_email[email.lower()] = cid
        if mobile is not None:
            old = ids.get("mobileNumber")
            if old is not None:
                self.by_mobile.pop(old.lstrip("+"), None)
            ids["mobileNumber"] = mobile
            self.by_mobile[mobile.lstrip("+")] = cid
            channels = contact["channelProperties"]
            if "sms" not in channels:
                digits = mobile.lstrip("+")
                country = next((c for p, c in _COUNTRY.items() if digits.startswith(p)), "ZZ")
                channels["sms"] = {"countryCode": country, "status": "noSubscription"}

    def _set_fields(
        self, contact: dict[str, Any], values: Mapping[str, Any], merge: str, result: ImportRow
    ) -> None:
        stored = contact["dataFields"]
        for name, value in values.items():
            df = self.data_fields.get(name.upper())
            if df is None:
                result.failures.append(
                    {
                        "failureCode": "unknownDataField",
                        "description": f"The data field '{name}' does not exist",
                    }
                )
                continue
            ok, typed = typed_value(df["type"], value)
            if not ok:
                result.failures.append(
                    {
                        "failureCode": "invalidDataFieldValue",
                        "description": f"Invalid value for data field '{df['name']}' of type {df['type']}",
                    }
                )
                continue
            current = stored.get(df["name"])
            if merge == "overwriteIfNotEmpty" and typed in (None, ""):
                continue
            if merge == "overwriteIfEmpty" and current not in (None, ""):
                continue
            if typed is None:
                stored.pop(df["name"], None)
            else:
                stored[df["name"]] = typed

    def _set_channels(
        self, contact: dict[str, Any], props: Mapping[str, Any], created: bool, at: datetime
    ) -> None:
        channels = contact["channelProperties"]
        email = props.get("email") or {}
        target = channels["email"]
        if "emailType" in email:
            target["emailType"] = _capital(email["emailType"])
        if "optInType" in email:
            target["optInType"] = _capital(email["optInType"])
        status = target["status"]
        if "status" in email:
            status = self._requested_status(contact, email, created)
        if (
            target["optInType"] == "VerifiedDouble"
            and status == "subscribed"
            and (created or "status" in email)
        ):
            status = "pendingOptIn"
        self.set_email_status(contact, status, at)
        for name in ("sms", "whatsApp"):
            status = (props.get(name) or {}).get("status")
            if status is not None:
                channels.setdefault(name, {})["status"] = status

    def _requested_status(
        self, contact: Mapping[str, Any], email: Mapping[str, Any], created: bool
    ) -> str:
        """The email status an import's ``channelProperties.email`` leads to (module doc)."""
        wanted = str(email["status"])
        current = contact["channelProperties"]["email"]["status"]
        if created or wanted == current:
            return wanted
        if current in REMOVAL_REASONS and current != "unsubscribed":
            return str(current)  # suppressed: an import does not change it
        challenged = current == "pendingOptIn" and contact["contactId"] in self.removals
        if wanted == "subscribed" and (current == "unsubscribed" or challenged):
            options = email.get("resubscribeOptions") or {}
            if options.get("resubscribeWithNoChallenge", True):
                return "subscribed"
            return "pendingOptIn"  # a resubscription email is sent; confirmed by the person
        return wanted

    def suppressed(self, cid: int) -> bool:
        """Whether the contact is suppressed at the account level: its email status is a
        suppression (bounced, complained, suppressed ...), not an unsubscribe, which an import
        may lift."""
        status = self.contacts[cid]["channelProperties"]["email"]["status"]
        return status in REMOVAL_REASONS and status != "unsubscribed"

    def set_email_status(
        self, contact: dict[str, Any], status: str, at: datetime, *, renew: bool = False
    ) -> None:
        """Set the email channel's status and keep the removal history in step with it.

        A removal is recorded when the status becomes a removal status (``renew``: also when
        it already was one, as when the person unsubscribes again), cleared when it becomes
        ``subscribed``; other statuses (``pendingOptIn``) leave it as it is."""
        target = contact["channelProperties"]["email"]
        old = target["status"]
        target["status"] = status
        contact["status"] = status if status in CONTACT_STATUSES else "suppressed"
        cid = contact["contactId"]
        reason = REMOVAL_REASONS.get(status)
        if reason is not None:
            if renew or old != status or cid not in self.removals:
                self.removals[cid] = Removal(to_utc(at), reason)
        elif status == "subscribed":
            self.removals.pop(cid, None)

    def act_as_person(self, cid: int, action: str, at: datetime) -> None:
        """The person behind contact ``cid`` acts inside Dotdigital (``PERSON_ACTIONS``)."""
        status = PERSON_ACTIONS.get(action)
        if status is None:
            raise ValueError(
                f"Unknown action {action!r}; one of {', '.join(sorted(PERSON_ACTIONS))}."
            )
        contact = self.contacts[cid]
        self.set_email_status(contact, status, at, renew=True)
        stamp = now()  # when Dotdigital recorded it, whatever time the act itself is dated
        if action == "subscribe":
            record = dict(FORM_CONSENT, dateTimeConsented=v2_time(to_utc(at)))
            contact["consentRecords"].append({**record, "dateTimeCreated": stamp})
        contact["updated"] = stamp

    def removed_since(
        self, since: datetime, reasons: frozenset[str] | None = None
    ) -> list[tuple[int, Removal]]:
        """Contacts with an email address removed strictly after ``since`` (with one of
        ``reasons``; None: any), oldest removal first (then by contact id)."""
        since = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
        rows = [
            (cid, removal)
            for cid, removal in self.removals.items()
            if removal.at > since
            and (reasons is None or removal.reason in reasons)
            and self.contacts[cid]["identifiers"].get("email")
        ]
        rows.sort(key=lambda row: (row[1].at, row[0]))
        return rows

    # --- insight data ------------------------------------------------------------------------

    def collection(self, name: str, scope: str, kind: str) -> dict[str, Any]:
        found = self.collections.get(name.lower())
        if found is None:
            found = {
                "collectionName": name,
                "collectionScope": scope,
                "collectionType": kind,
                "records": {},
            }
            self.collections[name.lower()] = found
        return found

    def upsert_record(
        self, coll: dict[str, Any], owner: int | None, key: str, data: Any, stamp: str
    ) -> None:
        records = coll["records"]
        rid = (owner, key)
        old = records.get(rid)
        records[rid] = {
            "key": key,
            "json": data,
            "created": old["created"] if old else stamp,
            "updated": stamp,
            **({"ownerContactId": owner} if owner is not None else {}),
        }


def has_nested_array(value: Any) -> bool:
    """Insight JSON may hold arrays of objects or scalars, never an array directly in an array."""
    if isinstance(value, dict):
        return any(has_nested_array(v) for v in value.values())
    if isinstance(value, list):
        return any(isinstance(v, list) or has_nested_array(v) for v in value)
    return False


def now() -> str:
    return iso(utcnow()) or ""

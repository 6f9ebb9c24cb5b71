"""Which rows a profile import job's errors are about
(``GET /api/profile-bulk-import-jobs/{id}/import-errors``).

Each error names its profile by ``source.pointer``, a JSON pointer into the request that
created the job. The spec says only "A pointer to the source of the error in the request
payload" (``ErrorSource.pointer``: nullable, default ``/data``) and gives each error the
profile as sent (``original_payload``, nullable); the docs show no example
(https://developers.klaviyo.com/en/reference/get_errors_for_bulk_import_profiles_job). So every
shape is read:

* ``/data/attributes/profiles/data/3/attributes/phone_number``: profile 3, its phone number
  (a nested field, ``.../attributes/location/city``, is ``location.city``);
* ``/data/attributes/profiles/data/3``: profile 3 as a whole;
* a pointer relative to the profiles (``/3/attributes/email``, ``/data/3``): profile 3;
* no pointer, ``/data``, a field without an index (``/data/attributes/email``) or an index past
  the job's profiles: the profile is found by ``original_payload``'s identifiers (email,
  ignoring case, phone number, external id), as the profile (``{"attributes": ...}``) or its
  attributes; the field, if the pointer names one, is kept.

An error none of this ties to a row is returned apart (``Attributed.unknown``): the caller
cannot tell which of the job's profiles failed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa

from reverse_etl.transform.rowerrors import RowError

_IN_PROFILES = re.compile(r"/profiles/data/(\d+)(?=/|$)")
_RELATIVE = re.compile(r"^/(?:data/)?(\d+)(?=/|$)")
_FIELD = re.compile(r"/attributes/(?!profiles/)(.+)$")
_IDENTIFIERS = ("email", "phone_number", "external_id")


@dataclass(frozen=True)
class Location:
    index: int | None  # the profile's position in the job; None: the pointer does not say
    field: str | None  # "phone_number", "location.city"; None: the profile as a whole


def locate(pointer: str | None) -> Location:
    """Where a ``source.pointer`` points (see the module docstring)."""
    if not pointer:
        return Location(None, None)
    match = _IN_PROFILES.search(pointer) or _RELATIVE.match(pointer)
    index = int(match.group(1)) if match else None
    rest = pointer[match.end() :] if match else pointer
    found = _FIELD.search(rest)
    name = None
    if found:  # RFC 6901 escapes: ~1 is "/", ~0 is "~"
        parts = [p.replace("~1", "/").replace("~0", "~") for p in found.group(1).split("/")]
        name = ".".join(p for p in parts if p) or None
    return Location(index, name)


@dataclass
class Attributed:
    errors: list[RowError] = field(default_factory=list)  # each tied to its row
    unknown: list[dict[str, Any]] = field(default_factory=list)  # attributes of the others


class JobProfiles:
    """The rows of one import job, in body order, to tie its errors to."""

    def __init__(self, table: pa.Table, columns: Mapping[str, str]):
        self.table = table  # the job's rows: __row, __id and the mapped fields
        self.columns = columns  # field -> the warehouse column mapped to it
        self._rows = table["__row"].to_pylist()
        self._index: dict[str, dict[str, int]] | None = None

    def attribute(self, errors: list[dict[str, Any]]) -> Attributed:
        """Row errors for the import errors (their ``attributes``) of this job."""
        out = Attributed()
        for attrs in errors:
            pointer = (attrs.get("source") or {}).get("pointer")
            where = locate(pointer)
            index = (
                where.index if where.index is not None and where.index < len(self._rows) else None
            )
            if index is None:
                index = self._by_payload(attrs.get("original_payload"))
            if index is None:
                out.unknown.append(attrs)
                continue
            out.errors.append(self._error(index, where.field, pointer, attrs))
        return out

    def _error(
        self, index: int, name: str | None, pointer: str | None, attrs: Mapping[str, Any]
    ) -> RowError:
        row = self._rows[index]
        ident = self.table["__id"][index].as_py()
        message = f"Klaviyo refused the profile: {attrs.get('title', '')} {attrs.get('detail', '')}"
        if pointer:
            message += f" (pointer {pointer})"
        if name is not None and name in self.table.column_names:
            column = self.columns.get(name, name)
            value: Any = self.table[name][index].as_py()
        else:
            column = name or "(profile)"
            value = orjson.dumps(attrs.get("original_payload")).decode()
        return RowError(row, ident, column, value, "destination_rejected", message.strip())

    def _by_payload(self, payload: Any) -> int | None:
        """The job's row whose identifiers the error's ``original_payload`` carries."""
        if not isinstance(payload, dict):
            return None
        attrs = payload.get("attributes", payload)
        if not isinstance(attrs, dict):
            return None
        index = self._identifiers()
        for name in _IDENTIFIERS:
            value = attrs.get(name)
            if isinstance(value, str):
                key = value.strip().lower() if name == "email" else value.strip()
                found = index.get(name, {}).get(key)
                if found is not None:
                    return found
        return None

    def _identifiers(self) -> dict[str, dict[str, int]]:
        if self._index is None:  # built once a job, and only for errors without a position
            self._index = {}
            for name in _IDENTIFIERS:
                if name not in self.table.column_names:
                    continue
                values: dict[str, int] = {}
                for i, value in enumerate(self.table[name].to_pylist()):
                    if isinstance(value, str):
                        key = value.strip().lower() if name == "email" else value.strip()
                        values.setdefault(key, i)
                self._index[name] = values
        return self._index

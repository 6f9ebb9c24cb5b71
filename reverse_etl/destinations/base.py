"""What a destination offers the engine.

A destination turns transformed batches (one column per destination field, plus ``__row``
and ``__id``) into API requests at the largest size the API allows, sends them under its
rate limits, and reports per batch what landed. ``load`` yields results in the order the
batches came in, whatever it keeps in flight, so the engine can move the watermark after
each one. To add a destination: a package under ``destinations/`` with a ``Destination``
subclass, registered in ``registry.py``.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from reverse_etl.config import Sync
from reverse_etl.transform.rowerrors import RowError


@dataclass
class Request:
    """One API call a batch becomes: what a dry run writes out, and what load sends."""

    method: str
    path: str
    body: bytes  # JSON
    rows: int


@dataclass
class LoadBatch:
    table: pa.Table
    token: Any  # the engine's marker (the batch's watermark); handed back untouched


@dataclass
class Screened:
    """What ``Destination.screen`` leaves of a batch: the rows to send (``table``), the row
    errors found without the network, and how many rows were removed entirely (``rejected``).
    An error may also name a row that stays in ``table`` with part of it dropped (consent
    without an address: the profile is sent, its consent is not)."""

    table: pa.Table
    errors: list[RowError] = field(default_factory=list)
    rejected: int = 0


@dataclass
class LoadResult:
    token: Any
    sent: int = 0
    created: int = 0
    updated: int = 0
    failed: int = 0
    errors: list[RowError] = field(default_factory=list)


class Destination(ABC):
    type: ClassVar[str]
    # standard field name -> value kind, for the object this class writes; other fields must be
    # custom fields (``is_custom_field``)
    standard_fields: ClassVar[dict[str, str]]

    @classmethod
    def check_sync(cls, sync: Sync) -> list[str]:
        """Config-time problems with a sync aimed at this destination (no network)."""
        problems = []
        for column, target in sync.fields().items():
            if target.field not in cls.standard_fields and not cls.is_custom_field(target.field):
                problems.append(
                    f"mapping.{column}: {target.field!r} is neither a standard {cls.type} field "
                    f"({', '.join(sorted(cls.standard_fields))}) nor a custom field "
                    f"({cls.custom_field_hint()})"
                )
        if sync.identifier not in sync.mapping:
            problems.append(
                f"identifier {sync.identifier!r} must also be mapped, e.g. mapping: "
                f"{{{sync.identifier}: email}}"
            )
        return problems + cls.check_options(sync)

    options: ClassVar[tuple[str, ...]] = ()  # destination-specific keys under `destination:`

    @classmethod
    def check_options(cls, sync: Sync) -> list[str]:
        valid = ["connection", "list", *cls.options]
        problems = []
        for key in sync.destination.options():
            if key in cls.options:
                continue
            hint = difflib.get_close_matches(key, valid, n=1)
            problems.append(
                f"destination.{key}: unknown option for {cls.type}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" Valid keys: {', '.join(valid)}"
            )
        return problems

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        return False

    @classmethod
    def custom_field_hint(cls) -> str:
        return "no custom fields"

    @abstractmethod
    def requests(self, table: pa.Table) -> Iterator[Request]:
        """The API calls ``table`` becomes, without sending them."""

    def screen(self, table: pa.Table) -> Screened:
        """Rows this destination would refuse, found before anything is sent (a missing
        required field, consent without an address ...). Pure and offline: the run, ``validate``
        and the dry run all call it on every transformed batch, so each reports the same rows.
        It runs on the read-ahead thread while ``load`` sends earlier batches, so it must not
        share mutable state (or a DuckDB cursor) with ``load``. ``load`` receives only what
        ``screen`` returned and does not report these rows again."""
        return Screened(table)

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Network set-up before the first batch (find or create the list, fields ...)."""

    @abstractmethod
    def load(self, batches: Iterator[LoadBatch]) -> Iterator[LoadResult]:
        """Send every batch; yield one result per batch, in order."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

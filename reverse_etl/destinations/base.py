"""What a destination offers the engine, and the one batch pipeline every object runs.

A destination object (Klaviyo profiles, Dotdigital orders ...) declares what it takes in a
frozen ``Capabilities`` and implements four steps for one batch: ``split`` (rows it cannot
send, found cheaply), ``submit`` (build the bodies at the largest size the API allows and
send them or start their jobs), ``complete`` (wait for them, polling and resubmitting through
``jobs.wait``, and count what landed in a ``Tally``). ``load`` is written once, here: it keeps
up to ``max_in_flight`` batches submitted and yields their results in the order the batches
came in, so the engine can move the watermark after each one. The counting rule is in
``Tally``; ``load`` checks that every row of a batch was counted exactly once.

To add a destination: see ``destinations/README.md``.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, final

import pyarrow as pa

from reverse_etl.config import DestinationConnection, Sync
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.destinations.jobs import in_order
from reverse_etl.errors import DestinationError
from reverse_etl.transform.rowerrors import RowError

if TYPE_CHECKING:
    from reverse_etl.consent.memory import ConsentMemory


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
    """What one batch came to. Every row sent ends as exactly one of created, updated or
    failed, so ``sent`` is their sum, never counted separately."""

    token: Any
    created: int = 0
    updated: int = 0
    failed: int = 0
    errors: list[RowError] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return self.created + self.updated + self.failed


@dataclass
class Tally:
    """Counts one batch as its calls and jobs answer. The counting rule lives here only."""

    created: int = 0
    updated: int = 0
    failed: int = 0
    errors: list[RowError] = field(default_factory=list)

    def refused(self, errors: Iterable[RowError]) -> None:
        """Rows that failed (before sending, or refused by the API): each counted once,
        however many errors it has."""
        errors = list(errors)
        self.failed += len({e.row_number for e in errors})
        self.errors.extend(errors)

    def landed(self, records: int, *, created: int = 0, failed: int = 0) -> None:
        """A call or job of ``records`` rows answered: ``created`` of them new (where the API
        says), ``failed`` refused, the rest updated. Counts the API gives that do not add up
        (two rows merged into one record) never make rows disappear: what did not fail landed."""
        failed = min(max(failed, 0), records)
        created = min(max(created, 0), records - failed)
        self.failed += failed
        self.created += created
        self.updated += records - failed - created

    def later_refused(self, errors: Iterable[RowError]) -> None:
        """Rows counted as landed whose follow-up call (consent after the profile) was refused:
        they move from updated to failed, still counted once."""
        errors = list(errors)
        moved = len({e.row_number for e in errors})
        self.updated -= moved
        self.failed += moved
        self.errors.extend(errors)

    def reported(self, errors: Iterable[RowError]) -> None:
        """Errors about rows that landed in part (a field refused): shown, not counted."""
        self.errors.extend(errors)

    def result(self, token: Any) -> LoadResult:
        return LoadResult(token, self.created, self.updated, self.failed, self.errors)


@dataclass
class Removed:
    """What ``Destination.remove`` did: the identifiers (``__id``) taken out of the list, and
    row errors for those it could not take out (they are tried again next run)."""

    ids: list[Any] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)

    @classmethod
    def of(cls, members: Iterable[Any]) -> Removed:
        """From members that each have an ``ident`` and, where their removal failed, an
        ``error``."""
        out = cls()
        for m in members:
            if m.error is not None:
                out.errors.append(m.error)
            else:
                out.ids.append(m.ident)
        return out


@dataclass(frozen=True)
class Leaving:
    """One row of the table ``Destination.remove`` is given, its values as text."""

    row: int
    ident: Any
    key: str | None
    dest_id: str | None

    @classmethod
    def rows(cls, table: pa.Table) -> list[Leaving]:
        rows = table["__row"].to_pylist() if "__row" in table.column_names else [0] * table.num_rows
        return [
            cls(row, ident, key, dest)
            for row, ident, key, dest in zip(
                rows,
                table["__id"].to_pylist(),
                _text(table, "key"),
                _text(table, "dest_id"),
                strict=True,
            )
        ]


def _text(table: pa.Table, name: str) -> list[str | None]:
    if name in table.column_names:
        return [None if v is None else str(v) for v in table[name].to_pylist()]
    return [None] * table.num_rows


@dataclass
class _Pending:
    batch: LoadBatch
    refused: list[RowError]
    work: Any  # what ``submit`` returned; None when no row was left to send


class Destination(ABC):
    type: ClassVar[str]  # the connection type, as in profiles.yml
    capabilities: ClassVar[Capabilities]
    # first wait before polling a job (backs off to 5 s), and submissions of a job that keeps
    # failing as a whole; tests shorten the first for every destination at once
    poll_interval: ClassVar[float] = 0.2
    job_attempts: ClassVar[int] = 3

    # ------------------------------------------------------------------ config checks

    @classmethod
    def check_sync(cls, sync: Sync) -> list[str]:
        """Config-time problems with a sync aimed at this destination (no network), from its
        capabilities; a destination adds its own by overriding and calling this."""
        cap = cls.capabilities
        problems = []
        for column, target in sync.fields().items():
            if target.field not in cap.standard_fields and not cls.is_custom_field(target.field):
                problems.append(
                    f"mapping.{column}: {target.field!r} is neither a standard {cls.type} field "
                    f"({', '.join(sorted(cap.standard_fields))}) nor a custom field "
                    f"({cls.custom_field_hint()})"
                )
        identifier = sync.fields().get(sync.identifier)
        if identifier is None:
            problems.append(
                f"identifier {sync.identifier!r} must also be mapped, e.g. mapping: "
                f"{{{sync.identifier}: email}}"
            )
        elif cap.identifier_fields and identifier.field not in cap.identifier_fields:
            allowed = cap.identifier_fields
            which = allowed[0] if len(allowed) == 1 else f"one of {', '.join(allowed)}"
            problems.append(
                f"identifier {sync.identifier!r} maps to {identifier.field!r}; the identifier of "
                f"{cap.label} must map to {which}"
            )
        if sync.destination.list and not cap.takes_list:
            problems.append(
                f"destination.list: {cap.label} do not go into lists; remove it "
                f"({cap.list_instead})"
            )
        if sync.mode == "mirror" and not cap.removes:
            problems.append(
                f"mode: mirror: {cap.label} cannot be taken out of a list by this tool; use "
                "mode: upsert"
            )
        elif sync.mode == "mirror" and not sync.destination.list:
            problems.append(
                "mode: mirror needs destination.list: the list whose members the view decides"
            )
        if sync.consent.columns() and not cap.takes_consent:
            problems.append(
                f"consent: {cap.label} carry no consent; remove it ({cap.consent_instead})"
            )
        return problems + cls.check_options(sync)

    @classmethod
    def check_options(cls, sync: Sync) -> list[str]:
        cap = cls.capabilities
        valid = ["connection", "list", *cap.options]
        problems = []
        opts = sync.destination.options()
        for key, value in opts.items():
            if key not in cap.options:
                hint = difflib.get_close_matches(key, valid, n=1)
                problems.append(
                    f"destination.{key}: unknown option for {cls.type}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" Valid keys: {', '.join(valid)}"
                )
            elif key in cap.bool_options and not isinstance(value, bool):
                problems.append(f"destination.{key}: true or false (got {value!r})")
        return problems

    @classmethod
    def is_custom_field(cls, name: str) -> bool:
        prefix = cls.capabilities.custom_prefix
        return prefix is not None and name.startswith(prefix + ".") and len(name) > len(prefix) + 1

    @classmethod
    def custom_field_hint(cls) -> str:
        prefix = cls.capabilities.custom_prefix
        if prefix is None:
            return "no custom fields"
        return f"custom fields of {cls.capabilities.label} are written {prefix}.<Name>"

    # ------------------------------------------------------------------ a run

    def __init__(self, conn: DestinationConnection, sync: Sync):
        self.conn = conn
        self.sync = sync

    def option(self, name: str, default: Any) -> Any:
        return self.sync.destination.options().get(name, default)

    def screen(self, table: pa.Table) -> Screened:
        """Rows this destination would refuse, found before anything is sent (a missing
        required field, consent without an address ...). Pure and offline: the run, ``validate``
        and the dry run all call it on every transformed batch, so each reports the same rows.
        It runs on the read-ahead thread while ``load`` sends earlier batches, so it must not
        share mutable state (or a DuckDB cursor) with ``load``. ``load`` receives only what
        ``screen`` returned and does not report these rows again."""
        return Screened(table)

    @abstractmethod
    def requests(self, table: pa.Table) -> Iterator[Request]:
        """The API calls ``table`` becomes, without sending them."""

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Network set-up before the first batch (find or create the list, fields ...)."""

    def consent_account(self) -> str | None:
        """The account whose people's consent this destination reads back
        (``consent.memory.account_key``); None: it reads none back."""
        return None

    def consent_standing(self, channel: str, persons: Sequence[str]) -> pa.Table | None:
        """The persons' latest opt-ins on ``channel`` made at the destination (not by us):
        ``person``, ``at``; looked up for the few unsubscribes a run sends. None: the
        destination cannot say (cheaply), and unsubscribes go as they are."""
        return None

    def read_back(self, memory: ConsentMemory) -> None:  # noqa: B027 - optional hook
        """Read what people did to their consent at the destination since the last read
        (unsubscribes, complaints, suppressions) into ``memory``, before a run reads a row."""

    def split(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """The cheap part of ``screen`` again, as a safety net for a batch that was not
        screened: rows that cannot be sent, as row errors (counted sent and failed)."""
        return table, []

    @abstractmethod
    def submit(self, table: pa.Table) -> Any:
        """Build ``table``'s bodies and send them, or start their jobs; return what
        ``complete`` needs to finish them. Called for batches ahead of the one being
        completed (up to ``max_in_flight``)."""

    @abstractmethod
    def complete(self, work: Any, tally: Tally) -> None:
        """Wait for what ``submit`` started and count every row it sent in ``tally``."""

    @final
    def load(self, batches: Iterator[LoadBatch]) -> Iterator[LoadResult]:
        """Send every batch; yield one result per batch, in order."""
        return in_order(batches, self._start, self._finish, self.capabilities.max_in_flight)

    def _start(self, batch: LoadBatch) -> _Pending:
        table, refused = self.split(batch.table)
        return _Pending(batch, refused, self.submit(table) if table.num_rows else None)

    def _finish(self, pending: _Pending) -> LoadResult:
        tally = Tally()
        tally.refused(pending.refused)
        if pending.work is not None:
            self.complete(pending.work, tally)
        result = tally.result(pending.batch.token)
        rows = pending.batch.table.num_rows
        if result.sent != rows or min(result.created, result.updated, result.failed) < 0:
            raise DestinationError(
                f"{self.capabilities.label}: a batch of {rows} rows was counted as "
                f"{result.created} created, {result.updated} updated and {result.failed} "
                "failed; this is a bug in the destination, and the batch stays behind the "
                "watermark"
            )
        return result

    def remove(self, members: pa.Table) -> Removed:
        """Take ``members`` out of the sync's list (``mode: mirror``: they left the view).
        Columns: ``__id`` (the sync's identifier, as text), ``key`` (the value of
        ``capabilities.match_field``: what the destination finds the record by) and ``dest_id``
        (the destination's own id where known, else null: look it up). Only the list
        membership goes: never unsubscribe, suppress or delete the person, and a member who is
        not in the list (any more) counts as removed. Returns the identifiers whose removal the
        API acknowledged; the rest stay in the snapshot and are tried again next run."""
        raise NotImplementedError(f"{self.capabilities.label} do not support mode: mirror")

    def removal_requests(self, members: pa.Table) -> Iterator[Request]:
        """The calls ``remove`` would send for ``members`` (the dry run), without sending them
        or looking anything up: where an id would first be looked up, a placeholder stands in
        its place. None for a destination that does not remove."""
        return iter(())

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

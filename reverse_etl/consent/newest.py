"""Newest wins: a row's consent is sent only when it is newer than what the destination knows.

A subscribe is sent only when the row's consent time (its ``consented_at`` column) is after the
person's latest opt-out at the destination, as read back (``memory.py``): an unsubscribe, a
spam complaint or a suppression the person or the vendor made there. A subscribe without a
consent time never overrides one: a date-less "yes" cannot be shown to be newer, and
subscribing lifts the opt-out (Klaviyo's bulk subscribe "will remove any UNSUBSCRIBE,
SPAM_REPORT or USER_SUPPRESSED suppressions"; Dotdigital's import resubscribes by default,
``resubscribeWithNoChallenge`` being true). What is held back keeps its row going (the profile
or contact is still written) without its consent, and becomes a row note
(``kept_unsubscribed``) with both times: not an error, counted as ``consent_held``.

The other way round: an unsubscribe is sent only when its consent time is after the person's
latest opt-in at the destination, where the destination can say so for a batch of people
(``Destination.consent_standing``: Klaviyo's ``consent_timestamp`` of a SUBSCRIBED profile
that we did not subscribe ourselves, a lookup per 100 unsubscribes with a consent time;
Dotdigital's newest consent record of a subscribed contact, read from the contacts modified
since the last read); otherwise held back as ``kept_subscribed``. Either is asked only by a
run with an unsubscribe that has a consent time (a run sends only the consent that changed).
An unsubscribe without a consent time is always sent, and so is one for a person whose
opt-in has no date: failing to honour an opt-out is the harm the law punishes.

Our own opt-outs are recorded twice: as an *intent*, durably, before the destination is sent
them (``record_intent``, called by the destination just before the call that carries them),
and again when the destination acknowledged them (``NewestWins.acknowledged``). Both set the
person's ``ours_at`` (``ConsentMemory.remember_ours``). A run killed after the destination
applied an unsubscribe but before it was acknowledged leaves the intent: the opt-out read back
next run (recorded within ``OURS_SLACK`` of it) is recognised as possibly ours, so a newer
subscribe in the warehouse is not held back by our own unsubscribe. An opt-out read back that
matches no intent or acknowledgement of that person in that window is the person's, and wins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.consent.kept import HELD, cleared, flagged, written
from reverse_etl.consent.memory import ConsentMemory
from reverse_etl.transform.consent import SUBSCRIBED, UNSUBSCRIBED
from reverse_etl.transform.rowerrors import RowError

# how long after we sent an opt-out the destination may record it (Klaviyo's subscription
# jobs run asynchronously; Dotdigital's imports too): an opt-out read back within it is ours.
# A person opting out themselves in that hour changed nothing: we had just opted them out.
OURS_SLACK = pa.scalar(timedelta(hours=1), pa.duration("us"))

# (channel, persons) -> the persons' latest opt-ins at the destination: ``person``, ``at``
# (None: the destination cannot say)
Standing = Callable[[str, Sequence[str]], pa.Table | None]

# the transformed column holding the address a channel's consent is read back by
PERSON = {"email": ("email",), "sms": ("phone_number", "mobileNumber")}


def _person(table: pa.Table, channel: str) -> str | None:
    """The column of ``table`` holding ``channel``'s address, if it has one."""
    return next((p for p in PERSON.get(channel, ()) if p in table.column_names), None)


def _keys(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Addresses as the read-back keeps them: text, lower-cased."""
    return pc.utf8_lower(pc.cast(values, pa.string()))


class NewestWins:
    """Holds back, batch by batch, the subscribes older than the destination's opt-outs as
    read back into ``memory`` (a dry run uses what earlier runs read)."""

    def __init__(
        self,
        memory: ConsentMemory,
        destination: str,
        columns: dict[str, str],
        standing: Standing | None = None,
    ):
        self.memory = memory
        self.destination = destination
        self.columns = columns  # channel -> the view's consent column
        self.standing = standing  # opt-ins at the destination, looked up (None: not)
        self._any = {ch: memory.has_opt_outs(ch) for ch in columns}  # one query each, a run

    def acknowledged(self, table: pa.Table) -> None:
        """The destination took ``table``'s rows: remember the opt-outs they carried as ours
        (a later subscribe without a consent time may lift them: nobody changed their mind
        at the destination)."""
        for channel, persons in opt_outs_sent(table, self.columns).items():
            self.memory.remember_ours(channel, persons, datetime.now(UTC))

    def apply(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        notes: list[RowError] = []
        for channel, column in self.columns.items():
            name = f"consent.{channel}"
            person = _person(table, channel)
            if not self._any[channel] or person is None or name not in table.column_names:
                continue
            wanted = pc.fill_null(pc.equal(table[name], SUBSCRIBED), False)
            if not pc.any(wanted).as_py():
                continue
            opt_outs = self.memory.opt_outs(
                channel, _keys(table[person].filter(wanted)).to_pylist()
            )
            table, held = hold_back_subscribes(
                table,
                channel,
                person=person,
                opt_outs=opt_outs,
                column=column,
                destination=self.destination,
            )
            notes += held
        if self.standing is not None:
            for channel, column in self.columns.items():
                table, held = self._unsubscribes(table, channel, column)
                notes += held
        return table, sorted(notes, key=lambda n: n.row_number)

    def _unsubscribes(
        self, table: pa.Table, channel: str, column: str
    ) -> tuple[pa.Table, list[RowError]]:
        name, at_name = f"consent.{channel}", f"consent.{channel}.consented_at"
        person = _person(table, channel)
        if person is None or name not in table.column_names or at_name not in table.column_names:
            return table, []
        wanted = pc.and_(
            pc.fill_null(pc.equal(table[name], UNSUBSCRIBED), False), pc.is_valid(table[at_name])
        )
        if not pc.any(wanted).as_py():
            return table, []
        assert self.standing is not None
        keys = _keys(table[person].filter(wanted)).to_pylist()
        opt_ins = self.standing(channel, sorted({k for k in keys if k}))
        if opt_ins is None:
            return table, []
        return hold_back_unsubscribes(
            table,
            channel,
            person=person,
            opt_ins=opt_ins,
            column=column,
            destination=self.destination,
        )


def opt_outs_sent(table: pa.Table, channels: Iterable[str]) -> dict[str, list[str]]:
    """channel -> the persons (as the read-back keeps them) whose unsubscribe ``table``
    writes on it: neither kept nor held back."""
    out: dict[str, list[str]] = {}
    for channel in channels:
        name = f"consent.{channel}"
        person = _person(table, channel)
        if person is None or name not in table.column_names or table.num_rows == 0:
            continue
        sent = pc.and_(pc.fill_null(pc.equal(table[name], UNSUBSCRIBED), False), written(table))
        if pc.any(sent).as_py():
            persons = [p for p in _keys(table[person].filter(sent)).to_pylist() if p]
            if persons:
                out[channel] = persons
    return out


def record_intent(
    memory: ConsentMemory,
    table: pa.Table,
    channels: Iterable[str],
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Before sending ``table``: remember the opt-outs it carries as ours (module docstring),
    durably (one committed transaction per channel), so a run killed before the destination
    acknowledged them still knows the opt-out it may have caused."""
    for channel, persons in opt_outs_sent(table, channels).items():
        memory.remember_ours(channel, persons, now())


def hold_back_subscribes(
    table: pa.Table,
    channel: str,
    *,
    person: str,
    opt_outs: pa.Table,
    column: str,
    destination: str,
) -> tuple[pa.Table, list[RowError]]:
    """``table`` with ``consent.<channel>`` NULL where a subscribe is older than the person's
    opt-out in ``opt_outs`` (``person``, ``at``, ``reason``; persons lower-cased like
    ``table[person]``), and a ``kept_unsubscribed`` note for each such row. ``column``: the
    view's consent column, for the notes; ``destination``: its name, for the messages."""
    name = f"consent.{channel}"
    if name not in table.column_names or opt_outs.num_rows == 0 or table.num_rows == 0:
        return table, []
    wanted = pc.fill_null(pc.equal(table[name], SUBSCRIBED), False)
    if not pc.any(wanted).as_py():
        return table, []
    at_name = f"{name}.consented_at"
    given = (
        table[at_name]
        if at_name in table.column_names
        else pa.nulls(table.num_rows, pa.timestamp("us", "UTC"))
    )
    keys = _keys(table[person])
    where = pc.index_in(keys, value_set=opt_outs["person"])
    found = pc.is_valid(where)
    held = pc.and_(wanted, found)
    if not pc.any(held).as_py():
        return table, []
    out_at = pc.take(opt_outs["at"], pc.fill_null(where, 0))
    ours_at = pc.take(opt_outs["ours_at"], pc.fill_null(where, 0))
    # an opt-out recorded soon after we sent one is ours: the warehouse said "no" then, and
    # its "yes" now is newer in the warehouse's own order
    ours = pc.fill_null(pc.less_equal(out_at, pc.add(ours_at, OURS_SLACK)), False)
    held = pc.and_(held, pc.invert(ours))
    given_utc = pc.cast(given, pa.timestamp("us", "UTC"))
    newer = pc.fill_null(pc.greater(given_utc, out_at), False)
    held = pc.and_(held, pc.invert(newer))
    if not pc.any(held).as_py():
        return table, []
    notes = _notes(
        table.filter(held),
        given_utc.filter(held),
        out_at.filter(held),
        opt_outs,
        where.filter(held),
        channel,
        column,
        destination,
    )
    return _held_back(table, name, held), notes


def _notes(
    rows: pa.Table,
    given: pa.ChunkedArray | pa.Array,
    out_at: pa.ChunkedArray | pa.Array,
    opt_outs: pa.Table,
    where: pa.ChunkedArray | pa.Array,
    channel: str,
    column: str,
    destination: str,
) -> list[RowError]:
    reasons = pc.take(opt_outs["reason"], where).to_pylist()
    notes = []
    for row, ident, at, out, reason in zip(
        rows["__row"].to_pylist(),
        rows["__id"].to_pylist(),
        given.to_pylist(),
        out_at.to_pylist(),
        reasons,
        strict=True,
    ):
        consented = f"consented at {at.isoformat()}" if at is not None else "with no consent time"
        why = f" ({reason})" if reason else ""
        notes.append(
            RowError(
                row,
                ident,
                column,
                "subscribed",
                "kept_unsubscribed",
                f"{channel} subscribe {consented} not sent: the person opted out at "
                f"{destination} at {out.isoformat()}{why}, which is newer",
            )
        )
    return notes


def hold_back_unsubscribes(
    table: pa.Table,
    channel: str,
    *,
    person: str,
    opt_ins: pa.Table,
    column: str,
    destination: str,
) -> tuple[pa.Table, list[RowError]]:
    """``table`` with ``consent.<channel>`` NULL where an unsubscribe with a consent time is
    older than the person's opt-in in ``opt_ins`` (``person``, ``at``), and a
    ``kept_subscribed`` note for each such row."""
    name = f"consent.{channel}"
    given = table[f"{name}.consented_at"]
    if opt_ins.num_rows == 0:
        return table, []
    wanted = pc.and_(pc.fill_null(pc.equal(table[name], UNSUBSCRIBED), False), pc.is_valid(given))
    keys = _keys(table[person])
    where = pc.index_in(keys, value_set=opt_ins["person"])
    in_at = pc.take(opt_ins["at"], pc.fill_null(where, 0))
    older = pc.fill_null(pc.less(pc.cast(given, pa.timestamp("us", "UTC")), in_at), False)
    held = pc.and_(pc.and_(wanted, pc.is_valid(where)), older)
    if not pc.any(held).as_py():
        return table, []
    rows = table.filter(held)
    notes = [
        RowError(
            row,
            ident,
            column,
            "unsubscribed",
            "kept_subscribed",
            f"{channel} unsubscribe consented at {at.isoformat()} not sent: the person "
            f"subscribed at {destination} at {opted.isoformat()}, which is newer",
        )
        for row, ident, at, opted in zip(
            rows["__row"].to_pylist(),
            rows["__id"].to_pylist(),
            pc.cast(given, pa.timestamp("us", "UTC")).filter(held).to_pylist(),
            in_at.filter(held).to_pylist(),
            strict=True,
        )
    ]
    return _held_back(table, name, held), notes


def _held_back(table: pa.Table, name: str, held: pa.Array | pa.ChunkedArray) -> pa.Table:
    """``table`` with consent column ``name`` NULL on the ``held`` rows, flagged ``HELD``."""
    table = cleared(table, name, held)
    held = pc.or_(flagged(table, HELD), held)
    if HELD in table.column_names:
        return table.set_column(table.column_names.index(HELD), HELD, held)
    return table.append_column(HELD, held)

"""What destinations said about people's consent, read back and kept in the state store.

Each destination account (``account``: its type, base URL and a digest of its credentials,
never the credentials) has read-back *streams* (Klaviyo's suppressions, Dotdigital's
unsubscribes and suppressions), each with its own cursor, so a run reads only what changed
since the last one. What was read is kept per person and channel: the latest opt-out or opt-in
and when, which is what "newest wins" compares a row's consent with (``newest.py``).

A stream's new rows and its cursor are written in one transaction: a run that dies between
reading and writing reads the same page again next time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import sqlalchemy as sa

from reverse_etl.state import StateStore, consent_cursors, consent_seen

OPTED_OUT = ("unsubscribed", "suppressed")
_IN_CHUNK = 500  # persons per IN (...) lookup


def account_key(kind: str, base_url: str, *secrets: str) -> str:
    """A destination account's name in the state store: type, base URL and a digest of its
    credentials (two API keys on one URL are two accounts; the key itself is never stored)."""
    digest = hashlib.sha256("\x00".join(secrets).encode()).hexdigest()[:12]
    return f"{kind}:{base_url.rstrip('/')}:{digest}"


@dataclass(frozen=True)
class Seen:
    """One person's consent on one channel, as the destination last said it."""

    person: str  # the address, lower-cased (email) or as given (phone)
    channel: str  # email | sms
    status: str  # subscribed | unsubscribed | suppressed
    at: datetime
    reason: str | None = None


class ConsentMemory:
    """The read-back consent of one destination account, in the state store."""

    def __init__(self, store: StateStore, account: str):
        self.engine = store.engine
        self.account = account

    def cursor(self, stream: str) -> str | None:
        query = sa.select(consent_cursors.c.cursor).where(
            consent_cursors.c.destination == self.account, consent_cursors.c.stream == stream
        )
        with self.engine.connect() as con:
            return con.execute(query).scalar_one_or_none()

    def remember(self, stream: str, seen: Iterable[Seen], cursor: str) -> int:
        """Keep ``seen`` (the newest statement per person and channel wins, older ones are
        ignored) and move ``stream``'s cursor, in one transaction; return how many were new."""
        latest: dict[tuple[str, str], Seen] = {}
        for s in seen:
            key = (s.person, s.channel)
            if key not in latest or s.at > latest[key].at:
                latest[key] = s
        read_at = datetime.now(UTC)
        new: list[dict[str, object]] = []
        newer: list[dict[str, object]] = []
        c = consent_seen.c
        with self.engine.begin() as con:
            held = self._held(con, [p for p, _ in latest], None)
            for (person, channel), s in latest.items():
                old = held.get((person, channel))
                if old is not None and old[0] != "sent" and old[1] >= s.at:
                    continue
                values: dict[str, object] = {
                    "status": s.status,
                    "reason": s.reason,
                    "at": s.at,
                    "read_at": read_at,
                }
                if old is None:
                    row = {"destination": self.account, "person": person, "channel": channel}
                    new.append({**values, **row})
                else:
                    newer.append({**values, "p_person": person, "p_channel": channel})
            # one statement each, however many people (executemany)
            if new:
                con.execute(sa.insert(consent_seen), new)
            if newer:
                con.execute(
                    sa.update(consent_seen)
                    .where(
                        c.destination == self.account,
                        c.person == sa.bindparam("p_person"),
                        c.channel == sa.bindparam("p_channel"),
                    )
                    .values(
                        status=sa.bindparam("status"),
                        reason=sa.bindparam("reason"),
                        at=sa.bindparam("at"),
                        read_at=sa.bindparam("read_at"),
                    ),
                    newer,
                )
            self._set_cursor(con, stream, cursor)
        return len(new) + len(newer)

    def _set_cursor(self, con: sa.Connection, stream: str, cursor: str) -> None:
        where = (consent_cursors.c.destination == self.account, consent_cursors.c.stream == stream)
        values = {"cursor": cursor, "updated_at": datetime.now(UTC)}
        if not con.execute(sa.update(consent_cursors).where(*where).values(**values)).rowcount:
            con.execute(
                sa.insert(consent_cursors).values(destination=self.account, stream=stream, **values)
            )

    def _held(
        self, con: sa.Connection, persons: Sequence[str], channel: str | None
    ) -> dict[tuple[str, str], tuple[str, datetime, str | None, datetime | None]]:
        """(person, channel) -> (status, at, reason, ours_at) for ``persons``."""
        out: dict[tuple[str, str], tuple[str, datetime, str | None, datetime | None]] = {}
        c = consent_seen.c
        for i in range(0, len(persons), _IN_CHUNK):
            query = sa.select(c.person, c.channel, c.status, c.at, c.reason, c.ours_at).where(
                c.destination == self.account, c.person.in_(persons[i : i + _IN_CHUNK])
            )
            if channel is not None:
                query = query.where(c.channel == channel)
            for row in con.execute(query):
                out[(row.person, row.channel)] = (
                    row.status,
                    _utc(row.at),
                    row.reason,
                    None if row.ours_at is None else _utc(row.ours_at),
                )
        return out

    def remember_ours(self, channel: str, persons: Sequence[str], at: datetime) -> None:
        """We sent ``persons`` an opt-out on ``channel`` at ``at`` (or are about to: an intent
        recorded before the call, ``newest.record_intent``; or it was acknowledged): the
        opt-out the destination then records is ours, not a change the person made there.

        One upsert per person, sent as raw driver rows: a first run can send hundreds of
        thousands of opt-outs, and SQLAlchemy's per-row parameter processing (its DateTime
        columns above all) cost 13 us a person, the time of the run's whole transform. A
        person already known keeps what was read back; only ``ours_at`` moves."""
        wanted = sorted({p for p in persons if p})
        if not wanted:
            return
        with self.engine.begin() as con:
            dialect = con.dialect
            stamp = sa.DateTime(timezone=True).dialect_impl(dialect).bind_processor(dialect)
            when = stamp(at) if stamp is not None else at
            mark = "?" if dialect.paramstyle == "qmark" else "%s"
            columns = "destination, person, channel, status, at, read_at, ours_at"
            statement = (
                f"INSERT INTO {consent_seen.name} ({columns}) "
                f"VALUES ({mark}, {mark}, {mark}, 'sent', {mark}, {mark}, {mark}) "
                "ON CONFLICT (destination, person, channel) DO UPDATE SET ours_at = "
                "excluded.ours_at"
            )
            rows = [(self.account, p, channel, when, when, when) for p in wanted]
            con.exec_driver_sql(statement, rows)

    def statements(self, since: datetime | None = None) -> list[Seen]:
        """Everything read back from this account (not our own sends alone), oldest first;
        ``since``: only what happened after it."""
        c = consent_seen.c
        query = (
            sa.select(c.person, c.channel, c.status, c.at, c.reason)
            .where(c.destination == self.account, c.status != "sent")
            .order_by(c.at, c.person, c.channel)
        )
        if since is not None:
            query = query.where(c.at > since)
        with self.engine.connect() as con:
            return [
                Seen(r.person, r.channel, r.status, _utc(r.at), r.reason)
                for r in con.execute(query)
            ]

    def has_opt_outs(self, channel: str) -> bool:
        """Whether any opt-out on ``channel`` was read back from this account."""
        c = consent_seen.c
        query = (
            sa.select(c.person)
            .where(c.destination == self.account, c.channel == channel, c.status.in_(OPTED_OUT))
            .limit(1)
        )
        with self.engine.connect() as con:
            return con.execute(query).first() is not None

    def opt_ins(self, channel: str, persons: Sequence[str]) -> pa.Table:
        """The persons among ``persons`` whose latest statement on ``channel`` is an opt-in
        read back: ``person``, ``at`` (UTC)."""
        wanted = sorted({p for p in persons if p})
        with self.engine.connect() as con:
            held = self._held(con, wanted, channel)
        rows = [(p, at) for (p, _), (st, at, *_) in held.items() if st == "subscribed"]
        return pa.table(
            {
                "person": pa.array([r[0] for r in rows], pa.string()),
                "at": pa.array([r[1] for r in rows], pa.timestamp("us", "UTC")),
            }
        )

    def opt_outs(self, channel: str, persons: Sequence[str]) -> pa.Table:
        """The persons among ``persons`` whose latest statement on ``channel`` is an opt-out:
        ``person``, ``at`` (UTC), ``reason``, ``ours_at`` (when we last sent them one)."""
        wanted = sorted({p for p in persons if p})
        with self.engine.connect() as con:
            held = self._held(con, wanted, channel)
        rows = [(p, *rest) for (p, _), (st, *rest) in held.items() if st in OPTED_OUT]
        return pa.table(
            {
                "person": pa.array([r[0] for r in rows], pa.string()),
                "at": pa.array([r[1] for r in rows], pa.timestamp("us", "UTC")),
                "reason": pa.array([r[2] for r in rows], pa.string()),
                "ours_at": pa.array([r[3] for r in rows], pa.timestamp("us", "UTC")),
            }
        )


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)  # SQLite gives naive UTC back

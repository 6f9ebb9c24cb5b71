"""Rows a destination refused because their parent did not exist yet, retried by later runs.

A Dotdigital order whose contact is not in Dotdigital yet is refused (``contact_missing``);
the contact often arrives with the next contacts run (``depends_on`` runs it first). Such rows
sit behind the watermark, so they would never be read again: the queue keeps their
identifiers in the state store (``retl_retry_queue``), the next incremental read takes them
too (``extract.build_query``'s ``retry``), and each is sent with the batch it falls in. A row
refused ``max_attempts`` times is given up: a normal error, ``parent_missing_gave_up``.

Only failing rows touch Python here; the rows a batch sent are matched to the queue in Arrow.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from reverse_etl.state import StateStore, now, retry_queue
from reverse_etl.transform.rowerrors import RowError

log = logging.getLogger(__name__)

# reason codes destinations report for a row whose parent record does not exist (yet):
# Dotdigital insight ContactEmailDoesNotExist / ContactIdDoesNotExist (destinations/dotdigital).
# Klaviyo creates the profile of an event or order itself, so it reports none.
PARENT_MISSING = frozenset({"contact_missing"})
GAVE_UP = "parent_missing_gave_up"
MAX_ATTEMPTS = 5
# identifiers re-read by one run (each is a query parameter); the oldest first, the rest wait
READ_LIMIT = 1000
_CHUNK = 500


class RetryQueue:
    """One run's view of its sync's queue: what to re-read, and what each batch settled."""

    def __init__(
        self, store: StateStore, sync: str, run_id: str, *, max_attempts: int = MAX_ATTEMPTS
    ) -> None:
        self.store, self.sync, self.run_id = store, sync, run_id
        self.max_attempts = max_attempts
        self.retrying: dict[str, int] = {}  # identifier -> attempts, read at the run's start
        self._seen: set[str] = set()

    def load(self, limit: int = READ_LIMIT) -> list[str]:
        """The identifiers this run re-reads (oldest queued first)."""
        q = retry_queue
        with self.store.engine.connect() as con:
            rows = con.execute(
                sa.select(q.c.identifier, q.c.attempts)
                .where(q.c.sync == self.sync)
                .order_by(q.c.first_queued_at, q.c.identifier)
                .limit(limit)
            ).all()
        self.retrying = {r.identifier: int(r.attempts) for r in rows}
        return list(self.retrying)

    def settle(self, sent: pa.Table | None, errors: list[RowError]) -> list[RowError]:
        """After an acknowledged batch: queued rows it delivered leave the queue, rows refused
        for a missing parent are queued (or given up after ``max_attempts``). Returns the
        batch's errors as the error file should hold them."""
        out: list[RowError] = []
        queue: dict[str, tuple[int, str]] = {}  # identifier -> (attempts, reason)
        done: set[str] = set()
        for e in errors:
            ident = str(e.identifier)
            if e.reason not in PARENT_MISSING or e.identifier is None:
                if ident in self.retrying:
                    done.add(ident)  # refused for another reason now: a normal error
                out.append(e)
                continue
            attempts = self.retrying.get(ident, 0) + 1
            if attempts >= self.max_attempts:
                done.add(ident)
                out.append(
                    dataclasses.replace(
                        e,
                        reason=GAVE_UP,
                        message=f"{e.message} (given up after {attempts} attempts)",
                    )
                )
                continue
            queue[ident] = (attempts, e.reason)
            out.append(
                dataclasses.replace(
                    e,
                    message=f"{e.message} (queued: sent again by the next run, attempt "
                    f"{attempts} of {self.max_attempts})",
                )
            )
        if self.retrying and sent is not None and sent.num_rows:
            ids = pc.cast(sent["__id"], pa.string())
            mine = ids.filter(pc.is_in(ids, pa.array(list(self.retrying), pa.string())))
            done.update(str(i) for i in mine.to_pylist() if i not in queue)
        self._seen.update(done)
        self._seen.update(queue)
        self._write(queue, done)
        return out

    def finish(self) -> int:
        """After a run that read everything it meant to: queued rows it did not meet left the
        view (or stopped failing in the transform, reported there), so nothing is left to
        retry for them. Returns how many were dropped."""
        gone = [i for i in self.retrying if i not in self._seen]
        if gone:
            log.info("%s: %d queued rows are no longer in the view; dropped", self.sync, len(gone))
            self._write({}, set(gone))
        return len(gone)

    def _write(self, queue: dict[str, tuple[int, str]], done: Iterable[str]) -> None:
        q, gone = retry_queue, sorted(done)
        if not queue and not gone:
            return
        with self.store.engine.begin() as con:
            keys = sorted(set(gone) | set(queue))
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                con.execute(sa.delete(q).where(q.c.sync == self.sync, q.c.identifier.in_(chunk)))
            if queue:
                at = now()
                con.execute(
                    sa.insert(q),
                    [
                        {
                            "sync": self.sync,
                            "identifier": ident[:500],
                            "reason": reason[:100],
                            "attempts": attempts,
                            "first_queued_at": at,
                            "last_run": self.run_id,
                        }
                        for ident, (attempts, reason) in queue.items()
                    ],
                )


def counts(store: StateStore, syncs: Iterable[str]) -> dict[str, int]:
    """Rows waiting in each sync's retry queue (``status``)."""
    q, names = retry_queue, list(syncs)
    with store.engine.connect() as con:
        rows = con.execute(
            sa.select(q.c.sync, sa.func.count()).where(q.c.sync.in_(names)).group_by(q.c.sync)
        ).all()
    found = {r[0]: int(r[1]) for r in rows}
    return {name: found.get(name, 0) for name in names}

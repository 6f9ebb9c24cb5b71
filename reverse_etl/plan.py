"""``reverse-etl plan``: what a run would do, from a dry run's diff against the snapshot.

Rows that would be sent split into adds (the destination does not hold the identifier yet,
as far as this sync knows) and updates, with a sample of each showing the fields that
changed, old -> new (the old values are those last sent, kept in the snapshot); a mirror
sync's removals with a sample of who would leave the list. Only the sampled rows are looked
at in Python.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.consent.kept import HELD, flagged, written
from reverse_etl.transform.consent import SUBSCRIBED, UNSUBSCRIBED


@dataclass
class Change:
    identifier: Any
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (old, new)

    def as_dict(self) -> dict[str, Any]:
        return {
            "identifier": self.identifier,
            "fields": {k: {"old": o, "new": n} for k, (o, n) in self.fields.items()},
        }


@dataclass
class Plan:
    sync: str = ""
    samples: int = 5  # changes shown per kind
    adds: int = 0
    updates: int = 0
    unchanged: int = 0
    rejected: int = 0
    removals: int = 0
    read: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    added: list[Change] = field(default_factory=list)
    updated: list[Change] = field(default_factory=list)
    removed: list[Change] = field(default_factory=list)
    # consent the run would write, per "<channel> subscribe|unsubscribe", and hold back
    consent: Counter[str] = field(default_factory=Counter)
    held: list[Any] = field(default_factory=list)  # identifiers of a sample held back

    def take(self, prints: pa.Table | None, sent_rows: pa.Array | pa.ChunkedArray) -> None:
        """Count a batch's rows that would be sent (``sent_rows``: their ``__row``) as adds
        or updates, and sample them."""
        if prints is None or prints.num_rows == 0 or len(sent_rows) == 0:
            return
        going = prints.filter(pc.is_in(prints["__row"], value_set=sent_rows))
        known = going["known"]
        updates = _count(known)
        self.updates += updates
        self.adds += going.num_rows - updates
        for kind, mask, into in (
            ("add", pc.invert(known), self.added),
            ("update", known, self.updated),
        ):
            room = self.samples - len(into)
            if room <= 0:
                continue
            rows = going.filter(mask).slice(0, room).to_pylist()
            into.extend(_change(r, with_old=kind == "update") for r in rows)

    def take_consent(self, table: pa.Table) -> None:
        """Count the consent a batch about to be sent would write (consent the destination
        holds from us is not written again) and that it holds back (``newest``)."""
        if table.num_rows == 0:
            return
        fresh = written(table)  # held-back consent is NULL already: not counted either way
        for name in table.column_names:
            if not name.startswith("consent.") or name.count(".") != 1:
                continue
            channel = name.split(".")[1]
            for word, kind in ((SUBSCRIBED, "subscribe"), (UNSUBSCRIBED, "unsubscribe")):
                mask = pc.and_(pc.fill_null(pc.equal(table[name], word), False), fresh)
                self.consent[f"{channel} {kind}"] += _count(mask)
        if HELD in table.column_names:
            held = flagged(table, HELD)
            self.consent["held back"] += _count(held)
            room = self.samples - len(self.held)
            if room > 0:
                self.held.extend(table["__id"].filter(held).slice(0, room).to_pylist())

    def take_removals(self, count: int, members: pa.Table) -> None:
        self.removals = count
        for ident, key in zip(
            members["__id"].to_pylist()[: self.samples],
            members["key"].to_pylist()[: self.samples],
            strict=True,
        ):
            self.removed.append(Change(ident, {"key": (key, None)}))

    def as_dict(self) -> dict[str, Any]:
        return {
            "sync": self.sync,
            "read": self.read,
            "adds": self.adds,
            "updates": self.updates,
            "removals": self.removals,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
            "rejected_by_reason": dict(self.by_reason.most_common()),
            "consent": dict(sorted(self.consent.items())),
            "samples": {
                "adds": [c.as_dict() for c in self.added],
                "updates": [c.as_dict() for c in self.updated],
                "removals": [c.as_dict() for c in self.removed],
                "consent_held_back": self.held,
            },
        }


def _values(doc: str | None) -> dict[str, Any]:
    """A remembered or new ``[payload, consent]`` doc as one flat mapping."""
    if not doc:
        return {}
    parts = orjson.loads(doc)
    out: dict[str, Any] = {}
    for part in parts if isinstance(parts, list) else [parts]:
        if isinstance(part, dict):  # "<column>?": the consent's address is there (not shown)
            out.update((k, v) for k, v in part.items() if not k.endswith("?"))
    return out


def _change(row: dict[str, Any], *, with_old: bool) -> Change:
    new = _values(row.get("doc"))
    old = _values(row.get("old")) if with_old else {}
    names = sorted(set(new) | set(old))
    return Change(
        row.get("id"),
        {n: (old.get(n), new.get(n)) for n in names if not with_old or old.get(n) != new.get(n)},
    )


def _count(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)

"""A sync's column names, respelled as the view spells them.

Analysts write a sync with the names they type in SQL (``identifier: email``), but every later
step of a run (the schema check, the quoted names of the incremental query, the transform, the
watermark) looks columns up by their exact spelling in the view's schema, and warehouses do not
agree on that spelling: Snowflake stores an unquoted ``email`` as ``EMAIL``, PostgreSQL as
``email``, DuckDB and BigQuery keep what the view wrote and compare names case-insensitively.
So once the view's schema is known, the sync is rewritten with the view's own spelling of every
column it names, and nothing downstream needs to know about case folding.

A name the view does not have is left as written: the run's schema check then reports it with
its usual message (which lists the view's columns). A name that matches several columns
differing only in case is a configuration error, as guessing would send the wrong column.
"""

from __future__ import annotations

from collections.abc import Sequence

from reverse_etl.config import ConsentColumn, ConsentSpec, FieldMapping, Sync
from reverse_etl.config.models import EVIDENCE_KEYS, EvidenceColumn
from reverse_etl.errors import ConfigError
from reverse_etl.sources.base import AmbiguousColumnError, Dialect, MissingColumnError

__all__ = ["resolve_sync_columns"]


def resolve_sync_columns(sync: Sync, columns: Sequence[str], dialect: Dialect) -> Sync:
    """A copy of ``sync`` in which every column it names (identifier, cursor, mapping keys,
    consent columns and their ``consented_at``, ``phone_region_column``) is spelled as in
    ``columns``, the view's column names, found with ``dialect.resolve_column``.

    Names not in the view stay as they are. ``ConfigError`` names the sync, the key and the
    candidates when a name is ambiguous, or when two mapping keys resolve to one column."""
    resolve = _Resolver(sync.name, list(columns), dialect)

    mapping: dict[str, str | FieldMapping] = {}
    written_as: dict[str, str] = {}  # view column -> the mapping key that named it
    for key, target in sync.mapping.items():
        column = resolve(key, f"mapping.{key}")
        if column in mapping:
            raise ConfigError(
                f"sync {sync.name!r}: mapping keys {written_as[column]!r} and {key!r} both name "
                f"the view's column {column!r}; map it once"
            )
        mapping[column] = target
        written_as[column] = key

    consent_update: dict[str, ConsentColumn] = {}
    for channel, consent in sync.consent.columns().items():
        at = consent.consented_at
        evidence = consent.evidence
        if evidence is not None:  # its columns too, as the view spells them
            evidence = evidence.model_copy(
                update={
                    key: EvidenceColumn(
                        column=resolve(value.column, f"consent.{channel}.evidence.{key}")
                    )
                    for key in EVIDENCE_KEYS
                    if isinstance(value := getattr(evidence, key), EvidenceColumn)
                }
            )
        consent_update[channel] = consent.model_copy(
            update={
                "column": resolve(consent.column, f"consent.{channel}.column"),
                "consented_at": None
                if at is None
                else resolve(at, f"consent.{channel}.consented_at"),
                "evidence": evidence,
            }
        )
    consent_spec: ConsentSpec = sync.consent.model_copy(update=consent_update)

    region = sync.phone_region_column
    return sync.model_copy(
        update={
            "identifier": resolve(sync.identifier, "identifier"),
            "cursor": resolve(sync.cursor_column, "cursor"),
            "mapping": mapping,
            "consent": consent_spec,
            "phone_region_column": None
            if region is None
            else resolve(region, "phone_region_column"),
        }
    )


class _Resolver:
    """``dialect.resolve_column`` over one view's columns, with the sync's own error."""

    def __init__(self, sync_name: str, columns: list[str], dialect: Dialect):
        self._sync = sync_name
        self._columns = columns
        self._dialect = dialect

    def __call__(self, name: str, key: str) -> str:
        try:
            return self._dialect.resolve_column(name, self._columns)
        except MissingColumnError:
            return name  # the schema check reports it, with the view's columns
        except AmbiguousColumnError as exc:
            candidates = ", ".join(repr(c) for c in exc.candidates)
            raise ConfigError(
                f"sync {self._sync!r}: {key} names column {name!r}, which matches several "
                f"columns of the view that differ only in case ({candidates}); write the "
                "exact spelling of the one to use"
            ) from None

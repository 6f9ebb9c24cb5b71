"""The synced-state snapshot: what a sync last sent and the destination acknowledged, one
record per identifier, so a run sends only what changed and a mirror sync knows who left.

``local.py``: the default, one DuckDB file per sync (``snapshot: {path: DIR}``).
``warehouse.py``: a table per sync in the warehouse itself (``snapshot: {connection: NAME,
schema: reverse_etl}``), joined by the read, for views of tens of millions of members.
``fingerprint.py``: the sync's definition (the salt) and the fingerprint SQL of each engine.
``store.py``: ``SnapshotStore``, what the engine asks of either, and ``Diff``.
"""

from reverse_etl.snapshot.fingerprint import Fingerprint, definition
from reverse_etl.snapshot.local import Snapshot, snapshot_path
from reverse_etl.snapshot.store import Diff, SnapshotStore
from reverse_etl.snapshot.warehouse import WarehouseSnapshot

__all__ = [
    "Diff",
    "Fingerprint",
    "Snapshot",
    "SnapshotStore",
    "WarehouseSnapshot",
    "definition",
    "snapshot_path",
]

"""What every Dotdigital destination shares: one client per run (paced on the account's call
budget), import queues, and the polling pace and resubmission count tests shorten.

The objects are subclasses: contacts (``contacts.py``, object ``profiles``), orders
(``orders.py``) and the product catalog (``catalog.py``), the last two as insight data
(``insight.py``).
"""

from __future__ import annotations

from typing import Any

from reverse_etl.config import DotdigitalConnection, Sync
from reverse_etl.destinations.base import Destination
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.destinations.dotdigital.imports import ImportApi, ImportQueue

# Records an import takes. Not published in the specs; 5,000 is the v3 services' own bulk
# maximum (contacts bulk delete, insight deleteRecords) and what the sandbox enforces.
MAX_IMPORT_RECORDS = 5000
MAX_IMPORT_BYTES = 10_000_000


class DotdigitalDestination(Destination):
    type = "dotdigital"
    poll_interval = 0.2  # first wait before polling an import; backs off to 5 s
    import_attempts = 3  # submissions of an import that keeps failing as a whole
    max_in_flight = 4  # batches submitted ahead of the one being acknowledged

    def __init__(self, conn: DotdigitalConnection, sync: Sync):
        self.conn = conn
        self.sync = sync
        self.import_size = int(sync.destination.options().get("import_size", MAX_IMPORT_RECORDS))
        self.client = DotdigitalClient(conn)

    @classmethod
    def check_import_size(cls, opts: dict[str, Any]) -> list[str]:
        size = opts.get("import_size", MAX_IMPORT_RECORDS)
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or not 1 <= size <= MAX_IMPORT_RECORDS
        ):
            return [
                f"destination.import_size: a whole number from 1 to {MAX_IMPORT_RECORDS} (records an import)"
            ]
        return []

    def queue(self, api: ImportApi) -> ImportQueue:
        return ImportQueue(
            self.client, api, poll_interval=self.poll_interval, attempts=self.import_attempts
        )

    def close(self) -> None:
        self.client.close()

"""What every Dotdigital object shares: one client per run (paced on the account's call
budget) and the import pipeline: a batch's records go into imports of up to ``import_size``
records (``ImportQueue`` keeps the account's limit of unfinished imports), each polled to its
end; the object says how an import's report counts (``account``).

The objects are subclasses: contacts (``profiles.py``), orders (``orders.py``) and the product
catalog (``catalog.py``), the last two as insight data (``insight.py``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from reverse_etl.config import Sync
from reverse_etl.destinations.base import Destination, Tally
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.destinations.dotdigital.imports import Import, ImportApi, ImportQueue

# Records an import takes. Not published in the specs; 5,000 is the v3 services' own bulk
# maximum (contacts bulk delete, insight deleteRecords) and what the sandbox enforces.
MAX_IMPORT_RECORDS = 5000
MAX_IMPORT_BYTES = 10_000_000


@dataclass
class _InFlight:
    table: pa.Table  # the rows sent
    imports: list[Import] = field(default_factory=list)


class DotdigitalBase(Destination):
    type = "dotdigital"
    import_api: ClassVar[ImportApi]

    def __init__(self, conn: DotdigitalConnection, sync: Sync):
        super().__init__(conn, sync)
        self.conn: DotdigitalConnection = conn
        self.import_size = int(self.option("import_size", MAX_IMPORT_RECORDS))
        self.client = DotdigitalClient(conn)
        self.imports = ImportQueue(
            self.client,
            self.import_api,
            poll_interval=self.poll_interval,
            attempts=self.job_attempts,
        )

    @classmethod
    def check_options(cls, sync: Sync) -> list[str]:
        problems = super().check_options(sync)
        size = sync.destination.options().get("import_size", MAX_IMPORT_RECORDS)
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or not 1 <= size <= MAX_IMPORT_RECORDS
        ):
            problems.append(
                f"destination.import_size: a whole number from 1 to {MAX_IMPORT_RECORDS} "
                "(records an import)"
            )
        return problems

    @abstractmethod
    def import_bodies(self, table: pa.Table) -> Iterator[tuple[int, int, bytes]]:
        """[start, end) runs of ``table``'s rows, each with the body of one import."""

    @abstractmethod
    def account(self, table: pa.Table, imp: Import, report: dict[str, Any], tally: Tally) -> None:
        """Count the rows of a finished import of ``table``'s rows from its report."""

    def before_import(self, table: pa.Table) -> None:  # noqa: B027 - optional hook
        """Set-up the first batch needs (data fields of the types its values have)."""

    def submit(self, table: pa.Table) -> _InFlight:
        self.before_import(table)
        item = _InFlight(table)
        rows = table["__row"].combine_chunks()
        for start, end, body in self.import_bodies(table):
            imp = Import(body, rows.slice(start, end - start))
            self.imports.submit(imp)
            item.imports.append(imp)
        return item

    def complete(self, item: _InFlight, tally: Tally) -> None:
        for imp in item.imports:
            self.account(item.table, imp, self.imports.wait(imp), tally)

    def close(self) -> None:
        self.client.close()

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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reverse_etl.config import Sync
from reverse_etl.destinations.base import Destination, Tally
from reverse_etl.destinations.dotdigital.client import DotdigitalClient
from reverse_etl.destinations.dotdigital.configuration import DotdigitalConnection
from reverse_etl.destinations.dotdigital.imports import Import, ImportApi, ImportQueue, Waits
from reverse_etl.transform.rowerrors import RowError

# Records an import takes. Not published in the specs; 5,000 is the v3 services' own bulk
# maximum (contacts bulk delete, insight deleteRecords) and what the sandbox enforces.
MAX_IMPORT_RECORDS = 5000
MAX_IMPORT_BYTES = 10_000_000


@dataclass
class _InFlight:
    table: pa.Table  # the rows sent
    imports: list[Import] = field(default_factory=list)
    refused: list[RowError] = field(default_factory=list)  # too large to send


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
            waits=Waits(
                poll_first=self.poll_interval,
                poll_max=conn.poll_max_seconds,
                import_timeout=conn.import_timeout_minutes * 60,
                slot_wait=conn.import_slot_wait_minutes * 60,
            ),
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

    def too_large(self, table: pa.Table) -> tuple[pa.Table, list[RowError]]:
        """Rows whose values alone pass what an import takes (``MAX_IMPORT_BYTES``), left out
        as ``value_too_large`` row errors: an import holding one would be refused whole, with
        the other records in it. Counted on the values' bytes (less than their JSON), so a
        row refused here could never be sent; one whose JSON alone passes the limit is caught
        when its import is built (``submit``)."""
        names = [n for n in table.column_names if not n.startswith("__")]
        if not names or table.num_rows == 0:
            return table, []
        size = np.zeros(table.num_rows, dtype=np.int64)
        for name in names:
            column = table[name]
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                size += pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)
        big = size > MAX_IMPORT_BYTES
        if not big.any():
            return table, []
        rows = table.filter(pa.array(big))
        errors = [
            _too_large(row, ident, int(n))
            for row, ident, n in zip(
                rows["__row"].to_pylist(), rows["__id"].to_pylist(), size[big].tolist(), strict=True
            )
        ]
        return table.filter(pa.array(~big)), errors

    def submit(self, table: pa.Table) -> _InFlight:
        self.before_import(table)
        item = _InFlight(table)
        rows = table["__row"].combine_chunks()
        ids = table["__id"].combine_chunks()
        for start, end, body in self.import_bodies(table):
            if end - start == 1 and len(body) > MAX_IMPORT_BYTES:  # alone, and still too large
                item.refused.append(_too_large(rows[start].as_py(), ids[start].as_py(), len(body)))
                continue
            imp = Import(body, rows.slice(start, end - start))
            self.imports.submit(imp)
            item.imports.append(imp)
        return item

    def complete(self, item: _InFlight, tally: Tally) -> None:
        tally.refused(item.refused)
        for imp in item.imports:
            self.account(item.table, imp, self.imports.wait(imp), tally)

    def close(self) -> None:
        self.client.close()


def _too_large(row: int, ident: Any, size: int) -> RowError:
    return RowError(
        row,
        ident,
        "(record)",
        f"{size} bytes",
        "value_too_large",
        f"the record is {size} bytes; a Dotdigital import takes at most {MAX_IMPORT_BYTES}",
    )

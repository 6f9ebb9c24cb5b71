"""Row errors and the error file users download to fix their data.

One CSV row per problem: which row, which identifier (and, to find rows without one, the
row's email and cursor value), which column, the value as the warehouse sent it, a reason
code, a message and how to fix it. Values are converted to text
by ``cell_text`` (Decimals, timestamps, bytes, nested values), never by the csv module's
repr, and every cell that a spreadsheet would run as a formula is neutralised.
"""

from __future__ import annotations

import csv
import math
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import duckdb
import orjson
import pyarrow as pa

from reverse_etl.secrets import scrub

ERROR_FILE_COLUMNS = (
    "sync",
    "run_id",
    "row_number",
    "identifier",
    "email",
    "cursor",
    "column",
    "value",
    "reason",
    "message",
    "how_to_fix",
)

# reason code -> how to fix it; the message says what was wrong with this row.
FIXES: dict[str, str] = {
    "missing_identifier": "Give every row a value in the identifier column, or filter such rows out of the view.",
    "duplicate_identifier": "Make the view return one row per identifier; only the latest row (by cursor) was sent.",
    "missing_cursor": "Give every row a value in the sync's cursor column (named in the message); rows without one can never be picked up incrementally.",
    "invalid_cursor": "Write the cursor as an ISO 8601 timestamp (2025-03-01T10:00:00Z); rows whose cursor cannot be read can never be picked up incrementally.",
    "cursor_in_future": "Fix the cursor value (a placeholder such as 9999-12-31, or a time zone error); the row is read again every run and sent once its cursor is no longer in the future. Raise max_future_skew_minutes if the warehouse's clock runs ahead.",
    "invalid_email": "Fix the address in the warehouse (it must look like name@domain.tld).",
    "missing_email": "Give the row an email address; Dotdigital matches contacts, and the owners of orders, by email.",
    "unknown_order_status": "Add the status to destination.order_status_map with the Dotdigital status it stands for (Pending, Paid, Completed, Cancelled ...).",
    "insight_nested_array": "Insight data refuses an array directly inside an array: flatten the column in the view, or wrap each inner array in a record ({'values': [...]}).",
    "insight_invalid_key": "Rename the field in the view: insight data keys are letters, digits, _ and - (not starting with a digit, at most 255 characters), and a-b beside a_b is refused.",
    "invalid_phone": "Store phone numbers in E.164 (+14155552671) or set default_phone_region for national numbers.",
    "invalid_consent": "Use one of: yes/no, y/n, true/false, 1/0, subscribed/unsubscribed, opt-in/opt-out (or leave empty for no change).",
    "invalid_timestamp": "Store timestamps as ISO 8601 (2025-03-01T10:00:00Z) or as a TIMESTAMP column.",
    "timestamp_too_old": "Timestamps before 1990-01-01 are refused as placeholders; fix or clear the value.",
    "timestamp_in_future": "The timestamp lies in the future; check the source's time zone or clear the value.",
    "invalid_date": "Store dates as YYYY-MM-DD or as a DATE column.",
    "invalid_number": "Store a plain finite number (no currency signs, thousands separators, NaN or Infinity; a whole number for integer fields), or map the column as a string.",
    "number_out_of_range": "The value has more digits than a JSON number keeps exactly: map the column as a string (type: string) or round it in the view.",
    "invalid_boolean": "Use true/false, yes/no or 1/0.",
    "value_too_large": "Shorten the value or stop mapping the column; the destination refuses records this large.",
    "missing_required_field": "Give every row a value in the fields the message names, or filter such rows out of the view; the destination cannot take the record without them.",
    "missing_consent_address": "Email consent needs an email address and SMS consent a phone number: map and fill that column, or leave the consent empty (the subscription is then left as it is).",
    "destination_rejected": "Read the message: the destination refused this record. Fix the data and it is sent again on its next change.",
    "not_sent": "The destination did not acknowledge this record before the run stopped; the next run sends it again.",
}


@dataclass(frozen=True, slots=True)
class RowError:
    row_number: int
    identifier: Any
    column: str
    value: Any
    reason: str
    message: str
    email: Any = None  # where known, what else finds the row: its email and cursor value
    cursor: Any = None


def cell_text(value: Any) -> str:
    """Text for one cell, for any value a warehouse driver can return."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):  # named as a user would type it, so the file shows the culprit
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return str(value)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """Prefix a quote so spreadsheets show the text instead of running it as a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text


class ErrorFileWriter:
    """Collects row errors and writes the error file, ordered by row, when closed.

    Errors arrive in the order the run finds them (the transform's per batch, the
    destination's when it answers), so they are spooled to an on-disk DuckDB table and
    written out sorted by row number (then in the order found): a user reads the file top to
    bottom as they would read the view. The file starts with a UTF-8 byte order mark so Excel
    on Windows shows accented names as they are. Memory stays flat however many rows fail.
    """

    def __init__(self, fh: IO[str], sync: str, run_id: str):
        self._fh = fh
        self.sync = sync
        self.run_id = run_id
        self.by_reason: Counter[str] = Counter()
        self._lock = threading.Lock()  # the transform thread and the load loop both write
        self._dir = tempfile.mkdtemp(prefix="reverse-etl-errors-")
        self._db = duckdb.connect(str(Path(self._dir) / "spool.duckdb"))
        columns = ", ".join(f'"{c}" VARCHAR' for c in ERROR_FILE_COLUMNS)
        self._db.execute(f"CREATE TABLE spool (__row BIGINT, __seq BIGINT, {columns})")
        self._seq = 0
        self._closed = False

    def write(self, errors: Iterable[RowError]) -> None:
        with self._lock:
            self._write(errors)

    def _write(self, errors: Iterable[RowError]) -> None:
        rows: list[list[Any]] = []
        for e in errors:
            self.by_reason[e.reason] += 1
            rows.append(
                [e.row_number, self._seq + len(rows)]
                + [
                    spreadsheet_safe(scrub(cell_text(v)))
                    for v in (
                        self.sync,
                        self.run_id,
                        e.row_number,
                        e.identifier,
                        e.email,
                        e.cursor,
                        e.column,
                        e.value,
                        e.reason,
                        e.message,
                        FIXES.get(e.reason, ""),
                    )
                ]
            )
        if not rows:
            return
        self._seq += len(rows)
        names = ["__row", "__seq", *ERROR_FILE_COLUMNS]
        table = pa.table(
            {
                n: pa.array([r[i] for r in rows], pa.int64() if i < 2 else pa.string())
                for i, n in enumerate(names)
            }
        )
        self._db.register("incoming", table)
        try:
            self._db.execute("INSERT INTO spool SELECT * FROM incoming")
        finally:
            self._db.unregister("incoming")

    def close(self) -> None:
        """Write the file: a byte order mark, the header, every error ordered by row."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._fh.write("\ufeff")
                writer = csv.writer(self._fh)
                writer.writerow(ERROR_FILE_COLUMNS)
                columns = ", ".join(f'"{c}"' for c in ERROR_FILE_COLUMNS)
                reader = self._db.execute(
                    f"SELECT {columns} FROM spool ORDER BY __row NULLS LAST, __seq"
                ).to_arrow_reader(10_000)
                for batch in reader:
                    writer.writerows(zip(*(c.to_pylist() for c in batch.columns), strict=True))
            finally:
                self._db.close()
                shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ErrorFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

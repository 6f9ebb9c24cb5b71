"""Row errors and the error file users download to fix their data.

One CSV row per problem: which row, which identifier (and, to find rows without one, the
row's email and cursor value), which column, the value as the warehouse sent it, a reason
code, a message, how to fix it and the run that first reported the problem (empty for a
note; see ``reverse_etl/problems.py``). Values are converted to text
by ``cell_text`` (Decimals, timestamps, bytes, nested values), never by the csv module's
repr, and every cell that a spreadsheet would run as a formula is neutralised.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import math
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import orjson

from reverse_etl.errors import ReverseEtlError
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
    "first_seen_run",  # the run that first reported this problem (this run's id: a new one)
)

# reason code -> how to fix it, for the codes every destination may report; a destination's
# own codes come with it (its ``reasons.py``). The message says what was wrong with this row.
FIXES: dict[str, str] = {
    "missing_identifier": "Give every row a value in the identifier column, or filter such rows out of the view.",
    "duplicate_identifier": "Make the view return one row per identifier; only the latest row (by cursor) was sent.",
    "missing_cursor": "Give every row a value in the sync's cursor column (named in the message); rows without one can never be picked up incrementally.",
    "malformed_csv_row": "Give the line as many fields as the header: quote a value that holds the delimiter or a line break, and remove a stray delimiter; the rest of the file was checked.",
    "invalid_cursor": "Write the cursor as an ISO 8601 timestamp (2025-03-01T10:00:00Z); rows whose cursor cannot be read can never be picked up incrementally.",
    "cursor_in_future": "Fix the cursor value (a placeholder such as 9999-12-31, or a time zone error); the row is read again every run and sent once its cursor is no longer in the future. Raise max_future_skew_minutes if the warehouse's clock runs ahead.",
    "invalid_email": "Fix the address in the warehouse (it must look like name@domain.tld).",
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
    "parent_missing_gave_up": "The record's parent (an order's contact) never reached the destination after several runs: sync the parent (check it is in its sync's view and was not rejected there), then change the row so it is read again.",
    "destination_rejected": "Read the message: the destination refused this record. Fix the data and it is sent again on its next change.",
    "not_sent": "The destination did not acknowledge this record before the run stopped; the next run sends it again.",
    "kept_unsubscribed": "Nothing to fix: the person opted out at the destination after the consent in the warehouse, so the subscribe was not sent (newest wins). A newer consent (its consented_at after the opt-out) is sent.",
    "unknown_consent_skipped": "Nothing to fix if intended: the row's consent is empty and the sync's unknown_consent is skip, so no contact was made. Fill the consent column, or set unknown_consent: opt_in_unknown to create such contacts with opt-in type unknown.",
    "sms_region_unsupported": "Nothing to fix if the number is right: Klaviyo cannot text this country, so the SMS consent was not sent (the profile was). Check the number's country code if it should be textable.",
    "consent_evidence_incomplete": "Fill the consent's evidence columns (an IP address, an absolute URL, the wording and the user agent) for this row; its subscribe went without a consent record.",
    "kept_subscribed": "Nothing to fix: the person subscribed at the destination after the opt-out in the warehouse, so the unsubscribe was not sent (newest wins). A newer opt-out (its consented_at after that subscribe) is sent.",
}

# row notes, not problems: the row was handled as it should be; they go in the error file, are
# counted in the run record (consent_held), and never make a run exit non-zero
NOTES = frozenset(
    {
        "kept_unsubscribed",
        "kept_subscribed",
        "unknown_consent_skipped",
        "sms_region_unsupported",
        "consent_evidence_incomplete",
    }
)


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


# Excel's most characters in one cell. A longer value (a 140,000-digit phone, a 200 KB event an
# API refused) is cut to fit, saying how long it was: past Python csv's field limit (131,072) the
# file could not even be merged back when the writer closed, and the run lost every error.
CELL_LIMIT = 32_767


def _cell(value: Any) -> str:
    """One cell as the file holds it: text, scrubbed of secrets, safe for spreadsheets, and no
    longer than a spreadsheet cell."""
    return capped(spreadsheet_safe(scrub(cell_text(value))))


def capped(text: str) -> str:
    """``text`` cut to ``CELL_LIMIT`` characters, ending with how long it was."""
    if len(text) <= CELL_LIMIT:
        return text
    note = f"… [{len(text):,} characters; cut to fit a spreadsheet cell]"
    return text[: CELL_LIMIT - len(note)] + note


def spreadsheet_safe(text: str) -> str:
    """Prefix a quote so spreadsheets show the text instead of running it as a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text


class ErrorFileWriter:
    """Collects row errors and writes the error file, ordered by row, when closed.

    Errors arrive in the order the run finds them: the transform's and the screen's a batch at
    a time (in row order), the destination's when it answers, after later batches were read.
    Each ``write`` is sorted and spooled as CSV text on disk: appended to the main spool while
    it continues the row order, else kept as a run of its own. Closing merges the spool and the
    runs by row, one row of each in memory, so memory stays flat however many rows fail. The
    file starts with a UTF-8 byte order mark so Excel on Windows shows accented names as they
    are.
    """

    def __init__(
        self,
        fh: IO[str],
        sync: str,
        run_id: str,
        fixes: Mapping[str, str] | None = None,
        first_seen: Callable[[Sequence[RowError]], Sequence[str]] | None = None,
    ):
        self._fh = fh
        # per error of a write, the run that first reported it (ProblemTracker.first_seen);
        # None (validate): the column stays empty
        self._first_seen = first_seen
        self._fixes = {**FIXES, **(fixes or {})}  # the destination's own codes beside ours
        self.sync = sync
        self.run_id = run_id
        self.by_reason: Counter[str] = Counter()
        self._lock = threading.Lock()  # the transform thread and the load loop both write
        self._dir = Path(tempfile.mkdtemp(prefix="reverse-etl-errors-"))
        self._runs: list[Path] = []  # the main spool first, then one file a run out of order
        self._main = self._open_run()
        self._last = (0, 0)  # the main spool's last (row, seq)
        self._seq = 0
        self._closed = False

    def _open_run(self) -> Any:
        path = self._dir / f"run{len(self._runs)}.csv"
        self._runs.append(path)
        return path.open("w", newline="", encoding="utf-8")

    def write(self, errors: Iterable[RowError]) -> None:
        with self._lock:
            self._write(errors)

    def _write(self, errors: Iterable[RowError]) -> None:
        rows: list[tuple[int, int, list[str]]] = []
        head = [_cell(self.sync), _cell(self.run_id)]
        errors = list(errors)
        seen = self._first_seen(errors) if self._first_seen else [""] * len(errors)
        for e, first in zip(errors, seen, strict=True):
            self.by_reason[e.reason] += 1
            cells = [
                *head,
                str(e.row_number),
                _cell(e.identifier),
                _cell(e.email),
                _cell(e.cursor),
                _cell(e.column),
                _cell(e.value),
                e.reason,
                _cell(e.message),
                self._fixes.get(e.reason, ""),
                _cell(first),
            ]
            rows.append((e.row_number, self._seq, cells))
            self._seq += 1
        if not rows:
            return
        rows.sort(key=lambda r: (r[0], r[1]))
        if (rows[0][0], rows[0][1]) >= self._last:
            fh, self._last = self._main, (rows[-1][0], rows[-1][1])
            csv.writer(fh).writerows([str(r), str(q), *c] for r, q, c in rows)
            return
        with self._open_run() as fh:  # errors for rows already passed: merged on close
            csv.writer(fh).writerows([str(r), str(q), *c] for r, q, c in rows)

    def close(self) -> None:
        """Write the file: a byte order mark, the header, every error ordered by row."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._main.close()
            try:
                self._fh.write("\ufeff")
                writer = csv.writer(self._fh)
                writer.writerow(ERROR_FILE_COLUMNS)
                with contextlib.ExitStack() as stack:
                    runs = [
                        csv.reader(stack.enter_context(p.open(newline="", encoding="utf-8")))
                        for p in self._runs
                    ]
                    merged = (
                        heapq.merge(*runs, key=lambda r: (int(r[0]), int(r[1])))
                        if len(runs) > 1
                        else runs[0]  # every write came in row order: nothing to merge
                    )
                    writer.writerows(r[2:] for r in merged)
            except (OSError, csv.Error, ValueError) as exc:
                # the watermark may already be past these rows: the spooled errors stay on
                # disk for the user instead of going with the temporary folder
                raise ReverseEtlError(
                    f"the error file could not be written ({type(exc).__name__}: {exc}); "
                    f"this run's row errors are kept, sorted in runs, in {self._dir}"
                ) from exc
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ErrorFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

"""The run page's look into an error file: the first rows of each reason, and the whole file
for download, byte for byte (local path or ``s3://``, through ``util.storage``)."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable

from starlette.background import BackgroundTask
from starlette.responses import FileResponse

from reverse_etl.util import storage

SHOWN = ("row_number", "identifier", "column", "value", "message")


def first_rows(
    path: str, reasons: Iterable[str], per_reason: int
) -> dict[str, list[dict[str, str]]]:
    """Up to ``per_reason`` rows of each reason, in file order; stops reading once every
    reason of ``reasons`` (the summary's) has its rows, so a large file is not read whole."""
    out: dict[str, list[dict[str, str]]] = {r: [] for r in reasons}
    wanting = len(out)
    with storage.open_text_for_read(path) as fh:
        for row in csv.DictReader(fh):
            rows = out.setdefault(row.get("reason") or "", [])
            if len(rows) < per_reason:
                rows.append({k: row.get(k) or "" for k in SHOWN})
                if len(rows) == per_reason:
                    wanting -= 1
                    if wanting <= 0:
                        break
    return out


def download(path: str, sync: str, run_id: str) -> FileResponse:
    """The error file as an attachment. An ``s3://`` file is fetched to a temporary file first,
    removed once sent. Raises FileNotFoundError (or StorageError, an OSError) if it is gone."""
    local = storage.local_copy_path(path)
    cleanup = BackgroundTask(os.unlink, local) if storage.is_s3(path) else None
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{sync}-{run_id}-errors.csv")
    return FileResponse(local, media_type="text/csv", filename=name, background=cleanup)

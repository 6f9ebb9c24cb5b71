"""Small builders shared by the unit tests: DuckDB warehouses, project files, a fake destination.

Everything here is plain functions and classes (no fixtures), so a test states what it builds.
"""

from __future__ import annotations

import contextlib
import copy
import socket
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import yaml

from reverse_etl.destinations.base import Destination, LoadBatch, LoadResult, Request
from reverse_etl.destinations.capabilities import Capabilities
from reverse_etl.destinations.klaviyo.profiles import STANDARD_FIELDS as KLAVIYO_FIELDS
from reverse_etl.errors import DestinationError
from reverse_etl.transform.rowerrors import RowError

# A recognisable API key: tests assert it never shows up in output, files or messages.
API_KEY = "pk_test_5ecret_Zq8vXw3N"
API_KEY_ENV = "RETL_TEST_KLAVIYO_KEY"

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

PEOPLE_COLUMNS: dict[str, str] = {
    "email": "VARCHAR",
    "first_name": "VARCHAR",
    "phone": "VARCHAR",
    "email_consent": "VARCHAR",
    "modified_at": "TIMESTAMPTZ",
}


def at(seconds: float) -> datetime:
    """T0 plus ``seconds``: distinct, ordered cursor values."""
    return T0 + timedelta(seconds=seconds)


# --------------------------------------------------------------------------- warehouses


def create_table(
    db: Path | str,
    name: str,
    columns: dict[str, str],
    rows: Sequence[Sequence[Any]],
    *,
    replace: bool = True,
) -> None:
    """Create (or append to, with ``replace=False``) table ``name`` in the DuckDB file ``db``.

    ``columns`` maps column name to DuckDB type; ``rows`` are tuples in that column order.
    The connection is closed on return, so a read-only source can open the file afterwards."""
    names = list(columns)
    data = {n: [row[i] for row in rows] for i, n in enumerate(names)}
    arrays = {}
    for n in names:
        values = data[n]
        if columns[n].upper().startswith("TIMESTAMP") and any(
            isinstance(v, datetime) for v in values
        ):
            arrays[n] = pa.array(values, pa.timestamp("us", tz="UTC"))
        else:
            try:
                arrays[n] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                arrays[n] = pa.array([None if v is None else str(v) for v in values])
    src = pa.table(arrays) if names else pa.table({})
    select = ", ".join(f'CAST(src."{n}" AS {columns[n]}) AS "{n}"' for n in names)
    con = duckdb.connect(str(db))
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("src", src)
        if replace:
            con.execute(f'CREATE OR REPLACE TABLE "{name}" AS SELECT {select} FROM src')
        else:
            con.execute(f'INSERT INTO "{name}" SELECT {select} FROM src')
        con.unregister("src")
    finally:
        con.close()


def execute(db: Path | str, *statements: str) -> None:
    """Run SQL statements against the DuckDB file and close it."""
    con = duckdb.connect(str(db))
    try:
        con.execute("SET TimeZone = 'UTC'")
        for sql in statements:
            con.execute(sql)
    finally:
        con.close()


def person(
    n: int,
    *,
    email: str | None = None,
    first_name: str | None = None,
    phone: str | None = None,
    consent: str | None = "yes",
    modified_at: datetime | None | str = "auto",
) -> tuple[Any, ...]:
    """One ``people`` row in PEOPLE_COLUMNS order; defaults are clean values."""
    return (
        email if email is not None else f"person{n:05d}@example.com",
        first_name if first_name is not None else f"Name{n}",
        phone,
        consent,
        at(n) if modified_at == "auto" else modified_at,
    )


def people_db(root: Path, rows: Sequence[Sequence[Any]], name: str = "warehouse.duckdb") -> Path:
    db = root / name
    create_table(db, "people", PEOPLE_COLUMNS, rows)
    return db


# --------------------------------------------------------------------------- project files


def sync_entry(name: str = "people", **overrides: Any) -> dict[str, Any]:
    """A valid Klaviyo profiles sync over table ``people``; keys in ``overrides`` replace it."""
    entry: dict[str, Any] = {
        "name": name,
        "source": {"connection": "warehouse", "table": "people"},
        "object": "profiles",
        "identifier": "email",
        "cursor": "modified_at",
        "destination": {"connection": "klaviyo"},
        "mapping": {"email": "email", "first_name": "first_name", "phone": "phone_number"},
        "consent": {"email": "email_consent"},
        "default_phone_region": "US",
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


def project_data(
    *,
    syncs: list[dict[str, Any]] | None = None,
    warehouse: str = "warehouse.duckdb",
    error_dir: str = "errors",
    state_url: str = "sqlite:///state/state.db",
    **top: Any,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "connections": {
            "warehouse": {"type": "duckdb", "path": warehouse},
            "klaviyo": {
                "type": "klaviyo",
                "api_key": "{{ env_var('" + API_KEY_ENV + "', '" + API_KEY + "') }}",
            },
        },
        "state": {"url": state_url},
        "error_dir": error_dir,
        "syncs": syncs if syncs is not None else [sync_entry()],
    }
    data.update(top)
    return data


def write_project(root: Path, data: dict[str, Any] | str | None = None, **kwargs: Any) -> Path:
    """Write ``root/profiles/profiles.yml`` (a mapping is dumped as YAML, text as is)."""
    path = root / "profiles" / "profiles.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = project_data(**kwargs)
    text = data if isinstance(data, str) else yaml.safe_dump(copy.deepcopy(data), sort_keys=False)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- fake destination


class FakeDestination(Destination):
    """An in-memory Klaviyo stand-in.

    ``received`` holds every row ``load`` was handed (a list of dicts, one per row, keys as the
    destination fields plus ``__row``/``__id``), across runs when the same instance is reused.
    ``fail_on_batch=N`` raises DestinationError on the Nth batch of a run: with
    ``record_failed_batch`` the rows are recorded first (sent, but never acknowledged).
    With ``drain_on_failure`` the failing call first pulls every remaining batch, as a
    destination with requests in flight does, so the engine's read-ahead has finished by the
    time the error propagates. ``reject_ids`` are reported as failed by the destination
    (LoadResult.failed + errors). ``lag=N`` acknowledges batch k only after it has pulled
    batch k+N (as a destination with N requests in flight does), so an engine that commits a
    batch before its result, or matches results to the wrong batch, loses rows in the tests;
    ``swap_results`` hands back the results of the first two batches in the wrong order."""

    type = "klaviyo"
    capabilities = Capabilities(label="fake profiles", standard_fields=KLAVIYO_FIELDS)

    def __init__(
        self,
        *,
        fail_on_batch: int | None = None,
        record_failed_batch: bool = True,
        drain_on_failure: bool = True,
        reject_ids: Sequence[str] = (),
        lag: int = 0,
        swap_results: bool = False,
    ):
        self.lag = lag
        self.swap_results = swap_results
        self.fail_on_batch = fail_on_batch
        self.record_failed_batch = record_failed_batch
        self.drain_on_failure = drain_on_failure
        self.reject_ids = set(reject_ids)
        self.received: list[dict[str, Any]] = []
        self.batches: list[int] = []  # rows per batch handed to load, across runs
        self.store: dict[Any, dict[str, Any]] = {}  # accepted profiles by identifier
        self.prepared = 0
        self.closed = 0
        self.requests_built = 0

    def requests(self, table: pa.Table) -> Iterator[Request]:
        self.requests_built += 1
        rows = [{k: v for k, v in r.items() if k != "__row"} for r in table.to_pylist()]
        if rows:
            yield Request("POST", "/fake/profiles", orjson.dumps(rows, default=str), len(rows))

    def prepare(self) -> None:
        self.prepared += 1

    # ``load`` is replaced whole, to misbehave on purpose; the pipeline's steps are unused
    submit = complete = None  # type: ignore[assignment]

    def load(self, batches: Iterator[LoadBatch]) -> Iterator[LoadResult]:  # type: ignore[misc]
        held: list[LoadResult] = []  # accepted, not yet acknowledged
        for result in self._accept(batches):
            held.append(result)
            if self.swap_results and len(held) == 2:
                held.reverse()
                self.swap_results = False
            while len(held) > self.lag:
                yield held.pop(0)
        yield from held

    def _accept(self, batches: Iterator[LoadBatch]) -> Iterator[LoadResult]:
        for n, batch in enumerate(batches, start=1):
            rows = batch.table.to_pylist()
            if n == self.fail_on_batch:
                if self.record_failed_batch:
                    self.received.extend(rows)
                    self.batches.append(len(rows))
                if self.drain_on_failure:
                    for _ in batches:
                        pass
                raise DestinationError(f"fake API gave up on batch {n}")
            self.received.extend(rows)
            self.batches.append(len(rows))
            result = LoadResult(token=batch.token)
            for r in rows:
                if r["__id"] in self.reject_ids:
                    result.failed += 1
                    result.errors.append(
                        RowError(
                            r["__row"],
                            r["__id"],
                            "(profile)",
                            r["__id"],
                            "destination_rejected",
                            "Fake: this profile is refused",
                        )
                    )
                elif r["__id"] in self.store:
                    result.updated += 1
                    self.store[r["__id"]] = r
                else:
                    result.created += 1
                    self.store[r["__id"]] = r
            yield result

    def close(self) -> None:
        self.closed += 1

    def received_ids(self) -> list[Any]:
        return [r["__id"] for r in self.received]


# --------------------------------------------------------------------------- misc


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_csv_rows(path: Path | str) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))

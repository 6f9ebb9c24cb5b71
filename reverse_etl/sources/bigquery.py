"""BigQuery through ``google-cloud-bigquery``: query result pages as Arrow record batches.

Statements use named parameters ``@name``, bound as typed ``ScalarQueryParameter``s: bool ->
BOOL, int -> INT64, float -> FLOAT64, Decimal -> NUMERIC (BIGNUMERIC when it needs more than 9
decimals or 29 integer digits), aware datetime -> TIMESTAMP, naive datetime -> DATETIME (BigQuery
does not compare TIMESTAMP with DATETIME: bind what the column holds, i.e. what ``stream``
returned for it), date -> DATE, str -> STRING, bytes -> BYTES, None -> NULL STRING. A
``ScalarQueryParameter``/``ArrayQueryParameter`` passed as a value is used as it is.

Rows come page by page (``page_size`` = the batch size) over the REST API; the Storage Read API
is not used. Arrow types: STRING -> string, INT64 -> int64, NUMERIC -> decimal128(38,9),
BIGNUMERIC -> decimal256(76,38), TIMESTAMP -> timestamp[us, UTC], DATETIME -> timestamp[us],
DATE -> date32, BOOL -> bool, JSON -> string, RECORD -> struct, REPEATED -> list.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import io
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import GoogleAPIError
from google.auth.credentials import AnonymousCredentials, Credentials
from google.auth.exceptions import GoogleAuthError
from google.cloud import bigquery
from google.cloud.bigquery import _pandas_helpers

from reverse_etl.sources.base import (
    Dialect,
    Source,
    SourceError,
    column_kind,
    probe_sql,
    rebatch,
    utc_schema,
)

DIALECT = Dialect(name="bigquery", param_style="at", string_type="STRING")

_BQ_TYPES = {"string": "STRING", "timestamp": "TIMESTAMP"}
_ERRORS = (GoogleAPIError, GoogleAuthError, concurrent.futures.TimeoutError)


class BigQuerySource(Source):
    dialect = DIALECT

    def __init__(
        self,
        project: str,
        *,
        location: str | None = None,
        api_endpoint: str | None = None,
        credentials: Credentials | None = None,
    ):
        """``api_endpoint`` (an emulator, e.g. ``http://127.0.0.1:9050``) without
        ``credentials`` connects anonymously; otherwise missing credentials are looked up the
        usual way (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud, metadata server)."""
        self._where = f"BigQuery project {project!r}" + (
            f" at {api_endpoint}" if api_endpoint else ""
        )
        if api_endpoint and credentials is None:
            credentials = AnonymousCredentials()
        try:
            self._client = bigquery.Client(
                project=project,
                location=location,
                credentials=credentials,
                client_options=ClientOptions(api_endpoint=api_endpoint) if api_endpoint else None,
            )
        except _ERRORS as exc:
            raise SourceError(f"cannot open {self._where}: {exc}") from None

    def schema(self, sql: str) -> pa.Schema:
        config = bigquery.QueryJobConfig(dry_run=True, use_query_cache=False)
        try:  # a dry run validates and types the query without running it
            job = self._client.query(probe_sql(sql), job_config=config)
        except _ERRORS as exc:
            raise self._error(exc) from None
        fields = job.schema or []
        arrow = _pandas_helpers.bq_to_arrow_schema(fields)
        if arrow is None:
            raise SourceError(
                f"{self._where}: cannot map the view's columns {[f.name for f in fields]} to "
                "Arrow types"
            )
        return utc_schema(arrow)

    def stream(
        self, sql: str, params: Mapping[str, Any], batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        config = bigquery.QueryJobConfig(
            query_parameters=[query_parameter(name, value) for name, value in params.items()]
        )
        try:
            job = self._client.query(sql, job_config=config)
            rows = job.result(page_size=batch_size)
            batches = iter(rows.to_arrow_iterable(bqstorage_client=None))
        except _ERRORS as exc:
            raise self._error(exc) from None
        yield from rebatch(self._pages(batches), batch_size)

    def _pages(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except _ERRORS as exc:
                raise self._error(exc) from None
            yield batch

    def replace_table(self, name: Sequence[str], rows: pa.Table) -> None:
        """One load job of newline-delimited JSON with ``WRITE_TRUNCATE``: BigQuery swaps the
        table's contents whole when the job succeeds (the dataset is created if missing).
        ``name`` must be ``[dataset, table]``."""
        if len(name) != 2:
            raise SourceError(f"{self._where}: name the table as dataset.table, not {name[0]!r}")
        dataset, table = name
        schema = [bigquery.SchemaField(f.name, _BQ_TYPES[column_kind(f.type)]) for f in rows.schema]
        lines = b"".join(
            orjson.dumps(dict(zip(rows.column_names, r, strict=True))) + b"\n"
            for r in zip(*(c.to_pylist() for c in rows.columns), strict=True)
        )
        config = bigquery.LoadJobConfig(
            schema=schema,
            source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON,
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
        )
        try:
            self._client.create_dataset(dataset, exists_ok=True)
            ref = f"{self._client.project}.{dataset}.{table}"
            job = self._client.load_table_from_file(io.BytesIO(lines), ref, job_config=config)
            job.result()
        except _ERRORS as exc:
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise SourceError(
                f"{self._where} cannot write the table {dataset}.{table}: {message}"
            ) from None

    def close(self) -> None:
        self._client.close()

    def _error(self, exc: BaseException) -> SourceError:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        return SourceError(f"{self._where} could not run the sync's SQL: {message}")


def query_parameter(
    name: str, value: Any
) -> bigquery.ScalarQueryParameter | bigquery.ArrayQueryParameter:
    """A typed BigQuery query parameter for a Python value (see the module docstring)."""
    if isinstance(value, bigquery.ScalarQueryParameter):
        return bigquery.ScalarQueryParameter(name, value.type_, value.value)
    if isinstance(value, bigquery.ArrayQueryParameter):
        return bigquery.ArrayQueryParameter(name, value.array_type, value.values)
    if value is None:
        kind = "STRING"
    elif isinstance(value, bool):
        kind = "BOOL"
    elif isinstance(value, int):
        kind = "INT64"
    elif isinstance(value, float):
        kind = "FLOAT64"
    elif isinstance(value, Decimal):
        kind = "NUMERIC" if _fits_numeric(value) else "BIGNUMERIC"
    elif isinstance(value, dt.datetime):
        kind = "DATETIME" if value.tzinfo is None else "TIMESTAMP"
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
    elif isinstance(value, dt.date):
        kind = "DATE"
    elif isinstance(value, str):
        kind = "STRING"
    elif isinstance(value, bytes):
        kind = "BYTES"
    else:
        raise SourceError(
            f"cannot bind parameter {name!r}: no BigQuery type for {type(value).__name__}"
        )
    return bigquery.ScalarQueryParameter(name, kind, value)


def _fits_numeric(value: Decimal) -> bool:
    if not value.is_finite():
        return False
    sign, digits, exponent = value.normalize().as_tuple()
    assert isinstance(exponent, int)
    decimals = max(0, -exponent)
    integer_digits = max(0, len(digits) + exponent)
    return decimals <= 9 and integer_digits <= 29

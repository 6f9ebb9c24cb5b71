"""Warehouse sources: one module per warehouse, opened from a connection profile."""

from __future__ import annotations

from reverse_etl.config import (
    BigQueryConnection,
    DuckDBConnection,
    PostgresConnection,
    Project,
    SnowflakeConnection,
    WarehouseConnection,
)
from reverse_etl.extras import requires
from reverse_etl.sources.base import Source, SourceError

__all__ = ["Source", "SourceError", "open_source"]


def open_source(conn: WarehouseConnection, project: Project, *, writable: bool = False) -> Source:
    """Open a source; drivers are imported only for the warehouse in use, and a missing one
    names the extra that installs it (``MissingExtra``, a ``ReverseEtlError``). ``writable``:
    a DuckDB file is opened for writing too (it holds the sync's snapshot), not read-only."""
    if isinstance(conn, DuckDBConnection):
        from reverse_etl.sources.duckdb import DuckDBSource

        # the warehouse's share of the budget unless its profile sets its own
        return DuckDBSource(
            project.path(conn.path),
            memory_limit=conn.memory_limit,
            threads=conn.threads,
            read_only=not writable,
        )
    if isinstance(conn, PostgresConnection):
        with requires("postgres", "the postgres source"):
            from reverse_etl.sources.postgres import PostgresSource

        return PostgresSource(conn.dsn())
    if isinstance(conn, SnowflakeConnection):
        with requires("snowflake", "the snowflake source"):
            from reverse_etl.sources.snowflake import SnowflakeSource

        kwargs = {
            "account": conn.account,
            "user": conn.user,
            "database": conn.database,
            "schema": conn.schema_,
            "warehouse": conn.warehouse,
            "role": conn.role,
            "host": conn.host,
            "port": conn.port,
            "protocol": conn.protocol,
        }
        if conn.password is not None:
            kwargs["password"] = conn.password.get_secret_value()
        if conn.private_key_file:
            kwargs["authenticator"] = "SNOWFLAKE_JWT"
            kwargs["private_key_file"] = str(project.path(conn.private_key_file))
        return SnowflakeSource(**{k: v for k, v in kwargs.items() if v is not None})
    if isinstance(conn, BigQueryConnection):
        with requires("bigquery", "the bigquery source"):
            from reverse_etl.sources.bigquery import BigQuerySource

        credentials = None
        if conn.credentials_file:
            with requires("bigquery", "the bigquery source"):
                from google.oauth2 import service_account

            credentials = service_account.Credentials.from_service_account_file(
                str(project.path(conn.credentials_file))
            )
        return BigQuerySource(
            conn.project,
            location=conn.location,
            api_endpoint=conn.api_endpoint,
            credentials=credentials,
        )
    raise SourceError(f"no source for connection type {conn.type!r}")

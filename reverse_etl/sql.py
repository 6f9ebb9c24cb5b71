"""Quoting for the SQL the engine writes (DuckDB, PostgreSQL and Snowflake share these rules;
BigQuery's identifiers are quoted by its source's dialect)."""

from __future__ import annotations


def ident(name: str) -> str:
    """A double-quoted identifier: any column name, quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A single-quoted string literal, quotes doubled."""
    return "'" + text.replace("'", "''") + "'"

"""Optional extras: what each one installs, and the message when one is missing.

The core install (``pip install reverse-etl``) syncs a DuckDB warehouse; every other warehouse,
S3 error files and the sandbox APIs are extras. Their libraries are imported only where they
are used, inside :func:`requires`, so that a missing one names the extra to install instead of
ending in a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

from reverse_etl.errors import ConfigError, ReverseEtlError

#: The top-level modules each extra brings (what an ImportError is matched against).
EXTRA_MODULES: dict[str, frozenset[str]] = {
    "postgres": frozenset({"psycopg", "adbc_driver_postgresql", "adbc_driver_manager"}),
    "snowflake": frozenset({"snowflake", "pandas"}),
    "bigquery": frozenset({"google"}),
    "s3": frozenset({"boto3", "botocore", "s3transfer"}),
    "sandbox": frozenset(
        {"starlette", "uvicorn", "openapi_core", "jsonschema_rs", "jsonschema", "werkzeug"}
    ),
    "ui": frozenset({"jinja2", "markupsafe", "starlette", "uvicorn"}),
}


class MissingExtra(ReverseEtlError):
    """A feature was used whose optional libraries are not installed."""

    def __init__(self, extra: str, feature: str, module: str | None = None):
        self.extra = extra
        self.feature = feature
        self.module = module
        missing = f" ({module} is not installed)" if module else ""
        super().__init__(
            f"{feature} needs the {extra} extra: pip install 'reverse-etl[{extra}]'{missing}"
        )


@contextmanager
def requires(extra: str, feature: str) -> Iterator[None]:
    """Turn the ImportError of one of ``extra``'s libraries into :class:`MissingExtra`.

    Import errors of any other module (a bug, a broken install) pass through unchanged.
    """
    try:
        yield
    except ImportError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in EXTRA_MODULES[extra]:
            raise
        raise MissingExtra(extra, feature, exc.name) from exc


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        return False


def check_state_url(url: str) -> None:
    """A PostgreSQL state store needs psycopg (the ``postgres`` extra); say so up front.

    ``postgresql://`` without a driver is SQLAlchemy's psycopg2, which no extra installs: name
    the URL that works with the extra instead.
    """
    scheme = url.partition(":")[0].lower()
    if scheme not in {"postgresql", "postgresql+psycopg"}:  # postgres:// is refused before
        return
    module = "psycopg" if scheme == "postgresql+psycopg" else "psycopg2"
    if installed(module):
        return
    if module == "psycopg":
        raise MissingExtra("postgres", "the PostgreSQL state store", "psycopg")
    raise ConfigError(
        f"state url {scheme}://...: use postgresql+psycopg://... (the driver the postgres "
        "extra installs: pip install 'reverse-etl[postgres]')"
    )

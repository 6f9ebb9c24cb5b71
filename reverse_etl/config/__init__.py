"""The project file: connections (warehouses, destinations) and syncs, as pydantic models
(``models``), read and checked by ``loading``.

Loading is strict: an unknown key, a missing env var, a sync naming a connection that does
not exist, or a column mapped twice is an error whose message names the file, the key path,
the bad value and what would be valid. Relative paths resolve against the project directory.
A missing env var for a destination connection's key (an API key) can be deferred
(``load_project(defer_secrets=True)``, as the command line loads): commands that never call the
API work without it, and ``require_env`` names it before one that does.
"""

from reverse_etl.config.loading import format_validation_error, load_project, require_env
from reverse_etl.config.models import (
    CONNECTION_MODELS,
    DEFAULT_CONFIG,
    DESTINATION_TYPES,
    FIELD_TYPES,
    WAREHOUSE_TYPES,
    BigQueryConnection,
    Connection,
    ConsentColumn,
    ConsentSpec,
    DestinationSpec,
    DuckDBConnection,
    FieldMapping,
    PostgresConnection,
    Project,
    SnowflakeConnection,
    SourceSpec,
    StateSpec,
    Sync,
    WarehouseConnection,
)
from reverse_etl.destinations.configuration import DestinationConnection
from reverse_etl.strict import Strict

__all__ = [
    "CONNECTION_MODELS",
    "DEFAULT_CONFIG",
    "DESTINATION_TYPES",
    "FIELD_TYPES",
    "WAREHOUSE_TYPES",
    "BigQueryConnection",
    "Connection",
    "ConsentColumn",
    "ConsentSpec",
    "DestinationConnection",
    "DestinationSpec",
    "DuckDBConnection",
    "FieldMapping",
    "PostgresConnection",
    "Project",
    "SnowflakeConnection",
    "SourceSpec",
    "StateSpec",
    "Strict",
    "Sync",
    "WarehouseConnection",
    "format_validation_error",
    "load_project",
    "require_env",
]

"""The project file: connections (warehouses, destinations) and syncs, as pydantic models
(``models``), read and checked by ``loading``.

Loading is strict: an unknown key, a missing env var, a sync naming a connection that does
not exist, or a column mapped twice is an error whose message names the file, the key path,
the bad value and what would be valid. Relative paths resolve against the project directory.
"""

from reverse_etl.config.loading import format_validation_error, load_project
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
]

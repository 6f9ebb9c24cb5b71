"""The project file: connections (warehouses, destinations) and syncs, as pydantic models.

Loading is strict: an unknown key, a missing env var, a sync naming a connection that does
not exist, or a column mapped twice is an error whose message names the file, the key path,
the bad value and what would be valid. Relative paths resolve against the project directory.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from reverse_etl.errors import ConfigError
from reverse_etl.schedule import Schedule, parse_schedule
from reverse_etl.secrets import register_secret, render_tree, scrub

DEFAULT_CONFIG = Path("profiles/profiles.yml")
FIELD_TYPES = (
    "string",
    "number",
    "integer",
    "boolean",
    "date",
    "datetime",
    "email",
    "phone",
    "json",
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- connections


class DuckDBConnection(Strict):
    type: Literal["duckdb"]
    path: str
    memory_limit: str = "256MB"  # large sorts spill to disk beyond it: memory stays flat
    threads: Annotated[int, Field(ge=1, le=64)] = 2


class PostgresConnection(Strict):
    type: Literal["postgres"]
    host: str = "127.0.0.1"
    port: int = 5432
    user: str
    password: SecretStr = SecretStr("")
    dbname: str

    def dsn(self) -> str:
        pw = self.password.get_secret_value()
        auth = f"{self.user}:{pw}" if pw else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.dbname}"


class SnowflakeConnection(Strict):
    type: Literal["snowflake"]
    account: str
    user: str
    password: SecretStr | None = None
    private_key_file: str | None = None
    database: str
    schema_: str = Field(alias="schema")
    warehouse: str | None = None
    role: str | None = None
    host: str | None = None  # set for an emulator (fakesnow) or a private link
    port: int | None = None
    protocol: Literal["https", "http"] = "https"


class BigQueryConnection(Strict):
    type: Literal["bigquery"]
    project: str
    location: str | None = None
    credentials_file: str | None = None
    api_endpoint: str | None = None  # set for the emulator


class KlaviyoConnection(Strict):
    type: Literal["klaviyo"]
    api_key: SecretStr
    base_url: str = "https://a.klaviyo.com"
    revision: str = "2026-07-15"


class DotdigitalConnection(Strict):
    type: Literal["dotdigital"]
    username: str
    password: SecretStr
    region: Literal["r1", "r2", "r3"] = "r1"
    base_url: str | None = None  # defaults to https://{region}-api.dotdigital.com

    def url(self) -> str:
        return (self.base_url or f"https://{self.region}-api.dotdigital.com").rstrip("/")


WarehouseConnection = (
    DuckDBConnection | PostgresConnection | SnowflakeConnection | BigQueryConnection
)
DestinationConnection = KlaviyoConnection | DotdigitalConnection
Connection = Annotated[
    DuckDBConnection
    | PostgresConnection
    | SnowflakeConnection
    | BigQueryConnection
    | KlaviyoConnection
    | DotdigitalConnection,
    Field(discriminator="type"),
]
WAREHOUSE_TYPES = ("duckdb", "postgres", "snowflake", "bigquery")
DESTINATION_TYPES = ("klaviyo", "dotdigital")


# --------------------------------------------------------------------------- syncs


class FieldMapping(Strict):
    """A column's destination field, with the type to coerce and validate it as."""

    field: str
    type: Literal[FIELD_TYPES] | None = None  # type: ignore[valid-type]


class ConsentColumn(Strict):
    column: str
    consented_at: str | None = None  # column holding when consent was given


class ConsentSpec(Strict):
    email: ConsentColumn | None = None
    sms: ConsentColumn | None = None

    @field_validator("email", "sms", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return {"column": value} if isinstance(value, str) else value

    def columns(self) -> dict[str, ConsentColumn]:
        return {ch: c for ch, c in (("email", self.email), ("sms", self.sms)) if c is not None}


class SourceSpec(Strict):
    connection: str
    sql: str | None = None  # path to a .sql file holding one SELECT
    table: str | None = None  # or a table / view name

    @model_validator(mode="after")
    def _one_of(self) -> SourceSpec:
        if (self.sql is None) == (self.table is None):
            raise ValueError("give exactly one of `sql` (path to a .sql file) or `table`")
        return self


class DestinationSpec(BaseModel):
    """Common destination keys; destination-specific options are checked by the destination."""

    model_config = ConfigDict(extra="allow", frozen=True)
    connection: str
    list: str | None = None

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Sync(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")]
    source: SourceSpec
    object: Literal["profiles", "orders", "catalog"]
    identifier: str
    cursor: str = "modified_at"
    destination: DestinationSpec
    mapping: dict[str, str | FieldMapping]
    consent: ConsentSpec = ConsentSpec()
    schedule: Schedule | None = None
    enabled: bool = True
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 20_000
    lookback_minutes: Annotated[int, Field(ge=0, le=60 * 24 * 31)] = 0
    null_values: Literal["skip", "clear"] = "skip"
    default_phone_region: str | None = None  # ISO country for national numbers, e.g. US
    phone_region_column: str | None = None  # or a column with each row's ISO country
    # fast: E.164 shape and a possible length for the country, vectorised; strict: every
    # number through phonenumbers' full validation (tens of microseconds a number)
    phone_validation: Literal["fast", "strict"] = "fast"
    naive_timezone: str = "UTC"
    max_future_skew_minutes: Annotated[int, Field(ge=0)] = 10

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> Any:
        return parse_schedule(value) if isinstance(value, str | dict) else value

    @field_validator("mapping")
    @classmethod
    def _mapping(cls, value: dict[str, str | FieldMapping]) -> dict[str, str | FieldMapping]:
        if not value:
            raise ValueError("map at least one column, e.g. {email: email}")
        seen: dict[str, str] = {}
        for column, target in value.items():
            field = target if isinstance(target, str) else target.field
            if not field:
                raise ValueError(f"column {column!r} maps to an empty field name")
            if field in seen:
                raise ValueError(
                    f"columns {seen[field]!r} and {column!r} both map to field {field!r}; "
                    "each field takes one column"
                )
            seen[field] = column
        return value

    def fields(self) -> dict[str, FieldMapping]:
        """Column → FieldMapping, with the short ``column: field`` form expanded."""
        return {
            col: (FieldMapping(field=t) if isinstance(t, str) else t)
            for col, t in self.mapping.items()
        }


class StateSpec(Strict):
    url: str = "sqlite:///.reverse_etl/state.db"


class Project(Strict):
    connections: dict[str, Connection]
    syncs: list[Sync] = []
    state: StateSpec = StateSpec()
    error_dir: str = ".reverse_etl/errors"
    # resolved at load time, not read from YAML
    root: Path = Field(default=Path("."), exclude=True)
    file: Path = Field(default=DEFAULT_CONFIG, exclude=True)

    @model_validator(mode="after")
    def _cross_checks(self) -> Project:
        names: set[str] = set()
        for i, sync in enumerate(self.syncs):
            if sync.name in names:
                raise _at(f"syncs[{i}].name", f"duplicate sync name {sync.name!r}")
            names.add(sync.name)
            _check_ref(
                self, f"syncs[{i}].source.connection", sync.source.connection, WAREHOUSE_TYPES
            )
            _check_ref(
                self,
                f"syncs[{i}].destination.connection",
                sync.destination.connection,
                DESTINATION_TYPES,
            )
        return self

    def sync(self, name: str) -> Sync:
        for sync in self.syncs:
            if sync.name == name:
                return sync
        known = [s.name for s in self.syncs]
        hint = difflib.get_close_matches(name, known, n=1)
        raise ConfigError(
            f"{self.file}: no sync named {name!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" Known syncs: {', '.join(known) or '(none)'}"
        )

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.root / p

    def source_sql(self, sync: Sync) -> str:
        """The SELECT the sync reads, from its .sql file or its table name."""
        if sync.source.table:
            return f"SELECT * FROM {sync.source.table}"
        path = self.path(sync.source.sql or "")
        try:
            sql = path.read_text()
        except OSError as exc:
            raise ConfigError(
                f"{self.file}: sync {sync.name!r} source.sql: cannot read {path}: {exc.strerror}"
            ) from None
        sql = re.sub(r";\s*$", "", sql.strip())
        if not sql:
            raise ConfigError(f"{self.file}: sync {sync.name!r}: {path} is empty; write one SELECT")
        return sql


class _RefError(ValueError):
    def __init__(self, loc: str, message: str):
        super().__init__(message)
        self.loc = loc


def _at(loc: str, message: str) -> _RefError:
    return _RefError(loc, message)


def _check_ref(project: Project, loc: str, name: str, types: tuple[str, ...]) -> None:
    conn = project.connections.get(name)
    if conn is None:
        candidates = [n for n, c in project.connections.items() if c.type in types]
        hint = difflib.get_close_matches(name, candidates, n=1)
        raise _at(
            loc,
            f"no connection named {name!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" Connections of type {'/'.join(types)}: {', '.join(candidates) or '(none)'}",
        )
    if conn.type not in types:
        raise _at(
            loc, f"connection {name!r} is a {conn.type}; this key needs one of {', '.join(types)}"
        )


# --------------------------------------------------------------------------- loading


def load_project(
    file: str | Path | None = None,
    root: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> Project:
    """Read, render and validate the project file; every failure is a ConfigError."""
    root = Path(root) if root else Path.cwd()
    file = Path(file) if file else root / DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{file}: file not found; pass --config or create profiles/profiles.yml "
            "(see README.md, 'Configuration')"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{file}: the top level must be a mapping with `connections:` and `syncs:`"
        )
    try:
        rendered = render_tree(raw, env)
    except KeyError as exc:
        path, name = exc.args[0]
        raise ConfigError(
            f"{file}: {path}: environment variable {name!r} is not set; export it, or give a "
            f"default: {{{{ env_var('{name}', 'value') }}}}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    try:
        project = Project.model_validate({**rendered, "root": root, "file": file})
    except ValidationError as exc:
        raise ConfigError(scrub(format_validation_error(file, exc, rendered))) from None
    for conn in project.connections.values():
        for value in conn.__dict__.values():
            if isinstance(value, SecretStr):
                register_secret(value.get_secret_value())
    _check_destination_options(project)
    return project


def _check_destination_options(project: Project) -> None:
    from reverse_etl.destinations.registry import UnsupportedObject, destination_for

    for i, sync in enumerate(project.syncs):
        conn = project.connections[sync.destination.connection]
        try:
            problems = destination_for(conn.type, sync.object).check_sync(sync)
        except UnsupportedObject as exc:
            problems = [str(exc)]
        if problems:
            raise ConfigError(
                "\n".join(f"{project.file}: syncs[{i}] ({sync.name}): {p}" for p in problems)
            )


_MODELS_BY_KEY: dict[str, type[BaseModel]] = {
    "source": SourceSpec,
    "consent": ConsentSpec,
    "state": StateSpec,
    "email": ConsentColumn,
    "sms": ConsentColumn,
}
_TYPE_TAGS = set(WAREHOUSE_TYPES + DESTINATION_TYPES)


def format_validation_error(file: Path, exc: ValidationError, data: Any) -> str:
    lines = [f"{file}: {exc.error_count()} problem(s):"]
    seen: set[str] = set()
    for err in exc.errors():
        loc = _loc_path(err["loc"])
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _RefError):
            lines.append(f"  {ctx_error.loc}: {ctx_error}")
            continue
        kind = err["type"]
        value = err.get("input")
        if _mapping_branch(err["loc"]) == "str" and isinstance(value, dict):
            continue  # the long form was meant; its own errors say what is wrong
        if kind == "extra_forbidden":
            key = err["loc"][-1]
            valid = _valid_keys(err["loc"])
            hint = difflib.get_close_matches(str(key), valid, n=1)
            line = (
                f"  {loc}: unknown key {key!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + (f" Valid keys: {', '.join(valid)}" if valid else "")
            )
        else:
            # Only scalars are echoed: a whole mapping may hold a secret.
            hidden = kind == "missing" or isinstance(value, dict | list)
            shown = "" if hidden else f" (got {_short(value)})"
            line = f"  {loc}: {err['msg'].removeprefix('Value error, ')}{shown}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def _mapping_branch(loc: tuple[Any, ...]) -> str | None:
    """Mapping values are ``str | FieldMapping``: pydantic names the branch after the column."""
    for i in range(2, len(loc) - 1):
        if loc[i - 1] == "mapping" and loc[0] == "syncs":
            branch = loc[i + 1]
            return "str" if str(branch).startswith("str") else str(branch)
    return None


def _loc_path(loc: tuple[Any, ...]) -> str:
    """The key path as the user wrote it, without pydantic's union-branch tags."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        conn_tag = i == 2 and loc[0] == "connections" and part in _TYPE_TAGS
        mapping_tag = (
            i >= 4 and loc[i - 2] == "mapping" and str(part).startswith(("str", "FieldMapping"))
        )
        if conn_tag or mapping_tag or str(part).startswith("function-"):
            continue
        out += f".{part}" if out else str(part)
    return out or "(top level)"


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    parents = [p for p in loc[:-1] if isinstance(p, str)]
    model: type[BaseModel] = Project
    if parents and parents[0] == "syncs":
        model = Sync
    if parents and parents[0] == "state":
        model = StateSpec
    if parents and parents[0] == "connections":
        tag = loc[2] if len(loc) > 3 and loc[2] in _TYPE_TAGS else None
        model = {
            "duckdb": DuckDBConnection,
            "postgres": PostgresConnection,
            "snowflake": SnowflakeConnection,
            "bigquery": BigQueryConnection,
            "klaviyo": KlaviyoConnection,
            "dotdigital": DotdigitalConnection,
        }.get(tag or "", Project)
    elif "mapping" in parents:
        model = FieldMapping
    else:
        for part in parents[1:]:
            if part in _MODELS_BY_KEY:
                model = _MODELS_BY_KEY[part]
    return sorted(
        (f.alias or name) for name, f in model.model_fields.items() if name not in {"root", "file"}
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

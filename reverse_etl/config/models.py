"""The project file's models: connections (warehouses, destinations) and syncs.

Destination connection models live in each destination's ``configuration.py`` and are found
through the registry; the union pydantic discriminates on ``type`` is built from it.
"""

from __future__ import annotations

import codecs
import difflib
import functools
import ipaddress
import operator
import re
import zoneinfo
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from reverse_etl.destinations import registry
from reverse_etl.destinations.configuration import DestinationConnection
from reverse_etl.errors import ConfigError
from reverse_etl.schedule import Schedule, parse_schedule
from reverse_etl.strict import Strict

# the constant column a cursorless mirror sync's view gets, to order and read it like any other
NO_CURSOR = "retl_no_cursor"
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


# --------------------------------------------------------------------------- files


class NotUtf8Error(ValueError):
    """A file the project reads is not UTF-8 text; the message says where and what to do."""


def read_text_file(path: Path) -> str:
    """``path``'s text as ``Path.read_text`` reads it on a UTF-8 system (newlines as ``\\n``),
    whatever the machine's locale; a NotUtf8Error, saying where, for any other encoding."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotUtf8Error(_not_utf8(data, exc)) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        where = f"it is UTF-16 (byte 0 is 0x{data[0]:02x}, a UTF-16 byte order mark)"
    else:
        line = data.count(b"\n", 0, exc.start) + 1
        where = (
            f"byte {exc.start} (line {line}) is 0x{data[exc.start]:02x}, which UTF-8 does not "
            "allow there (is the file Latin-1 or Windows-1252?)"
        )
    return f"not UTF-8 text: {where}; save it as UTF-8 (your editor's encoding setting)"


# --------------------------------------------------------------------------- connections


def _size(value: str) -> str:
    """A memory size as DuckDB and ``util/memory.py`` read it (400MB, 1GB, 512MiB)."""
    from reverse_etl.util.memory import parse_size

    parse_size(value)  # raises ValueError naming the accepted spellings
    return value


class DuckDBConnection(Strict):
    type: Literal["duckdb"]
    path: str
    # unset: the warehouse's share of the process's budget (util/memory.py); its sorts spill
    # to disk past it, so memory stays flat as the view grows
    memory_limit: Annotated[str, AfterValidator(_size)] | None = None
    threads: Annotated[int, Field(ge=1, le=64)] | None = None  # unset: from the budget


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


WarehouseConnection = (
    DuckDBConnection | PostgresConnection | SnowflakeConnection | BigQueryConnection
)
WAREHOUSE_MODELS: tuple[type[Strict], ...] = (
    DuckDBConnection,
    PostgresConnection,
    SnowflakeConnection,
    BigQueryConnection,
)
WAREHOUSE_TYPES = ("duckdb", "postgres", "snowflake", "bigquery")
# type tag -> connection model, warehouses and every registered destination
CONNECTION_MODELS: dict[str, type[Strict]] = {
    **dict(zip(WAREHOUSE_TYPES, WAREHOUSE_MODELS, strict=True)),
    **{t: p.connection for t, p in registry.plugins().items()},
}
DESTINATION_TYPES = tuple(registry.plugins())
if TYPE_CHECKING:
    Connection = WarehouseConnection | DestinationConnection
else:
    Connection = Annotated[
        functools.reduce(operator.or_, CONNECTION_MODELS.values()), Field(discriminator="type")
    ]


# --------------------------------------------------------------------------- syncs


class FieldMapping(Strict):
    """A column's destination field, with the type to coerce and validate it as."""

    field: str
    type: Literal[FIELD_TYPES] | None = None  # type: ignore[valid-type]


class EvidenceColumn(Strict):
    """A piece of consent evidence read per row from a column of the view."""

    column: Annotated[str, Field(min_length=1)]


# what a consent record says about how consent was obtained (its time is ``consented_at``)
EVIDENCE_KEYS = ("text", "url", "ip_address", "user_agent")
# an absolute URI (scheme:rest), as JSON Schema's "uri" format; the same test is made per row
URI_PATTERN = r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$"


def evidence_ip(value: str) -> bool:
    """``value`` is an IPv4 or IPv6 address (no zone index: ``fe80::1%eth0`` is not)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return "%" not in value


class ConsentEvidence(Strict):
    """How a consent was obtained, sent with it where the destination keeps consent records
    (Dotdigital's ``consentRecords``): each value a fixed text, the same for every row, or
    ``{column: NAME}``, the row's value in a column of the view. A row lacking one of them
    carries no record; its consent is still sent."""

    text: str | EvidenceColumn  # the consent wording the person agreed to
    url: str | EvidenceColumn  # the page it was given on (an absolute URL)
    ip_address: str | EvidenceColumn  # the person's IPv4 or IPv6 address
    user_agent: str | EvidenceColumn  # their browser's User-Agent header

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # pydantic says a mapping is wanted
        valid = ", ".join(EVIDENCE_KEYS)
        for key in value:
            if key not in EVIDENCE_KEYS:
                hint = difflib.get_close_matches(str(key), EVIDENCE_KEYS, n=1)
                raise ValueError(
                    f"unknown key {key!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" Valid keys: {valid}"
                )
        missing = [k for k in EVIDENCE_KEYS if k not in value]
        if missing:
            raise ValueError(
                f"give all of {valid} (a consent record needs each); missing: " + ", ".join(missing)
            )
        for key in EVIDENCE_KEYS:
            problem = _evidence_problem(key, value[key])
            if problem:
                raise ValueError(f"{key}: {problem}")
        return value

    def values(self) -> dict[str, str | EvidenceColumn]:
        return {key: getattr(self, key) for key in EVIDENCE_KEYS}

    def columns(self) -> dict[str, str]:
        """Key -> the view column it is read from, for the keys read per row."""
        return {k: v.column for k, v in self.values().items() if isinstance(v, EvidenceColumn)}


def _evidence_problem(key: str, value: Any) -> str | None:
    """What is wrong with one evidence value as written in YAML, or None."""
    if isinstance(value, dict):
        if set(value) != {"column"} or not isinstance(value["column"], str) or not value["column"]:
            return "write {column: NAME} to read it from a column of the view"
        return None
    if not isinstance(value, str):
        return f"a fixed text or {{column: NAME}} (got {value!r})"
    if not value.strip():
        return "empty; give a fixed text or {column: NAME}"
    if key == "url" and not re.match(URI_PATTERN, value):
        return f"{value!r} is not an absolute URL (https://shop.example.com/signup)"
    if key == "ip_address" and not evidence_ip(value):
        return f"{value!r} is not an IPv4 or IPv6 address"
    return None


class ConsentColumn(Strict):
    column: str
    consented_at: str | None = None  # column holding when consent was given
    # what an ambiguous "no" (no, n, false, f, 0, off, a false boolean) means: an opt-out
    # (unsubscribed) or a box never ticked (not_subscribed: the destination is left as it is).
    # Explicit words (unsubscribed, opt-out, revoked, ...) always opt out. None: unsubscribed,
    # and `check` warns when the column holds such words.
    no_means: Literal["unsubscribed", "not_subscribed"] | None = None
    # how consent was obtained (text, url, ip_address, user_agent), sent with a subscribe
    # where the destination keeps it; its time is consented_at
    evidence: ConsentEvidence | None = None

    @model_validator(mode="after")
    def _evidence_needs_time(self) -> ConsentColumn:
        if self.evidence is not None and self.consented_at is None:
            raise ValueError(
                "evidence needs consented_at: a consent record says when consent was given; "
                "name the column that holds it, e.g. consented_at: consent_updated_at"
            )
        for key, name in (self.evidence.columns() if self.evidence else {}).items():
            if name in (self.column, self.consented_at):
                raise ValueError(
                    f"evidence.{key}: column {name!r} already holds the consent or its time; "
                    "read the evidence from a column of its own"
                )
        return self


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


def _share(value: Any) -> Any:
    """``rejected_share`` as written: a number from 0 to 1 (0.05) or a percentage ("5%")."""
    how = 'a share from 0 to 1 (0.05) or a percentage ("5%")'
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"write {how}, not {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text.removesuffix("%").strip())
        except ValueError:
            raise ValueError(f"write {how}, not {value!r}") from None
        if text.endswith("%"):
            if not 0 <= number <= 100:
                raise ValueError(f"{value!r}: a percentage runs from 0% to 100%")
            return number / 100
        value = number
    if not 0 <= value <= 1:
        hint = f'; did you mean "{value:g}%"?' if 1 < value <= 100 else ""
        raise ValueError(f"{value!r} is not {how}{hint}")
    return float(value)


class FailOn(Strict):
    """When a finished run exits 1 instead of 0 (dbt's warn/error style; exit codes in
    ``reverse_etl/problems.py``). Set for the project, and per sync key by key: a key a sync
    leaves out comes from the project's, then from the defaults (``rejected_share: 0``,
    ``new_problems: true``: any rejected or failed row exits 1, as before ``fail_on``)."""

    # exit 1 when more than this share of the rows read is rejected or failed
    rejected_share: Annotated[float, BeforeValidator(_share)] | None = None
    # exit 1 when a problem no earlier run of the sync reported appears (``new_reasons`` is
    # accepted too, as issue 17 spelled it)
    new_problems: bool | None = Field(
        default=None, validation_alias=AliasChoices("new_problems", "new_reasons")
    )

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, value: Any) -> Any:
        if isinstance(value, dict) and {"new_problems", "new_reasons"} <= set(value):
            raise ValueError("give new_problems once (new_reasons is another name for it)")
        return value

    def over(self, base: FailOn) -> FailOn:
        """These thresholds, with the keys left out taken from ``base``."""
        fields = type(self).model_fields
        mine = {k: getattr(self, k) for k in fields}
        return self.model_copy(
            update={k: getattr(base, k) if v is None else v for k, v in mine.items()}
        )


def _timezone(value: str) -> str:
    """``naive_timezone``: an IANA time zone name, one zoneinfo knows. DuckDB reads it
    (``timezone(zone, ts)``) whatever its case, so utc and europe/london still work."""
    if value.casefold() in _time_zones():
        return value
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        pass
    else:
        if value not in _NOT_ZONES:
            return value
    hint = difflib.get_close_matches(value, list(_time_zones().values()), n=1)
    raise ValueError(
        f"{value!r} is not an IANA time zone; write one such as Europe/London, "
        "America/New_York or UTC" + (f"; did you mean {hint[0]!r}?" if hint else "")
    )


# files of the system's time zone database that are not zones (and DuckDB refuses)
_NOT_ZONES = ("localtime", "posixrules")


@functools.cache
def _time_zones() -> dict[str, str]:
    """Case-folded name -> IANA name, for each time zone zoneinfo knows."""
    zones = zoneinfo.available_timezones()
    return {zone.casefold(): zone for zone in zones if zone not in _NOT_ZONES}


def _phone_region(value: str) -> str:
    """``default_phone_region``: a region phonenumbers has metadata for, in any case (the
    transform upper-cases it)."""
    import phonenumbers  # here, not at the top: every command loads this module

    if value.upper() in phonenumbers.SUPPORTED_REGIONS:
        return value
    hint = _REGION_ALIASES.get(value.strip().upper())
    raise ValueError(
        f"{value!r} is not a region phonenumbers knows; write a two-letter ISO 3166 country "
        "code such as GB or US" + (f"; did you mean {hint!r}?" if hint else "")
    )


# names often written for a region that are not its ISO code
_REGION_ALIASES = {"UK": "GB", "USA": "US", "GBR": "GB"}


class Sync(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")]
    source: SourceSpec
    object: Literal["profiles", "orders", "catalog"]
    identifier: str
    # the column that says when a row last changed; a mirror sync may have none (null): it
    # reads the whole view every run anyway
    cursor: str | None = "modified_at"
    # upsert: adds and updates; mirror: the list holds exactly the view's members, so members
    # who left the view are removed from it (never unsubscribed or deleted)
    mode: Literal["upsert", "mirror"] = "upsert"
    # a mirror run that would remove more than this share of the list's members (or any member
    # when the view returns no rows) stops before removing anything
    max_removal_share: Annotated[float, Field(ge=0, le=1)] = 0.2
    # where each run writes the consent read back from the destination (schema.table in the
    # sync's own warehouse; dataset.table in BigQuery), for analysts to join in their views
    optouts_table: (
        Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")] | None
    ) = None
    destination: DestinationSpec
    mapping: dict[str, str | FieldMapping]
    consent: ConsentSpec = ConsentSpec()
    schedule: Schedule | None = None
    # syncs that run before this one (an orders sync after its contacts sync, whose orders
    # the destination refuses until the contact exists): run SYNC, run, run --due, scheduler
    depends_on: list[str] = []
    enabled: bool = True
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 20_000
    lookback_minutes: Annotated[int, Field(ge=0, le=60 * 24 * 31)] = 0
    null_values: Literal["skip", "clear"] = "skip"
    # ISO country for national numbers, e.g. US: one phonenumbers knows
    default_phone_region: Annotated[str, AfterValidator(_phone_region)] | None = None
    phone_region_column: str | None = None  # or a column with each row's ISO country
    # fast: E.164 shape and a possible length for the country, vectorised; strict: every
    # number through phonenumbers' full validation (tens of microseconds a number)
    phone_validation: Literal["fast", "strict"] = "fast"
    # the IANA time zone of timestamps without one (e.g. Europe/London)
    naive_timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"
    max_future_skew_minutes: Annotated[int, Field(ge=0)] = 10
    # thresholds over the project's fail_on, key by key (see FailOn)
    fail_on: FailOn = FailOn()

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

    @model_validator(mode="after")
    def _cursor_or_mirror(self) -> Sync:
        if self.cursor is None and self.mode != "mirror":
            raise ValueError(
                "cursor: only a mirror sync (mode: mirror) may have no cursor; name the column "
                "that says when a row last changed, e.g. cursor: modified_at"
            )
        return self

    @property
    def cursor_column(self) -> str:
        """The cursor to read by: a cursorless mirror sync orders by a constant."""
        return self.cursor or NO_CURSOR

    def fields(self) -> dict[str, FieldMapping]:
        """Column → FieldMapping, with the short ``column: field`` form expanded."""
        return {
            col: (FieldMapping(field=t) if isinstance(t, str) else t)
            for col, t in self.mapping.items()
        }


class StateSpec(Strict):
    url: str = "sqlite:///.reverse_etl/state.db"


# the warehouses a snapshot can live in (snapshot.connection); the others keep it local
SNAPSHOT_WAREHOUSE_TYPES = ("postgres", "duckdb")


class SnapshotSpec(Strict):
    """Where each sync's synced-state snapshot lives: by default a DuckDB file per sync in
    ``path``. With ``connection`` (a postgres or duckdb warehouse), the syncs that read from
    that connection keep it in the warehouse itself, a table per sync in ``schema``, and the
    read computes the diff there; syncs reading from another connection keep the local file
    in ``path`` (the diff must run where the view is)."""

    path: str = ".reverse_etl/snapshots"
    connection: str | None = None
    schema_: str = Field(
        default="reverse_etl", alias="schema", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
    )

    @model_validator(mode="after")
    def _schema_needs_connection(self) -> SnapshotSpec:
        if self.connection is None and "schema_" in self.model_fields_set:
            raise ValueError(
                "schema: only a snapshot in the warehouse has one; add `connection: NAME` (a "
                "postgres or duckdb connection) or remove `schema`"
            )
        return self


class Project(Strict):
    connections: dict[str, Connection]
    syncs: list[Sync] = []
    state: StateSpec = StateSpec()
    snapshot: SnapshotSpec = SnapshotSpec()
    error_dir: str = ".reverse_etl/errors"
    # the whole process's memory budget, shared out by util/memory.py (REVERSE_ETL_MEMORY_LIMIT
    # overrides it); unset: util.memory.DEFAULT
    memory_limit: Annotated[str, AfterValidator(_size)] | None = None
    # when a finished run exits 1: every sync's default (a sync's own fail_on overrides keys)
    fail_on: FailOn = FailOn()
    # resolved at load time, not read from YAML
    root: Path = Field(default=Path("."), exclude=True)
    file: Path = Field(default=DEFAULT_CONFIG, exclude=True)
    # connection -> [(key path, env var)] left unset (load_project's defer_secrets)
    _missing_env: dict[str, list[tuple[str, str]]] = PrivateAttr(default_factory=dict)

    def missing_env(self, connection: str) -> list[tuple[str, str]]:
        """(key path, variable) of each env var ``connection`` needs but did not get."""
        return list(self._missing_env.get(connection, []))

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
            conn = self.connections.get(sync.source.connection)
            if (
                sync.optouts_table
                and conn is not None
                and conn.type == "bigquery"
                and "." not in sync.optouts_table
            ):
                raise _at(
                    f"syncs[{i}].optouts_table",
                    "a BigQuery table is named with its dataset: dataset.table",
                )
        _check_dependencies(self.syncs)
        if self.snapshot.connection is not None:
            _check_snapshot_connection(self, self.snapshot.connection)
        return self

    def snapshot_connection(self, sync: Sync) -> str | None:
        """The connection whose warehouse holds ``sync``'s snapshot, or None: local (no
        ``snapshot.connection``, or the sync reads from another connection)."""
        name = self.snapshot.connection
        return name if name is not None and name == sync.source.connection else None

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
            return self._with_cursor(sync, f"SELECT * FROM {sync.source.table}")
        path = self.path(sync.source.sql or "")
        try:
            sql = read_text_file(path)
        except OSError as exc:
            raise ConfigError(
                f"{self.file}: sync {sync.name!r} source.sql: cannot read {path}: {exc.strerror}"
            ) from None
        except NotUtf8Error as exc:
            raise ConfigError(
                f"{self.file}: sync {sync.name!r} source.sql: {path}: {exc}"
            ) from None
        sql = re.sub(r";\s*$", "", sql.strip())
        if not sql:
            raise ConfigError(f"{self.file}: sync {sync.name!r}: {path} is empty; write one SELECT")
        return self._with_cursor(sync, sql)

    @staticmethod
    def _with_cursor(sync: Sync, sql: str) -> str:
        return sql if sync.cursor else f"SELECT v.*, 0 AS {NO_CURSOR} FROM ({sql}) AS v"


class _RefError(ValueError):
    def __init__(self, loc: str, message: str):
        super().__init__(message)
        self.loc = loc


def _at(loc: str, message: str) -> _RefError:
    return _RefError(loc, message)


def _check_dependencies(syncs: list[Sync]) -> None:
    """Every ``depends_on`` names another sync of the project, and they form no cycle."""
    import graphlib

    known = [s.name for s in syncs]
    for i, sync in enumerate(syncs):
        for j, name in enumerate(sync.depends_on):
            if name == sync.name:
                raise _at(f"syncs[{i}].depends_on[{j}]", f"sync {name!r} cannot depend on itself")
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                raise _at(
                    f"syncs[{i}].depends_on[{j}]",
                    f"no sync named {name!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" Known syncs: {', '.join(known)}",
                )
    try:
        graphlib.TopologicalSorter({s.name: s.depends_on for s in syncs}).prepare()
    except graphlib.CycleError as exc:
        cycle = list(reversed(exc.args[1]))  # graphlib lists each node before its dependent
        where = known.index(cycle[0])
        raise _at(
            f"syncs[{where}].depends_on",
            f"depends_on forms a cycle: {' -> '.join(cycle)} (each depends on the next); "
            "remove one of these dependencies",
        ) from None


def _check_snapshot_connection(project: Project, name: str) -> None:
    conn = project.connections.get(name)
    if conn is not None and conn.type in WAREHOUSE_TYPES:
        if conn.type not in SNAPSHOT_WAREHOUSE_TYPES:
            raise _at(
                "snapshot.connection",
                f"connection {name!r} is a {conn.type}: the snapshot can live in a "
                f"{' or '.join(SNAPSHOT_WAREHOUSE_TYPES)} warehouse only, not yet in "
                f"{conn.type}; remove `connection` to keep it local (the default: a DuckDB "
                "file per sync under `path`)",
            )
        return
    _check_ref(project, "snapshot.connection", name, SNAPSHOT_WAREHOUSE_TYPES)


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

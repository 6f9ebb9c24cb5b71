"""``reverse-etl debug``: connect to every connection of the project and say, check by check,
what works and how to fix what does not (as ``dbt debug`` does).

Warehouses: reachable (``SELECT 1``), then per sync its SQL (schema probe, no rows read), its
identifier and cursor columns (present, a cursor that can order rows) and its mapped columns.
Destinations: one cheap authenticated call each, and what it takes beyond valid credentials:

* Klaviyo: ``GET /api/profiles?page[size]=1`` (or another read the syncs need) answers 401 to
  a key Klaviyo does not know. Scopes: each operation the syncs call needs the scopes of its
  ``x-klaviyo-scopes`` (spec revision 2026-07-15, e.g. ``bulk_import_profiles``:
  ``lists:write profiles:write``), and a key lacking one is answered 403 ``permission_denied``
  ("You do not have permission to perform this action.",
  https://community.klaviyo.com/developer-group-64/api-patch-action-status-403-code-permission-denied-9225).
  No endpoint lists a key's scopes
  (https://community.klaviyo.com/developer-group-64/api-endpoint-to-know-what-are-the-scopes-of-the-api-key-6536),
  and a key has Read or Full access per scope
  (https://help.klaviyo.com/hc/en-us/articles/7423954176283-How-to-create-a-private-API-key),
  so each needed scope is probed with one read of its object (``SCOPE_PROBES``): a 403 proves
  the scope missing; a 200 proves read access only. Write access cannot be seen without
  writing; a read-only key passes here and fails the run's first write with 403.
* Dotdigital: ``GET /v2/account-info`` on r1 (or ``base_url``), where it answers every
  account, checks the API user; one regional read (``GET /v2/address-books?select=1``)
  through ``DotdigitalClient`` checks the region: a wrong one is 403, which the client turns
  into an error naming the account's endpoint (``client.check_region``).

Nothing is written anywhere; secrets never reach a result (``scrub``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import pyarrow as pa

from reverse_etl.columns import resolve_sync_columns
from reverse_etl.config import Project
from reverse_etl.config.models import WAREHOUSE_TYPES, Sync
from reverse_etl.destinations.http import ApiClient, RetryPolicy, error_detail
from reverse_etl.destinations.registry import destination_for
from reverse_etl.errors import ReverseEtlError
from reverse_etl.pipeline import cursor_problems
from reverse_etl.secrets import scrub
from reverse_etl.sources.base import Source

#: few, quick retries: debug reports, it does not wait out an outage
DEBUG_RETRY = RetryPolicy(max_attempts=2, base_delay=0.2, max_delay=1.0, max_retry_after=2.0)
TIMEOUT = 20.0


@dataclass(frozen=True)
class CheckResult:
    """One check: ``target`` is the connection or sync it is about."""

    target: str
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result(target: str, name: str, ok: bool, detail: str, fix: str = "") -> CheckResult:
    return CheckResult(target, name, ok, scrub(detail), scrub(fix))


def run_checks(project: Project) -> list[CheckResult]:
    """Every check of every connection, warehouses first, in the project's order."""
    results: list[CheckResult] = []
    for name, conn in project.connections.items():
        if conn.type in WAREHOUSE_TYPES:
            results += warehouse_checks(project, name)
    for name, conn in project.connections.items():
        unset = _unset_env(project, name)
        if unset:
            results.append(
                _result(
                    name,
                    "secrets set",
                    False,
                    "environment variables not set: " + ", ".join(unset),
                    "export " + " and ".join(unset) + " (or write the values in the project file)",
                )
            )
        elif conn.type == "klaviyo":
            results += klaviyo_checks(project, name)
        elif conn.type == "dotdigital":
            results += dotdigital_checks(project, name)
        elif conn.type not in WAREHOUSE_TYPES:
            results.append(
                _result(name, "connection", True, f"no debug checks for type {conn.type!r}")
            )
    return results


def _unset_env(project: Project, connection: str) -> list[str]:
    """Variables a destination's secrets name that the environment lacked, when the project
    was loaded with ``defer_secrets`` (then the API is not called: it would answer 401)."""
    missing = getattr(project, "missing_env", None)
    return [name for _, name in missing(connection)] if callable(missing) else []


# --------------------------------------------------------------------------- warehouses


def warehouse_checks(project: Project, connection: str) -> list[CheckResult]:
    """Reachable, then each sync reading from it."""
    from reverse_etl.sources import open_source

    conn = project.connections[connection]
    syncs = [s for s in project.syncs if s.source.connection == connection]
    try:
        with open_source(conn, project) as source:  # type: ignore[arg-type]
            results = [check_warehouse(connection, source)]
            if results[0].ok:
                for sync in syncs:
                    results += sync_checks(project, sync, source)
            return results
    except ReverseEtlError as exc:
        return [_warehouse_unreachable(project, connection, str(exc))]


def check_warehouse(connection: str, source: Source) -> CheckResult:
    try:
        source.schema("SELECT 1 AS ok")
    except ReverseEtlError as exc:
        return _result(
            connection,
            "warehouse reachable",
            False,
            str(exc),
            "check the connection's settings (host, database, user, credentials) and the network",
        )
    return _result(connection, "warehouse reachable", True, "connected; SELECT 1 ran")


def _warehouse_unreachable(project: Project, connection: str, message: str) -> CheckResult:
    conn = project.connections[connection]
    if conn.type == "duckdb":
        path = project.path(conn.path)  # type: ignore[union-attr]
        if not path.exists():
            fix = (
                f"create the DuckDB file {path} or correct `path:` of connection {connection!r} "
                "(relative paths start at the project directory)"
            )
        else:
            fix = f"check that {path} is a DuckDB database another process is not writing"
    else:
        fix = "check the connection's settings (host, database, user, credentials) and the network"
    return _result(connection, "warehouse reachable", False, message, fix)


def sync_checks(project: Project, sync: Sync, source: Source) -> list[CheckResult]:
    """The sync's SQL, then its identifier and cursor, then its mapping (each only when the
    one before passed: they read the same schema)."""
    sql_check, schema = check_sql(project, sync, source)
    if schema is None:
        return [sql_check]
    key_check, resolved = check_key_columns(sync, schema, source)
    checks = [sql_check, key_check]
    if resolved is not None:
        checks.append(check_mapping(project, resolved, schema))
    return checks


def check_sql(project: Project, sync: Sync, source: Source) -> tuple[CheckResult, Any]:
    """The view's schema, read without its rows."""
    where = sync.source.sql or sync.source.table
    try:
        schema = source.schema(project.source_sql(sync))
    except ReverseEtlError as exc:
        fix = (
            f"fix the SELECT in {where} (run it in the warehouse to see the error)"
            if sync.source.sql
            else f"check that {where} exists and the connection's user may read it"
        )
        return _result(sync.name, "sql runs", False, str(exc), fix), None
    return _result(sync.name, "sql runs", True, f"{where}: {len(schema.names)} columns"), schema


def check_key_columns(
    sync: Sync, schema: pa.Schema, source: Source
) -> tuple[CheckResult, Sync | None]:
    """The identifier and the cursor are in the view, and the cursor can order rows."""
    name = "identifier and cursor"
    columns = list(schema.names)
    try:
        resolved = resolve_sync_columns(sync, columns, source.dialect)
    except ReverseEtlError as exc:
        return _result(sync.name, name, False, str(exc), "name each column once"), None
    listed = ", ".join(columns)
    for key, column in (("identifier", resolved.identifier), ("cursor", resolved.cursor)):
        if column is not None and column not in columns:
            return _result(
                sync.name,
                name,
                False,
                f"{key} column {column!r} is not in the view; its columns: {listed}",
                f"add {column!r} to the view's SELECT, or set `{key}:` to one of its columns",
            ), None
    c = resolved.cursor
    if c is not None:
        dtype = schema.field(c).type
        if cursor_problems(sync.name, c, dtype):
            return _result(
                sync.name,
                name,
                False,
                f"cursor column {c!r} is {dtype}: text compares in string order "
                "('9' > '10'), so a watermark over it would skip rows",
                f"cast it to a timestamp or number in the view: CAST({c} AS TIMESTAMP) AS {c} "
                f"(or CAST({c} AS BIGINT) AS {c} for a counter)",
            ), None
    cursor = f", cursor {c!r} ({schema.field(c).type})" if c else ", no cursor (mirror)"
    return _result(sync.name, name, True, f"identifier {resolved.identifier!r}{cursor}"), resolved


def check_mapping(project: Project, sync: Sync, schema: pa.Schema) -> CheckResult:
    """Mapped columns present, of types their fields take (what ``check`` reports)."""
    from reverse_etl.engine import transform_spec
    from reverse_etl.transform.transformer import schema_problems

    conn = project.connections[sync.destination.connection]
    spec = transform_spec(sync, destination_for(conn.type, sync.object))

    keys = {repr(spec.identifier), repr(spec.cursor)}
    problems = [
        p
        for p in schema_problems(spec, schema)
        if not any(p.startswith(f"column {k} ") for k in keys)
    ]
    if problems:
        return _result(
            sync.name,
            "mapping",
            False,
            "; ".join(problems),
            "add or cast the columns in the view's SQL, or change the mapping",
        )
    return _result(sync.name, "mapping", True, f"{len(spec.fields)} mapped columns fit")


# --------------------------------------------------------------------------- Klaviyo

#: scopes each Klaviyo object's operations need (the spec's x-klaviyo-scopes, 2026-07-15):
#: profiles: bulk_import_profiles (lists:write profiles:write), its job and import errors
#: (lists:read profiles:read), get/create_list, list membership; consent adds
#: bulk_(un)subscribe_profiles (subscriptions:write). orders: bulk_create_events
#: (events:write). catalog: bulk create/update catalog items and their jobs, get_catalog_items.
KLAVIYO_SCOPES: dict[str, tuple[str, ...]] = {
    "profiles": ("profiles:write", "lists:write"),
    "orders": ("events:write",),
    "catalog": ("catalogs:write",),
}
CONSENT_SCOPES = ("subscriptions:write",)
#: scope family -> the read that probes it (operation scopes from the spec)
SCOPE_PROBES: dict[str, tuple[str, dict[str, str]]] = {
    "profiles": ("/api/profiles", {"page[size]": "1"}),  # get_profiles: profiles:read
    "lists": ("/api/lists", {"page[size]": "1"}),  # get_lists: lists:read
    "events": ("/api/events", {"page[size]": "1"}),  # get_events: events:read
    "catalogs": ("/api/catalog-items", {"page[size]": "1"}),  # get_catalog_items: catalogs:read
    # get_bulk_suppress_profiles_jobs: subscriptions:read
    "subscriptions": ("/api/profile-suppression-bulk-create-jobs", {}),
}


def klaviyo_scopes(project: Project, connection: str) -> list[str]:
    """The scopes the syncs writing to ``connection`` need, in a stable order."""
    needed: dict[str, None] = {}
    for sync in project.syncs:
        if sync.destination.connection != connection:
            continue
        needed.update(dict.fromkeys(KLAVIYO_SCOPES.get(sync.object, ())))
        if sync.object == "profiles" and sync.consent.columns():
            needed.update(dict.fromkeys(CONSENT_SCOPES))
    return list(needed)


def _klaviyo_api(project: Project, connection: str) -> ApiClient:
    conn: Any = project.connections[connection]
    return ApiClient(
        conn.base_url,
        headers={
            "Authorization": f"Klaviyo-API-Key {conn.api_key.get_secret_value()}",
            "revision": conn.revision,
            "Accept": "application/vnd.api+json",
        },
        timeout=TIMEOUT,
        retry=DEBUG_RETRY,
        name="Klaviyo",
    )


def klaviyo_checks(project: Project, connection: str) -> list[CheckResult]:
    scopes = klaviyo_scopes(project, connection)
    families = list(dict.fromkeys(s.split(":")[0] for s in scopes)) or ["lists"]
    api = _klaviyo_api(project, connection)
    try:
        answers = {f: _get(api, *SCOPE_PROBES[f]) for f in families[:1]}
        credentials = check_klaviyo_key(connection, families[0], answers[families[0]])
        if not credentials.ok:
            return [credentials]
        results = [credentials]
        for family in families:
            if family not in answers:
                answers[family] = _get(api, *SCOPE_PROBES[family])
            wanted = [s for s in scopes if s.startswith(f"{family}:")]
            results.append(check_klaviyo_scope(connection, family, wanted, answers[family]))
        return results
    finally:
        api.close()


def _get(api: ApiClient, path: str, params: dict[str, str]) -> httpx.Response | str:
    """The answer, or what stopped the call (no connection, retries spent)."""
    try:
        return api.request("GET", path, params=params or None)
    except (ReverseEtlError, httpx.HTTPError) as exc:
        return f"{type(exc).__name__}: {exc}"


def check_klaviyo_key(connection: str, family: str, answer: httpx.Response | str) -> CheckResult:
    """A 401 is a key Klaviyo does not know; a 403 is a known key lacking a scope."""
    name = "api key"
    path = SCOPE_PROBES[family][0]
    if isinstance(answer, str):
        return _result(
            connection,
            name,
            False,
            f"GET {path}: {answer}",
            "check base_url and the network (Klaviyo is https://a.klaviyo.com)",
        )
    if answer.status_code == 401:
        return _result(
            connection,
            name,
            False,
            f"GET {path}: {error_detail(answer)}",
            "set api_key to a private API key (pk_...) of the account, from Settings > API "
            "keys; a public key (site ID) does not authenticate /api calls",
        )
    if answer.status_code in (200, 403):
        return _result(connection, name, True, f"key accepted (GET {path}: {answer.status_code})")
    return _result(
        connection,
        name,
        False,
        f"GET {path}: {error_detail(answer)}",
        "retry later; if it persists check base_url and the connection's revision",
    )


def check_klaviyo_scope(
    connection: str, family: str, wanted: list[str], answer: httpx.Response | str
) -> CheckResult:
    """One scope family: a 403 ``permission_denied`` on its read proves it missing."""
    name = f"scope {family}"
    path = SCOPE_PROBES[family][0]
    need = " ".join(wanted) or f"{family}:read"
    if isinstance(answer, str):
        return _result(connection, name, False, f"GET {path}: {answer}", "retry later")
    if answer.status_code == 403:
        return _result(
            connection,
            name,
            False,
            f"the key lacks {family} access (GET {path}: 403 permission_denied); the syncs need "
            + need,
            f"create a private key with Full access to {family.capitalize()} (Settings > API "
            "keys > Create Private API Key > Custom; a key's scopes cannot be changed) and put "
            "it in api_key",
        )
    if answer.status_code != 200:
        return _result(
            connection, name, False, f"GET {path}: {error_detail(answer)}", "retry later"
        )
    return _result(
        connection,
        name,
        True,
        f"read access confirmed (GET {path}); write access ({need}) cannot be checked without "
        "writing: a read-only key fails the first write with 403",
    )


# --------------------------------------------------------------------------- Dotdigital


def dotdigital_checks(project: Project, connection: str) -> list[CheckResult]:
    """The API user, then (only if accepted) the region."""
    credentials = check_dotdigital_user(project, connection)
    if not credentials.ok:
        return [credentials]
    return [credentials, check_dotdigital_region(project, connection)]


def check_dotdigital_user(project: Project, connection: str) -> CheckResult:
    from reverse_etl.destinations.dotdigital.client import ACCOUNT_INFO
    from reverse_etl.destinations.dotdigital.configuration import R1

    conn: Any = project.connections[connection]
    base = (conn.base_url or R1).rstrip("/")
    name = "api user"
    try:
        with httpx.Client(
            base_url=base,
            auth=(conn.username, conn.password.get_secret_value()),
            headers={"Accept": "application/json"},
            timeout=TIMEOUT,
        ) as http:
            response = http.get(ACCOUNT_INFO)
    except httpx.HTTPError as exc:
        return _result(
            connection,
            name,
            False,
            f"GET {base}{ACCOUNT_INFO}: {type(exc).__name__}: {exc}",
            "check base_url and the network",
        )
    if response.status_code == 401:
        return _result(
            connection,
            name,
            False,
            f"GET {ACCOUNT_INFO}: {error_detail(response)}",
            "set username and password to an API user's (Settings > Access > API users, a "
            "name like apiuser-...@apiconnector.com), not a login to the app",
        )
    if response.status_code != 200:
        return _result(
            connection,
            name,
            False,
            f"GET {ACCOUNT_INFO}: {error_detail(response)}",
            "retry later; if it persists check base_url",
        )
    return _result(connection, name, True, f"API user {conn.username} accepted")


_REGION = re.compile(r"region: (r\d+)")


def check_dotdigital_region(project: Project, connection: str) -> CheckResult:
    from reverse_etl.destinations.dotdigital.client import DotdigitalClient

    name = "region"
    conn: Any = project.connections[connection]
    client: DotdigitalClient | None = None
    try:
        client = DotdigitalClient(conn, retry=DEBUG_RETRY)
        response = client.call("GET", "/v2/address-books", params={"select": "1", "skip": "0"})
    except ReverseEtlError as exc:
        found = _REGION.search(str(exc))
        fix = (
            f"set region: {found.group(1)} (or region: auto) in connection {connection!r}"
            if found
            else "set region: r1, r2 or r3 (or auto) in the connection"
        )
        return _result(connection, name, False, str(exc), fix)
    except httpx.HTTPError as exc:
        return _result(connection, name, False, f"{type(exc).__name__}: {exc}", "check the network")
    finally:
        if client is not None:
            client.close()
    if response.status_code != 200:
        return _result(
            connection,
            name,
            False,
            f"GET /v2/address-books: {error_detail(response)}",
            "retry later",
        )
    return _result(connection, name, True, f"{client.base_url} answers for this account")

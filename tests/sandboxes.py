"""Builders for the destination tests: a project in a temporary directory whose destination
connections point at the Klaviyo or Dotdigital sandbox, served over real loopback HTTP.

The real engine, clients and destinations run unchanged; only the retry pacing, the job poll
interval and (when a test asks) the client timeout are shortened, through ``fast_clients``,
so retries and fault injection take milliseconds instead of the production back-off.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from reverse_etl.config import Project, load_project
from reverse_etl.destinations import http, registry
from reverse_etl.destinations.base import Destination
from reverse_etl.destinations.registry import DestinationPlugin
from reverse_etl.engine import RunOptions, RunResult, run_sync
from reverse_etl.errors import ConfigError
from reverse_etl.sandbox import DotdigitalSandbox, KlaviyoSandbox, SandboxServer, SandboxSettings
from reverse_etl.sandbox.faults import FaultInjector
from reverse_etl.sandbox.spec import load_spec
from reverse_etl.state import RunRecord, StateStore, Watermark
from tests.helpers import at, create_table, read_csv_rows, write_project

Sandbox = KlaviyoSandbox | DotdigitalSandbox
_RETRY_POLICY = http.RetryPolicy

# --------------------------------------------------------------------------- client pacing


def fast_clients(
    monkeypatch: pytest.MonkeyPatch,
    *,
    max_attempts: int = 8,
    timeout: float | None = None,
    poll_interval: float = 0.02,
    settle_margin: float | None = None,
) -> None:
    """Retries in milliseconds (a capped ``Retry-After`` too), quick job polls, and
    optionally a short HTTP timeout so an injected ``timeout`` fault is a real client timeout.
    A create whose answer was lost is looked up every 50-400 ms until the client's timeout
    plus ``settle_margin`` (default ``SETTLE_MARGIN``) have passed. Library code is untouched:
    only defaults the clients read at construction are replaced."""

    def policy() -> http.RetryPolicy:
        return _RETRY_POLICY(
            max_attempts=max_attempts,
            base_delay=0.01,
            max_delay=0.1,
            max_retry_after=0.1,
            settle_margin=SETTLE_MARGIN if settle_margin is None else settle_margin,
            settle_first=0.05,
            settle_max=0.4,
        )

    monkeypatch.setattr(http, "RetryPolicy", policy)
    monkeypatch.setattr(Destination, "poll_interval", poll_interval)
    if timeout is not None:
        monkeypatch.setitem(http.ApiClient.__init__.__kwdefaults__, "timeout", timeout)


def set_faults(
    sandbox: Sandbox, rate: float, kinds: Sequence[str] = ("500",), seed: int = 0
) -> None:
    """Change a running sandbox's fault injection (its settings are frozen at start)."""
    sandbox.faults = FaultInjector(rate, tuple(kinds), seed)


# Every kind a run can meet.
EVERY_FAULT = ("429", "500", "503", "reset", "timeout", "failed_job")
# The seeds every fault test runs over: any seed must do, so they are not chosen to miss the
# one-off creates (lists, data fields, address books) at the start of a run.
FAULT_SEEDS = (0, 1, 2, 3)
# A held answer outlasts the client's timeout by this much before it is applied ...
CLIENT_TIMEOUT = 1.0
HELD_ANSWER = 1.5
# ... and a lost create is looked up until the timeout plus this margin have passed since the
# loss: room for a late landing on a loaded machine.
SETTLE_MARGIN = 2.0


def every_fault(seed: int, *, held: float = HELD_ANSWER) -> dict[str, Any]:
    """Sandbox settings for a run through 10% faults of every kind, so every fault test meets
    the same weather: jobs take a few polls (5 s sandbox time, 0.1 s real) and a held answer
    (``HELD_ANSWER``) outlasts the client timeout of ``fast_faulty_clients``: a real timeout,
    after which the request is applied."""
    return {
        "fault_rate": 0.1,
        "fault_kinds": EVERY_FAULT,
        "seed": seed,
        "job_seconds": 5.0,
        "fault_timeout_seconds": held,
    }


def fast_faulty_clients(
    monkeypatch: pytest.MonkeyPatch,
    *,
    max_attempts: int = 10,
    timeout: float = CLIENT_TIMEOUT,
    settle_margin: float = SETTLE_MARGIN,
) -> None:
    """``fast_clients`` for a run through ``every_fault``: more attempts (a call may meet
    several faults in a row) and the client timeout the held answers outlast."""
    fast_clients(
        monkeypatch, max_attempts=max_attempts, timeout=timeout, settle_margin=settle_margin
    )


def plugin_of(sandbox: Sandbox) -> DestinationPlugin:
    """The registered destination whose sandbox ``sandbox`` is."""
    for plugin in registry.plugins().values():
        if plugin.sandbox is not None and type(sandbox) is plugin.sandbox_class():
            return plugin
    raise LookupError(f"no registered destination has {type(sandbox).__name__} as its sandbox")


# What a run creates once and must never create twice, per destination type: name -> the names
# the sandbox holds. Klaviyo lets list names repeat (only the client's look-ups prevent a
# second list) and a catalog item is created once; Dotdigital data fields and address books are
# unique ignoring case. A destination with one-off creates adds its entry here.
CREATED_ONCE: dict[str, Callable[[Any], dict[str, list[str]]]] = {
    "klaviyo": lambda s: {
        "lists": [x["name"] for x in s.lists()],
        "catalog items": [x["external_id"] for x in s.catalog_items()],
    },
    "dotdigital": lambda s: {
        "data fields": [x["name"].upper() for x in s.data_fields()],
        "address books": [x["name"].lower() for x in s.address_books()],
    },
}


def assert_sandbox_clean(sandbox: Any) -> None:
    """After runs killed at random: no error of the sandbox's own but a run killed while
    sending a request body (reported, not the client's), no request off the spec, and every
    object created once."""
    errors = [e for e in sandbox.internal_errors if "ClientDisconnect" not in e]
    assert errors == [], errors
    assert sandbox.violations == [], sandbox.violations
    assert_created_once(sandbox)


def assert_created_once(sandbox: Sandbox) -> None:
    """Nothing a run creates exists twice (``CREATED_ONCE`` says what, per destination type)."""
    type_ = plugin_of(sandbox).type
    created = CREATED_ONCE.get(type_)
    assert created is not None, f"add {type_!r} to tests.sandboxes.CREATED_ONCE"
    for what, names in created(sandbox).items():
        twice = sorted({n for n in names if names.count(n) > 1})
        assert not twice, f"{what} created more than once: {twice}"


def spec_problems(sandbox: Sandbox, method: str, path: str, body: Any) -> list[str]:
    """What the vendor would refuse in one request, as the sandbox checks it but without sending
    it: the route, the documented body size limit and the body against the operation's schema in
    the vendor spec. ``body`` is the parsed JSON (a dry run's line). Empty: on spec."""
    method = method.upper()
    raw = orjson.dumps(body)
    for ep in sandbox.endpoints():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(ep.template)) + "$"
        if ep.method.upper() != method or not re.match(pattern, path):
            continue
        problems = []
        if ep.max_body is not None and len(raw) > ep.max_body:
            problems.append(f"{method} {path}: {len(raw)} bytes, over the {ep.max_body} allowed")
        if ep.spec is not None:
            op = load_spec(ep.spec).operation(ep.method, ep.template)
            if op.spec.present and op.media_types:
                error = op.body_validator().first_error(body)
                if error is not None:
                    problems.append(f"{method} {path} {error.pointer}: {error.message}")
        return problems
    return [f"{method} {path}: no such endpoint"]


def faults_met(sandbox: Sandbox) -> dict[str, int]:
    """The sandbox's ``fault_*`` counters: shows a run really met the faults it was given."""
    return {k: v for k, v in sandbox.counters.items() if k.startswith("fault_")}


# --------------------------------------------------------------------------- warehouse rows

PROFILE_COLUMNS: dict[str, str] = {
    "email": "VARCHAR",
    "first_name": "VARCHAR",
    "last_name": "VARCHAR",
    "phone": "VARCHAR",
    "city": "VARCHAR",
    "country": "VARCHAR",
    "zip": "VARCHAR",
    "latitude": "DOUBLE",
    "tier": "VARCHAR",
    "points": "INTEGER",
    "lifetime_value": "DECIMAL(12,2)",
    "is_vip": "BOOLEAN",
    "birthday": "DATE",
    "last_order_at": "TIMESTAMPTZ",
    "email_consent": "VARCHAR",
    "notes": "VARCHAR",
    "modified_at": "TIMESTAMPTZ",
}


def email_of(n: int) -> str:
    return f"customer{n:05d}@example.com"


def profile_row(n: int, **overrides: Any) -> tuple[Any, ...]:
    """One clean row in PROFILE_COLUMNS order; ``modified_at`` is ``at(n)`` unless given."""
    values: dict[str, Any] = {
        "email": email_of(n),
        "first_name": f"First{n}",
        "last_name": f"Last{n}",
        "phone": f"(415) 555-{n % 10_000:04d}",
        "city": "Springfield",
        "country": "US",
        "zip": f"{10_000 + n}",
        "latitude": 40.0 + n / 1000,
        "tier": ("bronze", "silver", "gold")[n % 3],
        "points": n * 10,
        "lifetime_value": Decimal(f"{n}.25"),
        "is_vip": n % 2 == 0,
        "birthday": date(1980, 1, 1 + n % 28),
        "last_order_at": at(3600 + n),
        "email_consent": ("yes", "no", None)[n % 3],
        "notes": None,
        "modified_at": at(n),
    }
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"not a profile column: {sorted(unknown)}")
    values.update(overrides)
    return tuple(values[c] for c in PROFILE_COLUMNS)


def profile_rows(numbers: range | Sequence[int], **overrides: Any) -> list[tuple[Any, ...]]:
    return [profile_row(n, **overrides) for n in numbers]


# --------------------------------------------------------------------------- the project


def sync_entry(name: str, connection: str, mapping: dict[str, Any], **extra: Any) -> dict[str, Any]:
    destination = {"connection": connection, **extra.pop("destination", {})}
    return {
        "name": name,
        "source": {"connection": "warehouse", "table": extra.pop("table", "people")},
        "object": "profiles",
        "identifier": "email",
        "cursor": "modified_at",
        "destination": destination,
        "mapping": mapping,
        "default_phone_region": "US",
        **extra,
    }


def dotdigital_project(syncs: list[dict[str, Any]]) -> dict[str, Any]:
    """A project whose Dotdigital connection points nowhere: config checks need no sandbox."""
    return {
        "connections": {
            "warehouse": {"type": "duckdb", "path": "warehouse.duckdb"},
            "dotdigital": {
                "type": "dotdigital",
                "username": "apiuser@example.com",
                "password": "not-used-here",
                "base_url": "http://127.0.0.1:9",
            },
        },
        "syncs": syncs,
    }


def dotdigital_config_error(root: Path, sync: dict[str, Any]) -> str:
    """The ConfigError message loading a Dotdigital project holding only ``sync`` gives."""
    write_project(root, dotdigital_project([sync]))
    with pytest.raises(ConfigError) as raised:
        load_project(None, root, env={})
    return str(raised.value)


@dataclass
class Rig:
    """A project directory, its warehouse and state store, and one served sandbox."""

    root: Path
    sandbox: Sandbox
    base_url: str
    project: Project | None = None
    store: StateStore | None = None

    @property
    def db(self) -> Path:
        return self.root / "warehouse.duckdb"

    def table(
        self, rows: Sequence[Sequence[Any]], name: str = "people", *, replace: bool = True
    ) -> None:
        create_table(self.db, name, PROFILE_COLUMNS, rows, replace=replace)

    @property
    def plugin(self) -> DestinationPlugin:
        return plugin_of(self.sandbox)

    def configure(self, syncs: list[dict[str, Any]]) -> Project:
        """Write and load a project holding ``syncs``: the warehouse, and a connection named
        after the destination type that points at this rig's sandbox."""
        plugin = self.plugin
        connections: dict[str, Any] = {
            "warehouse": {"type": "duckdb", "path": "warehouse.duckdb"},
            plugin.type: plugin.sandbox_connection(self.sandbox.settings, self.base_url),
        }
        write_project(
            self.root,
            {
                "connections": connections,
                "state": {"url": "sqlite:///state/state.db"},
                "error_dir": "errors",
                "syncs": syncs,
            },
        )
        self.project = load_project(None, self.root, env={})
        if self.store is None:
            self.store = StateStore(self.project.state.url, root=self.root)
        return self.project

    def run(self, sync: str, **options: Any) -> RunResult:
        assert self.project is not None and self.store is not None, "configure() first"
        result = run_sync(self.project, sync, self.store, RunOptions(**options))
        assert self.sandbox.wait_idle(30), "sandbox jobs did not finish"
        return result

    def watermark(self, sync: str) -> Watermark | None:
        assert self.store is not None
        return self.store.watermark(sync)

    def last_run(self, sync: str) -> RunRecord:
        assert self.store is not None
        return self.store.last_runs(sync, limit=1)[0]

    def requests(self, method: str, path_prefix: str) -> list[Any]:
        return [
            r
            for r in self.sandbox.request_log
            if r.method == method and r.path.startswith(path_prefix)
        ]


def error_rows(result: RunResult) -> list[dict[str, str]]:
    assert result.record.error_file, "the run wrote no error file"
    return read_csv_rows(result.record.error_file)


def assert_counts_add_up(result: RunResult) -> None:
    c = result.record.counts
    assert c.read == c.sent + c.rejected, c
    assert c.sent == c.created + c.updated + c.failed, c


def assert_counts(result: RunResult, exit_code: int, **expected: int) -> None:
    """The exit code and the named counts of a run, which must add up: most runs end so."""
    assert result.exit_code == exit_code, result.record.message
    got = {name: getattr(result.record.counts, name) for name in expected}
    assert got == expected, got
    assert_counts_add_up(result)


@contextlib.contextmanager
def served(sandbox: Sandbox, root: Path) -> Iterator[Rig]:
    with SandboxServer(sandbox) as server:
        rig = Rig(root, sandbox, server.base_url)
        try:
            yield rig
        finally:
            if rig.store is not None:
                rig.store.close()


def rig_fixture(
    request: pytest.FixtureRequest, tmp_path: Path, factory: type[Sandbox]
) -> Iterator[Callable[..., Rig]]:
    """Body of the per-file fixtures: ``start(**settings)`` serves a sandbox for the test and
    stops it afterwards. The sandbox must end with no violation (nothing off-spec was sent)
    and no internal error; a test marked xfail asserts violations itself instead."""
    started: list[Sandbox] = []
    with contextlib.ExitStack() as stack:

        def start(**settings: Any) -> Rig:
            settings.setdefault("speedup", 50.0)
            sandbox = factory(SandboxSettings(**settings))
            started.append(sandbox)
            root = tmp_path / f"project{len(started)}"
            root.mkdir()
            return stack.enter_context(served(sandbox, root))

        yield start
    for sandbox in started:
        assert sandbox.internal_errors == [], sandbox.internal_errors
        if request.node.get_closest_marker("xfail") is None:
            assert sandbox.violations == [], sandbox.violations

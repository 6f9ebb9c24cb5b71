"""The destination contract: what every (destination type, object) the registry lists must do,
run against its sandbox through the real engine, client and destination (in the spirit of dlt's
destination tests). Each test takes ``case`` (tests/contract/cases.py) and runs once per
destination object; what is particular to one destination stays in its own test files."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from reverse_etl import engine
from reverse_etl.config import load_project
from reverse_etl.destinations import registry, rowjson
from reverse_etl.errors import EXIT_FAILED, EXIT_OK, EXIT_ROW_ERRORS, ConfigError
from reverse_etl.sandbox import SandboxSettings
from reverse_etl.sandbox.spec import find_specs
from reverse_etl.state import Watermark
from reverse_etl.transform.rowerrors import FIXES
from reverse_etl.transform.transformer import MESSAGES
from tests.contract.cases import CASES, SYNC, Case, registered
from tests.helpers import at, write_project
from tests.sandboxes import (
    Rig,
    assert_counts,
    assert_created_once,
    error_rows,
    every_fault,
    fast_clients,
    fast_faulty_clients,
    faults_met,
    set_faults,
    spec_problems,
)

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def writes(rig: Rig) -> list[Any]:
    return [r for r in rig.sandbox.request_log if r.method in WRITES]


def once(case: Case, numbers: Any) -> Counter[str]:
    return Counter({case.key(n): 1 for n in numbers})


def explained(result: Any) -> list[dict[str, str]]:
    """The run's error file rows, each of which must say how to fix it."""
    rows = error_rows(result)
    assert all(r["how_to_fix"] for r in rows), [r["reason"] for r in rows if not r["how_to_fix"]]
    return rows


def begin(start: Any, case: Case, rows: list[tuple[Any, ...]], **sync: Any) -> Rig:
    rig = start()
    case.prepare(rig)
    case.write(rig, rows)
    rig.configure([case.sync(**sync)])
    return rig


def dry_run_lines(result: Any) -> list[tuple[dict[str, Any], bytes]]:
    """Each request a dry run wrote, and its body's bytes as the run would send them."""
    out = []
    for line in Path(result.dry_run_file).read_bytes().splitlines():
        head = line.index(b'"body":')
        out.append((orjson.loads(line), line[head + len(b'"body":') : -1]))
    return out


# --------------------------------------------------------------------------- the registry


def test_every_destination_object_has_a_case():
    missing = sorted(set(registered()) - set(CASES))
    assert not missing, f"add a contract case to tests/contract/cases.py for {missing}"
    assert sorted(CASES) == sorted(registered()), "a case names an object no destination has"


# --------------------------------------------------------------------------- runs


def test_first_run_lands_every_valid_row_and_later_runs_send_only_changes(case, start):
    n = 20
    rows = case.rows(range(n))
    # a row without an identifier, among the others: rejected, the rest land
    rows.append(case.row(100, **{case.identifier: None}, modified_at=at(6.5)))
    rig = begin(start, case, rows)

    first = rig.run(SYNC)

    assert_counts(first, EXIT_ROW_ERRORS, read=n + 1, rejected=1, sent=n, failed=0)
    assert case.landed(rig.sandbox) == once(case, range(n))
    assert case.notes(rig.sandbox) == {case.key(i): f"note {i}" for i in range(n)}
    [error] = explained(first)
    assert (error["identifier"], error["reason"]) == ("", "missing_identifier")
    assert rig.watermark(SYNC) == Watermark(at(n - 1), case.key(n - 1))
    if case.verify:
        case.verify(rig, range(n))
    assert rig.sandbox.violations == []

    rows.pop()  # rows without an identifier are read again every run: this one is filtered out
    case.write(rig, rows)
    rig.sandbox.reset_log()
    unchanged = rig.run(SYNC)

    assert_counts(unchanged, EXIT_OK, read=0, sent=0)
    assert writes(rig) == []
    assert rig.watermark(SYNC) == Watermark(at(n - 1), case.key(n - 1))

    changed = (2, 11, 17)
    for k, i in enumerate(changed):
        rows[i] = case.row(i, note=f"changed {i}", modified_at=at(1000 + k))
    case.write(rig, rows)
    rig.sandbox.reset_log()

    again = rig.run(SYNC)

    assert_counts(again, EXIT_OK, read=3, rejected=0, sent=3, failed=0)
    assert writes(rig), "the changed rows were not sent"
    assert case.landed(rig.sandbox) == once(case, range(n))  # sent again: still one record
    notes = case.notes(rig.sandbox)
    for i in range(n):
        new = case.updates and i in changed
        assert notes[case.key(i)] == (f"changed {i}" if new else f"note {i}"), i
    assert rig.watermark(SYNC) == Watermark(at(1002), case.key(17))
    if case.verify:
        case.verify(rig, range(n))


def test_dry_run_sends_nothing_and_writes_bodies_the_vendor_spec_accepts(case, start):
    cap = case.capabilities
    n = min(cap.batch_records + 1, 250)  # more than one call where a call takes few records
    batch = 100  # and more than one batch: each batch becomes calls of its own
    rig = begin(start, case, case.rows(range(n)), batch_size=batch)

    result = rig.run(SYNC, dry_run=True)

    assert result.record.status == "dry_run" and result.exit_code == EXIT_OK
    assert writes(rig) == []
    assert case.landed(rig.sandbox) == Counter()
    assert rig.watermark(SYNC) is None
    lines = dry_run_lines(result)
    assert sum(line["rows"] for line, _ in lines) == n == result.record.counts.sent
    assert len(lines) >= -(-n // min(batch, cap.batch_records))
    for line, body in lines:
        assert line["rows"] <= min(batch, cap.batch_records) and len(body) <= cap.batch_bytes
    if find_specs().path is None:
        pytest.skip("the vendor specs are not found: the bodies cannot be checked against them")
    for line, _ in lines:
        assert spec_problems(rig.sandbox, line["method"], line["path"], line["body"]) == []


def test_every_request_of_a_run_is_on_spec(case, start):
    odd = [None, "", 'ünïcödé ✓ “quoted” "escaped" \\ back\nslash', "🦜" * 50, "x" * 20_000]
    rows = [case.row(i, note=odd[i % len(odd)]) for i in range(10)]
    rig = begin(start, case, rows)

    result = rig.run(SYNC)

    assert result.exit_code == EXIT_OK, result.record.message
    assert case.landed(rig.sandbox) == once(case, range(10))
    assert rig.sandbox.violations == [] and rig.sandbox.internal_errors == []


# --------------------------------------------------------------------------- failures


def test_a_failed_run_keeps_unacknowledged_rows_behind_the_watermark(case, start, monkeypatch):
    fast_clients(monkeypatch, max_attempts=3, settle_margin=0.2)
    n, batch = 40, 10
    rig = begin(start, case, case.rows(range(n)), batch_size=batch)

    # the API is down from the start: nothing lands, nothing is acknowledged
    set_faults(rig.sandbox, 1.0, ("500",))
    down = rig.run(SYNC)
    assert down.exit_code == EXIT_FAILED and down.record.status == "failed"
    assert rig.watermark(SYNC) is None
    assert case.landed(rig.sandbox) == Counter()

    # the API fails once the first batch is acknowledged
    set_faults(rig.sandbox, 0.0)
    store = rig.store
    assert store is not None
    original = store.set_watermark
    marks: list[Watermark] = []

    def break_after_first_ack(sync: str, mark: Watermark) -> None:
        original(sync, mark)
        marks.append(mark)
        set_faults(rig.sandbox, 1.0, ("500",))  # writes and job polls answer 500 from now on

    monkeypatch.setattr(store, "set_watermark", break_after_first_ack)
    failed = rig.run(SYNC)
    monkeypatch.setattr(store, "set_watermark", original)

    first_batch = Watermark(at(batch - 1), case.key(batch - 1))
    assert failed.exit_code == EXIT_FAILED and failed.record.status == "failed"
    assert marks == [first_batch] and rig.watermark(SYNC) == first_batch
    assert failed.record.counts.sent == batch
    unsent = [r for r in explained(failed) if r["reason"] == "not_sent"]
    assert unsent and {r["identifier"] for r in unsent} <= {case.key(i) for i in range(batch, n)}
    # rows of batches in flight may have landed: the next run sends them again
    assert all(count == 1 for count in case.landed(rig.sandbox).values())

    set_faults(rig.sandbox, 0.0)
    resumed = rig.run(SYNC)

    assert_counts(resumed, EXIT_OK, read=n - batch, sent=n - batch, rejected=0, failed=0)
    assert case.landed(rig.sandbox) == once(case, range(n))  # none lost, none twice
    assert rig.watermark(SYNC) == Watermark(at(n - 1), case.key(n - 1))
    if case.verify:
        case.verify(rig, range(n))


def test_a_run_through_injected_faults_lands_everything_once(case, fault_seed, start, monkeypatch):
    # A client timeout shorter than the sandbox's held answer makes `timeout` a real timeout:
    # the request is applied after the client gave up on its answer. The one-off creates at the
    # start of a run meet the faults as much as the record calls do.
    if case.fault_settle is None:
        fast_faulty_clients(monkeypatch)
    else:
        fast_faulty_clients(monkeypatch, settle_margin=case.fault_settle)
    n = case.fault_rows
    rig = start(**{**every_fault(fault_seed), "fault_rate": case.fault_rate})
    case.prepare(rig)
    case.write(rig, case.rows(range(n)))
    rig.configure([case.sync(**case.fault_sync)])

    result = rig.run(SYNC)

    assert_counts(result, EXIT_OK, read=n, sent=n, rejected=0, failed=0)
    assert case.landed(rig.sandbox) == once(case, range(n))
    assert case.notes(rig.sandbox) == {case.key(i): f"note {i}" for i in range(n)}
    assert_created_once(rig.sandbox)
    assert rig.watermark(SYNC) == Watermark(at(n - 1), case.key(n - 1))
    if case.verify:
        case.verify(rig, range(n))
    met = faults_met(rig.sandbox)
    assert sum(met.values()) >= 3, met  # the run really met faults


# --------------------------------------------------------------------------- sizes


@pytest.fixture
def roomy_scratch() -> Any:
    """The engine's scratch DuckDB with room for batches of long values, for the tests of
    splitting and refusing by size (see test_a_batch_of_long_values_fits_the_scratch_memory)."""
    from reverse_etl.util import memory

    scratch = rowjson.scratch
    scratch.set_memory_limit(1 << 30)
    yield
    scratch.set_memory_limit(memory.current().scratch)


def test_a_record_over_the_record_limit_is_a_row_error_and_the_rest_land(case, start):
    limit = case.capabilities.record_bytes
    if limit is None:
        pytest.skip(f"{case.id} declares no record size limit")
    rows = case.rows(range(6))
    rows[3] = case.row(3, note="x" * (limit + 20_000))
    rows[4] = case.row(4, note="y" * (limit * 9 // 10))  # large, but under the limit
    rig = begin(start, case, rows)

    result = rig.run(SYNC)

    # found before sending (screen): rejected, never sent
    assert_counts(result, EXIT_ROW_ERRORS, read=6, rejected=1, sent=5, failed=0)
    [error] = explained(result)
    assert (error["identifier"], error["reason"]) == (case.key(3), "value_too_large")
    assert str(limit) in error["message"]
    assert case.landed(rig.sandbox) == once(case, (0, 1, 2, 4, 5))
    assert case.notes(rig.sandbox)[case.key(4)] == "y" * (limit * 9 // 10)


def test_a_batch_over_the_call_size_is_split_and_lands(case, start, roomy_scratch):
    cap = case.capabilities
    # records a little larger than a call's bytes shared out among its records (and under the
    # record limit), so that fewer records than a call takes need more bytes than it carries
    size = min(-(-cap.batch_bytes * 21 // (cap.batch_records * 20)), 90_000)
    if cap.record_bytes is not None:
        size = min(size, cap.record_bytes * 9 // 10)
    n = cap.batch_bytes // size + 2
    assert n <= cap.batch_records
    rows = [case.row(i, note=chr(ord("a") + i % 26) * size) for i in range(n)]
    rig = begin(start, case, rows)

    planned = rig.run(SYNC, dry_run=True)

    lines = dry_run_lines(planned)
    assert len(lines) > 1 and sum(line["rows"] for line, _ in lines) == n
    assert all(len(body) <= cap.batch_bytes for _, body in lines)

    result = rig.run(SYNC)

    assert_counts(result, EXIT_OK, read=n, sent=n, rejected=0, failed=0)
    assert case.landed(rig.sandbox) == once(case, range(n))
    notes = case.notes(rig.sandbox)
    assert all(len(notes[case.key(i)]) == size for i in range(n))


def test_a_batch_of_long_values_fits_the_scratch_memory(case, start):
    # 30 records of 90 KB: within every limit of every destination here, 2.7 MB in one batch
    rows = [case.row(i, note=chr(ord("a") + i % 26) * 90_000) for i in range(30)]
    rig = begin(start, case, rows)

    result = rig.run(SYNC)

    assert_counts(result, EXIT_OK, read=30, sent=30, rejected=0, failed=0)
    assert case.landed(rig.sandbox) == once(case, range(30))


def test_a_record_larger_than_a_call_is_a_row_error_and_the_rest_land(case, start, roomy_scratch):
    cap = case.capabilities
    rows = case.rows(range(4))
    rows[1] = case.row(1, note="z" * (cap.batch_bytes + 1000))
    rig = begin(start, case, rows)

    result = rig.run(SYNC)

    assert_counts(result, EXIT_ROW_ERRORS, read=4, rejected=1, sent=3, failed=0)
    [error] = explained(result)
    assert (error["identifier"], error["reason"]) == (case.key(1), "value_too_large")
    assert case.landed(rig.sandbox) == once(case, (0, 2, 3))


# --------------------------------------------------------------------------- configuration


def config_error(root: Path, case: Case, sync: dict[str, Any]) -> str | None:
    """The ConfigError loading a project with only ``sync`` gives (None: it loads)."""
    plugin = registry.plugin_for(case.type)
    connection = plugin.sandbox_connection(SandboxSettings(), "http://127.0.0.1:9")
    write_project(
        root,
        {
            "connections": {
                "warehouse": {"type": "duckdb", "path": "warehouse.duckdb"},
                case.type: connection,
            },
            "syncs": [sync],
        },
    )
    try:
        load_project(None, root, env={})
    except ConfigError as exc:
        return str(exc)
    return None


def test_the_config_check_follows_the_capabilities(case, tmp_path):
    cap = case.capabilities
    assert config_error(tmp_path, case, case.sync()) is None

    listed = config_error(tmp_path, case, case.sync(destination={"list": "Somewhere"}))
    if cap.takes_list:
        assert listed is None
    else:
        assert listed is not None and "destination.list" in listed

    consent = {"consent": {"email": "note"}}
    with_consent = config_error(tmp_path, case, case.sync(**consent))
    if cap.takes_consent:
        assert with_consent is None
    else:
        assert with_consent is not None and "consent:" in with_consent

    unknown = config_error(tmp_path, case, case.sync(destination={"no_such_option": 1}))
    assert unknown is not None and "destination.no_such_option" in unknown
    assert "Valid keys: " + ", ".join(["connection", "list", *cap.options]) in unknown

    for option in cap.bool_options:
        wrong = config_error(tmp_path, case, case.sync(destination={option: "yes"}))
        assert wrong is not None and f"destination.{option}: true or false" in wrong


# --------------------------------------------------------------------------- reason codes


def _reported_reasons(modules: list[Any]) -> set[str]:
    """Reason codes the modules' source passes, as literals, to a parameter named ``reason``
    (``RowError``, ``row_errors``, ``Check`` ...)."""
    found: set[str] = set()
    for module in modules:
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "reason" and isinstance(kw.value, ast.Constant):
                    found.add(kw.value.value)
            target = _resolve(module, node.func)
            try:
                params = list(inspect.signature(target).parameters) if target else []
            except (TypeError, ValueError):
                params = []
            if "reason" not in params:
                continue
            if params[0] in ("self", "cls"):
                params = params[1:]
            index = params.index("reason")
            if index < len(node.args) and isinstance(node.args[index], ast.Constant):
                found.add(node.args[index].value)
    return found


def _resolve(module: Any, func: ast.expr) -> Any:
    if isinstance(func, ast.Name):
        return getattr(module, func.id, None)
    if isinstance(func, ast.Attribute):
        owner = _resolve(module, func.value)
        return getattr(owner, func.attr, None) if owner is not None else None
    return None


def _package_modules(type_: str) -> list[Any]:
    """Every module of the package that holds the destination's objects."""
    plugin = registry.plugin_for(type_)
    first = next(iter(plugin.objects.values())).partition(":")[0]
    package = importlib.import_module(first.rpartition(".")[0])
    return [package] + [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
    ]


@pytest.mark.parametrize("type_", sorted(registry.plugins()))
def test_every_reason_code_a_destination_reports_says_how_to_fix_it(type_):
    plugin = registry.plugin_for(type_)
    reported = _reported_reasons(_package_modules(type_))
    assert "destination_rejected" in reported  # the scan sees the codes
    fixes = {**FIXES, **plugin.reasons}
    assert sorted(r for r in reported if not fixes.get(r)) == []
    # its own codes are its own: not a shared code redefined, and each one reported
    assert sorted(set(plugin.reasons) & set(FIXES)) == []
    assert sorted(set(plugin.reasons) - reported) == []


def test_every_shared_reason_code_says_how_to_fix_it():
    # the transform's codes (every destination may report them) and the engine's own
    shared = set(MESSAGES) | _reported_reasons([engine])
    assert "not_sent" in shared and "missing_identifier" in shared
    assert sorted(r for r in shared if not FIXES.get(r)) == []

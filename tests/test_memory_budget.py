"""The process's memory budget (util/memory.py) and the read-ahead bounded in bytes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import duckdb
import pytest

from reverse_etl.config import load_project
from reverse_etl.errors import ConfigError
from reverse_etl.sources.duckdb import DuckDBSource
from reverse_etl.util import memory, scratch
from reverse_etl.util.prefetch import prefetch

MIB = memory.MIB


@pytest.fixture(autouse=True)
def _default_budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(memory.ENV, raising=False)
    yield
    monkeypatch.delenv(memory.ENV, raising=False)
    memory.configure(None)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("400MB", 400_000_000),
        ("400MiB", 400 * MIB),
        ("1.5GiB", 3 * 512 * MIB),
        ("512 mib", 512 * MIB),
        ("2GB", 2_000_000_000),
        ("2G", 2_000_000_000),
        ("512M", 512_000_000),
        ("33554432", 32 * MIB),
    ],
)
def test_sizes_are_read_as_duckdb_spells_them(text: str, size: int) -> None:
    assert memory.parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "400 megabytes", "-1GB", "", "1.2.3MB"])
def test_a_size_that_is_not_one_says_how_to_write_it(text: str) -> None:
    with pytest.raises(ValueError, match="400MB, 1GB, 512MiB or 25%"):
        memory.parse_size(text)


def test_a_share_of_the_machine_and_a_size_too_small_for_duckdb() -> None:
    assert memory.parse_size("50%") == memory.parse_size("100%") // 2
    with pytest.raises(ValueError, match="too small"):
        memory.parse_size("100B")


def test_a_bad_size_in_the_environment_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(memory.ENV, "plenty")
    with pytest.raises(ConfigError, match=memory.ENV):
        memory.configure(None)


def test_the_shares_fit_in_the_budget_and_grow_with_it() -> None:
    for total in (512 * MIB, 1024 * MIB, 4096 * MIB):
        b = memory.Budget(total)
        assert b.source + b.snapshot + b.read_ahead <= total - memory.BASELINE
        assert b.total >= b.floor
    small, large = memory.Budget(512 * MIB), memory.Budget(4096 * MIB)
    assert large.source > small.source and large.snapshot > small.snapshot
    assert large.read_ahead > small.read_ahead


def test_a_budget_below_the_floors_uses_the_floors_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="reverse_etl.util.memory"):
        b = memory.configure("200MB")
    assert b.source >= 160 * MIB and b.snapshot >= 64 * MIB and b.read_ahead >= 24 * MIB
    assert "below what the engine's queries need" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="reverse_etl.util.memory"):
        memory.configure(None)  # the default is at or above the floors: no warning
    assert caplog.text == ""


def test_the_environment_overrides_the_project_file(monkeypatch: pytest.MonkeyPatch) -> None:
    assert memory.configure("1GB").total == 1_000_000_000
    monkeypatch.setenv(memory.ENV, "2GiB")
    assert memory.configure("1GB").total == 2 << 30
    assert memory.current().total == 2 << 30


def _setting(con: duckdb.DuckDBPyConnection, name: str) -> str:
    row = con.execute(f"SELECT current_setting('{name}')").fetchone()
    assert row is not None
    return str(row[0])


def _mib(setting: str) -> float:
    number, unit = setting.split()
    return float(number) * {"MiB": 1, "GiB": 1024, "KiB": 1 / 1024}[unit]


def test_the_warehouse_and_the_scratch_database_take_their_shares(tmp_path) -> None:
    budget = memory.configure("1GiB")
    db = tmp_path / "wh.duckdb"
    duckdb.connect(str(db)).close()
    with DuckDBSource(db) as source:
        assert _mib(_setting(source._con, "memory_limit")) == pytest.approx(
            budget.source / MIB, rel=0.01
        )
        assert int(_setting(source._con, "threads")) == memory.threads_for(budget.source)
    # a profile's own memory_limit still wins
    with DuckDBSource(db, memory_limit="300MB", threads=1) as source:
        assert _mib(_setting(source._con, "memory_limit")) == pytest.approx(286, rel=0.01)
    con = scratch.cursor()
    try:
        assert _mib(_setting(con, "memory_limit")) == pytest.approx(budget.scratch / MIB, rel=0.01)
        memory.configure("300MiB")  # a smaller budget reaches the open scratch database
        assert _mib(_setting(con, "memory_limit")) == pytest.approx(
            memory.current().scratch / MIB, rel=0.01
        )
    finally:
        con.close()


def test_the_project_file_takes_a_memory_limit_and_refuses_a_bad_one(tmp_path) -> None:
    (tmp_path / "profiles").mkdir()
    base = "connections:\n  wh: {type: duckdb, path: wh.duckdb}\n"
    (tmp_path / "profiles" / "profiles.yml").write_text(base + "memory_limit: 1GB\n")
    assert load_project(root=tmp_path).memory_limit == "1GB"
    (tmp_path / "profiles" / "profiles.yml").write_text(base + "memory_limit: plenty\n")
    with pytest.raises(ConfigError, match="memory_limit"):
        load_project(root=tmp_path)


def test_release_hands_memory_back_without_failing() -> None:
    memory.release()
    memory.release()


# --------------------------------------------------------------------------- read-ahead


def _ahead(max_bytes: int | None, sizes: list[int]) -> tuple[list[int], int]:
    """Consume a prefetch of ``sizes`` slowly; return what came and the most items the
    producer ever had out (made but not yet taken by the consumer)."""
    made, taken = [0], [0]
    most = [0]
    lock = threading.Lock()

    def source() -> Iterator[int]:
        for n in sizes:
            with lock:
                made[0] += 1
                most[0] = max(most[0], made[0] - taken[0])
            yield n

    out = []
    for item in prefetch(source(), depth=100, max_bytes=max_bytes, size=lambda n: n):
        if not out:  # let the producer run as far ahead as it may (a hang guard, not a time)
            give_up = time.monotonic() + (60 if max_bytes is None else 0.5)
            while made[0] < len(sizes) and time.monotonic() < give_up:
                time.sleep(0.01)
        with lock:
            taken[0] += 1
        out.append(item)
    return out, most[0]


def test_the_read_ahead_is_bounded_in_bytes() -> None:
    sizes = [10] * 30
    out, most = _ahead(25, sizes)
    assert out == sizes
    # two queued (20 bytes), a third made and waiting for room, the one being consumed
    assert most <= 4
    _, unbounded = _ahead(None, sizes)
    assert unbounded == len(sizes)  # without a byte bound only depth (100) holds it back


def test_an_item_larger_than_the_bound_still_goes_alone() -> None:
    sizes = [5, 100, 5, 100, 5]
    out, most = _ahead(50, sizes)
    assert out == sizes
    assert most <= 3

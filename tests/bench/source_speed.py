"""`make bench`: how promptly a PostgreSQL source streams and cancels, in seconds.

tests/test_sources.py used to assert these under 5 s; it now asserts the behaviour instead
(the server is still producing when the first batch arrives; a closed stream's COPY is
cancelled, not drained) and this prints the time. It is a pytest module, not named ``test_*``
so that `make test` does not collect it, and run by `make bench` as

    python -m pytest -q -s -p no:cacheprovider tests/bench/source_speed.py

to reuse the throw-away PostgreSQL server of ``tests.warehouses``. It asserts only that the
rows are right, never a time.
"""

from __future__ import annotations

import statistics
import time

pytest_plugins = ["tests.warehouses"]

ROWS = 100_000_000  # a buffered driver would need minutes and gigabytes before the first batch
RUNS = 5


def test_postgres_first_batch_close_and_next_statement(postgres_dsn: str) -> None:
    from reverse_etl.sources.postgres import PostgresSource

    sql = (
        "SELECT a * 100000 + b AS id, now() AS ts FROM generate_series(0, 999) a, "
        "generate_series(1, 100000) b WHERE b > %(after)s"
    )
    first_batch, close_and_next = [], []
    with PostgresSource(postgres_dsn, batch_size_hint_bytes=1 << 20) as src:
        for _ in range(RUNS):
            t0 = time.perf_counter()
            stream = src.stream(sql, {"after": 10}, 5000)
            first = next(stream)
            t1 = time.perf_counter()
            stream.close()  # cancels the server's COPY
            (again,) = list(src.stream("SELECT 1 AS one", {}, 10))
            t2 = time.perf_counter()
            assert first.num_rows == 5000 and first.column("id")[0].as_py() == 11
            assert again.column("one")[0].as_py() == 1
            first_batch.append(t1 - t0)
            close_and_next.append(t2 - t1)
    print(
        f"\nPostgreSQL, {ROWS:,}-row query: first batch in "
        f"{statistics.median(first_batch) * 1000:,.0f} ms (worst "
        f"{max(first_batch) * 1000:,.0f}); close + next statement in "
        f"{statistics.median(close_and_next) * 1000:,.0f} ms (worst "
        f"{max(close_and_next) * 1000:,.0f}), {RUNS} runs"
    )

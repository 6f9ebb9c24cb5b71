"""The state store on PostgreSQL, as a team shares it: watermarks, runs and the lock."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from reverse_etl.errors import LockHeldError
from reverse_etl.state import RunRecord, StateStore, Watermark, locks, now


@pytest.fixture()
def pg_url(postgres_dsn: str) -> str:
    url = postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(url)
    with engine.begin() as con:  # each test starts from an empty store
        for table in ("retl_watermarks", "retl_runs", "retl_locks"):
            con.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()
    return url


@pytest.mark.parametrize(
    "cursor, ident",
    [
        (datetime(2025, 3, 1, 10, 0, 0, 123456, tzinfo=UTC), "a@example.com"),
        (datetime(2025, 3, 1, 10, 0), 42),
        (date(2025, 3, 1), None),
        (12345, Decimal("10.50")),
    ],
)
def test_watermarks_round_trip_with_their_types(pg_url: str, cursor: object, ident: object) -> None:
    store = StateStore(pg_url)
    assert store.watermark("s") is None
    store.set_watermark("s", Watermark(cursor, ident))
    other = StateStore(pg_url)  # another process of the team reads the same value back
    assert other.watermark("s") == Watermark(cursor, ident)
    assert type(other.watermark("s").cursor) is type(cursor)
    store.reset_watermark("s")
    assert other.watermark("s") is None
    store.close()
    other.close()


def test_two_stores_share_one_lock(pg_url: str) -> None:
    first, second = StateStore(pg_url), StateStore(pg_url)
    with first.lock("sync_a", "run-1"):
        with (
            pytest.raises(LockHeldError, match="already running") as exc,
            second.lock("sync_a", "run-2"),
        ):
            pass
        assert "reverse-etl unlock sync_a" in str(exc.value)
        with second.lock("sync_b", "run-3"):  # another sync is not blocked
            pass
    with second.lock("sync_a", "run-4"):  # released after the first run ended
        pass
    first.close()
    second.close()


def test_stale_lock_is_taken_over(pg_url: str) -> None:
    dead = StateStore(pg_url)
    dead._acquire("s", "run-dead")  # a process that died without releasing
    live = StateStore(pg_url, stale_after=timedelta(seconds=0))
    with live.lock("s", "run-live") as handle:
        assert handle.run_id == "run-live" and not handle.lost
        # the old run, were it only paused, can neither beat nor release the new holder's lock
        assert dead.heartbeat("s", "run-dead") is False
        assert dead.release("s", "run-dead") is False
        assert live.unlock("s") is True
    dead.close()
    live.close()


def test_run_history_is_kept_in_order(pg_url: str) -> None:
    store = StateStore(pg_url)
    for i in range(3):
        record = RunRecord(
            run_id=f"r{i}", sync="s", started_at=now() + timedelta(seconds=i), status="running"
        )
        store.start_run(record)
        record.status = "success"
        record.counts.read, record.counts.sent = 10 * i, 10 * i
        record.ended_at = now()
        store.save_run(record)
    runs = store.last_runs("s", limit=2)
    assert [r.run_id for r in runs] == ["r2", "r1"]
    assert runs[0].counts.read == 20 and runs[0].started_at.tzinfo is not None
    assert store.last_started("s") == runs[0].started_at
    store.close()


def test_lock_messages_give_utc_times_whatever_the_session_time_zone(pg_url: str) -> None:
    url = pg_url + "?options=-ctimezone%3DAmerica/New_York"  # timestamptz come back in -05:00
    store = StateStore(url)
    with store.engine.connect() as con:
        assert con.execute(sa.text("SHOW timezone")).scalar() == "America/New_York"
    beat = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
    store.start_run(RunRecord(run_id="dead", sync="s", started_at=beat, status="running"))
    with store.engine.begin() as con:
        con.execute(
            sa.insert(locks).values(
                sync="s", run_id="dead", owner="gone:1", acquired_at=beat, heartbeat_at=beat
            )
        )
    patient = StateStore(url, stale_after=timedelta(days=365 * 100))
    with pytest.raises(LockHeldError, match="started 2025-03-01 10:00:00 UTC"):
        patient._acquire("s", "other")
    with store.lock("s", "next"):  # stale for the default stale_after: taken over
        pass
    (dead,) = store.last_runs("s")
    assert dead.status == "abandoned" and dead.ended_at == beat
    assert "stopped heartbeating at 2025-03-01 10:00:00 UTC" in (dead.message or "")
    store.close()
    patient.close()

"""Pacing on an injected clock: the client's token buckets (``ratelimit.RateLimiter``), the
Dotdigital call budget (``pacing.CallBudget``), the shared client's ``Retry-After`` wait and
the sandbox's enforcement of the published limits (``sandbox.limits``).

Nothing here sleeps or reads the wall clock: time is a number the fake sleep advances, so how
long N calls take is an exact figure, the same on an idle laptop and on a loaded CI runner.
(The wall-clock speed of the same code is printed by ``make bench``, never asserted.)
"""

from __future__ import annotations

import math
import random
import types
from collections.abc import Iterator

import httpx
import orjson
import pytest

from reverse_etl.destinations import http
from reverse_etl.destinations.dotdigital.pacing import CallBudget
from reverse_etl.destinations.klaviyo.client import LIMITS, PACE
from reverse_etl.destinations.ratelimit import Bucket, RateLimiter, Unlimited
from reverse_etl.sandbox import KlaviyoSandbox, SandboxServer
from reverse_etl.sandbox.limits import (
    FixedWindow,
    TokenBuckets,
    Window,
    klaviyo_windows,
    retry_after_headers,
)
from reverse_etl.sandbox.spec import SPEC_FILES, load_spec
from tests.sandbox.sandbox_helpers import FakeTime, klaviyo_headers

EPOCH = 1_750_000_000.0  # a whole second, so X-RateLimit-Reset rounding is easy to follow


def limiter(t: FakeTime, burst: float, steady: float, speedup: float = 1.0) -> RateLimiter:
    return RateLimiter(burst, steady, speedup=speedup, clock=t.clock, sleep=t.sleep)


def klaviyo_spec_limits() -> dict[str, dict[str, str]]:
    """operationId -> ``x-klaviyo-ratelimit`` for every Klaviyo operation in the specs."""
    found: dict[str, dict[str, str]] = {}
    for name in SPEC_FILES:
        if not name.startswith("klaviyo/"):
            continue
        for item in load_spec(name).raw["paths"].values():
            for op in item.values():
                if isinstance(op, dict) and "x-klaviyo-ratelimit" in op:
                    found[op["operationId"]] = op["x-klaviyo-ratelimit"]
    return found


# --------------------------------------------------------------------------- RateLimiter


def test_a_full_burst_goes_through_without_waiting():
    t = FakeTime(100.0)
    lim = limiter(t, 10, 150)
    assert [lim.acquire() for _ in range(10)] == [0.0] * 10
    assert t.slept == [] and t.now == 100.0 and lim.waits == 0


def test_the_call_after_the_burst_waits_one_refill_interval():
    t = FakeTime()
    lim = limiter(t, 10, 150)
    for _ in range(10):
        lim.acquire()
    assert lim.acquire() == pytest.approx(0.1)  # 10 a second: one token every 0.1 s
    assert t.slept == [pytest.approx(0.1)]
    assert lim.waited == pytest.approx(0.1) and lim.waits == 1


def test_n_calls_take_exactly_what_burst_and_steady_allow():
    # From full buckets, 10/s + 150/min allows min(10 + 10 t, 150 + 2.5 t) calls by time t:
    # the burst rate binds until the steady bucket runs dry (call 196), then 2.5 calls a second.
    t = FakeTime()
    lim = limiter(t, 10, 150)
    stamps = []
    for _ in range(300):
        lim.acquire()
        stamps.append(t.now)
    assert stamps[149] == pytest.approx(14.0)  # call 150: (150 - 10) / 10
    assert stamps[195] == pytest.approx(18.6)  # call 196: the last at the burst rate
    assert stamps[196] == pytest.approx(18.8)  # call 197: (197 - 150) / 2.5, steady-bound
    assert stamps[299] == pytest.approx(60.0)  # 150 at once, then 150 refilled in a minute
    assert sum(t.slept) == pytest.approx(60.0)
    assert all(b >= a for a, b in zip(stamps, stamps[1:], strict=False))


def test_speedup_compresses_the_same_schedule():
    slow, fast = FakeTime(), FakeTime()
    a, b = limiter(slow, 10, 150), limiter(fast, 10, 150, speedup=60.0)
    for _ in range(300):
        a.acquire()
        b.acquire()
    assert fast.now == pytest.approx(slow.now / 60.0) and fast.now == pytest.approx(1.0)


def test_idle_time_refills_up_to_the_bucket_size_only():
    t = FakeTime()
    lim = limiter(t, 10, 150)
    for _ in range(10):
        lim.acquire()
    t.now += 3600.0  # an hour idle refills 10 burst tokens, not 36,000
    assert [lim.acquire() for _ in range(10)] == [0.0] * 10
    assert lim.acquire() == pytest.approx(0.1)


def test_sleeping_the_computed_wait_is_enough_for_one_call():
    # Floats: refilling 1/3 s at 3 tokens a second does not always sum back to exactly 1.0.
    # One sleep must do, or every paced call would pay for a second, tiny sleep.
    t = FakeTime(1234.5)
    lim = limiter(t, 3, 100_000)
    for _ in range(3 + 300):
        lim.acquire()
    assert len(t.slept) == 300
    assert t.now - 1234.5 == pytest.approx(100.0)


def test_a_clock_that_steps_back_takes_no_tokens():
    bucket = Bucket(5, 1.0, stamp=50.0)
    assert bucket.wait_time(40.0) == 0.0 and bucket.tokens == 5
    assert Bucket(5, 1.0).tokens == 5  # the old positional form: starts full, now
    t = FakeTime(50.0)
    server = TokenBuckets(clock=t.clock)
    windows = (Window(5, 5.0, "w"),)
    assert server.acquire(("k",), windows) == 0.0
    t.now = 40.0  # the sandbox's side: the 4 tokens left stay 4
    assert [server.acquire(("k",), windows) for _ in range(4)] == [0.0] * 4


def test_unlimited_never_waits():
    free = Unlimited()
    assert all(free.acquire() == 0.0 for _ in range(10_000))
    assert free.waited == 0.0 and free.waits == 0


def test_default_clock_is_real_time_and_a_fresh_limiter_does_not_wait():
    lim = RateLimiter(10, 150, speedup=2.0)  # the signature other code calls
    assert [lim.acquire() for _ in range(10)] == [0.0] * 10


# ------------------------------------------------ the Klaviyo client against the sandbox


def test_client_limits_are_the_specs_published_limits():
    published = klaviyo_spec_limits()
    for op, (burst, steady) in LIMITS.items():
        windows = {w.name: w for w in klaviyo_windows(published[op])}
        assert (windows["burst"].limit, windows["burst"].period) == (burst, 1.0), op
        assert (windows["steady"].limit, windows["steady"].period) == (steady, 60.0), op


@pytest.mark.parametrize("speedup", [1.0, 50.0])
def test_client_pacing_meets_no_refusal_even_with_arrival_jitter(speedup):
    # Requests reach the server late by a varying amount, which bunches them; the client paces
    # at PACE of the published rates so that the bunching never empties the server's bucket.
    # At 100 % the same schedule is refused: the margin is what the test checks.
    published = klaviyo_spec_limits()
    for pace, refusals_expected in ((PACE, False), (1.0, True)):
        t = FakeTime()
        server = TokenBuckets(speedup=speedup, clock=t.clock)
        rng = random.Random(7)
        refused = 0
        for op, (burst, steady) in LIMITS.items():
            lim = limiter(t, burst * pace, steady * pace, speedup)
            windows = tuple(w for w in klaviyo_windows(published[op]) if w.name != "daily")
            arrived = t.now
            for _ in range(int(steady * 2)):
                lim.acquire()
                jitter = rng.uniform(0.0, 0.03) / speedup  # up to 30 ms of vendor time
                arrived = max(arrived, t.now + jitter)  # one connection: answers in order
                saved, t.now = t.now, arrived
                refused += server.acquire(("key", op), windows) > 0
                t.now = saved
        assert (refused > 0) is refusals_expected, (pace, refused)


# --------------------------------------------------------------------------- CallBudget


def test_budget_against_the_sandbox_window_waits_for_each_reset_and_is_never_refused():
    # Dotdigital counts calls in fixed hourly windows and announces the reset as whole epoch
    # seconds; the client stops when the budget is spent and resumes just after the reset.
    t = FakeTime(EPOCH)
    server = FixedWindow(5, 3600.0, clock=t.clock, wall=t.clock)
    budget = CallBudget(margin=0.05, clock=t.clock, sleep=t.sleep)
    for _ in range(12):
        budget.acquire()
        state = server.hit("apiuser")
        assert state.allowed, (t.now - EPOCH, state)
        budget.observe(state.headers())
    # window 1 opens at 0 and resets at 3600; window 2 opens at 3600.05, and its reset,
    # 7200.05, is announced rounded up to 7201: the rounding costs the client 0.95 s
    assert t.slept == [pytest.approx(3600.05), pytest.approx(3601.0)]
    assert t.now - EPOCH == pytest.approx(7201.05)
    assert budget.waits == 2 and budget.waited == pytest.approx(7201.05)


def test_budget_keeps_the_reserve_for_other_clients():
    t = FakeTime(EPOCH)
    server = FixedWindow(10, 60.0, clock=t.clock, wall=t.clock)
    budget = CallBudget(reserve=3, margin=0.0, clock=t.clock, sleep=t.sleep)
    calls_before_wait = 0
    while not t.slept:
        budget.acquire()
        if not t.slept:
            calls_before_wait += 1
        budget.observe(server.hit("apiuser").headers())
    assert calls_before_wait == 7  # 10 a window, 3 left for the others
    assert t.slept == [pytest.approx(60.0)]


def test_budget_waits_out_a_refusal_that_someone_else_caused():
    # another client of the same API user spent the window: the first answer is already a 429
    t = FakeTime(EPOCH)
    server = FixedWindow(3, 3600.0, clock=t.clock, wall=t.clock)
    for _ in range(3):
        server.hit("apiuser")
    budget = CallBudget(margin=0.05, clock=t.clock, sleep=t.sleep)
    budget.acquire()
    refused = server.hit("apiuser")
    assert not refused.allowed and refused.wait == pytest.approx(3600.0)
    budget.observe(refused.headers())
    assert budget.acquire() == pytest.approx(3600.05)
    assert server.hit("apiuser").allowed


# ------------------------------------------------------- ApiClient: 429 and Retry-After


@pytest.fixture
def fake_http_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    """The shared client's sleeps (``Retry-After``, backoff) on a fake clock, in that module
    only: ``http`` reads ``time.sleep`` and ``time.monotonic`` through its attribute ``time``."""
    t = FakeTime()
    monkeypatch.setattr(http, "time", types.SimpleNamespace(sleep=t.sleep, monotonic=t.clock))
    return t


def mock_client(answers: Iterator[httpx.Response], retry: http.RetryPolicy) -> http.ApiClient:
    api = http.ApiClient("http://vendor.test", headers={}, retry=retry, name="Vendor")
    api._http.close()
    api._http = httpx.Client(
        base_url="http://vendor.test", transport=httpx.MockTransport(lambda _: next(answers))
    )
    return api


def test_a_429_waits_exactly_the_retry_after_then_retries(fake_http_time):
    answers = iter([httpx.Response(429, headers={"Retry-After": "7"}), httpx.Response(200)])
    api = mock_client(answers, http.RetryPolicy(max_attempts=3))
    assert api.request("GET", "/things").status_code == 200
    assert fake_http_time.slept == [7.0]
    assert api.throttled == 1 and api.retries == 1


def test_a_long_retry_after_is_capped_and_a_missing_one_waits_a_second(fake_http_time):
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": "86400"}),
            httpx.Response(429),
            httpx.Response(201),
        ]
    )
    api = mock_client(answers, http.RetryPolicy(max_attempts=5, max_retry_after=120.0))
    assert api.request("POST", "/things", idempotent=False).status_code == 201
    assert fake_http_time.slept == [120.0, 1.0]


def test_the_limiter_is_asked_before_every_attempt(fake_http_time):
    t = FakeTime()
    lim = limiter(t, 1, 60)  # one call a second
    answers = iter(
        [
            httpx.Response(503),
            httpx.Response(429, headers={"Retry-After": "0"}),
            httpx.Response(200),
        ]
    )
    api = mock_client(answers, http.RetryPolicy(max_attempts=3, base_delay=0.0))
    assert api.request("GET", "/things", limiter=lim).status_code == 200
    assert t.slept == [pytest.approx(1.0), pytest.approx(1.0)]  # attempts 2 and 3 paced
    assert fake_http_time.slept == [0.0, 0.0]  # no backoff and a zero Retry-After between


# ------------------------------------------------------------------- sandbox enforcement


def test_sandbox_buckets_refill_at_the_published_rate():
    t = FakeTime()
    server = TokenBuckets(clock=t.clock)
    windows = klaviyo_windows({"burst": "10/s", "steady": "150/m"})
    stamps = []
    while len(stamps) < 300:  # a client that honours every wait the sandbox announces
        wait = server.acquire(("k",), windows)
        if wait:
            t.sleep(wait)
        else:
            stamps.append(t.now)
    # the same schedule as the client's limiter: the two sides do the same arithmetic
    assert stamps[149] == pytest.approx(14.0) and stamps[299] == pytest.approx(60.0)


def test_sandbox_retry_after_is_the_wait_rounded_up_and_exact_in_ms():
    t = FakeTime()
    server = TokenBuckets(speedup=0.2, clock=t.clock)  # burst 10/s refills at 2/s
    windows = (Window(10, 1.0, "burst"),)
    assert all(server.acquire(("k",), windows) == 0.0 for _ in range(10))
    wait = server.acquire(("k",), windows)
    assert wait == pytest.approx(0.5)
    assert retry_after_headers(wait) == {"Retry-After": "1", "X-Sandbox-Retry-After-Ms": "500"}
    t.now += 0.499
    assert server.acquire(("k",), windows) == pytest.approx(0.001)
    t.now += 0.001
    assert server.acquire(("k",), windows) == 0.0


def test_sandbox_daily_budget_is_not_refilled_by_the_steady_rate():
    t = FakeTime()
    server = TokenBuckets(clock=t.clock)
    windows = klaviyo_windows({"burst": "10/s", "steady": "150/m", "daily": "150/d"})
    stamps = []
    while True:  # an hour of calls, each as soon as the sandbox allows it
        wait = server.acquire(("k",), windows)
        if not wait:
            stamps.append(t.now)
        elif t.now + wait > 3600.0:
            break
        else:
            t.sleep(wait)
    # burst and steady alone would allow 150 + 2.5 * 3600 calls; the daily bucket, 150 at
    # once and then one every 86400 / 150 = 576 s
    assert stamps[149] == pytest.approx(14.0)
    assert stamps[150:] == pytest.approx([576.0 * n for n in range(1, 7)])


def test_fixed_window_counts_refusals_and_resets_on_the_period():
    t = FakeTime(1000.0)
    window = FixedWindow(3, 3600.0, speedup=60.0, clock=t.clock, wall=lambda: EPOCH + t.now)
    states = [window.hit("u") for _ in range(5)]  # an hour lasts 60 s
    assert [s.allowed for s in states] == [True, True, True, False, False]
    assert [s.remaining for s in states] == [2, 1, 0, 0, 0]
    assert states[3].wait == pytest.approx(60.0)
    assert states[0].headers()["X-RateLimit-Reset"] == str(math.ceil(EPOCH + 1060.0))
    t.now += 59.999
    assert not window.hit("u").allowed  # still the same window
    t.now += 0.001
    fresh = window.hit("u")
    assert fresh.allowed and fresh.remaining == 2
    assert window.peek("other").remaining == 3  # per API user


def test_sandbox_server_and_paced_client_share_a_fake_clock():
    # Over real HTTP: the Klaviyo sandbox enforces create_list's published limits on the fake
    # clock, and the shared client paces itself on the same clock at PACE of those limits.
    # 30 calls: none refused, and the fake time is exactly what the client's buckets imply.
    t = FakeTime()
    sandbox = KlaviyoSandbox()
    sandbox.buckets = TokenBuckets(clock=t.clock)
    burst, steady = LIMITS["create_list"]
    lim = limiter(t, burst * PACE, steady * PACE)
    body = orjson.dumps({"data": {"type": "list", "attributes": {"name": "Paced"}}})
    with SandboxServer(sandbox) as server:
        api = http.ApiClient(server.base_url, headers=klaviyo_headers(sandbox), name="Klaviyo")
        try:
            statuses = [
                api.request(
                    "POST",
                    "/api/lists",
                    content=body,
                    limiter=lim,
                    content_type="application/vnd.api+json",
                    idempotent=False,
                ).status_code
                for _ in range(30)
            ]
        finally:
            api.close()
    assert statuses == [201] * 30
    assert sandbox.counters["throttled"] == 0 and api.throttled == 0
    rate = burst * PACE  # 9.7 tokens, 9.7 a second: call n >= 10 at (n - 9.7) / 9.7
    assert t.now == pytest.approx((30 - rate) / rate)
    assert len(sandbox.lists()) == 30

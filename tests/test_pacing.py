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

from reverse_etl.destinations import http, ratelimit
from reverse_etl.destinations.dotdigital.pacing import CallBudget
from reverse_etl.destinations.klaviyo.client import LIMITS, PACE
from reverse_etl.destinations.ratelimit import Bucket, RateLimiter, Unlimited
from reverse_etl.sandbox import KlaviyoSandbox, SandboxServer
from reverse_etl.sandbox.limits import (
    FixedWindow,
    KlaviyoWindows,
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


def full_buckets(t: FakeTime, burst: float, steady: float, speedup: float = 1.0) -> RateLimiter:
    """A limiter whose buckets hold a window's whole limit (the shape ``ratelimit.shape``
    replaced): after an idle spell it lets twice the limit into one window."""
    lim = limiter(t, burst, steady, speedup)
    lim._buckets = [
        Bucket(burst, burst * speedup, stamp=t.now),
        Bucket(steady, steady / 60.0 * speedup, stamp=t.now),
    ]
    return lim


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


def most_in_any_span(stamps: list[float], span: float) -> int:
    """The most calls that fall in one half-open span of ``span`` seconds."""
    most, first = 0, 0
    for last, stamp in enumerate(stamps):
        while stamps[first] <= stamp - span:
            first += 1
        most = max(most, last - first + 1)
    return most


def test_no_second_or_minute_ever_holds_more_than_its_limit_even_after_idling():
    # Klaviyo counts fixed windows: a bucket that let its whole limit through after an idle
    # spell would put twice the limit in one clock-minute. Idle spells between bursts of work.
    t = FakeTime(100.0)
    lim = limiter(t, 10, 150)
    stamps = []
    for burst in range(6):
        for _ in range(200):
            lim.acquire()
            stamps.append(t.now)
        t.now += 3600.0 if burst % 2 else 45.0
    assert most_in_any_span(stamps, 1.0) <= 10
    assert most_in_any_span(stamps, 60.0) <= 150


def test_a_long_run_gets_the_steady_rate_less_the_bucket():
    # 10/s and 150/m: a 3-call bucket refilled at 147 a minute (``ratelimit.shape``)
    t = FakeTime()
    lim = limiter(t, 10, 150)
    for _ in range(3 + 1470):
        lim.acquire()
    assert t.now == pytest.approx(600.0)  # 1,470 refilled calls at 2.45 a second
    assert lim.waits >= 1470 - 1


def test_the_second_call_waits_for_the_burst_refill():
    t = FakeTime()
    lim = limiter(t, 10, 150)
    assert lim.acquire() == 0.0
    assert lim.acquire() == pytest.approx(1 / 9)  # burst: 1 token, refilled at 9 a second
    assert lim.waited == pytest.approx(1 / 9) and lim.waits == 1


def test_speedup_compresses_the_same_schedule():
    slow, fast = FakeTime(), FakeTime()
    a, b = limiter(slow, 10, 150), limiter(fast, 10, 150, speedup=60.0)
    for _ in range(300):
        a.acquire()
        b.acquire()
    # 297 refilled calls at 147 a minute: 121.2 s, a 60th of it at 60 times the speed
    assert fast.now == pytest.approx(slow.now / 60.0) and slow.now == pytest.approx(297 / 2.45)


def test_idle_time_refills_up_to_the_bucket_size_only():
    t = FakeTime()
    lim = limiter(t, 10, 150)
    for _ in range(10):
        lim.acquire()
    t.now += 3600.0  # an hour idle refills one burst token, not 36,000
    assert lim.acquire() == 0.0
    assert lim.acquire() == pytest.approx(1 / 9)


def test_sleeping_the_computed_wait_is_enough_for_one_call():
    # Floats: refilling 1/3 s at 3 tokens a second does not always sum back to exactly 1.0.
    # One sleep must do, or every paced call would pay for a second, tiny sleep.
    t = FakeTime(1234.5)
    lim = limiter(t, 4, 100_000)  # burst: one token, refilled at 3 a second
    for _ in range(1 + 300):
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
    assert lim.acquire() == 0.0  # its bucket's one call


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
    # at PACE of the published rates so that the bunching never fills a window the server
    # counts (Klaviyo's fixed windows). A bucket of the whole limit (the shape before
    # ``ratelimit.shape``) is refused on the same schedule: what the test checks is the shape.
    published = klaviyo_spec_limits()
    for make, refusals_expected in ((limiter, False), (full_buckets, True)):
        pace = PACE
        t = FakeTime()
        server = KlaviyoWindows(speedup=speedup, clock=t.clock)
        rng = random.Random(7)
        refused = 0
        for op, (burst, steady) in LIMITS.items():
            lim = make(t, burst * pace, steady * pace, speedup)
            windows = tuple(w for w in klaviyo_windows(published[op]) if w.name != "daily")
            arrived = t.now
            for _ in range(int(steady * 2)):
                lim.acquire()
                jitter = rng.uniform(0.0, 0.03) / speedup  # up to 30 ms of vendor time
                arrived = max(arrived, t.now + jitter)  # one connection: answers in order
                saved, t.now = t.now, arrived
                refused += server.acquire(("key", op), windows) > 0
                t.now = saved
        assert (refused > 0) is refusals_expected, (make.__name__, refused)


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
    sandbox.buckets = KlaviyoWindows(clock=t.clock)
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
    # the steady window's small bucket (``ratelimit.shape``), then its refill, sets the pace
    capacity, rate = ratelimit.shape(steady * PACE, 60.0)
    assert t.now == pytest.approx((30 - capacity) / rate)
    assert len(sandbox.lists()) == 30


def test_a_long_pacing_wait_is_the_runs_phase_while_it_lasts(monkeypatch):
    from contextlib import contextmanager

    from reverse_etl import progress

    seen: list[tuple[str, object]] = []

    @contextmanager
    def phase(text: str) -> Iterator[None]:
        seen.append(("phase", text))
        yield
        seen.append(("back", text))

    monkeypatch.setattr(progress, "phase", phase)
    t = FakeTime()

    def sleep(seconds: float) -> None:
        seen.append(("sleep", round(seconds, 3)))
        t.sleep(seconds)

    lim = RateLimiter(10, 2, clock=t.clock, sleep=sleep)  # steady: 1 now, then 1 a minute
    lim.acquire()
    lim.acquire()
    assert seen == [
        ("phase", "rate limited, resuming in 60 s"),
        ("sleep", 60.0),
        ("back", "rate limited, resuming in 60 s"),
    ]
    seen.clear()
    short = RateLimiter(10, 600, clock=t.clock, sleep=sleep)
    short.acquire()
    short.acquire()  # a tenth of a second: no phase
    assert [kind for kind, _ in seen] == ["sleep"]

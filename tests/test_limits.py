"""Tests of how fast a job sends: the rpm/tpm budgets (GCRA), the job-wide pause
after 429s, the adaptive concurrency limit, and all of them end to end through
``run_job`` against the embedded endpoint on 127.0.0.1.

Unit tests drive ``Budget``/``Pause``/``AdaptiveLimit``/``Limits`` with a fake
clock and a recording fake sleep, so they take no time. End-to-end tests use the
real clock (the limits read ``time.monotonic``) with waits kept well under a
second, and record each request's arrival at the server with a middleware.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from yarl import URL

from batchrun import limits as limits_module
from batchrun.config import Job, load_job
from batchrun.engines import local as api_module
from batchrun.engines.local import run_job as api_run_job
from batchrun.errors import JobError
from batchrun.lifecycle import RunOptions, RunResult
from batchrun.limits import BURST_S, SPENT_STREAK, AdaptiveLimit, Budget, Limits, Pause
from batchrun.mock import MockConfig, MockServer, create_app
from tests.conftest import make_job, run_app, tickets, write_jsonl

pytestmark = pytest.mark.timeout(20)

MODEL = "test-model"
TEMPLATE = "Summarize: {ticket}"

# What this file's jobs lay over make_job's defaults; each call gives its concurrency.
JOB_KEYS: dict[str, Any] = {"model": MODEL, "prompt_template": TEMPLATE}


# ---- helpers -----------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeSleep:
    """Records each wait; waits not (and leaves the clock alone unless given one)."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.waits: list[float] = []
        self.clock = clock

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.clock is not None:
            self.clock.advance(seconds)
        await asyncio.sleep(0)


class RealSleep:
    """Really sleeps, and records each wait (for end-to-end runs on the real clock)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(seconds)


@dataclass
class Arrival:
    """One request as the server saw it (times are ``time.monotonic()``)."""

    at: float
    body: dict[str, Any]
    status: int | None = None
    done: float | None = None


@dataclass
class Recorder:
    arrivals: list[Arrival] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0


@asynccontextmanager
async def recording_serve(
    config: MockConfig, *middlewares: Any
) -> AsyncIterator[tuple[MockServer, Recorder]]:
    """The embedded endpoint (``create_app``) plus a middleware that records when
    each completion request arrived, how it was answered and how many were in
    flight at once (what ``middlewares``, run inside it, answer included)."""
    app = create_app(config)
    rec = Recorder()

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.endswith("/chat/completions"):
            return await handler(request)  # type: ignore[no-any-return]
        arrival = Arrival(time.monotonic(), orjson.loads(await request.read()))
        rec.arrivals.append(arrival)
        rec.in_flight += 1
        rec.peak_in_flight = max(rec.peak_in_flight, rec.in_flight)
        try:
            resp: web.StreamResponse = await handler(request)
            arrival.status = resp.status
            return resp
        finally:
            rec.in_flight -= 1
            arrival.done = time.monotonic()

    app.middlewares.append(record)
    app.middlewares.extend(middlewares)
    async with run_app(app) as base_url:
        yield MockServer(app, "127.0.0.1", URL(base_url).port or 0), rec


async def run_job(job: Job, sleep: Any) -> RunResult:
    return await api_run_job(job, RunOptions(progress=False), sleep=sleep)


def read_rows(job: Job) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(job.output).to_pylist()
    return rows


EPS = 1e-9
"""Waits below this are "at once" (a GCRA schedule adds 0.1 s steps: float dust)."""


def at_once(waits: list[float]) -> int:
    return sum(1 for w in waits if w < EPS)


def build(
    concurrency: int | str = 4,
    max_concurrency: int = 256,
    rpm: float | None = None,
    tpm: float | None = None,
    clock: FakeClock | None = None,
    sleep: FakeSleep | None = None,
) -> Limits:
    clock = clock or FakeClock()
    return Limits.build(
        concurrency, max_concurrency, rpm, tpm, clock=clock, sleep=sleep or FakeSleep()
    )


# ---- Budget (GCRA) -----------------------------------------------------------------


def test_budget_lets_one_seconds_worth_through_at_once_then_spaces() -> None:
    clock = FakeClock()
    budget = Budget(600, clock)  # 10 a second
    waits = [budget.reserve(1) for _ in range(15)]
    burst = int(10 * BURST_S) + 1  # a second's worth, plus the one that starts the schedule
    assert at_once(waits[:burst]) == burst
    assert waits[burst:] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_budget_callers_that_wait_their_turn_go_0_1s_apart() -> None:
    clock = FakeClock()
    budget = Budget(600, clock)
    sent: list[float] = []
    for _ in range(40):
        wait = budget.reserve(1)
        sent.append(clock() + wait)
        clock.advance(wait)  # a caller who leaves as soon as allowed, then the next comes
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert sent[0] == 1000.0
    assert gaps[:10] == pytest.approx([0.0] * 10, abs=EPS)
    assert gaps[10:] == pytest.approx([0.1] * 29)


def test_budget_never_releases_a_minutes_worth_at_start() -> None:
    budget = Budget(600, FakeClock())
    waits = [budget.reserve(1) for _ in range(600)]
    assert at_once(waits) == 11  # one second's worth (+1), not 600
    assert waits[-1] == pytest.approx((600 - 11) * 0.1)


def test_budget_idle_time_does_not_pile_up_a_bigger_burst() -> None:
    clock = FakeClock()
    budget = Budget(600, clock)
    budget.reserve(1)
    clock.advance(600)  # ten idle minutes
    waits = [budget.reserve(1) for _ in range(20)]
    assert at_once(waits) == 11


def test_budget_admits_per_minute_plus_burst_in_a_minute() -> None:
    clock = FakeClock()
    start = clock()
    budget = Budget(600, clock)
    admitted = 0
    while True:
        send_at = clock() + budget.reserve(1)
        if send_at >= start + 60:
            break
        admitted += 1
        clock.t = max(clock.t, send_at)
    assert 600 <= admitted <= 611
    assert admitted == pytest.approx(600 + 10, abs=1)


@pytest.mark.parametrize("per_minute", [60, 600, 6000])
def test_budget_rate_scales_with_per_minute(per_minute: float) -> None:
    budget = Budget(per_minute, FakeClock())
    per_second = per_minute / 60
    waits = [budget.reserve(1) for _ in range(int(per_second) + 3)]
    assert waits[-1] == pytest.approx(2 / per_second)


def test_budget_correct_negative_gives_back_positive_takes_more() -> None:
    clock = FakeClock()
    a, b, c = Budget(600, clock), Budget(600, clock), Budget(600, clock)
    for budget in (a, b, c):
        for _ in range(11):
            assert budget.reserve(1) < EPS
    b.correct(-5)  # give back half a second
    c.correct(+5)  # spend half a second more
    assert a.reserve(1) == pytest.approx(0.1)
    assert b.reserve(1) < EPS
    assert c.reserve(1) == pytest.approx(0.6)


def test_budget_giving_back_never_allows_more_than_one_burst() -> None:
    clock = FakeClock()
    budget = Budget(600, clock)
    budget.correct(-10_000)
    waits = [budget.reserve(1) for _ in range(15)]
    assert at_once(waits) == 11


# ---- tpm -----------------------------------------------------------------------------


def test_tpm_request_bigger_than_a_seconds_allowance_is_admitted_and_paid_for() -> None:
    budget = Budget(600, FakeClock())  # 10 tokens a second: one second's worth is 10
    assert budget.reserve(100) == 0.0  # admitted, not refused nor stuck forever
    assert budget.reserve(100) == pytest.approx(9.0)  # the first costs 10 s, 1 s of burst
    assert budget.reserve(10) == pytest.approx(19.0)


async def test_tpm_wait_turn_waits_proportionally() -> None:
    clock = FakeClock()
    sleep = FakeSleep()
    limits = build(tpm=600, clock=clock, sleep=sleep)
    await limits.wait_turn(100)
    assert sleep.waits == []
    await limits.wait_turn(50)
    assert sleep.waits == [pytest.approx(9.0)]


async def test_used_tokens_corrects_the_estimate_both_ways() -> None:
    def spent(estimated: int, actual: int | None) -> float:
        """The wait of a follow-up 10-token request after one request of ``estimated`` tokens."""
        clock = FakeClock()
        limits = build(tpm=600, clock=clock)
        assert limits.tpm is not None
        limits.tpm.reserve(estimated)
        limits.used_tokens(estimated, actual)
        return limits.tpm.reserve(10)

    assert spent(100, None) == pytest.approx(9.0)  # no usage reported: the estimate stands
    assert spent(100, 100) == pytest.approx(9.0)
    assert spent(100, 40) == pytest.approx(3.0)  # 60 tokens given back = 6 s
    assert spent(100, 150) == pytest.approx(14.0)  # 50 tokens more = 5 s


def test_used_tokens_without_tpm_is_a_no_op() -> None:
    limits = build(rpm=600)
    limits.used_tokens(100, 10)
    assert limits.tpm is None


async def test_rpm_and_tpm_together_wait_for_the_slower() -> None:
    clock = FakeClock()
    sleep = FakeSleep()
    limits = build(rpm=60, tpm=6000, clock=clock, sleep=sleep)  # 1 req/s, 100 tok/s
    await limits.wait_turn(10)
    await limits.wait_turn(10)
    await limits.wait_turn(10)  # rpm binds: the 3rd request in the same instant waits 1 s
    assert sleep.waits == [pytest.approx(1.0)]
    sleep.waits.clear()
    clock.advance(100)
    await limits.wait_turn(1000)
    await limits.wait_turn(1000)  # tpm binds: 1000 tokens = 10 s, minus 1 s of burst
    assert sleep.waits == [pytest.approx(9.0)]


def test_reserve_turn_reserves_what_wait_turn_would_without_a_coroutine() -> None:
    clock = FakeClock()
    limits = build(rpm=60, tpm=6000, clock=clock)  # 1 req/s, 100 tok/s
    assert limits.reserve_turn(10) == 0.0  # the usual case: send now
    assert limits.reserve_turn(10) == 0.0  # the second second's burst
    assert limits.reserve_turn(10) == pytest.approx(1.0)  # rpm binds, as in wait_turn
    clock.advance(100)
    assert limits.reserve_turn(1000) == 0.0
    assert limits.reserve_turn(1000) == pytest.approx(9.0)  # tpm binds
    assert build().reserve_turn(10) == 0.0  # no budget: nothing to reserve


async def test_reserve_turn_leaves_a_pause_to_wait_turn() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    limits = build(rpm=60, clock=clock, sleep=sleep)
    assert limits.rate_limited(retry_after=2.0, backoff_s=0.5, exhausted=True)
    assert limits.reserve_turn(10) is None  # nothing reserved while the pause lasts
    await limits.wait_turn(10)
    assert sleep.waits == [pytest.approx(2.0)]
    assert limits.reserve_turn(10) == 0.0  # the pause is over: the budget holds two in a burst


# ---- the job-wide pause ------------------------------------------------------------------


async def test_a_429_that_says_the_budget_is_spent_pauses_every_caller() -> None:
    clock = FakeClock()
    sleep = FakeSleep()
    limits = build(concurrency=4, clock=clock, sleep=sleep)
    assert not limits.pause_active()
    assert limits.rate_limited(retry_after=2.0, backoff_s=0.5, exhausted=True)
    assert limits.pause_active() and limits.pause.episodes == 1
    await asyncio.gather(*(limits.wait_turn(10) for _ in range(5)))
    assert sleep.waits == [pytest.approx(2.0)] * 5
    assert limits.concurrency.limit == 4  # a fixed concurrency never moves


async def test_a_lone_429_pauses_no_one() -> None:
    sleep = FakeSleep()
    limits = build(sleep=sleep)
    assert not limits.rate_limited(retry_after=2.0, backoff_s=0.5)
    assert not limits.pause_active() and limits.pause.episodes == 0
    await limits.wait_turn(10)
    assert sleep.waits == []  # only the row that got it waits (the retry policy's wait)


def test_a_lone_429_still_lowers_auto_concurrency() -> None:
    limits = build("auto", 256)
    assert not limits.rate_limited(retry_after=1.0, backoff_s=0.5)
    assert limits.concurrency.limit == 11 and not limits.pause_active()


def test_429s_in_a_row_pause_the_job_an_answer_between_resets_the_count() -> None:
    clock = FakeClock()
    limits = build(clock=clock)
    pause = limits.pause
    assert SPENT_STREAK == 4
    lone = [False] * (SPENT_STREAK - 1)
    assert [limits.rate_limited(1.0, 0.5) for _ in lone] == lone
    pause.streak = 0  # an answer came (Scheduler._post)
    assert [limits.rate_limited(1.0, 0.5) for _ in lone] == lone
    assert not limits.pause_active()
    assert limits.rate_limited(1.0, 0.5)  # the fourth in a row
    assert pause.remaining() == pytest.approx(1.0) and pause.episodes == 1


async def test_a_spent_429_without_retry_after_pauses_for_the_backoff() -> None:
    sleep = FakeSleep()
    limits = build(sleep=sleep)
    limits.rate_limited(retry_after=None, backoff_s=1.5, exhausted=True)
    await limits.wait_turn(10)
    await limits.wait_turn(10)
    assert sleep.waits == [pytest.approx(1.5)] * 2


async def test_pause_is_over_once_its_time_has_passed() -> None:
    clock = FakeClock()
    sleep = FakeSleep()
    limits = build(clock=clock, sleep=sleep)
    limits.rate_limited(retry_after=2.0, backoff_s=0.5, exhausted=True)
    clock.advance(0.5)
    await limits.wait_turn(10)
    assert sleep.waits == [pytest.approx(1.5)]
    clock.advance(2.0)
    await limits.wait_turn(10)
    assert sleep.waits == [pytest.approx(1.5)]  # no further wait


def test_a_pause_is_taken_once_per_episode() -> None:
    clock = FakeClock(1000.0)
    pause = Pause(clock)
    assert pause.remaining() == 0.0
    assert pause.rate_limited(2.0, exhausted=True, sent_at=999.9)
    # The other requests in flight when the budget ran out come back 429 too:
    # while the pause lasts, and after it (a slow answer), they neither extend it
    # nor count towards the next one.
    clock.advance(0.5)
    assert not pause.rate_limited(5.0, exhausted=True, sent_at=999.95)
    assert not pause.rate_limited(5.0, exhausted=True)  # during the pause
    assert pause.until == pytest.approx(1002.0)
    clock.advance(2.0)  # t = 1002.5: the pause is over
    assert not pause.rate_limited(5.0, exhausted=True, sent_at=999.99)
    assert not pause.rate_limited(5.0, exhausted=False, sent_at=1002.1)
    assert pause.streak == 1 and pause.remaining() == 0.0
    # A request sent after the pause ended finds the budget spent again: a new episode.
    assert pause.rate_limited(3.0, exhausted=True, sent_at=1002.2)
    assert pause.until == pytest.approx(1005.5) and pause.episodes == 2 and pause.streak == 0


async def test_pause_then_rpm_budget_both_apply() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)  # this sleep moves the clock
    limits = build(rpm=60, clock=clock, sleep=sleep)
    limits.rate_limited(retry_after=5.0, backoff_s=0.5, exhausted=True)
    for _ in range(3):
        await limits.wait_turn(1)
    # 5 s of pause, then two go at once (a second's worth + 1), the third waits 1 s.
    assert sleep.waits == [pytest.approx(5.0), pytest.approx(1.0)]


async def test_a_pause_that_begins_while_a_caller_waits_is_honored() -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:
            await gate.wait()  # the caller sleeps out the first pause; the test moves the clock
        else:
            clock.advance(seconds)

    limits = Limits.build(4, 256, None, None, clock=clock, sleep=sleep)
    limits.rate_limited(retry_after=2.0, backoff_s=0.5, exhausted=True)
    waiter = asyncio.create_task(limits.wait_turn(10))
    await asyncio.sleep(0)
    clock.advance(2.5)  # the first pause is over, but the waiter has not woken yet...
    limits.rate_limited(retry_after=5.0, backoff_s=0.5, exhausted=True)  # ...when a new one begins
    clock.advance(1.0)
    gate.set()
    await waiter
    # At t+3.5 the job is paused until t+7.5: 4 s more.
    assert waits == [pytest.approx(2.0), pytest.approx(4.0)]


# ---- AdaptiveLimit --------------------------------------------------------------------


class Holders:
    """Tasks that each take a place and hold it until released one by one."""

    def __init__(self, limit: AdaptiveLimit, n: int) -> None:
        self.limit = limit
        self.inside: list[int] = []
        self.seen_in_flight: list[int] = []
        self.release = [asyncio.Event() for _ in range(n)]
        self.tasks = [asyncio.create_task(self._hold(i)) for i in range(n)]

    async def _hold(self, i: int) -> None:
        async with self.limit.place():
            self.inside.append(i)
            self.seen_in_flight.append(self.limit.in_flight)
            assert self.limit.in_flight <= max(self.limit.limit, 1)
            await self.release[i].wait()
            self.inside.remove(i)

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)


async def test_in_flight_never_exceeds_the_limit() -> None:
    limit = AdaptiveLimit(3, 3, auto=False)
    holders = Holders(limit, 10)
    await holders.settle()
    assert len(holders.inside) == 3 and limit.in_flight == 3
    released = 0
    while released < 10:
        first = holders.inside[0]
        holders.release[first].set()
        released += 1
        await holders.settle()
        assert limit.in_flight == len(holders.inside) == min(3, 10 - released)
    await asyncio.gather(*holders.tasks)
    assert max(holders.seen_in_flight) == 3
    assert limit.in_flight == 0 and not limit._waiters


async def test_a_cut_limit_holds_new_places_until_in_flight_drops_below_it() -> None:
    clock = FakeClock()
    limit = AdaptiveLimit(10, 20, auto=True, clock=clock)
    holders = Holders(limit, 14)
    await holders.settle()
    assert limit.in_flight == 10
    limit.on_overload()
    assert limit.limit == 7
    for i in list(holders.inside)[:3]:  # 10 → 7 in flight: still no room
        holders.release[i].set()
    await holders.settle()
    assert limit.in_flight == 7 and len(holders.inside) == 7
    holders.release[holders.inside[0]].set()  # 7 → 6: one waiter may enter
    await holders.settle()
    assert limit.in_flight == 7
    for e in holders.release:
        e.set()
    await asyncio.gather(*holders.tasks)
    assert limit.in_flight == 0


def test_on_overload_cuts_by_30_percent_at_most_once_per_cooldown() -> None:
    clock = FakeClock()
    limit = AdaptiveLimit(16, 256, auto=True, clock=clock, cooldown_s=1.0)
    limit.on_overload()
    assert limit.limit == 11  # int(16 * 0.7)
    limit.on_overload()
    clock.advance(0.5)
    limit.on_overload()
    assert limit.limit == 11  # same cooldown: one cut
    seen = []
    for _ in range(6):
        clock.advance(1.0)
        limit.on_overload()
        seen.append(limit.limit)
    assert seen == [7, 4, 2, 1, 1, 1]  # never below 1


def test_on_success_raises_by_one_after_a_window_never_past_maximum() -> None:
    limit = AdaptiveLimit(4, 6, auto=True, clock=FakeClock())
    for _ in range(3):
        limit.on_success(0.1)
    assert limit.limit == 4
    limit.on_success(0.1)  # a full window of 4 healthy successes
    assert limit.limit == 5
    for _ in range(4):
        limit.on_success(0.1)
    assert limit.limit == 5
    limit.on_success(0.1)
    assert limit.limit == 6
    for _ in range(100):
        limit.on_success(0.1)
    assert limit.limit == 6


def test_slow_successes_do_not_count_towards_a_raise() -> None:
    limit = AdaptiveLimit(2, 10, auto=True, clock=FakeClock())
    limit.on_success(0.1)  # best latency 0.1
    for _ in range(10):
        limit.on_success(0.5)  # over twice the best: not healthy
    assert limit.limit == 2
    limit.on_success(0.15)
    assert limit.limit == 3


def test_overload_restarts_the_success_window() -> None:
    clock = FakeClock()
    limit = AdaptiveLimit(10, 20, auto=True, clock=clock)
    for _ in range(6):
        limit.on_success(0.1)
    limit.on_overload()
    assert limit.limit == 7
    for _ in range(6):
        limit.on_success(0.1)
    assert limit.limit == 7  # the 6 successes before the cut do not count
    limit.on_success(0.1)
    assert limit.limit == 8


def test_fixed_concurrency_never_changes() -> None:
    clock = FakeClock()
    limit = AdaptiveLimit(5, 5, auto=False, clock=clock)
    for _ in range(50):
        limit.on_success(0.01)
        limit.on_overload()
        clock.advance(2.0)
    assert limit.limit == 5


async def test_a_raise_lets_a_waiter_in_at_once() -> None:
    limit = AdaptiveLimit(1, 2, auto=True, clock=FakeClock())
    holders = Holders(limit, 2)
    await holders.settle()
    assert limit.in_flight == 1
    limit.on_success(0.1)  # window of 1 → limit 2
    await holders.settle()
    assert limit.in_flight == 2
    for e in holders.release:
        e.set()
    await asyncio.gather(*holders.tasks)


async def test_a_cancelled_waiter_does_not_lose_a_wake_up() -> None:
    limit = AdaptiveLimit(1, 1, auto=False)
    holders = Holders(limit, 3)
    await holders.settle()
    first, second, third = holders.tasks
    assert holders.inside == [0]
    holders.release[0].set()
    await asyncio.sleep(0)  # the holder leaves and wakes the 2nd task...
    await first
    second.cancel()  # ...which is cancelled before it gets to run
    await holders.settle()
    assert holders.inside == [2], (limit.in_flight, len(limit._waiters))
    holders.release[2].set()
    await asyncio.wait_for(third, 1)


# ---- Limits.build ---------------------------------------------------------------------------


def test_build_auto_starts_at_16_or_the_maximum() -> None:
    limits = build("auto", 256)
    assert (limits.concurrency.limit, limits.concurrency.maximum) == (16, 256)
    assert limits.concurrency.auto and limits.paces
    small = build("auto", 8)
    assert (small.concurrency.limit, small.concurrency.maximum) == (8, 8)


def test_build_fixed_concurrency_and_budgets() -> None:
    limits = build(12, 256)
    assert (limits.concurrency.limit, limits.concurrency.maximum) == (12, 12)
    assert not limits.concurrency.auto
    assert limits.rpm is None and limits.tpm is None and not limits.paces
    assert not limits.pause_active()
    paced = build(12, 256, rpm=600, tpm=60_000)
    assert paced.paces
    assert paced.rpm is not None and paced.rpm.rate == pytest.approx(10)
    assert paced.tpm is not None and paced.tpm.rate == pytest.approx(1000)


# ---- job keys ---------------------------------------------------------------------------


def job_values(**overrides: Any) -> dict[str, Any]:
    return {"input": "in.jsonl", "model": MODEL, "prompt_template": TEMPLATE, **overrides}


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("rpm", -1, "at least"),
        ("rpm", 0, "at least"),
        ("tpm", -100, "at least"),
        ("tpm", 0.5, "at least"),
        ("rpm", "600", "must be a number"),
        ("rpm", True, "must be a number"),
        ("concurrency", "fast", 'whole number or "auto"'),
        ("concurrency", 0, "at least"),
        ("concurrency", -4, "at least"),
        ("concurrency", 2.5, "whole number"),
        ("max_concurrency", 0, "at least"),
    ],
)
def test_bad_limit_keys_are_job_errors(key: str, value: Any, match: str) -> None:
    with pytest.raises(JobError, match=match) as info:
        load_job(None, job_values(**{key: value}))
    assert f"`{key}`" in str(info.value)


def test_good_limit_keys_are_accepted() -> None:
    job = load_job(None, job_values(concurrency="auto", max_concurrency=64, rpm=600, tpm=90_000))
    assert job.concurrency == "auto" and job.workers == 64
    assert job.rpm == 600.0 and job.tpm == 90_000.0
    assert load_job(None, job_values(concurrency="12")).concurrency == 12
    assert load_job(None, job_values(rpm=0.5)).rpm == 0.5
    plain = load_job(None, job_values())
    assert plain.rpm is None and plain.tpm is None and plain.concurrency == 16


def test_limit_keys_from_a_job_file(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        'input = "in.jsonl"\nmodel = "m"\nprompt_template = "{a}"\n'
        'concurrency = "auto"\nrpm = 120\ntpm = 5000.5\n'
    )
    job = load_job(path)
    assert (job.concurrency, job.rpm, job.tpm) == ("auto", 120.0, 5000.5)
    path.write_text('input = "in.jsonl"\nmodel = "m"\nprompt_template = "{a}"\nrpm = -5\n')
    with pytest.raises(JobError, match=r"`rpm` in .*job\.toml"):
        load_job(path)


# ---- end to end ----------------------------------------------------------------------------


async def test_rpm_paces_a_real_job(tmp_path: Path) -> None:
    n, rpm, workers = 36, 1200, 4  # 20 a second: 21 at once, the other 15 spaced 0.05 s apart
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with recording_serve(MockConfig()) as (server, rec):
        job = make_job(server.base_url, src, out, **JOB_KEYS, rpm=rpm, concurrency=workers)
        t0 = time.monotonic()
        result = await run_job(job, RealSleep())
        wall = time.monotonic() - t0
    assert result.exit_code == 0 and result.ok == n and result.requests == n
    burst = int(rpm / 60 * BURST_S) + 1
    expected = (n - burst) / (rpm / 60)  # 0.75 s
    assert wall >= expected * 0.9
    assert wall < expected + 3.0

    arrivals = sorted(a.at for a in rec.arrivals)
    assert len(arrivals) == n
    first = arrivals[0]
    early = sum(1 for t in arrivals if t - first < 0.1)
    # The burst, plus the two the schedule spaces 0.05 s apart (+ slack for a
    # slow start: the schedule runs from when the job built its limits).
    assert early <= burst + 5 < n, f"{early} requests in the first 100 ms"
    assert arrivals[-1] - first >= expected * 0.9
    # After the burst, about one request per 0.05 s: never 10 within 0.3 s.
    for t in arrivals[burst:]:
        window = sum(1 for u in arrivals[burst:] if t <= u < t + 0.3)
        assert window <= 9, window

    # A row's started_at is when a worker took it (before its rpm wait): the burst
    # and the rows the workers then wait with start early, the rest one by one.
    rows = read_rows(job)
    starts = sorted(r["started_at"].timestamp() for r in rows)
    early_starts = sum(1 for s in starts if s - starts[0] < 0.1)
    assert early_starts <= burst + workers + 3 < n, early_starts
    assert starts[-1] - starts[0] >= (n - burst - workers) / (rpm / 60) * 0.8
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in rows)


@dataclass
class Capture:
    limits: list[Limits] = field(default_factory=list)
    limit_history: list[int] = field(default_factory=list)
    used_tokens: list[tuple[int, int | None]] = field(default_factory=list)
    pauses: list[float] = field(default_factory=list)
    """When each job-wide pause began (``time.monotonic``, as the server's arrivals)."""


@pytest.fixture
def capture(monkeypatch: pytest.MonkeyPatch) -> Capture:
    """Reach the Limits that ``run_job`` builds: record each concurrency-limit change,
    each usage correction and each job-wide pause."""
    cap = Capture()

    class RecordingAdaptive(AdaptiveLimit):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            cap.limit_history.append(self.limit)

        def on_overload(self) -> None:
            super().on_overload()
            if cap.limit_history[-1] != self.limit:
                cap.limit_history.append(self.limit)

        def on_success(self, latency_s: float) -> None:
            super().on_success(latency_s)
            if cap.limit_history[-1] != self.limit:
                cap.limit_history.append(self.limit)

    class RecordingLimits(Limits):
        @classmethod
        def build(cls, *args: Any, **kwargs: Any) -> Limits:
            built = super().build(*args, **kwargs)
            cap.limits.append(built)
            return built

        def used_tokens(self, estimated: int, actual: int | None) -> None:
            cap.used_tokens.append((estimated, actual))
            super().used_tokens(estimated, actual)

        def rate_limited(self, *args: Any, **kwargs: Any) -> bool:
            paused = super().rate_limited(*args, **kwargs)
            if paused:
                cap.pauses.append(self.pause.began)
            return paused

    monkeypatch.setattr(limits_module, "AdaptiveLimit", RecordingAdaptive)
    monkeypatch.setattr(api_module, "Limits", RecordingLimits)
    return cap


async def test_auto_concurrency_drops_on_429s_and_the_job_completes(
    tmp_path: Path, capture: Capture
) -> None:
    n, storm = 40, 16
    config = MockConfig(fail_first=storm, fail_first_kind="429", retry_after_s=0.1, latency_s=0.02)
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with recording_serve(config) as (server, rec):
        job = make_job(
            server.base_url, src, out, **JOB_KEYS, concurrency="auto", max_concurrency=32
        )
        result = await run_job(job, RealSleep())
        assert server.stats.by_outcome == {"429": storm, "ok": n}
    assert result.exit_code == 0 and result.ok == n
    assert all(r["status"] == "ok" for r in read_rows(job))

    (limits,) = capture.limits
    assert limits.concurrency.auto
    history = capture.limit_history
    assert history[0] == 16  # auto starts at min(16, max_concurrency)
    assert history[1] == 11  # the first 429s cut it by 30%, once for the whole wave
    assert min(history) == 11  # one cut per cooldown (1 s): a wave of 16 429s is one cut
    assert all(b - a == 1 for a, b in itertools.pairwise(history[1:]) if b > a)
    assert max(history) <= 32
    # 32 workers, but never more in flight than the limit allowed.
    assert rec.peak_in_flight <= 16


async def test_used_tokens_gets_the_reported_usage(tmp_path: Path, capture: Capture) -> None:
    n = 6
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with recording_serve(MockConfig()) as (server, _):
        job = make_job(
            server.base_url, src, out, **JOB_KEYS, concurrency=8, tpm=1_000_000, max_tokens=50
        )
        result = await run_job(job, RealSleep())
    assert result.exit_code == 0
    rows = read_rows(job)
    assert sorted(a for _, a in capture.used_tokens) == sorted(r["total_tokens"] for r in rows)
    for estimated, _ in capture.used_tokens:
        prompt = len(TEMPLATE.format(ticket=tickets(1)[0]["ticket"]))
        assert estimated == pytest.approx(prompt // 4 + 50, abs=2)


async def test_auto_concurrency_honors_the_job_wide_pause(tmp_path: Path) -> None:
    n, storm, retry_after = 40, 16, 0.3
    # 32 workers, 16 places: 16 requests go, 16 attempts queue for a place. The
    # latency keeps the first 16 at the server until all of them have arrived.
    # Every 429 says the budget is spent, so the first one pauses the job.
    config = MockConfig(
        fail_first=storm, fail_first_kind="429-exhausted", retry_after_s=retry_after, latency_s=0.1
    )
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with recording_serve(config) as (server, rec):
        job = make_job(
            server.base_url, src, out, **JOB_KEYS, concurrency="auto", max_concurrency=32
        )
        result = await run_job(job, RealSleep())
    assert result.exit_code == 0
    arrivals = sorted(rec.arrivals, key=lambda a: a.at)
    first_429 = min(a.done for a in arrivals if a.status == 429 and a.done is not None)
    later = arrivals[storm:]  # all but the first wave
    during = [a for a in later if first_429 < a.at < first_429 + retry_after - 0.05]
    assert during == [], f"{len(during)} requests sent during the pause"


# ---- 429s end to end: lone ones, a spent budget, an enforced limit --------------------------


async def timed_job(
    config: MockConfig, tmp_path: Path, name: str, n: int, **keys: Any
) -> tuple[RunResult, Job, Recorder, dict[str, int], float]:
    """Run ``n`` rows against the embedded endpoint with ``config`` (real sleeps):
    the result, the job, the server's record and outcomes, and the run's seconds."""
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    async with recording_serve(config) as (server, rec):
        job = make_job(server.base_url, src, tmp_path / f"{name}.parquet", **JOB_KEYS, **keys)
        started = time.monotonic()
        result = await run_job(job, RealSleep())
        wall = time.monotonic() - started
        outcomes = dict(server.stats.by_outcome)
    return result, job, rec, outcomes, wall


@pytest.mark.timeout(60)
async def test_sporadic_429s_and_503s_retry_only_their_rows(
    tmp_path: Path, capture: Capture
) -> None:
    # 5% of the answers are a 429 (Retry-After 0.5 s, no budget spent) or a 503.
    # Pausing the job for each 429 would add about half a second per 429 (10 of
    # them here): the job would take seconds longer than without faults.
    n, retry_after = 600, 0.5
    sporadic = MockConfig(fault_rate=0.05, faults=("429", "503"), retry_after_s=retry_after)
    clean, _, _, _, clean_s = await timed_job(MockConfig(), tmp_path, "clean", n, concurrency=16)
    result, job, _, outcomes, faulty_s = await timed_job(
        sporadic, tmp_path, "sporadic", n, concurrency=16
    )
    assert clean.ok == result.ok == n
    assert outcomes["429"] >= 10 and outcomes["503"] >= 10, outcomes
    # No job-wide pause: only the rows that got a 429 or 503 waited, each its own wait.
    assert capture.pauses == []
    assert capture.limits[-1].pause.episodes == 0
    rows = read_rows(job)
    assert max(r["queued_ms"] for r in rows) < 100, "a row waited for another row's 429"
    retried = [r for r in rows if r["attempts"] > 1]
    assert len(retried) >= 16
    # The time it took: the fault-free run's plus the last retried rows' own waits
    # (a Retry-After, or a backoff of at most 0.5 + 1 s for two 503s in a row).
    assert faulty_s < clean_s + 2.5, (faulty_s, clean_s)


@asynccontextmanager
async def spent_budget(
    spent: int, retry_after: float
) -> AsyncIterator[tuple[MockServer, Recorder]]:
    """The embedded endpoint (50 ms latency) where requests 2 to ``spent + 1`` (the
    first, the key probe, is answered) get a 429 saying the budget is spent
    (``x-ratelimit-remaining-requests: 0``), the k-th of them k times 0.1 s later than
    an answer would come: one episode's 429s, spread over time."""
    refused = {"n": 0}

    @web.middleware
    async def refuse(request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.endswith("/chat/completions"):
            return await handler(request)  # type: ignore[no-any-return]
        refused["n"] += 1
        k = refused["n"] - 2
        if not 0 <= k < spent:
            return await handler(request)  # type: ignore[no-any-return]
        await asyncio.sleep(0.05 + 0.1 * k)
        headers = {"Retry-After": f"{retry_after:g}", "x-ratelimit-remaining-requests": "0"}
        return web.json_response({"error": "rate_limited"}, status=429, headers=headers)

    async with recording_serve(MockConfig(latency_s=0.05), refuse) as (server, rec):
        yield server, rec


async def test_a_spent_budget_pauses_every_worker_once_per_episode(
    tmp_path: Path, capture: Capture
) -> None:
    n, spent, retry_after = 24, 4, 0.5
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    async with spent_budget(spent, retry_after) as (server, rec):
        job = make_job(server.base_url, src, tmp_path / "out.parquet", **JOB_KEYS, concurrency=8)
        result = await run_job(job, RealSleep())
    assert result.exit_code == 0 and result.ok == n and result.retries == spent
    # Four 429s over 0.3 s, one episode: one pause, from the first of them.
    assert len(capture.pauses) == 1 and capture.limits[0].pause.episodes == 1
    began = capture.pauses[0]
    statuses = [a.status for a in sorted(rec.arrivals, key=lambda a: a.at)]
    assert statuses.count(429) == spent
    last_429 = max(a.done for a in rec.arrivals if a.status == 429 and a.done is not None)
    assert last_429 > began + 0.25  # the later 429s came well inside the pause
    # Every worker waits: nothing is sent while the pause lasts (a request sent
    # just before the client read the first 429 may still arrive in the first 30 ms)...
    slack = 0.03
    during = [
        a.at - began for a in rec.arrivals if began + slack < a.at < began + retry_after - slack
    ]
    assert during == [], f"requests {during} s into the pause"
    # ...and the pause is not extended by the episode's later 429s: the workers
    # with new rows go when the first 429's wait is over, not the last one's.
    after = sorted(a.at for a in rec.arrivals if a.at > began + slack)
    assert after[0] == pytest.approx(began + retry_after, abs=0.1)
    assert after[0] < last_429 + retry_after - 0.1


async def test_retry_after_ms_is_honoured_before_retry_after(
    tmp_path: Path, capture: Capture
) -> None:
    # Retry-After: 1 (whole seconds, rounded up) and retry-after-ms: 250.
    config = MockConfig(
        fail_first=1, fail_first_kind="429-exhausted", retry_after_s=0.25, send_retry_after_ms=True
    )
    sleep = FakeSleep()
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    async with recording_serve(config) as (server, _):
        job = make_job(server.base_url, src, tmp_path / "out.parquet", **JOB_KEYS, concurrency=1)
        result = await run_job(job, sleep)
    assert result.ok == 3 and result.retries == 1
    assert sleep.waits[0] == pytest.approx(0.25)  # the row's own wait
    assert len(capture.pauses) == 1
    assert all(w <= 0.25 for w in sleep.waits), sleep.waits  # the job's pause: 0.25 s too


@pytest.mark.timeout(60)
async def test_an_enforced_rpm_limit_is_used_with_few_429s(tmp_path: Path) -> None:
    # 100 requests a second (a bucket of one second's worth); 8 workers could send
    # many times that. Each time the budget runs out, the requests in flight get a
    # 429 saying so, and the job pauses until the budget is whole again.
    n, rpm = 400, 6000
    result, _, rec, outcomes, _ = await timed_job(
        MockConfig(rpm_limit=rpm), tmp_path, "limited", n, concurrency=8
    )
    assert result.exit_code == 0 and result.ok == n
    refused = outcomes.get("rpm-limit", 0)
    assert refused / n <= 0.15, outcomes
    # The share of the limit used: rows / what the server admits over the span.
    arrivals = sorted(a.at for a in rec.arrivals)
    span = arrivals[-1] - arrivals[0]
    admissible = rpm / 60 * span + rpm / 60  # the refill over the span, plus a full bucket
    assert n / admissible >= 0.8, (n, span)

"""Unit tests of send_with_retries: the retry policy, with a fake sleep (and,
for the deadline, a fake clock) so nothing actually waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import tenacity

import batchrun.retry
from batchrun.errors import (
    BadResponse,
    ConnectionDropped,
    FatalRequestError,
    RateLimited,
    RequestError,
    RequestTimeout,
    ServerError,
)
from batchrun.retry import RetryPolicy, send_with_retries
from tests.conftest import make_job

OK = "ok"


class FakeSleep:
    """Records every wait instead of waiting; optionally advances a FakeClock."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.waits: list[float] = []
        self.clock = clock

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.clock is not None:
            self.clock.now += seconds


@dataclass
class FakeClock:
    now: float = 1000.0

    def monotonic(self) -> float:
        return self.now


@dataclass
class Script:
    """A fake ``send``: raises or returns the scripted outcomes in order; a
    callable outcome is called first (e.g. to advance the clock)."""

    outcomes: list[Any]
    calls: int = 0
    before_each: Callable[[], None] | None = None

    async def __call__(self) -> str:
        self.calls += 1
        if self.before_each is not None:
            self.before_each()
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@dataclass
class Recorder:
    calls: list[tuple[RequestError, int, float]] = field(default_factory=list)

    def __call__(self, error: RequestError, attempt: int, wait: float) -> None:
        self.calls.append((error, attempt, wait))


def policy(sleep: FakeSleep, **kw: Any) -> RetryPolicy:
    return RetryPolicy(sleep=sleep, **kw)


def server_error(status: int = 503, retry_after: float | None = None) -> ServerError:
    return ServerError(f"HTTP {status}", status, retry_after)


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A fake monotonic clock for both batchrun.retry and tenacity (which measures
    seconds_since_start itself). time.monotonic itself is left alone: the event
    loop needs the real one."""
    fake = FakeClock()
    fake_time = SimpleNamespace(monotonic=fake.monotonic)
    monkeypatch.setattr(batchrun.retry, "time", fake_time)
    monkeypatch.setattr(tenacity, "time", fake_time)
    return fake


# --- success -----------------------------------------------------------------------


async def test_first_attempt_success_makes_one_attempt_and_never_sleeps(sleep: FakeSleep) -> None:
    send = Script([OK])
    on_retry = Recorder()
    result, attempts = await send_with_retries(send, policy(sleep), on_retry=on_retry)
    assert (result, attempts) == (OK, 1)
    assert send.calls == 1
    assert sleep.waits == []
    assert on_retry.calls == []


async def test_success_after_retries_counts_attempts(sleep: FakeSleep) -> None:
    send = Script([server_error(), server_error(), OK])
    result, attempts = await send_with_retries(send, policy(sleep))
    assert (result, attempts) == (OK, 3)
    assert send.calls == 3
    assert len(sleep.waits) == 2


async def test_mixed_errors_count_attempts(sleep: FakeSleep) -> None:
    timeout, unavailable = RequestTimeout("no answer"), server_error(503)
    send = Script([timeout, unavailable, OK])
    on_retry = Recorder()
    result, attempts = await send_with_retries(send, policy(sleep), on_retry=on_retry)
    assert (result, attempts) == (OK, 3)
    assert send.calls == 3
    assert [(e, n) for e, n, _ in on_retry.calls] == [(timeout, 1), (unavailable, 2)]
    assert [w for _, _, w in on_retry.calls] == sleep.waits


@pytest.mark.parametrize(
    "error",
    [
        RateLimited("HTTP 429"),
        server_error(500),
        server_error(408),
        RequestTimeout("t"),
        ConnectionDropped("c"),
        BadResponse("b", 200),
    ],
    ids=["429", "500", "408", "timeout", "dropped", "bad-response"],
)
async def test_every_retryable_error_is_retried(sleep: FakeSleep, error: RequestError) -> None:
    send = Script([error, OK])
    assert await send_with_retries(send, policy(sleep)) == (OK, 2)
    assert len(sleep.waits) == 1


# --- the wait ------------------------------------------------------------------------


async def test_retry_after_wins_over_backoff(sleep: FakeSleep) -> None:
    send = Script([RateLimited("HTTP 429", 429, 3.0), server_error(503, 7.5), OK])
    await send_with_retries(send, policy(sleep, backoff_initial_s=0.5, backoff_max_s=1.0))
    assert sleep.waits == [3.0, 7.5]


async def test_retry_after_zero_means_no_wait(sleep: FakeSleep) -> None:
    send = Script([RateLimited("HTTP 429", 429, 0.0), OK])
    await send_with_retries(send, policy(sleep))
    assert sleep.waits == [0.0]


async def test_retry_after_is_capped(sleep: FakeSleep) -> None:
    send = Script([RateLimited("HTTP 429", 429, 3600.0), OK])
    on_retry = Recorder()
    await send_with_retries(send, policy(sleep, retry_after_max_s=20.0), on_retry=on_retry)
    assert sleep.waits == [20.0]
    assert on_retry.calls[0][2] == 20.0


async def test_backoff_without_retry_after_grows_within_bounds(sleep: FakeSleep) -> None:
    initial, cap = 0.5, 30.0
    send = Script([server_error()] * 9 + [OK])
    await send_with_retries(
        send, policy(sleep, max_attempts=10, backoff_initial_s=initial, backoff_max_s=cap)
    )
    assert len(sleep.waits) == 9
    for n, wait in enumerate(sleep.waits):
        base = min(initial * 2**n, cap)
        # Equal jitter: drawn from the upper half of the capped exponential.
        assert base / 2 <= wait <= base, (n, wait)
    uncapped = [w for w in sleep.waits if initial * 2 ** sleep.waits.index(w) < cap]
    # The halves do not overlap below the cap, so the waits strictly grow.
    assert uncapped == sorted(uncapped)
    assert len(set(uncapped)) == len(uncapped)
    capped = sleep.waits[-3:]
    assert all(cap / 2 <= w <= cap for w in capped)
    assert len(set(capped)) == len(capped), "rows at the cap must not retry in lockstep"


async def test_first_backoff_starts_at_initial(sleep: FakeSleep) -> None:
    send = Script([ConnectionDropped("reset"), OK])
    await send_with_retries(send, policy(sleep, backoff_initial_s=0.5))
    (wait,) = sleep.waits
    assert 0.25 <= wait <= 0.5


# --- giving up -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [FatalRequestError(f"HTTP {s}", s) for s in (400, 401, 403, 404, 422)],
    ids=lambda e: str(e.status),
)
async def test_fatal_error_is_never_retried(sleep: FakeSleep, error: FatalRequestError) -> None:
    send = Script([error, OK])
    on_retry = Recorder()
    with pytest.raises(FatalRequestError) as info:
        await send_with_retries(send, policy(sleep), on_retry=on_retry)
    assert info.value is error
    assert info.value.attempts == 1
    assert send.calls == 1
    assert sleep.waits == []
    assert on_retry.calls == []


async def test_fatal_error_after_a_retry_stops_at_once(sleep: FakeSleep) -> None:
    fatal = FatalRequestError("HTTP 400", 400)
    send = Script([server_error(), fatal, OK])
    with pytest.raises(FatalRequestError) as info:
        await send_with_retries(send, policy(sleep))
    assert info.value is fatal
    assert info.value.attempts == 2
    assert send.calls == 2
    assert len(sleep.waits) == 1


async def test_gives_up_after_max_attempts_with_last_error(sleep: FakeSleep) -> None:
    errors = [
        server_error(500),
        RequestTimeout("t"),
        RateLimited("HTTP 429", 429, 1.0),
        server_error(502),
    ]
    send = Script([*errors, OK])
    on_retry = Recorder()
    with pytest.raises(ServerError) as info:
        await send_with_retries(send, policy(sleep, max_attempts=4), on_retry=on_retry)
    assert info.value is errors[-1]
    assert info.value.attempts == 4
    assert send.calls == 4
    assert len(sleep.waits) == 3
    assert [n for _, n, _ in on_retry.calls] == [1, 2, 3]


async def test_max_attempts_one_never_retries(sleep: FakeSleep) -> None:
    error = server_error()
    send = Script([error, OK])
    on_retry = Recorder()
    with pytest.raises(ServerError) as info:
        await send_with_retries(send, policy(sleep, max_attempts=1), on_retry=on_retry)
    assert info.value is error
    assert info.value.attempts == 1
    assert send.calls == 1
    assert sleep.waits == []
    assert on_retry.calls == []


async def test_max_attempts_two_retries_once(sleep: FakeSleep) -> None:
    send = Script([server_error(), server_error(), OK])
    with pytest.raises(ServerError) as info:
        await send_with_retries(send, policy(sleep, max_attempts=2))
    assert info.value.attempts == 2
    assert send.calls == 2
    assert len(sleep.waits) == 1


# --- the deadline --------------------------------------------------------------------------


async def test_deadline_stops_before_a_wait_would_pass_it(clock: FakeClock) -> None:
    sleep = FakeSleep(clock)
    errors = [RateLimited("HTTP 429", 429, 4.0) for _ in range(10)]
    send = Script([*errors, OK])
    on_retry = Recorder()
    with pytest.raises(RateLimited) as info:
        await send_with_retries(
            send, policy(sleep, max_attempts=10, deadline_s=10.0), on_retry=on_retry
        )
    # t=0 fail, wait 4 -> t=4 fail, wait 4 -> t=8 fail; 8 + 4 >= 10: stop.
    assert sleep.waits == [4.0, 4.0]
    assert info.value is errors[2]
    assert info.value.attempts == 3
    assert send.calls == 3
    assert len(on_retry.calls) == 2


async def test_deadline_counts_the_first_attempt(clock: FakeClock) -> None:
    sleep = FakeSleep(clock)

    def slow() -> None:
        clock.now += 3.0

    send = Script([RateLimited("HTTP 429", 429, 4.0) for _ in range(5)] + [OK], before_each=slow)
    with pytest.raises(RateLimited) as info:
        await send_with_retries(send, policy(sleep, max_attempts=10, deadline_s=12.0))
    # The first attempt takes 3 s, leaving 9 s. Wait 4 -> the second attempt fails at
    # t=10: 7 s into the retries + a 4 s wait >= 9: stop. Ignoring the first attempt's
    # 3 s, 7 + 4 < 12 would have allowed a third attempt.
    assert sleep.waits == [4.0]
    assert info.value.attempts == 2


async def test_wait_longer_than_deadline_is_not_taken(clock: FakeClock) -> None:
    sleep = FakeSleep(clock)
    send = Script([RateLimited("HTTP 429", 429, 60.0), OK])
    on_retry = Recorder()
    with pytest.raises(RateLimited) as info:
        await send_with_retries(send, policy(sleep, deadline_s=30.0), on_retry=on_retry)
    assert info.value.attempts == 1
    assert send.calls == 1
    assert sleep.waits == []
    assert on_retry.calls == []


async def test_zero_deadline_means_no_retry(clock: FakeClock) -> None:
    sleep = FakeSleep(clock)
    send = Script([RequestTimeout("t"), OK])
    with pytest.raises(RequestTimeout) as info:
        await send_with_retries(send, policy(sleep, deadline_s=0.0))
    assert info.value.attempts == 1
    assert sleep.waits == []


async def test_waits_within_deadline_are_taken(clock: FakeClock) -> None:
    sleep = FakeSleep(clock)
    send = Script([RateLimited("HTTP 429", 429, 4.0)] * 2 + [OK])
    assert await send_with_retries(send, policy(sleep, deadline_s=10.0)) == (OK, 3)
    assert sleep.waits == [4.0, 4.0]


async def test_small_real_deadline_with_real_sleep() -> None:
    """End to end with asyncio.sleep and the real clock: 20 ms waits, 50 ms deadline."""
    send = Script([RateLimited("HTTP 429", 429, 0.02) for _ in range(20)] + [OK])
    real = RetryPolicy(max_attempts=20, deadline_s=0.05, sleep=asyncio.sleep)
    with pytest.raises(RateLimited) as info:
        await send_with_retries(send, real)
    assert 2 <= info.value.attempts <= 3
    assert send.calls == info.value.attempts


# --- on_retry ----------------------------------------------------------------------------


async def test_on_retry_called_once_per_retry_with_error_attempt_and_wait(sleep: FakeSleep) -> None:
    errors = [RateLimited("HTTP 429", 429, 2.0), server_error(503, 5.0), RequestTimeout("t")]
    send = Script([*errors, OK])
    on_retry = Recorder()
    assert await send_with_retries(send, policy(sleep), on_retry=on_retry) == (OK, 4)
    assert [(e, n) for e, n, _ in on_retry.calls] == [
        (errors[0], 1),
        (errors[1], 2),
        (errors[2], 3),
    ]
    assert [w for _, _, w in on_retry.calls] == sleep.waits
    assert sleep.waits[:2] == [2.0, 5.0]


async def test_on_retry_not_called_when_giving_up(sleep: FakeSleep) -> None:
    send = Script([server_error()] * 3)
    on_retry = Recorder()
    with pytest.raises(ServerError):
        await send_with_retries(send, policy(sleep, max_attempts=3), on_retry=on_retry)
    # Two retries, not three: no callback for the final failure.
    assert [n for _, n, _ in on_retry.calls] == [1, 2]


async def test_on_retry_is_optional(sleep: FakeSleep) -> None:
    send = Script([server_error(), OK])
    assert await send_with_retries(send, policy(sleep), on_retry=None) == (OK, 2)


# --- RetryPolicy.for_job -----------------------------------------------------------------


def test_policy_for_job_takes_attempts_and_deadline_from_job(sleep: FakeSleep) -> None:
    job = make_job(
        "https://api.example.test/v1",
        model="m",
        prompt_template="{x}",
        api_key_env=None,
        request_timeout_s=None,
        max_attempts=7,
        retry_deadline_s=42.0,
    )
    p = RetryPolicy.for_job(job, sleep=sleep)
    assert (p.max_attempts, p.deadline_s, p.sleep) == (7, 42.0, sleep)
    assert RetryPolicy.for_job(job).sleep is asyncio.sleep

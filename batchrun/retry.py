"""The whole retry policy, in one function: ``send_with_retries``.

Retried: every ``RetryableError`` — 408, 409, 429 and 5xx answers, timeouts,
dropped connections and unreadable 2xx bodies. Never retried: any other 4xx
(``FatalRequestError``). The wait before the next attempt is the API's
Retry-After when it gave one (capped), else a capped exponential backoff with
jitter. A row stops after ``max_attempts`` attempts or when the next wait would
pass its ``deadline_s``, whichever comes first; it is abandoned (``Abandoned``)
the moment the job stops while it waits.

Every attempt, the first included, goes through ``send_with_retries``; tenacity
decides the retries. It is brought in only once an attempt has failed: wrapping
a request that succeeds costs about 20 µs of tenacity bookkeeping (measured with
tenacity 9.2), a tenth of aiohttp's own cost per request, and most requests
succeed the first time. Tenacity's loop then starts from the outcome of that
first attempt, so its wait, stop and callbacks follow the same rules for every
attempt.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    DoAttempt,
    DoSleep,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
)
from tenacity.wait import wait_base

from batchrun.config import Job
from batchrun.errors import Abandoned, RequestError, RetryableError

RETRY_AFTER_MAX_S = 300.0
"""The longest wait batchrun takes when a server asks for one (Retry-After);
a longer ask stops the job as if the API were down (exit 3, resumable)."""

T = TypeVar("T")
OnRetry = Callable[[RequestError, int, float], None]
"""Called before each wait with the error, the attempt that failed (1-based) and the wait in seconds."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one row. Times in seconds."""

    max_attempts: int = 5
    deadline_s: float = 600.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_after_max_s: float = RETRY_AFTER_MAX_S
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    @classmethod
    def for_job(
        cls, job: Job, sleep: Callable[[float], Awaitable[None]] | None = None
    ) -> RetryPolicy:
        return cls(
            max_attempts=job.max_attempts,
            deadline_s=job.retry_deadline_s,
            sleep=sleep or asyncio.sleep,
        )


class _RetryAfterOrBackoff(wait_base):
    """Retry-After wins over the computed backoff.

    The backoff doubles from ``backoff_initial_s`` up to ``backoff_max_s`` and is
    then drawn uniformly from its upper half ("equal jitter"): waits still grow
    attempt by attempt, and rows that hit the cap together do not all come back
    in the same instant.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.cap = policy.retry_after_max_s
        self.initial = policy.backoff_initial_s
        self.maximum = policy.backoff_max_s

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(min(retry_after, self.cap))
        base = min(self.initial * 2 ** (retry_state.attempt_number - 1), self.maximum)
        return base * random.uniform(0.5, 1.0)


async def send_with_retries(
    send: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    on_retry: OnRetry | None = None,
    stopped: asyncio.Event | None = None,
) -> tuple[T, int]:
    """Run ``send`` until it succeeds or the policy gives up.

    Returns the result and the number of attempts made. On giving up, raises the
    last RequestError with its ``attempts`` attribute set. When ``stopped`` is
    set during a wait, raises ``Abandoned`` instead of trying again.
    """
    started = time.monotonic()
    try:
        return await send(), 1
    except RequestError as exc:
        if not exc.retryable or policy.max_attempts <= 1:
            exc.attempts = 1
            raise
        error = exc
    return await _retry(error, send, policy, on_retry, stopped, started)


async def _retry(
    error: RequestError,
    send: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    on_retry: OnRetry | None,
    stopped: asyncio.Event | None,
    started: float,
) -> tuple[T, int]:
    """Tenacity's attempt loop, from the first attempt's failure (made at
    monotonic ``started``) on."""

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if isinstance(exc, RequestError) and state.next_action is not None:
                on_retry(exc, state.attempt_number, state.next_action.sleep)

    async def sleep(seconds: float) -> None:
        await _sleep_unless_stopped(policy.sleep, seconds, stopped)

    retrying = AsyncRetrying(
        sleep=sleep,
        stop=stop_after_attempt(policy.max_attempts) | stop_before_delay(policy.deadline_s),
        wait=_RetryAfterOrBackoff(policy),
        retry=retry_if_exception_type(RetryableError),
        before_sleep=before_sleep,
        reraise=True,
    )
    retrying.begin()
    state = RetryCallState(retrying, fn=None, args=(), kwargs={})
    state.start_time = started
    state.set_exception((type(error), error, error.__traceback__))
    try:
        while True:
            action = await retrying.iter(state)
            if isinstance(action, DoSleep):
                state.prepare_for_next_attempt()
                await retrying.sleep(action)  # type: ignore[misc]
            elif isinstance(action, DoAttempt):
                try:
                    return await send(), state.attempt_number
                except RequestError:
                    state.set_exception(sys.exc_info())  # type: ignore[arg-type]
            else:  # pragma: no cover - reraise=True: tenacity raises rather than returns
                raise AssertionError(f"unexpected retry action {action!r}")
    except RequestError as exc:
        exc.attempts = state.attempt_number
        raise


async def _sleep_unless_stopped(
    sleep: Callable[[float], Awaitable[None]], seconds: float, stopped: asyncio.Event | None
) -> None:
    """``sleep(seconds)``, cut short by ``stopped``: the row is then abandoned."""
    if stopped is None:
        await sleep(seconds)
        return
    if not stopped.is_set():
        waiting = asyncio.ensure_future(sleep(seconds))
        stopping = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            stopping.cancel()
    if stopped.is_set():
        raise Abandoned("the job is stopping")

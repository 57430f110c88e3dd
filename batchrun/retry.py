"""The whole retry policy, in one place.

Retried: every ``RetryableError`` — 408, 409, 429 and 5xx answers, timeouts,
dropped connections and unreadable 2xx bodies. Never retried: any other 4xx
(``FatalRequestError``). The wait before the next attempt is the API's
Retry-After when it gave one (capped), else a capped exponential backoff with
jitter. A row stops after ``max_attempts`` attempts or when the next wait would
pass its ``deadline_s``, whichever comes first.

The first attempt runs without tenacity: wrapping every request in the retry
machinery costs measurable throughput, and most requests succeed the first time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
)
from tenacity.wait import wait_base

from batchrun.config import Job
from batchrun.errors import RequestError, RetryableError

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
    retry_after_max_s: float = 300.0
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

    def backoff(self, retry_state: RetryCallState) -> float:
        base = min(self.initial * 2 ** (retry_state.attempt_number - 1), self.maximum)
        return base * random.uniform(0.5, 1.0)

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(min(retry_after, self.cap))
        # attempt_number counts attempts inside tenacity; the first attempt ran outside it.
        return float(self.backoff(retry_state))


async def send_with_retries(
    send: Callable[[], Awaitable[T]], policy: RetryPolicy, on_retry: OnRetry | None = None
) -> tuple[T, int]:
    """Run ``send`` until it succeeds or the policy gives up.

    Returns the result and the number of attempts made. On giving up, raises the
    last RequestError with its ``attempts`` attribute set.
    """
    started = time.monotonic()
    try:
        return await send(), 1
    except RequestError as exc:
        return await retry_after(exc, send, policy, on_retry, started)


async def retry_after(
    first_error: RequestError,
    send: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    on_retry: OnRetry | None = None,
    started: float | None = None,
) -> tuple[T, int]:
    """Carry on after a first attempt (begun at monotonic ``started``) failed with
    ``first_error``: the hot path makes that first attempt itself, so most rows
    never build the retry machinery. Same result and errors as send_with_retries."""
    first_error.attempts = 1
    if not first_error.retryable or policy.max_attempts <= 1:
        raise first_error
    elapsed = time.monotonic() - started if started is not None else 0.0
    pending: RequestError | None = first_error
    attempts = 0

    async def attempt() -> T:
        # Tenacity's first attempt replays the failure that already happened, so
        # its wait, stop and callbacks follow the same rules as every later one.
        nonlocal attempts, pending
        attempts += 1
        if pending is not None:
            error, pending = pending, None
            raise error
        return await send()

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if isinstance(exc, RequestError):
                wait = state.next_action.sleep if state.next_action is not None else 0.0
                on_retry(exc, attempts, wait)

    retrying = AsyncRetrying(
        sleep=policy.sleep,
        stop=stop_after_attempt(policy.max_attempts)
        | stop_before_delay(max(0.0, policy.deadline_s - elapsed)),
        wait=_RetryAfterOrBackoff(policy),
        retry=retry_if_exception_type(RetryableError),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        result: T = await retrying(attempt)
    except RequestError as exc:
        exc.attempts = attempts
        raise
    return result, attempts

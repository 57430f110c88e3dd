"""How fast the job may send: requests per minute, tokens per minute, a shared
pause when the API's rate limit is spent, and (``concurrency = "auto"``) how
many requests may be in flight.

Every attempt, retries included, takes a place under the in-flight limit
(``AdaptiveLimit.place``, when it adapts) and then waits its turn: the job-wide
pause and the rpm and tpm budgets (``Limits.reserve_turn``, with no coroutine
when nothing makes it wait; ``Limits.wait_turn`` otherwise). The answer's usage
corrects the token estimate afterwards.

The budgets are GCRA schedules (a "virtual clock" per budget) rather than
aiolimiter's leaky bucket: a token budget must be corrected by the usage that
comes back, in both directions, and a single request may need more tokens than
one second's allowance; aiolimiter supports neither. Each waiter reserves its
own send time, so waiters leave in order and no one polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from batchrun.aio import Line, wait_in_line, wake_first
from batchrun.prices import ModelPrice

if TYPE_CHECKING:
    from batchrun.payload import Completion

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

BURST_S = 1.0
"""A budget lets through at most about one second's worth at once: smooth, not a
minute's worth at start."""


class Budget:
    """``per_minute`` units a minute, spread evenly (a GCRA schedule)."""

    def __init__(
        self, per_minute: float, clock: Clock = time.monotonic, burst_s: float = BURST_S
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst_s = burst_s
        self.clock = clock
        self._tat = clock()  # theoretical arrival time: when the budget is next fully spent

    def reserve(self, amount: float) -> float:
        """Spend ``amount`` now; return how many seconds the caller must wait first."""
        now = self.clock()
        tat = self._tat
        if tat < now:
            tat = now
        send_at = tat - self.burst_s
        self._tat = tat + amount / self.rate
        return send_at - now if send_at > now else 0.0

    def correct(self, delta: float) -> None:
        """Adjust what was spent by ``delta`` units (negative: give back)."""
        self._tat += delta / self.rate


SPENT_STREAK = 4
"""This many 429s in a row, with no answer between them, say the API's budget is
spent even when no header says so: once it is, every answer is a 429, and the
requests in flight come back so together. A count in a row rather than a count
per second: a fast job with 5% of its answers refused gets dozens of 429s a
second while most requests still go through. In 5,000-row jobs with 2% of the
answers 429, three in a row came up in one run of six (a needless pause of one
Retry-After); four in a row is about 50 times rarer."""


class Pause:
    """The job-wide pause: once the API's rate limit is spent, every request
    waits, not only the ones that got a 429.

    A 429 pauses the job when it says a budget is spent (``exhausted``: a
    remaining count of 0) or is the ``SPENT_STREAK``-th in a row with no answer
    between. Any other 429 is lone: only its row waits (the retry policy's wait).
    A pause is taken once per episode: the 429s of requests that left before it
    began (or that come while it lasts) neither extend it nor count towards the
    next one. Times are seconds on ``clock``.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.until = 0.0
        self.began = -math.inf  # when the last episode's pause began
        self.episodes = 0
        self.streak = 0  # 429s in a row, of requests sent since that pause began
        # A success sets the streak back to 0 (``Scheduler._post``, on the hot path).

    def rate_limited(self, wait_s: float, exhausted: bool, sent_at: float | None = None) -> bool:
        """One 429 of a request that left at ``sent_at`` (None: just now).
        Pause every request for ``wait_s`` when it shows the budget is spent and
        no pause covers it; return whether it began one."""
        now = self.clock()
        if (sent_at is not None and sent_at < self.began) or now < self.until:
            return False  # the episode already paused for
        self.streak += 1
        if not exhausted and self.streak < SPENT_STREAK:
            return False
        self.began = now
        self.until = now + wait_s
        self.episodes += 1
        self.streak = 0
        return True

    def remaining(self) -> float:
        return max(0.0, self.until - self.clock())


class AdaptiveLimit:
    """How many requests may be in flight, adapted (AIMD) when ``auto``.

    Lower by 30% on a 429 or a timeout (at most once per ``cooldown_s``); one
    higher after each full window of successes while latency stays under twice
    the best seen. Acquire and release happen in the same coroutine
    (``async with limit.place()``).
    """

    def __init__(
        self,
        start: int,
        maximum: int,
        auto: bool,
        clock: Clock = time.monotonic,
        cooldown_s: float = 1.0,
    ) -> None:
        self.limit = start
        self.maximum = maximum
        self.auto = auto
        self.clock = clock
        self.cooldown_s = cooldown_s
        self.in_flight = 0
        self._waiters: Line = deque()
        self._successes = 0
        self._best_latency_s: float | None = None
        self._last_cut = -1e18

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        while self.in_flight >= self.limit:
            await wait_in_line(self._waiters, self._wake)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._wake()

    def _wake(self) -> None:
        free = self.limit - self.in_flight
        while free > 0 and wake_first(self._waiters):
            free -= 1

    def on_success(self, latency_s: float) -> None:
        if not self.auto:
            return
        best = self._best_latency_s
        self._best_latency_s = latency_s if best is None else min(best, latency_s)
        if latency_s > 2 * self._best_latency_s:
            return
        self._successes += 1
        if self._successes >= self.limit and self.limit < self.maximum:
            self._successes = 0
            self.limit += 1
            self._wake()

    def on_overload(self) -> None:
        if not self.auto:
            return
        now = self.clock()
        if now - self._last_cut < self.cooldown_s:
            return
        self._last_cut = now
        self._successes = 0
        self.limit = max(1, int(self.limit * 0.7))


class CostBudget:
    """The spend so far and ``max_cost``: no request starts that could push the
    spend over the budget (``max_cost`` None: the spend is only counted).

    Before each attempt the worst case of that attempt (every prompt byte a
    token, plus max_tokens of completion, at the dearest of the prompt and cached
    rates and of the completion and reasoning rates) is reserved; when the answer
    comes, the reservation is replaced by what its usage costs (``Rates.cost``,
    the function that prices the output's ``cost`` column), or stays charged when
    the API reports no usage. Amounts are Decimals in the prices' currency, at the
    rates in force today (UTC).
    """

    def __init__(
        self,
        max_cost: Decimal | None,
        price: ModelPrice,
        max_tokens: int,
        spent: Decimal = Decimal(0),
    ) -> None:
        self.max_cost = max_cost
        self.price = price
        self.max_tokens = max_tokens
        self.spent = spent
        self.reserved = Decimal(0)

    def worst_case(self, prompt_bound: int) -> Decimal:
        return self.price.rates().worst_case(prompt_bound, self.max_tokens)

    def reserve(self, prompt_bound: int) -> Decimal | None:
        """Reserve one attempt's worst case; None when it does not fit the budget."""
        worst = self.worst_case(prompt_bound)
        if self.max_cost is not None and self.spent + self.reserved + worst > self.max_cost:
            return None
        self.reserved += worst
        return worst

    def settle(self, reservation: Decimal, answer: Completion | None) -> None:
        """Replace a reservation by the cost of the attempt's ``answer`` (the
        reservation when there is none, or it reports no usage)."""
        self.reserved -= reservation
        if answer is None or (answer.prompt_tokens is None and answer.completion_tokens is None):
            self.spent += reservation
        else:
            self.spent += self.price.cost(
                answer.prompt_tokens or 0,
                answer.completion_tokens or 0,
                answer.cached_tokens or 0,
                answer.reasoning_tokens or 0,
            )

    def release(self, reservation: Decimal) -> None:
        """An attempt the API refused with an error status is not paid."""
        self.reserved -= reservation


@dataclass
class Limits:
    """Everything that decides when the next attempt may go."""

    concurrency: AdaptiveLimit
    pause: Pause
    rpm: Budget | None = None
    tpm: Budget | None = None
    sleep: Sleep = asyncio.sleep

    @classmethod
    def build(
        cls,
        concurrency: int | str,
        max_concurrency: int,
        rpm: float | None,
        tpm: float | None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> Limits:
        auto = concurrency == "auto"
        start = min(16, max_concurrency) if auto else int(concurrency)
        return cls(
            concurrency=AdaptiveLimit(start, max_concurrency if auto else start, auto, clock),
            rpm=Budget(rpm, clock) if rpm else None,
            tpm=Budget(tpm, clock) if tpm else None,
            pause=Pause(clock),
            sleep=sleep,
        )

    @property
    def paces(self) -> bool:
        """Whether anything beyond the pool of workers limits the sending."""
        return self.concurrency.auto or self.rpm is not None or self.tpm is not None

    def pause_active(self) -> bool:
        """Cheap check on the hot path: has the job ever been paused?"""
        return self.pause.until > 0

    def reserve_turn(self, est_tokens: int) -> float | None:
        """One attempt's turn without a coroutine, for the hot path: when no pause
        lasts, reserve its rpm/tpm budgets now and return the seconds to wait
        before sending (0.0: send now, the usual case). None while a pause
        lasts: the attempt goes through ``wait_turn``, which waits it out first."""
        if self.pause.until > 0 and self.pause.remaining() > 0:
            return None
        return self._reserve(est_tokens)

    def _reserve(self, est_tokens: int) -> float:
        wait = 0.0
        if self.rpm is not None:
            wait = self.rpm.reserve(1)
        if self.tpm is not None:
            wait = max(wait, self.tpm.reserve(est_tokens))
        return wait

    async def wait_turn(self, est_tokens: int) -> None:
        """Wait out the job-wide pause and the rpm/tpm budgets for one attempt."""
        while True:
            until = self.pause.until
            wait = self.pause.remaining()
            if wait <= 0:
                break
            await self.sleep(wait)
            if self.pause.until == until:
                break  # no new pause began meanwhile
        wait = self._reserve(est_tokens)
        if wait > 0:
            await self.sleep(wait)

    def used_tokens(self, estimated: int, actual: int | None) -> None:
        """Correct the tpm budget with the usage the API reported."""
        if self.tpm is not None and actual is not None:
            self.tpm.correct(actual - estimated)

    def rate_limited(
        self,
        retry_after: float | None,
        backoff_s: float,
        exhausted: bool = False,
        sent_at: float | None = None,
    ) -> bool:
        """A 429: auto concurrency drops, and when the budget is spent (see
        ``Pause``) every request waits the wait it asked for (``backoff_s``
        when it named none). Returns whether the job paused."""
        self.concurrency.on_overload()
        wait_s = retry_after if retry_after is not None else backoff_s
        return self.pause.rate_limited(wait_s, exhausted, sent_at)

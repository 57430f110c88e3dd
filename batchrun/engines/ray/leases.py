"""A row sender's side of the job-wide coordinator: the objects its Scheduler
is given in place of a local run's ``Limits`` and ``CostBudget``, backed by the
coordinator (``engines.ray.coordinator``) without a remote call per request.

- ``LeasedBudget``: the rpm or tpm budget as a supply of chunks leased ahead
  (about ``LEASE_S`` seconds of this sender's share each, the next one asked for
  when half of the current is used). A request takes its place in the supply and
  goes at the time the coordinator's schedule gives that place.
- ``SharedPause``: when a 429 shows the API's rate limit is spent
  (``limits.Pause``), every sender pauses (the coordinator pushes it): at once
  when it says a remaining count of 0; when it is the fourth in a row with no
  answer between, counted by the coordinator over every sender. A pause begun
  elsewhere is held here, as the same episode.
- ``SharedLimit``: ``concurrency = "auto"`` with the job-wide limit: successes
  and overloads go to the coordinator, which says this sender's share.
- ``LeasedCost``: max_cost as an allowance leased from the coordinator; each
  attempt's worst case is reserved from it before the request starts.
- ``LeasedLimits``: the scheduler's ``Limits``, waiting for the pause, then the
  leased budgets, then enough allowance for one more request.
- ``Link``: what the sender reports (usage corrections, latencies, spend, its
  last success) and the status it is told, synced about ``SYNC_S``; the
  circuit breaker asks it whether the whole job has had no success.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from batchrun.engines.ray.coordinator import EXHAUSTED, GRANTED, Report, Status
from batchrun.errors import RateLimited, RequestError
from batchrun.failures import AUTH_STATUSES
from batchrun.limits import SPENT_STREAK, AdaptiveLimit, Budget, Clock, CostBudget, Limits, Pause
from batchrun.payload import Completion
from batchrun.prices import ModelPrice

log = logging.getLogger("batchrun")

LEASE_S = 0.2
"""A rate lease covers about this many seconds of one sender's share of the budget."""
SYNC_S = 0.1
"""A sender reports what it has to report about this often."""
KEEPALIVE_S = 1.0
"""… and at least this often, to hear the status (auto concurrency's share)."""
WAIT_S = 0.01
"""A sender told to wait for allowance asks again after this many seconds."""
WAIT_TRIES = 200
"""… at most this many times in a row before taking the budget as reached."""


class Remote(Protocol):
    """The coordinator as one sender calls it (``coordinator.Coordinator``'s
    methods, that sender's index given)."""

    async def sync(self, report: Report) -> Status: ...

    async def lease_rate(
        self, kind: str, amount: float, report: Report
    ) -> tuple[float, Status]: ...

    async def lease_cost(
        self, wanted: Decimal, needed: Decimal, report: Report
    ) -> tuple[Decimal, str, Status]: ...

    async def api_down(self, report: Report, error: str) -> str | None: ...

    async def count_429(
        self, report: Report, seconds: float, sent_s_ago: float, at: float
    ) -> float: ...

    def rate_limited(self, seconds: float) -> None: ...

    def overloaded(self) -> None: ...


class Link:
    """What one sender has to tell the coordinator, and what it was told."""

    def __init__(
        self,
        remote: Remote,
        api_down_after_s: float,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self.remote = remote
        self.api_down_after_s = api_down_after_s
        self.clock = clock
        self.wall = wall
        self.tokens_delta = 0.0
        self.latencies: list[float] = []
        self.consumed = Decimal(0)
        self.given_back = Decimal(0)
        self.last_success = clock()
        self.last_success_wall: float | None = None
        self.key_settled = False
        """Whether an attempt came back other than 401/403 (the key probe's verdict)."""
        self.pause: SharedPause | None = None
        self.limit: SharedLimit | None = None
        self.cost: LeasedCost | None = None
        self.on_api_down: Callable[[str], None] | None = None
        self._down_check: asyncio.Task[None] | None = None
        self._counts: set[asyncio.Task[None]] = set()
        self._reported_reserved = Decimal(0)
        self._reported_success: float | None = None
        self._last_sync = clock()

    def report(self) -> Report:
        """What happened since the last report (taken: the next one starts empty)."""
        reserved = self.cost.reserved if self.cost is not None else Decimal(0)
        report = Report(
            tokens_delta=self.tokens_delta,
            latencies=self.latencies,
            last_success=self.last_success_wall,
            consumed=self.consumed,
            reserved=reserved,
            given_back=self.given_back,
        )
        self.tokens_delta = 0.0
        self.latencies = []
        self.consumed = self.given_back = Decimal(0)
        self._reported_reserved = reserved
        self._reported_success = self.last_success_wall
        self._last_sync = self.clock()
        return report

    def apply(self, status: Status) -> None:
        """Take what the coordinator said: the pause, this sender's share, the spend."""
        if self.pause is not None and status.pause_s > 0:
            self.pause.hold(status.pause_s)
        if self.limit is not None:
            self.limit.set(status.limit)
        if self.cost is not None:
            self.cost.spent = status.spent

    def due(self) -> bool:
        """Whether there is something to report, or the keepalive is due. An
        answer is news: it ends the job's run of 429s (``count_429``)."""
        reserved = self.cost.reserved if self.cost is not None else Decimal(0)
        return bool(
            self.last_success_wall != self._reported_success
            or self.latencies
            or self.tokens_delta
            or self.consumed
            or self.given_back
            or reserved != self._reported_reserved
            or self.clock() - self._last_sync >= KEEPALIVE_S
        )

    async def sync(self) -> None:
        self.apply(await self.remote.sync(self.report()))

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Report about every SYNC_S seconds, from the start of the sending until
        cancelled (the circuit breaker counts from that start, as locally)."""
        self.last_success = self.clock()
        while True:
            await sleep(SYNC_S)
            if self.due():
                await self.sync()

    # ---- what the client saw --------------------------------------------------

    def succeeded(self) -> None:
        """An attempt was answered."""
        self.last_success = self.clock()
        self.last_success_wall = self.wall()
        self.key_settled = True

    def failed(self, exc: RequestError) -> None:
        """An attempt failed: the key probe's verdict, and the circuit breaker,
        which asks the coordinator once this sender has had no success for
        api_down_after_s (429s excepted, as in a local run)."""
        if exc.status not in AUTH_STATUSES:
            self.key_settled = True
        if not exc.retryable or isinstance(exc, RateLimited) or self._down_check is not None:
            return
        if self.clock() - self.last_success < self.api_down_after_s:
            return
        self._down_check = asyncio.ensure_future(self._check_down(str(exc)))

    def count_429(self, seconds: float, sent_s_ago: float) -> None:
        """A 429 that did not say the rate limit is spent: the coordinator counts
        it with every sender's; when it makes SPENT_STREAK in a row, the job
        pauses for ``seconds`` (this sender says so in the log)."""
        task = asyncio.ensure_future(self._count_429(seconds, sent_s_ago, self.wall()))
        self._counts.add(task)
        task.add_done_callback(self._counts.discard)
        task.add_done_callback(_retrieved)

    async def _count_429(self, seconds: float, sent_s_ago: float, at: float) -> None:
        pause_s = await self.remote.count_429(self.report(), seconds, sent_s_ago, at)
        if pause_s <= 0 or self.pause is None:
            return
        self.pause.hold(pause_s)
        log.info(
            "The API's rate limit is spent (%d HTTP 429s in a row, over every Ray actor): "
            "every request waits %.2fs",
            SPENT_STREAK,
            pause_s,
            extra={"event": "rate_limit_pause", "wait_s": round(pause_s, 3), "cause": "HTTP 429"},
        )

    async def _check_down(self, error: str) -> None:
        try:
            message = await self.remote.api_down(self.report(), error)
        finally:
            self._down_check = None
        if message is not None and self.on_api_down is not None:
            self.on_api_down(message)


class SharedPause(Pause):
    """The job-wide pause, as one sender holds it. A 429 saying a remaining
    count of 0 pauses the job from here; whether others make SPENT_STREAK in a
    row is judged by the coordinator, over every sender's 429s and answers."""

    def __init__(self, link: Link, clock: Clock = time.monotonic) -> None:
        super().__init__(clock)
        self.link = link
        link.pause = self

    def rate_limited(self, wait_s: float, exhausted: bool, sent_at: float | None = None) -> bool:
        """A 429 here; when it begins a pause, every other sender pauses too."""
        now = self.clock()
        if (sent_at is not None and sent_at < self.began) or now < self.until:
            return False  # the episode already paused for
        if not exhausted:
            self.link.count_429(wait_s, now - sent_at if sent_at is not None else 0.0)
            return False
        began = super().rate_limited(wait_s, exhausted, sent_at)
        if began:
            self.link.remote.rate_limited(wait_s)
        return began

    def hold(self, seconds: float) -> None:
        """A pause another sender began (the coordinator's push, or its status):
        the same episode here, so the 429s of requests that left before it do
        not begin another."""
        now = self.clock()
        if now + seconds > self.until:
            self.until = now + seconds
            self.began = now
            self.streak = 0


class SharedLimit(AdaptiveLimit):
    """``concurrency = "auto"`` for the whole job: this sender's places are its
    share of the job-wide limit the coordinator adapts."""

    def __init__(self, start: int, link: Link) -> None:
        super().__init__(start, start, auto=True)
        self.link = link
        link.limit = self

    def on_success(self, latency_s: float) -> None:
        self.link.latencies.append(latency_s)

    def on_overload(self) -> None:
        self.link.remote.overloaded()

    def set(self, limit: int) -> None:
        """The coordinator's new share for this sender."""
        if limit != self.limit:
            self.limit = self.maximum = limit
            self._wake()


@dataclass
class _Chunk:
    start: float  # position of its first unit in the sender's supply
    end: float
    at: float  # local monotonic time of its first unit (unit k: k / rate seconds later)


class LeasedBudget(Budget):
    """One sender's supply of a job-wide rpm or tpm budget (``kind``), leased
    from the coordinator in chunks of ``chunk`` units.

    The coordinator reserves a chunk of n units in its GCRA schedule as n units
    one by one, and says the time of its first unit; unit k may be spent k /
    rate seconds later (at once, when that time has passed). So every sender
    together keeps to the job's rate, with the same allowance of about a
    second's worth at once. The time is taken when the answer arrives, a little
    after the coordinator gave it: never early.
    """

    def __init__(
        self,
        per_minute: float,
        kind: str,
        link: Link,
        chunk: float,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(per_minute, clock)
        self.kind = kind
        self.link = link
        self.chunk = chunk
        self._chunks: deque[_Chunk] = deque()
        self._leased = 0.0  # units leased so far
        self._taken = 0.0  # units handed out so far
        self._waiting: list[float] = []  # positions of the takers waiting for a lease
        self._lease: asyncio.Future[None] | None = None

    def reserve(self, amount: float) -> float:  # pragma: no cover - LeasedLimits uses take()
        raise NotImplementedError("a leased budget is spent with take()")

    def correct(self, delta: float) -> None:
        """The usage said ``delta`` more (or fewer) units: the job's budget is corrected."""
        self.link.tokens_delta += delta

    async def take(self, amount: float) -> float:
        """Spend ``amount`` units; return how many seconds the caller must wait first."""
        position = self._taken
        self._taken = end = position + amount
        if end > self._leased:
            self._waiting.append(position)
            try:
                while end > self._leased:
                    await self._more(end - self._leased)
            finally:
                self._waiting.remove(position)
        send_at = self._time_of(position, end)
        self._forget(min(self._waiting, default=position))
        if self._lease is None and self._leased - self._taken < self.chunk / 2:
            # The next chunk, asked for ahead: no taker waits while the supply lasts.
            self._lease = asyncio.ensure_future(self._lease_more(self.chunk))
            self._lease.add_done_callback(_retrieved)
        return max(0.0, send_at - self.clock())

    def _time_of(self, position: float, end: float) -> float:
        """When the units [position, end) may be spent: the time of ``position``
        in its chunk, and no earlier than the start of any later chunk they reach."""
        at = 0.0
        for chunk in self._chunks:
            if chunk.end <= position:
                continue
            if chunk.start >= end:
                break
            offset = max(position - chunk.start, 0.0)
            at = max(at, chunk.at + offset / self.rate)
        return at

    def _forget(self, position: float) -> None:
        while self._chunks and self._chunks[0].end <= position:
            self._chunks.popleft()

    async def _more(self, needed: float) -> None:
        """Wait for the lease under way, or ask for one of at least ``needed`` units."""
        if self._lease is None:
            self._lease = asyncio.ensure_future(self._lease_more(max(needed, self.chunk)))
        await asyncio.shield(self._lease)

    async def _lease_more(self, amount: float) -> None:
        try:
            offset, status = await self.link.remote.lease_rate(
                self.kind, amount, self.link.report()
            )
            start = self._leased
            self._chunks.append(_Chunk(start, start + amount, self.clock() + offset))
            self._leased = start + amount
            self.link.apply(status)
        finally:
            self._lease = None


class LeasedCost(CostBudget):
    """max_cost for one sender: an allowance leased from the coordinator, from
    which each attempt's worst case is reserved. ``reserve`` says None (the job
    stops: BudgetReached) only when the coordinator could not make room."""

    def __init__(
        self,
        max_cost: Decimal,
        price: ModelPrice,
        max_tokens: int,
        link: Link,
        rows_per_lease: int = 8,
    ) -> None:
        super().__init__(max_cost, price, max_tokens)
        self.link = link
        link.cost = self
        self.rows_per_lease = rows_per_lease
        self.allowance = Decimal(0)  # granted, not yet spent
        self.largest = Decimal(0)  # the largest worst case among the rows this sender was given
        self.exhausted = False
        self._lease: asyncio.Future[None] | None = None
        self._waits = 0

    @property
    def free(self) -> Decimal:
        return self.allowance - self.reserved

    def expect(self, prompt_bound: int) -> None:
        """A row for this sender: its worst case may be the largest to make room for."""
        worst = self.worst_case(prompt_bound)
        if worst > self.largest:
            self.largest = worst

    def reserve(self, prompt_bound: int) -> Decimal | None:
        """Reserve one attempt's worst case from this sender's allowance; None when
        it does not fit (``ready`` found no more room: the budget is reached)."""
        worst = self.worst_case(prompt_bound)
        fits = self.reserved + worst <= self.allowance
        self.reserved += worst if fits else 0
        return worst if fits else None

    def settle(self, reservation: Decimal, answer: Completion | None) -> None:
        before = self.spent
        super().settle(reservation, answer)
        cost = self.spent - before
        self.allowance -= cost
        self.link.consumed += cost

    async def ready(self) -> None:
        """Make room for one more request of the largest worst case (or learn
        that the budget cannot hold it). Nothing is awaited after the last
        check, so the reservation that follows finds the room."""
        while self.free < self.largest and not self.exhausted:
            if self._lease is None:
                self._lease = asyncio.ensure_future(self._lease_more())
            await asyncio.shield(self._lease)

    async def _lease_more(self) -> None:
        try:
            needed = self.largest - self.free
            wanted = max(needed, self.largest * self.rows_per_lease)
            grant, verdict, status = await self.link.remote.lease_cost(
                wanted, needed, self.link.report()
            )
            self.link.apply(status)
            if verdict == GRANTED:
                self.allowance += grant
                self._waits = 0
            elif verdict == EXHAUSTED:
                self.exhausted = True
            else:  # WAIT: the other senders are giving back what they hold unreserved
                self._waits += 1
                if self._waits >= WAIT_TRIES:
                    self.exhausted = True
                await asyncio.sleep(WAIT_S)
        finally:
            self._lease = None

    def reclaim(self) -> None:
        """Give back the allowance not reserved (another sender needs room)."""
        free = self.free
        if free > 0:
            self.allowance -= free
            self.link.given_back += free


@dataclass
class LeasedLimits(Limits):
    """The scheduler's limits in a sender: the job-wide pause, then the leased
    rpm and tpm budgets, then room in the leased cost allowance."""

    cost: LeasedCost | None = None
    _pause_only: Limits = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The pause is waited for as a local run waits for it: a Limits with no budgets.
        self._pause_only = Limits(concurrency=self.concurrency, pause=self.pause, sleep=self.sleep)

    @property
    def paces(self) -> bool:
        return (
            self.concurrency.auto
            or self.rpm is not None
            or self.tpm is not None
            or (self.cost is not None)
        )

    def reserve_turn(self, est_tokens: int) -> float | None:
        """Never reserved on the spot: a leased budget is taken from its lease,
        which may have to be asked for (``wait_turn``)."""
        return None

    async def wait_turn(self, est_tokens: int) -> None:
        await self._pause_only.wait_turn(est_tokens)
        wait = 0.0
        if isinstance(self.rpm, LeasedBudget):
            wait = await self.rpm.take(1)
        if isinstance(self.tpm, LeasedBudget):
            wait = max(wait, await self.tpm.take(est_tokens))
        if wait > 0:
            await self.sleep(wait)
        if self.cost is not None:
            await self.cost.ready()


def _retrieved(task: asyncio.Future[None]) -> None:
    """A lease asked for ahead that failed: the next taker asks again (and
    meets the error itself), so this one is not reported as unretrieved."""
    if not task.cancelled():
        task.exception()

"""The Ray engine's job-wide coordinator and the leases its senders hold, in this
process and without Ray: several senders' ``Link``s call one ``Coordinator``
directly, and its pushes (a pause, a new share, a reclaim) reach the other
senders at once. These run in the default suite."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from batchrun.engines.ray.coordinator import EXHAUSTED, Coordinator, Plan, Report, Status
from batchrun.engines.ray.leases import (
    LeasedBudget,
    LeasedCost,
    LeasedLimits,
    Link,
    SharedLimit,
    SharedPause,
)
from batchrun.errors import RateLimited, ServerError
from batchrun.limits import AdaptiveLimit
from batchrun.payload import Completion
from batchrun.prices import ModelPrice, Rates


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Push:
    """An actor method as the coordinator calls it: ``.remote(...)`` runs it here."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> None:
        self.fn(*args)


class Sender:
    """One sender's side (its link and leased objects), with the pushes a
    RowSender answers."""

    def __init__(
        self, coordinator: Coordinator, index: int, clock: Clock, wall: Clock | None = None
    ) -> None:
        self.link = Link(
            _Here(coordinator, index), api_down_after_s=60.0, clock=clock, wall=wall or Clock()
        )
        self.pause = SharedPause(self.link, clock)
        self.pause_push = _Push(self.pause.hold)
        self.set_limit = _Push(lambda n: self.link.limit.set(n) if self.link.limit else None)
        self.reclaim = _Push(self._reclaim)
        self.syncs: set[asyncio.Future[None]] = set()

    def _reclaim(self) -> None:
        """As RowSender.reclaim: give back, and say so."""
        if self.link.cost is not None:
            self.link.cost.reclaim()
            self.syncs.add(asyncio.ensure_future(self.link.sync()))


class _Here:
    """``leases.Remote`` calling the coordinator in this process."""

    def __init__(self, coordinator: Coordinator, index: int) -> None:
        self.c = coordinator
        self.i = index

    async def sync(self, report: Report) -> Status:
        return self.c.sync(self.i, report)

    async def lease_rate(self, kind: str, amount: float, report: Report) -> tuple[float, Status]:
        return self.c.lease_rate(self.i, kind, amount, report)

    async def lease_cost(
        self, wanted: Decimal, needed: Decimal, report: Report
    ) -> tuple[Decimal, str, Status]:
        return self.c.lease_cost(self.i, wanted, needed, report)

    async def api_down(self, report: Report, error: str) -> str | None:
        return self.c.api_down(self.i, report, error)

    async def count_429(
        self, report: Report, seconds: float, sent_s_ago: float, at: float
    ) -> float:
        return self.c.count_429(self.i, report, seconds, sent_s_ago, at)

    def rate_limited(self, seconds: float) -> None:
        self.c.rate_limited(self.i, seconds)

    def overloaded(self) -> None:
        self.c.overloaded(self.i)


class _Handle:
    def __init__(self, sender: Sender) -> None:
        self.pause = sender.pause_push
        self.set_limit = sender.set_limit
        self.reclaim = sender.reclaim


def fleet(plan: Plan, clock: Clock, wall: Clock | None = None) -> tuple[Coordinator, list[Sender]]:
    wall = wall or Clock()
    coordinator = Coordinator(plan, clock=clock, wall=wall)
    senders = [Sender(coordinator, i, clock, wall) for i in range(plan.senders)]
    coordinator.register([_Handle(s) for s in senders])
    return coordinator, senders


async def test_two_senders_together_keep_the_jobs_rpm() -> None:
    """Leased in chunks and taken in turns, the send times of both senders
    together are those of one GCRA schedule at the job's rate: about a
    second's worth at once, then one every 60/rpm seconds."""
    clock = Clock()
    _, senders = fleet(Plan(senders=2, rpm=600), clock)
    budgets = [LeasedBudget(600, "rpm", s.link, chunk=3, clock=clock) for s in senders]
    times = []
    for n in range(60):
        times.append(clock.now + await budgets[n % 2].take(1))
    times.sort()
    # One GCRA schedule at 10/s with a one-second burst: 11 at once, then every
    # 0.1 s (or more, where a sender leased a unit ahead and has not used it).
    assert times[:11] == [clock.now] * 11
    gaps = [b - a for a, b in itertools.pairwise(times[10:])]
    assert min(gaps) >= 0.1 - 1e-9
    assert times[-1] - times[0] <= (60 - 11 + 2 * 3) / 10 + 1e-9


async def test_tpm_corrections_reach_the_job_budget() -> None:
    clock = Clock()
    coordinator, senders = fleet(Plan(senders=2, tpm=6000), clock)
    budget = LeasedBudget(6000, "tpm", senders[0].link, chunk=100, clock=clock)
    await budget.take(100)
    tat = coordinator.tpm._tat  # type: ignore[union-attr]
    budget.correct(-50)  # the answer used 50 tokens fewer than estimated
    await senders[0].link.sync()
    assert coordinator.tpm._tat == pytest.approx(tat - 50 / 100)  # type: ignore[union-attr]


async def test_a_spent_rate_limit_in_one_sender_pauses_every_sender() -> None:
    clock = Clock()
    _, (a, b, c) = fleet(Plan(senders=3), clock)
    assert not a.pause.rate_limited(2.0, exhausted=False)  # a lone 429: only its row waits
    assert a.pause.remaining() == b.pause.remaining() == 0
    a.pause.rate_limited(2.0, exhausted=True)  # a 429 saying the budget is spent
    assert a.pause.remaining() == b.pause.remaining() == c.pause.remaining() == 2.0
    # The pause a sender hears about is not sent around again, and is the same
    # episode there: a 429 of a request that left before it begins no other.
    b.pause.hold(5.0)
    assert a.pause.remaining() == 2.0
    clock.now += 6
    assert not c.pause.rate_limited(2.0, exhausted=True, sent_at=clock.now - 7)


async def _settle() -> None:
    """Let the tasks the senders started (a 429 counted by the coordinator) run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_four_429s_in_a_row_over_every_sender_pause_the_job() -> None:
    """Two 429s in each of two senders, none saying the budget is spent: four
    in a row for the job, which pauses every sender (neither saw four of its
    own). An answer anywhere between starts the count again."""
    clock, wall = Clock(), Clock()
    _, (a, b) = fleet(Plan(senders=2), clock, wall)

    async def lone_429(s: Sender) -> None:
        wall.now += 0.01
        assert not s.pause.rate_limited(2.0, exhausted=False)  # judged by the coordinator
        await _settle()

    for s in (a, b, a):
        await lone_429(s)
    assert a.pause.remaining() == b.pause.remaining() == 0
    await lone_429(b)
    assert a.pause.remaining() == b.pause.remaining() == 2.0
    # During the pause and after it, 429s of requests sent before it began count for nothing.
    await lone_429(a)
    clock.now += 3
    wall.now += 3
    for _ in range(4):
        wall.now += 0.01
        assert not a.pause.rate_limited(2.0, exhausted=False, sent_at=clock.now - 4)
    await _settle()
    assert a.pause.remaining() == b.pause.remaining() == 0
    # Two 429s, an answer in b (reported within SYNC_S), two more: not four in a row.
    await lone_429(a)
    await lone_429(b)
    wall.now += 0.01
    b.link.succeeded()
    assert b.link.due()  # an answer is news for the coordinator
    await b.link.sync()
    await lone_429(a)
    await lone_429(a)
    assert a.pause.remaining() == b.pause.remaining() == 0
    await lone_429(a)
    await lone_429(b)
    assert a.pause.remaining() == b.pause.remaining() == 2.0


async def test_auto_concurrency_is_one_limit_shared_by_the_senders() -> None:
    clock = Clock()
    coordinator, senders = fleet(
        Plan(senders=2, auto=True, start_concurrency=16, max_concurrency=64), clock
    )
    limits = [SharedLimit(8, s.link) for s in senders]
    limits[0].on_overload()  # a 429 or a timeout in one sender
    assert coordinator.concurrency.limit == 11  # 16 x 0.7: the whole job's limit drops
    assert [x.limit for x in limits] == [6, 5]  # pushed to both
    for _ in range(11):
        limits[1].on_success(0.01)
    await senders[1].link.sync()
    await senders[0].link.sync()
    assert coordinator.concurrency.limit == 12
    assert [x.limit for x in limits] == [6, 6]


async def test_cost_allowances_never_pass_the_budget_and_make_room_for_each_other() -> None:
    """Two senders reserve worst cases from leased allowances: the spend plus
    every reservation stays within max_cost; a sender short of room gets what
    the other holds unreserved; the budget is reached only when it is."""
    clock = Clock()
    one = Decimal(1_000_000)
    price = ModelPrice((Rates(one, one, one, one),))  # 1 per token, of every kind
    coordinator, senders = fleet(
        Plan(senders=2, max_cost=Decimal(100), price=price, max_tokens=5), clock
    )
    costs = [LeasedCost(Decimal(100), price, 5, s.link, rows_per_lease=4) for s in senders]
    for cost in costs:
        cost.expect(5)  # worst case 5 + 5 = 10
    await costs[0].ready()
    assert costs[0].allowance == 40  # four worst cases leased at once
    held = []
    for _ in range(4):
        held.append(costs[0].reserve(5))
    await costs[1].ready()
    assert costs[1].allowance == 40
    assert costs[1].reserve(5) == 10
    # Sender 0 settles two cheap answers and holds 2 x 10 reserved, 16 free after them.
    cheap = Completion("a", "stop", 1, 1, 2, None, None)
    costs[0].settle(held.pop(), cheap)
    costs[0].settle(held.pop(), cheap)
    await senders[0].link.sync()
    # Sender 1 takes what is left of the budget, then what sender 0 gives back.
    for _ in range(6):
        await costs[1].ready()
        assert costs[1].reserve(5) == 10
    assert coordinator.spent + sum(c.reserved for c in costs) <= 100
    await costs[1].ready()
    assert costs[1].exhausted and costs[1].reserve(5) is None
    assert coordinator.lease_cost(1, Decimal(10), Decimal(10), Report())[1] == EXHAUSTED


async def test_leased_limits_wait_for_the_pause_then_the_budget() -> None:
    clock = Clock()
    _, (a, b) = fleet(Plan(senders=2, rpm=60), clock)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    limits = LeasedLimits(
        concurrency=AdaptiveLimit(4, 4, False),
        pause=b.pause,
        rpm=LeasedBudget(60, "rpm", b.link, chunk=1, clock=clock),
        sleep=sleep,
    )
    assert limits.paces
    a.pause.rate_limited(3.0, exhausted=True)  # a spent budget, seen by the other sender
    await limits.wait_turn(10)
    assert slept == [3.0]


def test_the_circuit_breaker_looks_at_the_whole_job() -> None:
    clock = Clock()
    wall = Clock()
    coordinator = Coordinator(Plan(senders=2, api_down_after_s=60), clock=clock, wall=wall)
    coordinator.sync(0, Report())  # the sending begins
    wall.now += 61
    # Sender 1 answered 10 s ago: the API is up, whatever sender 0 sees.
    assert coordinator.api_down(1, Report(last_success=wall.now - 10), "HTTP 500") is None
    wall.now += 55
    message = coordinator.api_down(0, Report(), "HTTP 500: boom")
    assert message is not None and "no request has succeeded for 65s" in message


async def test_link_asks_the_coordinator_before_calling_the_api_down() -> None:
    clock = Clock()
    coordinator = Coordinator(Plan(senders=1, api_down_after_s=60), clock=clock)
    link = Link(_Here(coordinator, 0), api_down_after_s=60, clock=clock)
    stops: list[str] = []
    link.on_api_down = stops.append
    link.failed(RateLimited("HTTP 429", 429))
    link.failed(ServerError("HTTP 500", 500))
    await asyncio.sleep(0)
    assert stops == [] and link.key_settled
    coordinator.sync(0, Report())  # the sending begins
    clock.now += 61
    coordinator.last_success -= 61  # type: ignore[operator]
    link.failed(ServerError("HTTP 500", 500))
    await asyncio.sleep(0)
    assert len(stops) == 1 and "HTTP 500" in stops[0]

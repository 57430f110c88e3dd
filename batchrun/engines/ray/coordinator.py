"""The job-wide coordinator of a Ray run: one Ray actor that owns what the
row senders share, so that a job sent by many actors keeps the limits a local
run keeps.

- The rpm and tpm budgets: the same GCRA schedules as a local run
  (``limits.Budget``), leased to the senders in chunks (``lease_rate``): a
  chunk of n units is reserved as n units would be one by one, and the sender
  spreads them at the job's rate from the time the chunk may start. Usage
  corrections come back with the reports (``Report.tokens_delta``).
- The pause when the API's rate limit is spent (``limits.Pause``): a sender
  whose 429 says a remaining count of 0 pauses and says so (``rate_limited``);
  every other 429 is counted here (``count_429``), so that four in a row with
  no answer between, from whichever senders, pause the job. The pause is pushed
  at once to every other sender (``RowSender.pause``). "No answer between" is
  told by the answers' wall-clock times, which the senders report within
  ``leases.SYNC_S`` of them.
- ``max_cost``: the spend so far and the allowance each sender holds
  (``lease_cost``). A sender reserves each attempt's worst case from its own
  allowance, so the whole never passes the budget: the spend plus every
  allowance stays within max_cost. When a sender needs more than is left, the
  others give back what they hold unreserved (``RowSender.reclaim``) before the
  budget counts as reached.
- ``concurrency = "auto"``: one ``AdaptiveLimit`` for the job, fed by every
  sender's successes and overloads; each sender is told its share.
- ``api_down_after_s``: the time of the job's last success, so that the circuit
  breaker looks at the whole job (``api_down``).

Nothing here imports Ray: the class is wrapped into an actor by the driver, and
tests use it as it is. Every method is called one at a time (a Ray actor runs
one call after the other), so no lock is needed. Times sent to and from the
senders are durations in seconds (their clocks are not this one's), except the
last success and the time a 429 came, which are wall-clock time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from batchrun.limits import SPENT_STREAK, AdaptiveLimit, Budget, Clock
from batchrun.prices import ModelPrice

GRANTED = "granted"
WAIT = "wait"
EXHAUSTED = "exhausted"


@dataclass(frozen=True)
class Plan:
    """What the coordinator keeps for the job: its limits, and the spend of
    earlier runs of its output."""

    senders: int
    rpm: float | None = None
    tpm: float | None = None
    auto: bool = False
    start_concurrency: int = 16
    max_concurrency: int = 256
    max_cost: Decimal | None = None
    price: ModelPrice | None = None
    max_tokens: int = 0
    spent: Decimal = Decimal(0)
    api_down_after_s: float = 300.0


@dataclass
class Report:
    """What a sender tells the coordinator with each call: what happened since
    its last report, and what it holds now."""

    tokens_delta: float = 0.0
    """Tokens used minus tokens estimated, over the answers since the last report."""
    latencies: list[float] = field(default_factory=list)
    """Seconds each successful attempt took (for ``concurrency = "auto"``)."""
    last_success: float | None = None
    """Wall-clock time of the sender's last answer."""
    consumed: Decimal = Decimal(0)
    """Spend settled since the last report (taken from the sender's allowance)."""
    reserved: Decimal = Decimal(0)
    """Worst cases the sender holds now for its requests in flight."""
    given_back: Decimal = Decimal(0)
    """Allowance returned unused."""


@dataclass(frozen=True)
class Status:
    """What the coordinator tells a sender with each answer."""

    pause_s: float
    """Seconds of job-wide pause left."""
    limit: int
    """The sender's share of the requests the job may have in flight (auto)."""
    spent: Decimal
    """The job's spend so far, every run of its output included."""
    reserved: Decimal
    """Worst cases held for the job's requests in flight, as last reported."""


class Schedule(Budget):
    """The job's rpm or tpm GCRA schedule, leased in chunks."""

    def lease(self, amount: float) -> float:
        """Reserve ``amount`` units as ``reserve`` would one by one; return the
        seconds from now to the time of the first unit, before which unit k of
        the chunk may not go k / rate seconds later (negative: that time has
        passed, within the allowance of BURST_S seconds' worth at once)."""
        now = self.clock()
        tat = max(self._tat, now)
        self._tat = tat + amount / self.rate
        return tat - self.burst_s - now


class _Sender:
    __slots__ = ("alive", "granted", "reserved")

    def __init__(self) -> None:
        self.alive = True
        self.granted = Decimal(0)  # allowance held: reserved in flight, or free
        self.reserved = Decimal(0)


class Coordinator:
    """The job's shared limits and spend (see the module docstring)."""

    def __init__(
        self,
        plan: Plan,
        clock: Clock = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.plan = plan
        self.clock = clock
        self.wall = wall
        self.rpm = Schedule(plan.rpm, clock) if plan.rpm else None
        self.tpm = Schedule(plan.tpm, clock) if plan.tpm else None
        self.pause_until = 0.0  # on clock: the job-wide pause's end
        self.pause_began = -math.inf  # on clock: when it began
        self.streak: list[float] = []
        """Wall-clock times of the 429s counted towards the next pause."""
        self.last_answer = -math.inf
        """Wall-clock time of the job's last answer, as the senders reported it."""
        self.concurrency = AdaptiveLimit(
            plan.start_concurrency, plan.max_concurrency, plan.auto, clock
        )
        self.spent = plan.spent
        self.senders = [_Sender() for _ in range(plan.senders)]
        self.handles: Sequence[Any] = ()
        self.last_success: float | None = None
        """Wall-clock time of the job's last answer (at first: when the first sender
        spoke, its sending begun)."""
        self._shares = self._split()

    def register(self, handles: Sequence[Any]) -> None:
        """The senders' actor handles, in sender order, for the pushes."""
        self.handles = handles

    # ---- reports and status ---------------------------------------------------

    def sync(self, sender: int, report: Report) -> Status:
        """Take a sender's report; say the pause, its share and the spend."""
        self._take(sender, report)
        return self._status(sender)

    def _take(self, sender: int, report: Report) -> None:
        s = self.senders[sender]
        if self.last_success is None:
            self.last_success = self.wall()
        if report.tokens_delta and self.tpm is not None:
            self.tpm.correct(report.tokens_delta)
        if report.latencies:
            for latency in report.latencies:
                self.concurrency.on_success(latency)
            self._reshare()
        if report.last_success is not None:
            self.last_success = max(self.last_success, report.last_success)
            self.last_answer = max(self.last_answer, report.last_success)
        self.spent += report.consumed
        s.granted -= report.consumed + report.given_back
        s.reserved = report.reserved

    def _status(self, sender: int) -> Status:
        reserved = sum((s.reserved for s in self.senders if s.alive), Decimal(0))
        pause_s = max(0.0, self.pause_until - self.clock())
        return Status(pause_s, self._shares[sender], self.spent, reserved)

    # ---- rpm and tpm ----------------------------------------------------------

    def lease_rate(
        self, sender: int, kind: str, amount: float, report: Report
    ) -> tuple[float, Status]:
        """Reserve ``amount`` requests (``kind`` "rpm") or tokens ("tpm") of the
        job's budget for one sender. Returns the seconds from now to the time of
        the chunk's first unit (``Schedule.lease``), and the status."""
        self._take(sender, report)
        budget = self.rpm if kind == "rpm" else self.tpm
        offset = budget.lease(amount) if budget is not None else -math.inf
        return offset, self._status(sender)

    # ---- the 429 pause and auto concurrency --------------------------------------

    def rate_limited(self, sender: int, seconds: float) -> None:
        """A sender's 429 says the rate limit is spent and it paused for
        ``seconds``: every other sender pauses too (auto concurrency drops
        through ``overloaded``, as the sender says it)."""
        self._pause(sender, seconds)

    def count_429(
        self, sender: int, report: Report, seconds: float, sent_s_ago: float, at: float
    ) -> float:
        """A 429 that did not say the rate limit is spent, which came at
        wall-clock time ``at`` to a request sent ``sent_s_ago`` seconds ago and
        asked to wait ``seconds``. When it is the job's SPENT_STREAK-th in a row
        with no answer between, every sender pauses for ``seconds``: returns the
        pause it began (0: none). As locally, a 429 to a request sent before the
        last pause began, or while one lasts, counts towards none."""
        self._take(sender, report)
        now = self.clock()
        if now - sent_s_ago < self.pause_began or now < self.pause_until:
            return 0.0
        answered = self.last_answer
        self.streak = [t for t in self.streak if t > answered]
        if at > answered:
            self.streak.append(at)
        if len(self.streak) < SPENT_STREAK:
            return 0.0
        self._pause(sender, seconds)
        return seconds

    def _pause(self, sender: int, seconds: float) -> None:
        """A pause begun by ``sender``: every other sender hears of it."""
        now = self.clock()
        self.pause_began = now
        self.pause_until = max(self.pause_until, now + seconds)
        self.streak = []
        remaining = self.pause_until - now
        for i, handle in enumerate(self.handles):
            if i != sender and self.senders[i].alive:
                handle.pause.remote(remaining)

    def overloaded(self, sender: int) -> None:
        """A 429 or a timeout: auto concurrency drops for the whole job."""
        before = self.concurrency.limit
        self.concurrency.on_overload()
        if self.concurrency.limit != before:
            self._reshare(push=True)

    def _split(self) -> list[int]:
        alive = [s.alive for s in self.senders]
        return split(self.concurrency.limit, alive)

    def _reshare(self, push: bool = False) -> None:
        shares = self._split()
        if shares == self._shares:
            return
        self._shares = shares
        if push:
            for i, handle in enumerate(self.handles):
                if self.senders[i].alive:
                    handle.set_limit.remote(shares[i])

    # ---- max_cost -------------------------------------------------------------

    def lease_cost(
        self, sender: int, wanted: Decimal, needed: Decimal, report: Report
    ) -> tuple[Decimal, str, Status]:
        """Give a sender ``wanted`` more allowance, or at least ``needed`` (the
        worst case of its next request). Returns the allowance granted and the
        verdict: GRANTED; WAIT (other senders hold unreserved allowance that
        would make room: they are asked for it, ask again shortly); EXHAUSTED
        (the budget cannot hold the request)."""
        self._take(sender, report)
        max_cost = self.plan.max_cost
        if max_cost is None:
            return wanted, GRANTED, self._status(sender)
        s = self.senders[sender]
        held = sum((x.granted for x in self.senders if x.alive), Decimal(0))
        left = max_cost - self.spent - held
        if left >= needed:
            grant = min(wanted, left)
            s.granted += grant
            return grant, GRANTED, self._status(sender)
        idle = [
            i
            for i, x in enumerate(self.senders)
            if i != sender and x.alive and x.granted > x.reserved
        ]
        free = sum((self.senders[i].granted - self.senders[i].reserved for i in idle), Decimal(0))
        if left + free >= needed:
            for i in idle:
                if i < len(self.handles):
                    self.handles[i].reclaim.remote()
            return Decimal(0), WAIT, self._status(sender)
        return Decimal(0), EXHAUSTED, self._status(sender)

    # ---- the circuit breaker and lost senders ------------------------------------

    def api_down(self, sender: int, report: Report, error: str) -> str | None:
        """A sender has had no success for api_down_after_s and a request just
        failed with ``error``: the message to stop the job with when the whole
        job has had none either, else None."""
        self._take(sender, report)
        assert self.last_success is not None  # _take sets it
        down_s = self.wall() - self.last_success
        limit = self.plan.api_down_after_s
        if down_s < limit:
            return None
        return (
            f"The API looks down: no request has succeeded for {down_s:.0f}s "
            f"(api_down_after_s={limit:g}, over every Ray actor); the last error was: {error}. "
            "Every finished row is saved: run the same command again to resume once the API is back "
            "(add --retry-failed to also resend rows that failed meanwhile)."
        )

    def lost(self, sender: int) -> None:
        """A sender died: what it held in flight counts as spent (the API may have
        answered), the rest of its allowance comes back, and the others share
        its place."""
        s = self.senders[sender]
        if not s.alive:
            return
        s.alive = False
        self.spent += s.reserved
        s.granted = s.reserved = Decimal(0)
        self._reshare(push=True)

    def spend(self) -> tuple[Decimal, Decimal]:
        """The job's spend and the worst cases held in flight, as last reported."""
        status = self._status(0)
        return status.spent, status.reserved


def split(limit: int, alive: Sequence[bool]) -> list[int]:
    """Each sender's share of the job's in-flight ``limit`` (0 for a dead one):
    at least one each, so a sender holding rows is never left without a place."""
    living = [i for i, a in enumerate(alive) if a]
    shares = [0] * len(alive)
    for n, i in enumerate(living):
        shares[i] = max(1, limit // len(living) + (1 if n < limit % len(living) else 0))
    return shares


def lease_chunk(per_minute: float, senders: int, lease_s: float, at_least: float = 1.0) -> float:
    """Units per lease: one sender's share of ``lease_s`` seconds of the budget,
    at least ``at_least`` (a whole request, or the tokens of the largest one)."""
    return max(at_least, math.ceil(per_minute / 60.0 * lease_s / max(1, senders)))

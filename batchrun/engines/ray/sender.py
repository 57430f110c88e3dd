"""The row sender: a Ray actor that sends rows with batchrun's Scheduler for the
whole job, and hands each result back to the driver as soon as it exists.

One ``RowSender`` per CPU of the cluster (at most one per request in flight).
Each owns one event loop (Ray's, for an async actor), one ``ApiClient`` session
and one ``Scheduler`` for the job's life: the same retry policy, key probe,
structured re-asks and records as a local run, with its share of the job's
requests in flight. The limits it is given are backed by the job-wide
coordinator (``engines.ray.leases``).

Rows and results travel in one call, ``exchange``, made by the driver again as
soon as the last one returned: it brings rows (as many as the sender said it
wants) and takes back every result finished since the last call, waiting
until there is one (or the sender wants rows, or ``POLL_S`` passed). A call
also acknowledges the results the previous one took: the driver journals them
before it calls again. A row holds one of the sender's places (its share of
the job's concurrency) from the moment its first request may start until its
result is acknowledged, so the rows sent and not yet journaled never number
more than the job's concurrency: a crash of the driver loses at most the
requests in flight, as a local run does.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from batchrun import errors
from batchrun.client import ApiClient
from batchrun.config import Job
from batchrun.engines.ray.coordinator import Report, Status
from batchrun.engines.ray.leases import (
    LeasedBudget,
    LeasedCost,
    LeasedLimits,
    Link,
    SharedLimit,
    SharedPause,
)
from batchrun.engines.ray.rows import Ways
from batchrun.engines.shell import GRACE_S
from batchrun.errors import ApiDown, EveryRequestFails, Interrupted, JobStopped, RequestError
from batchrun.failures import Failure, FailureWatch
from batchrun.limits import AdaptiveLimit
from batchrun.outputs import STATUS_NONE, Record
from batchrun.payload import Completion, Prepared
from batchrun.prices import ModelPrice
from batchrun.progress import Tally
from batchrun.retry import RetryPolicy
from batchrun.scheduler import Scheduler
from batchrun.schema_via import SchemaVia
from batchrun.stream_options import StreamOptions
from batchrun.structured import Structured

log = logging.getLogger("batchrun")

POLL_S = 0.1
"""The longest an exchange waits with nothing to bring back."""


class Secret:
    """A value (the API key, header values from the environment) that must not be
    shown: its repr is a mask, so no Ray message or log can print it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret(***)"


@dataclass(frozen=True)
class Setup:
    """What a sender needs beyond its share of the job: its index, the
    coordinator's actor handle, the rows the whole run sends (the key probe's
    size), the job's circuit breaker, the lowest level the driver's log wants
    (records below it are not sent back), the units of one rpm and tpm lease
    and the job's rpm and tpm, the sender's first share of the job-wide limit
    (``concurrency = "auto"``), max_cost and the model's price, and the job's
    ways as the driver knows them when the sender starts."""

    index: int
    coordinator: Any
    to_send: int
    api_down_after_s: float
    log_level: int = logging.WARNING
    rpm_chunk: float = 1.0
    tpm_chunk: float = 1.0
    rpm: float | None = None
    tpm: float | None = None
    start_limit: int | None = None
    max_cost: Decimal | None = None
    price: ModelPrice | None = None
    ways: Ways = field(default_factory=Ways)


@dataclass
class Reply:
    """What an exchange brings back to the driver."""

    records: list[Record]
    want: int
    """Rows this sender would take now."""
    requests: int
    retries: int
    logs: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[int, Failure] = field(default_factory=dict)
    """The failure of each failed row among ``records`` that the job's failure
    watch counts (by row number): the driver's watch judges the whole job."""
    bodies: dict[int, bytes] = field(default_factory=dict)
    """The body sent for each row among ``records`` whose body the sender
    changed (a move of ``schema_via = "auto"``'s search, a dropped
    ``stream_options``): the driver hashes it with the row's pii values."""
    ways: Ways | None = None
    """The job's ways as this sender knows them, when they changed since its last reply."""
    key_settled: bool = False
    stop: tuple[str, str] | None = None
    """The stop the sender's scheduler ended with: its class name and message."""
    failure: str | None = None
    """What broke the sender, when it ended with something other than a stop."""
    finished: bool = False
    """The sender's scheduler has ended; these are its last results."""


class _RemoteCoordinator:
    """The coordinator's Ray actor as one sender calls it (``leases.Remote``)."""

    def __init__(self, handle: Any, index: int) -> None:
        self.handle = handle
        self.index = index

    async def sync(self, report: Report) -> Status:
        status: Status = await self.handle.sync.remote(self.index, report)
        return status

    async def lease_rate(self, kind: str, amount: float, report: Report) -> tuple[float, Status]:
        answer: tuple[float, Status] = await self.handle.lease_rate.remote(
            self.index, kind, amount, report
        )
        return answer

    async def lease_cost(
        self, wanted: Decimal, needed: Decimal, report: Report
    ) -> tuple[Decimal, str, Status]:
        answer: tuple[Decimal, str, Status] = await self.handle.lease_cost.remote(
            self.index, wanted, needed, report
        )
        return answer

    async def api_down(self, report: Report, error: str) -> str | None:
        message: str | None = await self.handle.api_down.remote(self.index, report, error)
        return message

    async def count_429(
        self, report: Report, seconds: float, sent_s_ago: float, at: float
    ) -> float:
        pause_s: float = await self.handle.count_429.remote(
            self.index, report, seconds, sent_s_ago, at
        )
        return pause_s

    def rate_limited(self, seconds: float) -> None:
        self.handle.rate_limited.remote(self.index, seconds)

    def overloaded(self) -> None:
        self.handle.overloaded.remote(self.index)


class _WatchedClient(ApiClient):
    """The job's client, telling the link how each attempt came back (the key
    probe's verdict, the last success for the circuit breaker), and the inbox
    of each failure (its row may be held back)."""

    link: Link
    inbox: _Inbox

    async def complete(self, body: bytes) -> Completion:
        try:
            answer = await super().complete(body)
        except RequestError as exc:
            self.link.failed(exc)
            self.inbox.wake()
            raise
        self.link.succeeded()
        return answer


class _Inbox:
    """The rows given to this sender, as the scheduler takes them: a row is taken
    only while a place is free, and its place comes back when the driver has
    journaled its result. A failed row the scheduler holds back while the key
    probe has no verdict (``Scheduler.held``) has no answer to lose: its place
    counts as free."""

    def __init__(self, places: int, changed: asyncio.Event) -> None:
        self.rows: deque[Prepared] = deque()
        self.places = places
        self.closed = False
        self.held: Callable[[], int] = lambda: 0
        self._arrived = asyncio.Event()
        self._changed = changed

    def __aiter__(self) -> _Inbox:
        return self

    async def __anext__(self) -> Prepared:
        while not self.rows or self.places + self.held() <= 0:
            if self.closed and not self.rows:
                raise StopAsyncIteration
            self._arrived.clear()
            await self._arrived.wait()
        self.places -= 1
        self._changed.set()  # the sender may want more rows now
        return self.rows.popleft()

    def put(self, rows: list[Prepared]) -> None:
        self.rows.extend(rows)
        self._arrived.set()

    def release(self, places: int) -> None:
        if places:
            self.places += places
            self._arrived.set()

    def close(self) -> None:
        self.closed = True
        self._arrived.set()

    def wake(self) -> None:
        """Look again (a row may have been held back)."""
        self._arrived.set()


class _Outbox:
    """The scheduler's result sink in a sender: every row it is given is unsent
    (the driver gives only rows without a result, or failed ones to resend), and
    each result waits here for the next exchange, with the body sent when it is
    not the one the row came with."""

    def __init__(self, changed: asyncio.Event) -> None:
        self.records: list[Record] = []
        self.failures: dict[int, Failure] = {}
        self.bodies: dict[int, bytes] = {}
        self.given: dict[int, tuple[Prepared, str]] = {}
        """Each row given and not yet recorded, with the request hash it came with."""
        self._changed = changed

    def expect(self, rows: list[Prepared]) -> None:
        for p in rows:
            self.given[p.row] = (p, p.request_hash)

    @property
    def status(self) -> _Unsent:
        return _UNSENT

    def record(self, rec: Record) -> JobStopped | None:
        self.records.append(rec)
        given = self.given.pop(rec["row"], None)
        if given is not None and given[0].request_hash != given[1]:
            self.bodies[rec["row"]] = given[0].body
        self._changed.set()
        return None  # max_failures is counted over the whole job, by the driver


class _Unsent:
    def __getitem__(self, row: int) -> int:
        return STATUS_NONE


_UNSENT = _Unsent()


class _ForwardedWatch(FailureWatch):
    """The failure watch in a sender: the verdict is the driver's, over every
    sender's rows (one ``FailureWatch`` for the job), so each failure goes back
    with its row's result instead of being counted here. Nor is a failed row
    held back here while the job has had no answer: the driver holds it, so a
    job stopped by its watch records none of them, as locally."""

    def __init__(self, job: Job, outbox: _Outbox) -> None:
        super().__init__(job)
        self.outbox = outbox
        self.answered = True  # for the scheduler: never hold a row back for the watch

    def answer(self) -> None:
        pass

    def row_failed(self, exc: RequestError, row: int | None = None) -> EveryRequestFails | None:
        failure = self.failure_of(exc)
        if failure is not None and row is not None:
            self.outbox.failures[row] = failure
        return None


_NOT_SHIPPED = frozenset({"args", "exc_info", "exc_text", "stack_info", "msg", "message"})


class _LogShipper(logging.Handler):
    """batchrun's log records in a sender, kept to travel back to the driver's log."""

    def __init__(self, level: int, index: int) -> None:
        super().__init__(level)
        self.index = index
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        data = {k: v for k, v in vars(record).items() if k not in _NOT_SHIPPED}
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info))
        data["msg"] = message
        data["ray_actor"] = self.index
        self.records.append(data)

    def take(self) -> list[dict[str, Any]]:
        records, self.records = self.records, []
        return records


class RowSender:
    """A Ray actor (async methods: one event loop) that sends rows with batchrun's
    Scheduler for the whole job (see the module docstring)."""

    def __init__(
        self,
        job: Job,
        api_key: Secret | None,
        headers: Secret,
        secrets: Secret,
        structured: Structured | None,
        setup: Setup,
    ) -> None:
        self.job = job
        self.setup = setup
        self.structured = structured
        self._secrets = (api_key, headers, secrets)
        self.shipper = _LogShipper(setup.log_level, setup.index)
        logger = logging.getLogger("batchrun")
        logger.handlers[:] = [self.shipper]
        logger.setLevel(setup.log_level)
        logger.propagate = False  # Ray would print them on the driver's stderr too
        self.unacked = 0
        self.stopped: JobStopped | None = None
        self.failure: str | None = None
        self.finished = False
        self.cost: LeasedCost | None = None
        self._task: asyncio.Task[None] | None = None
        self.scheduler = self._build()

    # ---- the driver's calls ---------------------------------------------------

    async def exchange(self, rows: bytes | None, more: bool, ways: Ways | None = None) -> Reply:
        """Take ``rows`` (pickled ``Prepared``s) and the job's ``ways`` when they
        changed; bring back the results finished since the last call, once there
        is one, or the sender wants rows and the driver has ``more``, or POLL_S
        passed."""
        self._start()
        # The driver journaled what the last call took: those places are free.
        self.inbox.release(self.unacked)
        self.unacked = 0
        if ways is not None:
            ways.apply(self.via, self.stream_options)
        if rows:
            given: list[Prepared] = pickle.loads(rows)
            self.outbox.expect(given)
            if self.cost is not None:
                for p in given:
                    self.cost.expect(p.prompt_bound)
            self.inbox.put(given)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POLL_S
        while True:
            self._changed.clear()
            if self.outbox.records or self.finished or (more and self.want() >= self.low):
                break
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                break
        return self._reply()

    async def close(self) -> None:
        """No more rows will come: the scheduler ends once those given are done."""
        self._start()  # Ray may run this before the first exchange: an async actor keeps no order
        self.inbox.close()

    async def stop(self, kind: str, message: str, now: bool) -> None:
        """Stop as the job stops (another sender's stop, max_failures, a signal):
        no new request; ``now``: those in flight abandoned, else given GRACE_S."""
        error = stop_error(kind, message)
        self._start()
        if now:
            self.scheduler.stop_now(error)
        else:
            self.scheduler.stop(error, GRACE_S)
        self.inbox.close()

    async def pause(self, seconds: float) -> None:
        """The coordinator's push: another sender's 429s showed the rate limit is spent."""
        if self.link.pause is not None:
            self.link.pause.hold(seconds)

    async def set_limit(self, limit: int) -> None:
        """The coordinator's push: this sender's share of auto concurrency changed."""
        if self.link.limit is not None:
            self.link.limit.set(limit)

    async def reclaim(self) -> None:
        """The coordinator's push: another sender needs room in the cost budget."""
        if self.cost is not None:
            self.cost.reclaim()
            await self.link.sync()

    # ---- inside ---------------------------------------------------------------

    def _start(self) -> None:
        """Start the scheduler's run on Ray's event loop, on the first call that
        arrives (whichever it is)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def _build(self) -> Scheduler:
        """The sender's inbox, outbox, link to the coordinator, client, limits and
        scheduler (nothing bound to an event loop until the run starts)."""
        job, setup = self.job, self.setup
        self._changed = asyncio.Event()
        self.inbox = _Inbox(job.workers, self._changed)
        self.outbox = _Outbox(self._changed)
        self.target = job.workers
        self.low = max(1, self.target // 2)
        self.link = link = Link(
            _RemoteCoordinator(setup.coordinator, setup.index), setup.api_down_after_s
        )
        api_key, headers, secrets = self._secrets
        self.client = _WatchedClient(
            job, api_key.value if api_key else None, headers.value, secrets.value
        )
        self.client.link = link
        self.client.inbox = self.inbox
        concurrency = (
            SharedLimit(setup.start_limit, link)
            if setup.start_limit is not None
            else AdaptiveLimit(job.workers, job.workers, False)
        )
        limits = LeasedLimits(
            concurrency=concurrency,
            pause=SharedPause(link),
            rpm=LeasedBudget(setup.rpm, "rpm", link, setup.rpm_chunk) if setup.rpm else None,
            tpm=LeasedBudget(setup.tpm, "tpm", link, setup.tpm_chunk) if setup.tpm else None,
        )
        if setup.max_cost is not None and setup.price is not None:
            self.cost = LeasedCost(
                setup.max_cost, setup.price, job.max_tokens, link, max(8, job.workers // 2)
            )
            limits.cost = self.cost
        self.tally = Tally(total=setup.to_send)
        # The job's ways, searched for here as locally while this sender is the
        # only one sending; their finds go back to the driver with each reply.
        ways = setup.ways
        self.via = (
            SchemaVia(self.structured, job.schema_via, ways.schema_via)
            if self.structured is not None
            else None
        )
        refused = ways.stream_options_refused
        self.stream_options = StreamOptions(
            job, {"sent": False, "refused": refused} if refused is not None else None
        )
        self.stream_options.accepted = ways.stream_options_accepted
        self.ways = ways
        scheduler = Scheduler(
            job,
            self.client,
            self.outbox,
            self.tally,
            RetryPolicy.for_job(job),
            limits,
            structured=self.structured,
            spend=self.cost,
            grace_s=GRACE_S,
            # A row waiting to retry keeps its worker: with places held until the
            # driver journals a result, stand-ins would wait for rows no place lets in.
            lends=False,
            watch=_ForwardedWatch(job, self.outbox),
            via=self.via,
            stream_options=self.stream_options,
        )
        link.on_api_down = lambda message: scheduler.stop_now(ApiDown(message))
        self.inbox.held = lambda: scheduler.held
        return scheduler

    async def _run(self) -> None:
        scheduler = self.scheduler
        reports = asyncio.ensure_future(self.link.run())
        reports.add_done_callback(self._link_ended)
        try:
            async with self.client:
                await scheduler.run(self.inbox, self.setup.to_send)
                scheduler.finish()
        except JobStopped as exc:
            self.stopped = exc
        except Exception as exc:
            log.exception("Ray actor %d failed", self.setup.index)
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            reports.cancel()
            self.finished = True
            self._changed.set()

    def _link_ended(self, task: asyncio.Future[None]) -> None:
        """The reports to the coordinator failed: the job cannot keep its limits."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.scheduler.stop_now(
            JobStopped(
                f"A Ray actor lost the job's coordinator ({type(exc).__name__}: {exc}). Every "
                "finished row is saved: run the same command again to resume."
            )
        )

    def want(self) -> int:
        return max(0, self.target - len(self.inbox.rows)) if not self.inbox.closed else 0

    def _reply(self) -> Reply:
        records, self.outbox.records = self.outbox.records, []
        failures, self.outbox.failures = self.outbox.failures, {}
        bodies, self.outbox.bodies = self.outbox.bodies, {}
        ways = Ways.of(self.via, self.stream_options)
        news, self.ways = (ways if ways != self.ways else None), ways
        self.unacked = len(records)
        stop = self.stopped
        return Reply(
            records=records,
            want=self.want(),
            requests=self.tally.requests,
            retries=self.tally.retries,
            logs=self.shipper.take(),
            failures=failures,
            bodies=bodies,
            ways=news,
            key_settled=self.link.key_settled,
            stop=(type(stop).__name__, str(stop)) if stop is not None else None,
            failure=self.failure,
            finished=self.finished,
        )


def stop_error(kind: str, message: str) -> JobStopped:
    """A JobStopped rebuilt from its class name and message (a stop that crossed
    between the driver and a sender)."""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, JobStopped) and cls is not Interrupted:
        return cls(message)
    return JobStopped(message)

"""The Ray engine's driver: the process that runs ``batchrun run --engine ray``.

It opens the run as a local run does (``lifecycle.OpenRun``: checks, journal,
resume, --reuse), starts the coordinator and the row senders, hands each
sender rows as it asks for them and journals every result the moment it comes
back (``Dispatch``), and ends with ``OpenRun.finish``: the same output file,
schema and metadata as a local run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from batchrun.config import Job
from batchrun.engines.ray.coordinator import Coordinator, Plan, lease_chunk, split
from batchrun.engines.ray.leases import LEASE_S
from batchrun.engines.ray.rows import Handoff, Results
from batchrun.engines.ray.sender import Reply, RowSender, Secret, Setup, stop_error
from batchrun.engines.shell import (
    GRACE_S,
    Heartbeat,
    Recorder,
    embedded_endpoint_thread,
    interrupted,
)
from batchrun.errors import (
    EveryRequestFails,
    JobError,
    JobStopped,
    KeyRejected,
    TooManyFailures,
)
from batchrun.failures import FailureWatch
from batchrun.lifecycle import OpenRun, RunOptions, RunResult
from batchrun.payload import Prepared
from batchrun.progress import Progress

log = logging.getLogger("batchrun")

INSTALL_HINT = "pip install 'batchrun[ray]'"
MIN_ROWS_PER_ACTOR = 16
"""No more actors than rows to send / this."""
TICK_S = 0.1
"""The driver looks at signals and redraws progress at least this often."""
STOP_WAIT_S = 10.0
"""After a stop, the senders get this long beyond GRACE_S (GRACE_S after a
second signal: none) to bring back their last results before the driver leaves."""
STARTUP_S = 300.0
"""The job stops when no sender has started (answered its first call) by then:
the cluster has no CPU free for one."""
STOP_AT_ONCE = (KeyRejected, EveryRequestFails, TooManyFailures)
"""Stops that abandon the requests in flight at once, as a local run does."""


def import_ray() -> ModuleType:
    """The ``ray`` module, or JobError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise JobError(
            f"--engine ray needs Ray, which is not installed ({exc}). Install it with: {INSTALL_HINT}"
        ) from None
    return ray


def run_on_ray(job: Job, options: RunOptions | None = None) -> RunResult:
    """Run a checked ``job`` with its rows sent by Ray actors, to the end (or to a
    stop, raised as JobStopped), and return what it did.

    Ray's own rule picks the cluster: the one this process already joined, else
    the one ``RAY_ADDRESS`` names, else one that ``ray start`` runs on this
    machine, else a new one started here (and shut down at the end).
    """
    options = options or RunOptions()
    if job.mode != "online":
        raise JobError(
            f'mode = "{job.mode}" sends the rows through a provider\'s Batch API, which the Ray '
            "engine does not do: leave out --engine ray (one process submits every batch)."
        )
    ray = import_ray()
    # The same checks, journal, resume, reuse and output as a local run: only the sending differs.
    with OpenRun(job, options, engine="ray") as run:
        if run.to_send:
            with (
                embedded_endpoint_thread(run.job, options.mock) as sent_job,
                _ray_session(ray),
                _signal_flags(options.handle_signals) as signals,
            ):
                progress = Progress(run.tally, enabled=options.progress, mode=options.progress_mode)
                try:
                    _send_on_ray(ray, run, sent_job, progress, signals)
                finally:
                    progress.close()
            # The senders' spend is read back from the journal, as a resumed run's is.
            spend = run.spend_so_far()
            if spend is not None:
                run.tally.cost = spend.spent
        return run.finish()


def actor_plan(job: Job, cpus: float, to_send: int) -> tuple[int, Job]:
    """How many senders, and the job each one runs: its share of the
    concurrency (rounded down, so the whole never exceeds the job's). The rpm,
    tpm, max_cost, max_failures and api_down_after_s are the whole job's, kept
    by the coordinator and the driver, not split."""
    actors = max(1, min(int(cpus), job.workers, math.ceil(to_send / MIN_ROWS_PER_ACTOR)))
    if job.concurrency == "auto":
        share = replace(job, max_concurrency=max(1, job.max_concurrency // actors))
    else:
        assert isinstance(job.concurrency, int)
        share = replace(job, concurrency=max(1, job.concurrency // actors))
    share = replace(
        share, rpm=None, tpm=None, max_failures=None, max_cost=None, api_down_after_s=math.inf
    )
    return actors, share


def coordinator_plan(job: Job, share: Job, actors: int, run: OpenRun) -> Plan:
    """What the coordinator keeps: the job's rpm, tpm, auto concurrency (between
    1 and every sender's places), max_cost and circuit breaker."""
    auto = job.concurrency == "auto"
    spend = run.spend
    return Plan(
        senders=actors,
        rpm=job.rpm,
        tpm=job.tpm,
        auto=auto,
        start_concurrency=min(16, share.workers * actors) if auto else job.workers,
        max_concurrency=share.workers * actors,
        max_cost=Decimal(str(job.max_cost)) if job.max_cost is not None else None,
        price=spend.price if spend is not None else None,
        max_tokens=job.max_tokens,
        spent=spend.spent if spend is not None else Decimal(0),
        api_down_after_s=job.api_down_after_s,
    )


def _log_level() -> int:
    """The lowest level the driver's batchrun log shows anywhere."""
    level = log.getEffectiveLevel()
    if log.handlers:
        level = max(level, min(h.level for h in log.handlers))
    return level


def _send_on_ray(
    ray: ModuleType, run: OpenRun, job: Job, progress: Progress, signals: list[int]
) -> None:
    """Start the coordinator and the senders, send every row, journal every result."""
    checked = run.checked
    cpus = ray.cluster_resources().get("CPU", 1)
    actors, share = actor_plan(job, cpus, run.to_send)
    plan = coordinator_plan(job, share, actors, run)
    log.info(
        "sending with %d Ray actors, up to %d requests in flight each",
        actors,
        share.workers,
        extra={"event": "ray_plan", "actors": actors, "workers": share.workers},
    )
    coordinator = ray.remote(Coordinator).options(num_cpus=0).remote(plan)
    handoff = Handoff(run.via, run.stream_options)
    starts = split(plan.start_concurrency, [True] * actors) if plan.auto else [None] * actors
    sender_class = ray.remote(RowSender).options(num_cpus=1)
    handles = [
        sender_class.remote(
            share,
            Secret(checked.api_key) if checked.api_key else None,
            Secret(checked.headers),
            Secret(checked.secrets),
            checked.structured,
            Setup(
                index=i,
                coordinator=coordinator,
                to_send=run.to_send,
                api_down_after_s=job.api_down_after_s,
                rpm=job.rpm,
                rpm_chunk=lease_chunk(job.rpm or 0, actors, LEASE_S),
                tpm=job.tpm,
                tpm_chunk=lease_chunk(job.tpm or 0, actors, LEASE_S),
                start_limit=starts[i],
                max_cost=plan.max_cost,
                price=plan.price,
                log_level=_log_level(),
                ways=handoff.ways,
            ),
        )
        for i in range(actors)
    ]
    coordinator.register.remote(handles)
    dispatch = Dispatch(
        ray,
        run.rows_to_send(),
        Recorder(run.journal, run.tally, job.max_failures, run.prices),
        FailureWatch(job),
        handoff,
        Heartbeat(progress, run.journal),
        handles,
        coordinator,
        share.workers,
        signals,
        job.output,
    )
    try:
        dispatch.run()
    finally:
        for handle in [*handles, coordinator]:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)


@dataclass
class _Sender:
    """The driver's view of one sender."""

    index: int
    handle: Any
    want: int
    ref: Any = None
    """The exchange under way."""
    given: dict[int, Prepared] = field(default_factory=dict)
    """Rows handed to it whose result has not come back (as the driver keeps them)."""
    ways: int = 0
    """The version of the ways it was last told (``Handoff.version``)."""
    requests: int = 0
    retries: int = 0
    started: bool = False
    """It has answered a call: Ray placed it and it runs."""
    finished: bool = False
    closed: bool = False


class Dispatch:
    """The driver's loop: one exchange under way per sender; each reply's
    results are journaled (and counted, max_failures included) before the
    sender's next exchange is sent, with as many rows as it asked for.

    Each row leaves and its result comes back through the ``Handoff`` (the
    job's ways, pii kept on the driver), and is journaled through ``Results``
    (one failure watch for the job). Until one attempt shows the key is
    accepted and the ways are settled (``Handoff.settled``: the schema's
    dialect found, ``stream_options`` taken or refused), only the first sender
    gets rows: the key probe of the whole job, one request at a time, and
    ``schema_via = "auto"``'s search, whose finds every sender then sends with.

    A sender that dies hands its rows without a result to the others. A stop — a
    sender's, max_failures, a signal — goes to every sender; the driver then
    takes their last results and raises it.
    """

    def __init__(
        self,
        ray: ModuleType,
        rows: Iterator[Prepared],
        recorder: Recorder,
        watch: FailureWatch,
        handoff: Handoff,
        heartbeat: Heartbeat,
        handles: list[Any],
        coordinator: Any,
        window: int,
        signals: list[int],
        output: Path | None,
    ) -> None:
        self.ray = ray
        self.rows = rows
        self.tally = recorder.tally
        self.results = Results(recorder, watch, self._halt)
        self.handoff = handoff
        self.heartbeat = heartbeat
        self.senders = [_Sender(i, h, window) for i, h in enumerate(handles)]
        self.coordinator = coordinator
        self.signals = signals
        self.output = output
        self.pending: deque[Prepared] = deque()
        self.exhausted = False
        self.key_settled = False
        self.stop: JobStopped | None = None
        self.stopped_now = False
        self.deadline: float | None = None
        self.hits = 0

    # ---- the loop -------------------------------------------------------------

    def run(self) -> None:
        ray = self.ray
        for s in self.senders:
            self._call(s)
        startup = time.monotonic() + STARTUP_S
        while True:
            refs = {s.ref: s for s in self.senders if s.ref is not None}
            if not refs:
                break
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=TICK_S)
            if ready:
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            for ref in ready:
                self._take(refs[ref], ref)
            self._on_signals()
            self._close_when_done()
            self.heartbeat.beat()
            if self.deadline is not None and time.monotonic() > self.deadline:
                log.warning("the Ray actors did not bring back their last results in time")
                break
            if not any(s.started for s in self.senders) and time.monotonic() > startup:
                raise JobStopped(
                    f"No Ray actor started within {STARTUP_S:g}s: the cluster has no CPU free for "
                    "one (see ray status). Nothing was sent: run the same command again once it has."
                )
        if self.stop is not None:
            raise self.stop  # the rows held back are not journaled: the rerun sends them
        self.results.held.release()  # no answer, no verdict: they are the job's results
        left = sum(len(s.given) for s in self.senders) + len(self.pending)
        if left or not self.exhausted:
            raise JobStopped(
                f"The Ray job ended with rows still to send. Every result that came back is saved in "
                f"{self.output}.partial: run the same command again to resume."
            )

    def _take(self, s: _Sender, ref: Any) -> None:
        """One sender's reply: journal its results, then call it again."""
        s.ref = None
        exceptions = self.ray.exceptions
        try:
            reply: Reply = self.ray.get(ref)
        except exceptions.RayActorError as exc:
            self._lost(s, exc)
            return
        except exceptions.RayError as exc:
            s.finished = True
            self._halt(self._failed(exc), now=True)
            return
        s.started = True
        self._journal(s, reply)
        if reply.finished:
            s.finished = True
            if reply.failure is not None:
                self._halt(self._failed(reply.failure), now=True)
            return
        s.want = reply.want
        self._call(s)

    def _journal(self, s: _Sender, reply: Reply) -> None:
        tally, handoff = self.tally, self.handoff
        handoff.learn(reply.ways)
        for rec in reply.records:
            row = rec["row"]
            p = s.given.pop(row, None)
            if p is not None:
                handoff.inbound(p, rec, reply.bodies.get(row))
            self.results.take(rec, reply.failures.get(row))
        for data in reply.logs:
            log.handle(logging.makeLogRecord(data))
        tally.requests += reply.requests - s.requests
        tally.retries += reply.retries - s.retries
        s.requests, s.retries = reply.requests, reply.retries
        self.key_settled = self.key_settled or reply.key_settled
        if reply.stop is not None:
            error = stop_error(*reply.stop)
            self._halt(error, now=isinstance(error, STOP_AT_ONCE))

    def _call(self, s: _Sender) -> None:
        """Send ``s`` its next exchange, with the rows it wants (if it may have any)."""
        rows: list[Prepared] = []
        handoff = self.handoff
        settled = self.key_settled and handoff.settled
        may = self.stop is None and not s.closed and (settled or s is self._prober())
        if may:
            while len(rows) < s.want and self._refill():
                p = self.pending.popleft()
                s.given[p.row] = p
                rows.append(handoff.outbound(p))
        more = may and self._refill()
        blob = pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL) if rows else None
        ways = handoff.ways if s.ways != handoff.version else None
        s.ways = handoff.version
        s.ref = s.handle.exchange.remote(blob, more, ways)

    def _refill(self) -> bool:
        """Whether a row is waiting to be given (read ahead from the input)."""
        if not self.pending and not self.exhausted:
            p = next(self.rows, None)
            if p is None:
                self.exhausted = True
            else:
                self.pending.append(p)
        return bool(self.pending)

    def _prober(self) -> _Sender | None:
        """The sender that probes the key: the first one running (Ray may place
        them in any order, or not all)."""
        return next((s for s in self.senders if s.started and not s.finished), None)

    def _close_when_done(self) -> None:
        """Every row given and every result back: the senders may end."""
        if self.stop is not None or not self.exhausted or self.pending:
            return
        if any(s.given for s in self.senders):
            return
        for s in self.senders:
            if not s.started:
                s.finished = True  # never placed by Ray, never given a row: nothing to wait for
                s.ref = None
            elif not s.finished and not s.closed:
                s.handle.close.remote()
                s.closed = True

    # ---- stops ----------------------------------------------------------------

    def _halt(self, error: JobStopped, now: bool) -> None:
        """Stop every sender (``now``: abandon the requests in flight)."""
        if self.stop is None:
            self.stop = error
        elif not now or self.stopped_now:
            return
        self.stopped_now = self.stopped_now or now
        self.deadline = time.monotonic() + (STOP_WAIT_S if now else GRACE_S + STOP_WAIT_S)
        kind, message = type(error).__name__, str(error)
        for s in self.senders:
            if not s.started:
                s.finished, s.ref = True, None  # never placed by Ray: it holds nothing
            elif not s.finished:
                s.handle.stop.remote(kind, message, now)

    def _on_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            self.hits += 1
            error = interrupted(signum, self.output)
            if self.hits == 1:
                log.warning(
                    "%s: finishing the requests in flight (up to %.0fs); press Ctrl-C again to stop at once",
                    "Ctrl-C" if signum == signal.SIGINT else "SIGTERM",
                    GRACE_S,
                )
                self._halt(error, now=False)
            else:
                self._halt(error, now=True)

    def _lost(self, s: _Sender, exc: BaseException) -> None:
        """A sender died (its node, its process): its rows without a result go to
        the others; a result already journaled is never sent again."""
        s.finished = True
        self.coordinator.lost.remote(s.index)
        rows = sorted(s.given.values(), key=lambda p: p.row)
        s.given.clear()
        log.warning(
            "Ray actor %d was lost (%s); its %d rows without a result go to the other actors",
            s.index,
            _first_line(exc),
            len(rows),
            extra={"event": "ray_actor_lost", "ray_actor": s.index, "rows": len(rows)},
        )
        self.pending.extendleft(reversed(rows))
        if all(x.finished for x in self.senders):
            self._halt(
                JobStopped(
                    f"Every Ray actor was lost (the last: {_first_line(exc)}). Every result that came "
                    f"back is saved in {self.output}.partial: run the same command again to resume."
                ),
                now=True,
            )

    def _failed(self, what: BaseException | str) -> JobStopped:
        text = what if isinstance(what, str) else _first_line(what)
        return JobStopped(
            f"The Ray job failed: {text}. Every result that came back is saved in "
            f"{self.output}.partial: run the same command again to resume."
        )


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


@contextlib.contextmanager
def _signal_flags(handle: bool) -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM noted (the driver's loop acts on them) instead of
    raised, while ``handle``; the caller's handlers come back at the end."""
    hits: list[int] = []
    if not handle:
        yield hits
        return

    def note(signum: int, frame: FrameType | None) -> None:
        hits.append(signum)

    previous = {signum: signal.signal(signum, note) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield hits
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _ray_session(ray: ModuleType) -> Iterator[None]:
    """Ray as it is when already initialized; else joined (RAY_ADDRESS) or started
    here, and shut down at the end."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = os.environ.get("RAY_ADDRESS")
        what = f"join the Ray cluster at RAY_ADDRESS={where}" if where else "start Ray here"
        raise JobError(
            f"Cannot {what} ({_first_line(exc)}). Check that the cluster is up (ray status), "
            "or unset RAY_ADDRESS to run on this machine."
        ) from None
    try:
        yield
    finally:
        ray.shutdown()

"""What every engine does around the sending, written once: Ctrl-C and SIGTERM
and the message they end with, the heartbeat that redraws progress and fsyncs
the journal, the recorder that journals each result and counts it, and the
embedded endpoint for ``--mock``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from batchrun.config import Job
from batchrun.errors import Interrupted, JobStopped, TooManyFailures
from batchrun.outputs import STATUS_ERROR, Record
from batchrun.prices import Prices
from batchrun.progress import Progress, Tally

log = logging.getLogger("batchrun")

GRACE_S = 10.0
"""Seconds the requests in flight get to finish after Ctrl-C or SIGTERM."""


# ---- signals -------------------------------------------------------------------


def interrupted(signum: int, output: Path | None) -> Interrupted:
    """The stop a signal ends a job with (``Interrupted.by_signal``)."""
    return Interrupted.by_signal(signum, output)


@contextlib.contextmanager
def stop_on_signals(
    stop: Callable[[JobStopped, float], None],
    stop_now: Callable[[JobStopped], None],
    output: Path | None,
) -> Iterator[None]:
    """On this event loop, Ctrl-C / SIGTERM call ``stop`` (no new request; the
    requests in flight get GRACE_S seconds) and a second one ``stop_now``."""
    loop = asyncio.get_running_loop()
    hits = 0

    def on_signal(signum: int) -> None:
        nonlocal hits
        hits += 1
        error = interrupted(signum, output)
        if hits == 1:
            log.warning(
                "%s: finishing the requests in flight (up to %.0fs); press Ctrl-C again to stop at once",
                "Ctrl-C" if signum == signal.SIGINT else "SIGTERM",
                GRACE_S,
            )
            stop(error, GRACE_S)
        else:
            stop_now(error)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            # Hand back the caller's handler (the CLI's, for the final write), not the default.
            if handler is not None:
                signal.signal(signum, handler)


# ---- progress and durability -----------------------------------------------------


class Journaling(Protocol):
    """What the recorder and the heartbeat need of a journal: each row's status
    code before a result (``outputs.STATUS_*``), one append per result, fsync."""

    @property
    def status(self) -> Any: ...

    def append(self, record: Mapping[str, Any]) -> None: ...

    def sync(self) -> None: ...


class Heartbeat:
    """Progress redrawn and the journal fsynced about once a second."""

    SYNC_S = 1.0

    def __init__(self, progress: Progress, journal: Journaling) -> None:
        self.progress = progress
        self.journal = journal
        self.last_tick = self.last_sync = time.monotonic()

    def beat(self) -> None:
        """Redraw and fsync if due (for an engine that wakes on its own)."""
        now = time.monotonic()
        if now - self.last_tick >= self.progress.interval_s:
            self.progress.tick()
            self.last_tick = now
        if now - self.last_sync >= self.SYNC_S:
            self.journal.sync()
            self.last_sync = now

    async def run(self) -> None:
        """Beat until cancelled, the fsync off the event loop."""
        while True:
            await asyncio.sleep(self.progress.interval_s if self.progress.enabled else self.SYNC_S)
            self.progress.tick()
            if time.monotonic() - self.last_sync >= self.SYNC_S:
                await asyncio.get_running_loop().run_in_executor(None, self.journal.sync)
                self.last_sync = time.monotonic()


class Recorder:
    """Journals each result and counts it into the tally; says when the job has
    more failed rows than ``max_failures`` allows. With ``prices``, each record
    gets its ``cost`` (``Prices.row_cost``) before it is journaled, and the tally's
    cost (when counted) grows by it: the summary is the sum of the column."""

    def __init__(
        self,
        journal: Journaling,
        tally: Tally,
        max_failures: float | None,
        prices: Prices | None = None,
    ) -> None:
        self.journal = journal
        self.tally = tally
        self.max_failures = max_failures
        self.limit = failure_limit(max_failures, tally.total)
        self.failures = 0
        self.prices = prices

    @property
    def status(self) -> Any:
        return self.journal.status

    def record(self, rec: Record) -> TooManyFailures | None:
        """Journal and count ``rec``; the stop to make once failures pass the limit."""
        before = self.journal.status[rec["row"]]
        t = self.tally
        if self.prices is not None:
            cost = self.prices.row_cost(rec)
            rec["cost"] = float(cost) if cost is not None else None
            if cost is not None and t.cost is not None:
                t.cost += cost
        self.journal.append(rec)
        if before == STATUS_ERROR:
            t.failed -= 1  # --retry-failed: the new result replaces the old one
        prompt, completion = rec.get("prompt_tokens"), rec.get("completion_tokens")
        t.prompt_tokens += prompt or 0
        t.completion_tokens += completion or 0
        t.cached_tokens += rec.get("cached_tokens") or 0
        t.reasoning_tokens += rec.get("reasoning_tokens") or 0
        status = rec["status"]
        no_usage = prompt is None and completion is None and rec.get("total_tokens") is None
        if no_usage and status != "error" and rec.get("attempts"):
            t.no_usage += 1  # an answer that reported no usage at all
        if status == "ok":
            t.ok += 1
            return None
        if status == "invalid":
            t.invalid += 1
            return None
        t.failed += 1
        self.failures += 1
        log_row_failed(rec)
        if self.limit is not None and self.failures > self.limit:
            return TooManyFailures(
                f"{self.failures} rows failed, more than max_failures={self.max_failures:g} allows "
                f"(the last: {rec.get('error')}). Every finished row is saved: fix the cause and run the same "
                "command again to resume (add --retry-failed to resend the failed rows)."
            )
        return None


def failure_limit(max_failures: float | None, total: int) -> float | None:
    """How many failed rows a run may have: a count, or a fraction (< 1) of the rows."""
    if max_failures is None:
        return None
    return max_failures * total if max_failures < 1 else max_failures


def log_row_failed(rec: Mapping[str, Any]) -> None:
    """The row_failed event of a failed row's record."""
    log.debug(
        "row %s failed: %s",
        rec["id"],
        rec["error"],
        extra={
            "event": "row_failed",
            "row_id": rec["id"],
            "error": rec["error"],
            "attempts": rec.get("attempts"),
        },
    )


# ---- the embedded endpoint ----------------------------------------------------------


def _mocked(job: Job, base_url: str) -> Job:
    return replace(job, base_url=base_url, api_key_env="", allow_insecure_http=False)


@contextlib.asynccontextmanager
async def embedded_endpoint(job: Job, mock: bool) -> AsyncIterator[Job]:
    """The job as sent: with ``mock``, against the embedded endpoint on this loop."""
    if not mock:
        yield job
        return
    from batchrun.mock import MockConfig, serve

    async with serve(MockConfig()) as server:
        yield _mocked(job, server.base_url)


@contextlib.contextmanager
def embedded_endpoint_thread(job: Job, mock: bool) -> Iterator[Job]:
    """The job as sent: with ``mock``, against the embedded endpoint served on
    127.0.0.1 from a thread of this process (for an engine that blocks)."""
    if not mock:
        yield job
        return
    ready: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event, Job]] = (
        concurrent.futures.Future()
    )

    async def serve_until_stopped() -> None:
        stop = asyncio.Event()
        async with embedded_endpoint(job, mock=True) as sent:
            ready.set_result((asyncio.get_running_loop(), stop, sent))
            await stop.wait()

    def main() -> None:
        try:
            asyncio.run(serve_until_stopped())
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)

    thread = threading.Thread(target=main, name="batchrun-mock", daemon=True)
    thread.start()
    loop, stop, sent = ready.result(timeout=30)
    try:
        yield sent
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)

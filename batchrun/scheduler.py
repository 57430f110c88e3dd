"""Runs the rows through retry → client and hands each result to the journal.

A producer turns input rows into request bodies and puts them on a bounded
queue; a fixed pool of ``concurrency`` workers takes them off, sends them and
journals each result the moment it is known (a row waiting to retry lends its
worker's place meanwhile: ``workers.Workers``). Memory stays flat whatever the
input's size. A row that fails becomes a result (``status = "error"``), never
a crash; only a job-level stop (bad key, signal, …) ends the run early.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, Protocol

from batchrun.client import ApiClient
from batchrun.config import Job
from batchrun.errors import (
    Abandoned,
    ApiDown,
    BudgetReached,
    EmptyAnswer,
    JobStopped,
    KeyRejected,
    RateLimited,
    RequestError,
    RequestTimeout,
    first_batchrun_error,
)
from batchrun.failures import AUTH_STATUSES, FailureWatch, HeldFailures
from batchrun.limits import SPENT_STREAK, CostBudget, Limits
from batchrun.outputs import Record
from batchrun.payload import Completion, Prepared, unwanted
from batchrun.prices import ONLINE
from batchrun.progress import Tally
from batchrun.retry import RETRY_AFTER_MAX_S, RetryPolicy, send_with_retries
from batchrun.row_totals import RowTotals
from batchrun.schema_via import Attempt, SchemaVia
from batchrun.stream_options import StreamOptions
from batchrun.structured import InvalidAnswer, Structured
from batchrun.workers import Workers

log = logging.getLogger("batchrun")

AUTH_PROBE_ROWS = 5
"""A job stops with KeyRejected when this many first answers (or every answer,
for a smaller job) are all 401/403."""


class ResultSink(Protocol):
    """Where the scheduler puts results (``engines.shell.Recorder``): ``status[row]``
    is the row's status code (``outputs.STATUS_*``) before this result; ``record``
    keeps one result and returns the stop it calls for, if any."""

    @property
    def status(self) -> Any: ...

    def record(self, rec: Record) -> JobStopped | None: ...


def _now_us() -> int:
    return time.time_ns() // 1000


class Scheduler:
    """Sends every row that has no result yet and journals the results."""

    def __init__(
        self,
        job: Job,
        client: ApiClient,
        results: ResultSink,
        tally: Tally,
        policy: RetryPolicy,
        limits: Limits,
        structured: Structured | None = None,
        spend: CostBudget | None = None,
        currency: str = "",
        grace_s: float = 10.0,
        via: SchemaVia | None = None,
        stream_options: StreamOptions | None = None,
        lends: bool = True,
        watch: FailureWatch | None = None,
    ) -> None:
        self.job = job
        self.via = via  # how requests carry the schema; "auto" may change it as answers come
        # Whether streamed requests carry stream_options; dropped when the server refuses it.
        self.stream_options = stream_options if stream_options and stream_options.asked else None
        self.client = client
        self.results = results
        self.tally = tally
        # A row's wait before a retry lends its worker's place to a stand-in,
        # except while schema_via's search keeps that row's turn, or when the
        # caller says no (``lends``: a Ray sender, whose rows keep a place until
        # their result is journaled).
        self.workers = Workers(
            job.workers, self._work, policy.sleep, lambda: lends and (via is None or via.settled)
        )
        self.policy = dataclasses.replace(policy, sleep=self.workers.rest)
        # Set when the job stops: a row waiting to retry is then abandoned, not sent.
        self._stopped = asyncio.Event()
        self.limits = limits
        self._adaptive = limits.concurrency.auto
        self.structured = structured
        self.spend = spend
        self.currency = currency
        self.grace_s = grace_s
        self.queue: asyncio.Queue[Prepared | None] = asyncio.Queue(maxsize=job.workers * 2)
        # A full queue is refilled once it is down to half (``_refill_at``), not a
        # row at a time: waiting in ``queue.put`` would wake the producer for every
        # row a worker takes.
        self._refill_at = job.workers
        self._room = asyncio.Event()
        self._stop: JobStopped | None = None
        self._producer: asyncio.Task[None] | None = None
        # Failed rows before the first answer are held back, not journaled: a job
        # stopped for a bad key, or because every request fails the same way
        # (FailureWatch), must send them again once the cause is fixed.
        self._probe_lock = asyncio.Lock()
        self._probe_auth_failures = 0
        self._held = HeldFailures(self._write)
        self._key_settled = False
        # The failure watch (a Ray sender's sends each failure to the driver's, for the whole job).
        self.watch = watch or FailureWatch(job)
        # Circuit breaker: the API counts as down once no request has succeeded
        # for api_down_after_s while requests keep failing (429s excepted: a
        # rate-limited API is up).
        self._last_success = time.monotonic()
        # The longest wait a server may ask for (Retry-After) before the job stops.
        self._longest_wait_s = min(job.retry_deadline_s, policy.retry_after_max_s)

    # ---- the run ---------------------------------------------------------

    async def run(self, rows: Iterator[Prepared] | AsyncIterator[Prepared], to_send: int) -> None:
        """Send every one of ``rows`` until done or stopped (an async iterator:
        rows that arrive as the run goes, as on Ray). ``to_send`` is how many of
        them need a request, for the key probe."""
        self._probe_size = max(1, min(AUTH_PROBE_ROWS, to_send))
        try:
            async with asyncio.TaskGroup() as tg:
                self._producer = tg.create_task(self._produce(rows))
                self.workers.start(tg)
        except BaseExceptionGroup as group:
            raise first_batchrun_error(group) from None
        if self._stop is not None:
            raise self._stop

    @property
    def held(self) -> int:
        """Failed rows held back while no answer has come (not given to the results yet)."""
        return len(self._held.rows)

    def stop(self, error: JobStopped, grace_s: float) -> None:
        """Send no new request (rows waiting to retry are abandoned); cancel what is
        still in flight after ``grace_s`` seconds."""
        if self._stop is None:
            self._stop = error
        self._stopped.set()
        if self._producer is not None:
            self._producer.cancel()
        # Wake the idle workers: the queue is emptied, so the wake-up fits.
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)
        asyncio.get_running_loop().call_later(grace_s, self._cancel_all)

    def stop_now(self, error: JobStopped) -> None:
        """Stop at once: requests in flight are abandoned (their rows stay unsent)."""
        self._stop = error
        self._stopped.set()
        self._cancel_all()

    def _cancel_all(self) -> None:
        if self._producer is not None:
            self._producer.cancel()
        self.workers.cancel()

    async def _produce(self, rows: Iterator[Prepared] | AsyncIterator[Prepared]) -> None:
        queue, room = self.queue, self._room
        async for p in _each(rows):
            if self._stop is not None:
                return
            if p.error is not None:
                self._record(self._error_record(p, p.error, None, 0, _now_us()))
                continue
            if queue.full():
                room.clear()
                await room.wait()  # until the workers have taken half the queue
                if self._stop is not None:
                    return
            queue.put_nowait(p)
        await queue.put(None)

    async def _work(self) -> None:
        workers, queue, room, refill_at = self.workers, self.queue, self._room, self._refill_at
        while self._stop is None:
            if workers.waiting:  # a row back from its retry wait takes this place
                workers.leave()
                return
            p = await queue.get()
            if queue.qsize() <= refill_at:
                room.set()
            if p is None:
                queue.put_nowait(None)  # the end of the rows, for every other worker too
                workers.leave()
                return
            if self._stop is not None:
                return
            await self._send(p)

    def _attempt(self, p: Prepared, row: RowTotals) -> Awaitable[Completion]:
        """One request for row ``p``, through the key probe and the in-flight limit
        (once the key is settled, with a fixed pool: ``_post`` itself, one
        coroutine less on every row's path)."""
        if self._key_settled and not self._adaptive:
            return self._post(p, row)
        return self._attempt_limited(p, row)

    async def _attempt_limited(self, p: Prepared, row: RowTotals) -> Completion:
        if not self._key_settled:
            # Until one answer shows the key is accepted, requests go one at a
            # time: a bad key costs a handful of requests, not a pool's worth.
            queued = time.perf_counter()
            async with self._probe_lock:
                row.queued_s += time.perf_counter() - queued
                if not self._key_settled:
                    return await self._post(p, row)
        if self._adaptive:
            # A place first, then the budgets and the pause: waiting for a place
            # must not let a request skip a pause that began meanwhile.
            queued = time.perf_counter()
            async with self.limits.concurrency.place():
                row.queued_s += time.perf_counter() - queued
                return await self._post(p, row)
        return await self._post(p, row)

    async def _send(self, p: Prepared) -> None:
        started = _now_us()
        limits = self.limits
        structured = self.structured
        asks = self.job.max_parse_attempts if structured is not None else 1
        requests = 0
        usage = RowTotals()
        invalid: tuple[Completion, str] | None = None
        for _ in range(asks):
            try:
                options = self.stream_options
                completion, attempts = await (
                    options.ask(p, functools.partial(self._ask, p, usage))
                    if options
                    else self._ask(p, usage)
                )
            except Abandoned:
                return  # the job is stopping: this row stays without a result, for the resume
            except RequestError as exc:
                try:
                    self._attempt_failed(exc, self.policy.backoff_initial_s)
                except Abandoned:
                    return
                rec = self._error_record(p, str(exc), exc.status, requests + exc.attempts, started)
                # usage.put: what earlier answers of the row cost (an ignored schema way too)
                self._record(usage.put(rec), exc)
                self._systematic(self.watch.row_failed(exc, p.row))
                return
            requests += attempts
            self._last_success = time.monotonic()
            self.watch.answer()
            if limits.tpm is not None:
                limits.used_tokens(p.est_tokens, completion.total_tokens)
            usage.add(completion)
            if completion.usage_problem is not None:
                log.warning(
                    "row %s: %s; recorded as not reported",
                    p.id,
                    completion.usage_problem,
                    extra={"event": "usage_dropped", "row_id": p.id},
                )
            problem = unwanted(completion, p.body)
            if problem is not None:  # a refusal, unasked tool calls: paid, not re-asked
                self._record(
                    self._answer_record(
                        p, completion, usage, requests, started, status="invalid", error=problem
                    )
                )
                return
            if structured is None:
                self._record(self._answer_record(p, completion, usage, requests, started))
                return
            try:
                values = structured.parse(
                    completion.text, completion.finish_reason, self.job.max_tokens
                )
            except InvalidAnswer as exc:
                invalid = (completion, str(exc))
                continue
            self._record(
                self._answer_record(p, completion, usage, requests, started, values=values)
            )
            return
        assert invalid is not None
        completion, reason = invalid
        self._record(
            self._answer_record(
                p, completion, usage, requests, started, status="invalid", error=reason
            )
        )

    def _ask(self, p: Prepared, usage: RowTotals) -> Awaitable[tuple[Completion, int]]:
        """One ask for row ``p``: its request through the retry policy, and the
        schema_via search when the job has one (which may change ``p``'s body
        and ask again; what it was paid goes to ``usage``). Not a coroutine of
        its own: the one it returns is awaited at once."""

        on_retry = functools.partial(self._on_retry, p)
        attempt = functools.partial(self._attempt, p, usage)
        if self.via is None:
            return send_with_retries(attempt, self.policy, on_retry=on_retry, stopped=self._stopped)

        def send(attempt: Attempt) -> Awaitable[tuple[Completion, int]]:
            if self._stopped.is_set():  # the job stopped while the row waited for its turn
                raise Abandoned("the job is stopping")
            return send_with_retries(attempt, self.policy, on_retry=on_retry, stopped=self._stopped)

        return self.via.ask(p, attempt, send, usage.add)

    async def _post(self, p: Prepared, row: RowTotals) -> Completion:
        """One attempt: wait for the limits, reserve the worst-case cost, send."""
        limits = self.limits
        if limits.paces or limits.pause_active():
            # Budgets that need no wait are reserved on the spot: a coroutine (and
            # the time it took) only for an attempt that has to wait.
            wait = limits.reserve_turn(p.est_tokens)
            if wait != 0.0:
                queued = time.perf_counter()
                if wait is None:
                    await limits.wait_turn(p.est_tokens)
                else:
                    await limits.sleep(wait)
                row.queued_s += time.perf_counter() - queued
            if self._stop is not None:
                raise Abandoned("the job is stopping")
        spend = self.spend
        reservation = None
        if spend is not None:
            reservation = spend.reserve(p.prompt_bound)
            if reservation is None:
                self._over_budget(spend)
                raise Abandoned("the job is stopping")
        options = self.stream_options
        if options is not None and options.refused is not None:
            options.render(p)  # refused while this row waited for its turn: not sent again
        self.tally.requests += 1
        adaptive = self._adaptive
        t = time.perf_counter()
        try:
            answer = await self.client.complete(p.body)
        except RequestError as exc:
            api_s = time.perf_counter() - t
            row.api_s += api_s
            if exc.status not in AUTH_STATUSES:
                self._key_settled = True
            if isinstance(exc, RateLimited):
                # When it left, on the limits' clock: which pause episode it belongs to.
                exc.sent_at = limits.pause.clock() - api_s
            elif isinstance(exc, RequestTimeout):
                limits.concurrency.on_overload()
            paid = exc.answer if isinstance(exc, EmptyAnswer) else None
            if paid is not None:
                row.add(paid)  # an answer that said nothing was paid all the same
            if spend is not None and reservation is not None:
                if paid is not None:
                    spend.settle(reservation, paid)
                elif exc.status is None:
                    # No answer read: the API may still have generated it, so the worst case stays charged.
                    spend.settle(reservation, None)
                else:
                    spend.release(reservation)
            raise
        api_s = time.perf_counter() - t
        row.api_s += api_s
        self._key_settled = True
        limits.pause.streak = 0  # an answer: the 429s before it were not a spent budget
        if adaptive:
            limits.concurrency.on_success(api_s)
        if spend is not None and reservation is not None:
            spend.settle(reservation, answer)
        return answer

    def _over_budget(self, spend: CostBudget) -> None:
        if self._stop is not None:
            return
        self.stop(
            BudgetReached(
                f"Stopped before passing max_cost={spend.max_cost} {self.currency}: {spend.spent:.4f} spent so far, "
                f"{spend.reserved:.4f} held for the requests in flight at their worst case (every prompt byte a "
                "token, max_tokens of completion). Every finished row is saved: raise max_cost and run the "
                "same command again to resume."
            ),
            grace_s=self.grace_s,
        )

    def _answer_record(
        self,
        p: Prepared,
        completion: Completion,
        usage: RowTotals,
        requests: int,
        started: int,
        *,
        status: str = "ok",
        error: str | None = None,
        values: dict[str, Any] | None = None,
    ) -> Record:
        """The result of a row that got an answer; usage is summed over every request made."""
        rec: Record = {
            "row": p.row,
            "id": p.id,
            "status": status,
            "model": p.model or self.job.model,
            "response_model": completion.response_model,
            "completion": completion.text,
            "finish_reason": completion.finish_reason,
            "error": error,
            "http_status": completion.http_status,
            "attempts": requests,
            "response_id": completion.response_id,
            "request_hash": p.request_hash,
            "started_at": started,
            "finished_at": _now_us(),
            "tier": ONLINE,
        }
        usage.put(rec)
        if completion.refusal is not None:
            rec["refusal"] = completion.refusal
        if completion.tool_calls is not None:
            rec["tool_calls"] = completion.tool_calls
        if self.job.stream:
            rec["ttft_ms"] = completion.ttft_ms
        if values is not None:
            rec["values"] = values
        if p.pii is not None:
            p.pii.restore(rec)  # before the journal: a resumed row is already restored
        return rec

    def _error_record(
        self,
        p: Prepared,
        error: str,
        status: int | None,
        attempts: int,
        started: int,
    ) -> Record:
        rec: Record = {
            "row": p.row,
            "id": p.id,
            "status": "error",
            "model": p.model or self.job.model,
            "error": error,
            "http_status": status,
            "attempts": attempts,
            "latency_ms": 0.0,
            "queued_ms": 0.0,
            "request_hash": p.request_hash or None,
            "started_at": started,
            "finished_at": _now_us(),
            "tier": ONLINE,
        }
        if p.pii is not None:
            rec["pii_found"] = p.pii.found  # the error keeps the placeholders
        return rec

    def _on_retry(self, p: Prepared, exc: RequestError, attempt: int, wait_s: float) -> None:
        """Before the wait for row ``p``'s next attempt."""
        self.tally.retries += 1
        self._attempt_failed(exc, wait_s)
        log.debug(
            "row %s attempt %d failed: %s; retrying in %.2fs",
            p.id,
            attempt,
            exc,
            wait_s,
            extra={
                "event": "retry",
                "row_id": p.id,
                "attempt": attempt,
                "cause": str(exc),
                "wait_s": round(wait_s, 3),
            },
        )

    def _attempt_failed(self, exc: RequestError, wait_s: float) -> None:
        """Every failed attempt: a 429 that shows the API's budget is spent
        pauses the whole job, once per episode, for the wait it asked for (else
        ``wait_s``); a lone 429 leaves the others alone (``limits.Pause``). The
        circuit breaker looks at the API. A server that asks to wait longer than
        batchrun ever waits stops the job (the row is abandoned, for the resume)."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None and retry_after > self._longest_wait_s:
            if self._stop is None:
                self.stop(
                    ApiDown(
                        f"The API asked to wait {retry_after:.3g}s before the next request "
                        f"(Retry-After with HTTP {exc.status}), longer than batchrun waits "
                        f"({self._longest_wait_s:g}s: the smaller of retry_deadline_s and "
                        f"{RETRY_AFTER_MAX_S:g}s). Every finished row is saved: run the same "
                        "command again later to resume."
                    ),
                    self.grace_s,
                )
            raise Abandoned("the API asked for a longer wait than batchrun takes")
        if isinstance(exc, RateLimited) and self.limits.rate_limited(
            exc.retry_after, wait_s, exc.exhausted, exc.sent_at
        ):
            pause_s = self.limits.pause.remaining()
            why = (
                "an HTTP 429 says x-ratelimit-remaining is 0"
                if exc.exhausted
                else f"{SPENT_STREAK} HTTP 429s in a row"
            )
            log.info(
                "The API's rate limit is spent (%s): every request waits %.2fs",
                why,
                pause_s,
                extra={"event": "rate_limit_pause", "wait_s": round(pause_s, 3), "cause": str(exc)},
            )
        self._check_api_down(exc)

    def _systematic(self, stop: JobStopped | None) -> bool:
        """Stop the job when the watch says it cannot succeed; the held rows
        (failed before any answer) are dropped, to be sent by the resume."""
        if stop is None:
            return False
        if self._stop is None:
            self._held.drop()
            self.stop_now(stop)
        return True

    def _check_api_down(self, exc: RequestError) -> None:
        if not exc.retryable or isinstance(exc, RateLimited) or self._stop is not None:
            return
        down_s = time.monotonic() - self._last_success
        if down_s >= self.job.api_down_after_s:
            self.stop_now(
                ApiDown(
                    f"The API looks down: no request has succeeded for {down_s:.0f}s "
                    f"(api_down_after_s={self.job.api_down_after_s:g}); the last error was: {exc}. "
                    "Every finished row is saved: run the same command again to resume once the API is back "
                    "(add --retry-failed to also resend rows that failed meanwhile)."
                )
            )

    # ---- results -----------------------------------------------------------

    def _record(self, rec: Record, exc: RequestError | None = None) -> None:
        """Journal one result and count it; a failed one is held while no answer
        has come yet (``exc``: the failure, for the watch)."""
        failed = rec["status"] == "error" and bool(rec.get("attempts"))
        if failed and not self._key_settled and rec.get("http_status") in AUTH_STATUSES:
            self._probe_auth_failures += 1
            self._held.hold(rec)
            if self._probe_auth_failures >= self._probe_size:
                self._held.drop()
                self.stop_now(
                    KeyRejected(
                        f"The API refused the key on the first {self._probe_auth_failures} requests "
                        f"({rec['error']}). Check that ${self.job.api_key_env} holds a valid key for "
                        f"{self.job.base_url}, then run the same command again: nothing was recorded for those rows."
                    )
                )
            return
        if failed and self._held.holding and not self.watch.answered:
            self._held.hold(rec)
            return
        self._held.release()
        self._write(rec)

    def _write(self, rec: Record) -> None:
        stop = self.results.record(rec)
        if stop is not None and self._stop is None:
            self.stop_now(stop)

    def finish(self) -> None:
        """After the run: journal what is still held (a job that ended before
        any answer and before the watch could tell a cause)."""
        self._held.release()


async def _each(rows: Iterator[Prepared] | AsyncIterator[Prepared]) -> AsyncIterator[Prepared]:
    if isinstance(rows, AsyncIterator):
        async for p in rows:
            yield p
    else:
        for p in rows:
            yield p

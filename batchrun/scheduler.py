"""Runs the rows through retry → client and hands each result to the journal.

A producer turns input rows into request bodies and puts them on a bounded
queue; a fixed pool of ``concurrency`` workers takes them off, sends them and
journals each result the moment it is known. Memory stays flat whatever the
input's size. A row that fails becomes a result (``status = "error"``), never
a crash; only a job-level stop (bad key, signal, …) ends the run early.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Iterator
from typing import Any, Protocol

from batchrun.client import ApiClient
from batchrun.config import Job
from batchrun.errors import (
    Abandoned,
    ApiDown,
    BatchrunError,
    BudgetReached,
    JobStopped,
    KeyRejected,
    RateLimited,
    RequestError,
    RequestTimeout,
)
from batchrun.limits import CostBudget, Limits
from batchrun.outputs import Record
from batchrun.payload import Completion, Prepared
from batchrun.progress import Tally
from batchrun.retry import RetryPolicy, send_with_retries
from batchrun.schema_via import Attempt, SchemaVia
from batchrun.structured import InvalidAnswer, Structured

log = logging.getLogger("batchrun")

AUTH_STATUSES = frozenset({401, 403})
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


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class _Usage:
    """Tokens summed over every request a row made (re-asks were paid too)."""

    __slots__ = ("completion", "prompt", "total")

    def __init__(self) -> None:
        self.prompt: int | None = None
        self.completion: int | None = None
        self.total: int | None = None

    def add(self, c: Completion) -> None:
        if c.prompt_tokens is not None:
            self.prompt = (self.prompt or 0) + c.prompt_tokens
        if c.completion_tokens is not None:
            self.completion = (self.completion or 0) + c.completion_tokens
        if c.total_tokens is not None:
            self.total = (self.total or 0) + c.total_tokens

    def put(self, rec: Record) -> Record:
        rec["prompt_tokens"] = self.prompt
        rec["completion_tokens"] = self.completion
        rec["total_tokens"] = self.total
        return rec


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
    ) -> None:
        self.job = job
        self.via = via  # how requests carry the schema; "auto" may change it as answers come
        self.client = client
        self.results = results
        self.tally = tally
        self.policy = policy
        # Set when the job stops: a row waiting to retry is then abandoned, not sent.
        self._stopped = asyncio.Event()
        self.limits = limits
        self._adaptive = limits.concurrency.auto
        self.structured = structured
        self.spend = spend
        self.currency = currency
        self.grace_s = grace_s
        self.queue: asyncio.Queue[Prepared | None] = asyncio.Queue(maxsize=job.workers * 2)
        self._stop: JobStopped | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._producer: asyncio.Task[None] | None = None
        # Answers that were 401/403 before the key proved good are held back, not
        # journaled: a job stopped for a bad key must resume them once the key is fixed.
        self._probe_lock = asyncio.Lock()
        self._probe_auth_failures = 0
        self._held: list[Record] = []
        self._key_settled = False
        # Circuit breaker: the API counts as down once no request has succeeded
        # for api_down_after_s while requests keep failing (429s excepted: a
        # rate-limited API is up).
        self._last_success = time.monotonic()

    # ---- the run ---------------------------------------------------------

    async def run(self, rows: Iterator[Prepared], to_send: int) -> None:
        """Send every one of ``rows`` until done or stopped.
        ``to_send`` is how many of them need a request, for the key probe."""
        self._probe_size = max(1, min(AUTH_PROBE_ROWS, to_send))
        try:
            async with asyncio.TaskGroup() as tg:
                self._producer = tg.create_task(self._produce(rows))
                self._workers = [tg.create_task(self._work()) for _ in range(self.job.workers)]
        except BaseExceptionGroup as group:
            raise _first_batchrun_error(group) from None
        if self._stop is not None:
            raise self._stop

    def stop(self, error: JobStopped, grace_s: float) -> None:
        """Send no new request (rows waiting to retry are abandoned); cancel what is
        still in flight after ``grace_s`` seconds."""
        if self._stop is None:
            self._stop = error
        self._stopped.set()
        if self._producer is not None:
            self._producer.cancel()
        # Wake the idle workers: the queue is emptied, so the wake-ups always fit.
        while not self.queue.empty():
            self.queue.get_nowait()
        for _ in self._workers:
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
        for task in self._workers:
            task.cancel()

    async def _produce(self, rows: Iterator[Prepared]) -> None:
        for p in rows:
            if self._stop is not None:
                return
            if p.error is not None:
                self._record(self._error_record(p, p.error, None, 0, _now_us(), 0.0))
                continue
            await self.queue.put(p)
        for _ in range(self.job.workers):
            await self.queue.put(None)

    async def _work(self) -> None:
        while self._stop is None:
            p = await self.queue.get()
            if p is None or self._stop is not None:
                return
            await self._send(p)

    async def _attempt(self, p: Prepared) -> Completion:
        """One request for row ``p``, through the key probe and the in-flight limit."""
        if not self._key_settled:
            # Until one answer shows the key is accepted, requests go one at a
            # time: a bad key costs a handful of requests, not a pool's worth.
            async with self._probe_lock:
                if not self._key_settled:
                    return await self._post(p)
        if self._adaptive:
            # A place first, then the budgets and the pause: waiting for a place
            # must not let a request skip a pause that began meanwhile.
            async with self.limits.concurrency.place():
                return await self._post(p)
        return await self._post(p)

    async def _send(self, p: Prepared) -> None:
        started = _now_us()
        t0 = time.perf_counter()
        limits = self.limits
        structured = self.structured
        asks = self.job.max_parse_attempts if structured is not None else 1
        requests = 0
        usage = _Usage()
        invalid: tuple[Completion, str] | None = None
        for _ in range(asks):
            try:
                completion, attempts = await self._ask(p, usage)
            except Abandoned:
                return  # the job is stopping: this row stays without a result, for the resume
            except RequestError as exc:
                self._attempt_failed(exc, self.policy.backoff_initial_s)
                rec = self._error_record(
                    p, str(exc), exc.status, requests + exc.attempts, started, _ms_since(t0)
                )
                self._record(usage.put(rec))  # what earlier answers of the row cost
                return
            requests += attempts
            self._last_success = time.monotonic()
            if limits.tpm is not None:
                limits.used_tokens(p.est_tokens, completion.total_tokens)
            usage.add(completion)
            if structured is None:
                self._record(self._answer_record(p, completion, usage, requests, started, t0))
                return
            try:
                values = structured.parse(
                    completion.text, completion.finish_reason, self.job.max_tokens
                )
            except InvalidAnswer as exc:
                invalid = (completion, str(exc))
                continue
            self._record(
                self._answer_record(p, completion, usage, requests, started, t0, values=values)
            )
            return
        assert invalid is not None
        completion, reason = invalid
        self._record(
            self._answer_record(
                p, completion, usage, requests, started, t0, status="invalid", error=reason
            )
        )

    async def _ask(self, p: Prepared, usage: _Usage) -> tuple[Completion, int]:
        """One ask for row ``p``: its request through the retry policy, and the
        schema_via search when the job has one (which may change ``p``'s body
        and ask again; what it was paid goes to ``usage``)."""

        on_retry = functools.partial(self._on_retry, p)
        attempt = functools.partial(self._attempt, p)
        if self.via is None:
            return await send_with_retries(
                attempt, self.policy, on_retry=on_retry, stopped=self._stopped
            )

        def send(attempt: Attempt) -> Awaitable[tuple[Completion, int]]:
            if self._stopped.is_set():  # the job stopped while the row waited for its turn
                raise Abandoned("the job is stopping")
            return send_with_retries(attempt, self.policy, on_retry=on_retry, stopped=self._stopped)

        return await self.via.ask(p, attempt, send, usage.add)

    async def _post(self, p: Prepared) -> Completion:
        """One attempt: wait for the limits, reserve the worst-case cost, send."""
        limits = self.limits
        if limits.paces or limits.pause_active():
            await limits.wait_turn(p.est_tokens)
            if self._stop is not None:
                raise Abandoned("the job is stopping")
        spend = self.spend
        reservation = None
        if spend is not None:
            reservation = spend.reserve(p.prompt_bound)
            if reservation is None:
                self._over_budget(spend)
                raise Abandoned("the job is stopping")
        self.tally.requests += 1
        adaptive = self._adaptive
        t = time.perf_counter() if adaptive else 0.0
        try:
            answer = await self.client.complete(p.body)
        except RequestError as exc:
            if exc.status not in AUTH_STATUSES:
                self._key_settled = True
            if isinstance(exc, RequestTimeout):
                limits.concurrency.on_overload()
            if spend is not None and reservation is not None:
                # No answer read: the API may still have generated it, so the worst case stays charged.
                if exc.status is None:
                    spend.settle(reservation, None, None)
                else:
                    spend.release(reservation)
                self.tally.cost = spend.spent
            raise
        self._key_settled = True
        if adaptive:
            limits.concurrency.on_success(time.perf_counter() - t)
        if spend is not None and reservation is not None:
            spend.settle(reservation, answer.prompt_tokens, answer.completion_tokens)
            self.tally.cost = spend.spent
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
        usage: _Usage,
        requests: int,
        started: int,
        t0: float,
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
            "http_status": 200,
            "attempts": requests,
            "latency_ms": _ms_since(t0),
            "response_id": completion.response_id,
            "request_hash": p.request_hash,
            "started_at": started,
            "finished_at": _now_us(),
        }
        usage.put(rec)
        if self.job.stream:
            rec["ttft_ms"] = completion.ttft_ms
        if values is not None:
            rec["values"] = values
        return rec

    def _error_record(
        self,
        p: Prepared,
        error: str,
        status: int | None,
        attempts: int,
        started: int,
        latency_ms: float,
    ) -> Record:
        return {
            "row": p.row,
            "id": p.id,
            "status": "error",
            "model": p.model or self.job.model,
            "error": error,
            "http_status": status,
            "attempts": attempts,
            "latency_ms": latency_ms,
            "request_hash": p.request_hash or None,
            "started_at": started,
            "finished_at": _now_us(),
        }

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
        """Every failed attempt: a 429 pauses the whole job (for its Retry-After,
        else ``wait_s``), and the circuit breaker looks at the API."""
        if isinstance(exc, RateLimited):
            self.limits.rate_limited(exc.retry_after, wait_s)
        self._check_api_down(exc)

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

    def _record(self, rec: Record) -> None:
        """Journal one result (or hold it while the key is unproven) and count it."""
        if (
            not self._key_settled
            and rec.get("attempts")
            and rec["status"] == "error"
            and rec.get("http_status") in AUTH_STATUSES
        ):
            self._probe_auth_failures += 1
            self._held.append(rec)
            if self._probe_auth_failures >= self._probe_size:
                self._held.clear()
                self.stop_now(
                    KeyRejected(
                        f"The API refused the key on the first {self._probe_auth_failures} requests "
                        f"({rec['error']}). Check that ${self.job.api_key_env} holds a valid key for "
                        f"{self.job.base_url}, then run the same command again: nothing was recorded for those rows."
                    )
                )
            return
        if self._held and self._key_settled:
            held, self._held = self._held, []
            for h in held:
                self._write(h)
        self._write(rec)

    def _write(self, rec: Record) -> None:
        stop = self.results.record(rec)
        if stop is not None and self._stop is None:
            self.stop_now(stop)

    def flush_held(self) -> None:
        """At the end of a job too small to settle the key: journal what is held."""
        held, self._held = self._held, []
        for h in held:
            self._write(h)


def _first_batchrun_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error to surface from a task group: ours first, then anything else."""
    flat: list[BaseException] = []

    def walk(g: BaseExceptionGroup[Any]) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                flat.append(e)

    walk(group)
    for e in flat:
        if isinstance(e, BatchrunError):
            return e
    return flat[0]

"""``batchrun plan``: what a job would do, found without sending anything.

The same checks and the same resume state as ``run`` before its first request
(``lifecycle``), then the rows to send, the first request, the estimated prompt
tokens, the cost range from the prices file and the time at the job's
concurrency, rpm and tpm.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from batchrun.checks import check_job
from batchrun.config import Job
from batchrun.files import require_folder
from batchrun.journal import Journal, partial_dir
from batchrun.lifecycle import (
    RunOptions,
    earlier_outputs,
    open_schema_via,
    resume_checked,
    rows_to_send,
    run_identity,
)
from batchrun.outputs import STATUS_NONE
from batchrun.pii import PiiCount
from batchrun.pii import enabled as pii_enabled
from batchrun.prices import load_prices
from batchrun.stream_options import StreamOptions


@dataclass(frozen=True)
class Plan:
    """What a job would do, found without sending anything."""

    rows: int
    to_send: int
    first_request: dict[str, Any]
    url: str
    prompt_tokens: int
    max_completion_tokens: int
    cost_low: Decimal | None
    cost_high: Decimal | None
    currency: str
    pace_rows_per_s: float | None
    concurrency: int | str
    batch_discount: Decimal = Decimal(0)
    """The fraction off rows a provider batch answers (the prices file's)."""
    mode: str = "online"
    done: int = 0
    """Rows with a result from an earlier run of this output."""
    failed: int = 0
    """Of those, rows that failed (sent again with --retry-failed)."""
    reused: int = 0
    """Rows --reuse would copy from earlier outputs instead of sending."""
    retry_failed: bool = False
    pii: PiiCount | None = None
    """Jobs with ``pii``: what the whole input would have replaced."""

    def seconds_at(self, latency_s: float) -> float:
        """How long sending takes when each answer takes ``latency_s`` seconds."""
        workers = self.concurrency if isinstance(self.concurrency, int) else 16
        rate = workers / latency_s
        if self.pace_rows_per_s is not None:
            rate = min(rate, self.pace_rows_per_s)
        return self.to_send / rate if rate else 0.0

    def text(self) -> str:
        from batchrun.progress import duration

        body = orjson.dumps(self.first_request, option=orjson.OPT_INDENT_2).decode()
        kept = []
        if self.done:
            kept.append(f"{self.done:,} with a result from an earlier run")
            if self.failed and not self.retry_failed:
                kept.append(f"{self.failed:,} of them failed: --retry-failed sends them again")
        if self.reused:
            kept.append(f"{self.reused:,} reused from earlier outputs")
        lines = [
            f"rows          {self.rows:,}  ({'; '.join([f'{self.to_send:,} to send', *kept])})",
            f"first request POST {self.url}",
            "              Authorization: Bearer ***",
            *("              " + line for line in body.splitlines()),
            *(["              (nothing to send)"] if not self.first_request else []),
            f"prompt tokens ~{self.prompt_tokens:,} (estimated: characters / 4)",
            f"max completion {self.max_completion_tokens:,} tokens (each request's max_tokens, summed)",
        ]
        if self.cost_low is not None and self.cost_high is not None:
            lines.append(
                f"cost          {self.cost_low:.4f} .. {self.cost_high:.4f} {self.currency} "
                "(prompt only .. prompt + max_tokens per row)"
                + (" online" if self.batch_discount or self.mode != "online" else "")
            )
            if self.batch_discount:
                off = 1 - self.batch_discount
                lines.append(
                    f"              {self.cost_low * off:.4f} .. {self.cost_high * off:.4f} "
                    f"{self.currency} by a provider batch (batch_discount {self.batch_discount:.0%}); "
                    "hybrid falls between, as the batch answers before the deadline"
                )
            if self.mode != "online":
                lines.append(f"mode          {self.mode}")
        else:
            lines.append("cost          unpriced (pass --prices FILE with this model)")
        pace = f"; rpm/tpm allow {self.pace_rows_per_s:,.1f} rows/s" if self.pace_rows_per_s else ""
        lines.append(
            f"time          ~{duration(self.seconds_at(1.0))} at 1 s per answer, "
            f"~{duration(self.seconds_at(5.0))} at 5 s (concurrency {self.concurrency}{pace})"
        )
        if self.pii is not None:
            lines.append(self.pii.text())
        return "\n".join(lines)


def plan_job(job: Job, options: RunOptions | None = None) -> Plan:
    """What ``run`` would do, found the way ``run`` finds it before its first
    request — the same checks, the same resume state (an unfinished journal or
    the finished output; a changed job is refused alike), the same --shard,
    --reuse and --retry-failed — with its tokens, cost and time estimated.
    Sends nothing, writes nothing, takes no lock."""
    options = options or RunOptions()
    from batchrun.finished import fingerprint, read_finished

    # A finished output that answers a rerun alone answers its plan too (a job
    # with pii counts what the whole input would have replaced: it reads it).
    if not pii_enabled(job) and (found := read_finished(job, options, fingerprint(job, options))):
        return _plan(found.job, options, found.rows, found.counts)
    checked = check_job(job, options)
    job, scan = checked.job, checked.scan
    assert job.output is not None  # check_job makes sure
    require_folder(job.output, "`output`")
    state = Journal.peek(
        job.output, scan.num_rows, run_identity(job, options, scan.num_rows), options.restart
    )
    via = open_schema_via(checked, options)
    stream_options = StreamOptions.open(job, partial_dir(job.output), earlier_outputs(job, options))
    rows = stream_options.rendered(
        checked.rows(estimates=True, shape=via.shape if via is not None else None)
    )
    if state.resumed is not None:
        rows = resume_checked(state, rows, via)
    index = None
    if options.reuse:
        from batchrun.reuse import ReuseIndex

        index = ReuseIndex(list(options.reuse), embedded=options.mock)
    first: dict[str, Any] | None = None
    prompt_tokens = completion_cap = to_send = reused = 0
    pii = PiiCount() if pii_enabled(job) else None
    if pii is not None:
        rows = pii.counted(rows)  # the whole input, also the rows not to send
    for p in rows_to_send(rows, state.status, options.retry_failed):
        if p.error:
            continue
        done_earlier = state.status[p.row] != STATUS_NONE
        if index is not None and not done_earlier and index.find(p.request_hash) is not None:
            reused += 1
            continue
        if first is None:
            first = orjson.loads(p.body)
        to_send += 1
        prompt_tokens += p.prompt_tokens
        completion_cap += p.max_tokens
    return _plan(
        job,
        options,
        scan.rows_kept,
        state.counts(),
        first or {},
        (to_send, prompt_tokens, completion_cap, reused),
        pii,
    )


def _plan(
    job: Job,
    options: RunOptions,
    rows: int,
    counts: tuple[int, int, int],
    first_request: dict[str, Any] | None = None,
    sends: tuple[int, int, int, int] = (0, 0, 0, 0),
    pii: PiiCount | None = None,
) -> Plan:
    """The plan of ``rows`` rows with ``counts`` (ok, failed, invalid) done before,
    ``sends`` (rows to send, their prompt tokens and completion cap, rows reused)
    to go: priced and paced."""
    to_send, prompt_tokens, completion_cap, reused = sends
    cost_low = cost_high = None
    batch_discount = Decimal(0)
    currency = ""
    if job.prices is not None:
        prices = load_prices(job.prices)
        currency = prices.currency
        price = prices.price(job.model)
        if price is not None:
            rates = price.rates()  # in force today
            cost_low = rates.cost(prompt_tokens, 0)
            cost_high = rates.worst_case(prompt_tokens, completion_cap)
            batch_discount = rates.batch_discount
    pace = None
    if job.rpm:
        pace = job.rpm / 60
    if job.tpm and to_send:
        per_row = (prompt_tokens + completion_cap) / to_send
        pace = min(pace or float("inf"), job.tpm / 60 / per_row)
    ok, failed, invalid = counts
    return Plan(
        rows=rows,
        to_send=to_send,
        first_request=first_request or {},
        url=job.url,
        prompt_tokens=prompt_tokens,
        max_completion_tokens=completion_cap,
        cost_low=cost_low,
        cost_high=cost_high,
        batch_discount=batch_discount,
        mode=job.mode,
        currency=currency,
        pace_rows_per_s=pace,
        concurrency=job.concurrency,
        done=ok + failed + invalid,
        failed=failed,
        reused=reused,
        retry_failed=options.retry_failed,
        pii=pii,
    )

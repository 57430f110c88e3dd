"""``batchrun plan``: what a job would do, found without sending anything.

The same checks as ``run`` before its first request (``run.check_job``), then
the rows, the first request, the estimated prompt tokens, the cost range from the
prices file and the time at the job's concurrency, rpm and tpm.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from batchrun.config import Job
from batchrun.files import require_folder
from batchrun.lifecycle import RunOptions, check_job
from batchrun.prices import load_prices


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
        lines = [
            f"rows          {self.rows:,}  ({self.to_send:,} to send)",
            f"first request POST {self.url}",
            "              Authorization: Bearer ***",
            *("              " + line for line in body.splitlines()),
            f"prompt tokens ~{self.prompt_tokens:,} (estimated: characters / 4)",
            f"max completion {self.max_completion_tokens:,} tokens (each request's max_tokens, summed)",
        ]
        if self.cost_low is not None and self.cost_high is not None:
            lines.append(
                f"cost          {self.cost_low:.4f} .. {self.cost_high:.4f} {self.currency} "
                "(prompt only .. prompt + max_tokens per row)"
            )
        else:
            lines.append("cost          unpriced (pass --prices FILE with this model)")
        pace = f"; rpm/tpm allow {self.pace_rows_per_s:,.1f} rows/s" if self.pace_rows_per_s else ""
        lines.append(
            f"time          ~{duration(self.seconds_at(1.0))} at 1 s per answer, "
            f"~{duration(self.seconds_at(5.0))} at 5 s (concurrency {self.concurrency}{pace})"
        )
        return "\n".join(lines)


def plan_job(job: Job, options: RunOptions | None = None) -> Plan:
    """Check ``job`` as ``run`` would before its first request, and estimate
    its tokens, cost and time. Sends nothing, writes nothing."""
    checked = check_job(job, options or RunOptions())
    job, scan = checked.job, checked.scan
    require_folder(job.output or Path("output.parquet"), "`output`")
    first: dict[str, Any] | None = None
    prompt_tokens = completion_cap = to_send = 0
    for p in checked.rows(estimates=True):
        if p.error:
            continue
        if first is None:
            first = orjson.loads(p.body)
        to_send += 1
        prompt_tokens += p.prompt_tokens
        completion_cap += p.max_tokens
    cost_low = cost_high = None
    currency = ""
    if job.prices is not None:
        prices = load_prices(job.prices)
        currency = prices.currency
        price = prices.price(job.model)
        if price is not None:
            rates = price.rates()  # in force today
            cost_low = rates.cost(prompt_tokens, 0)
            cost_high = rates.worst_case(prompt_tokens, completion_cap)
    pace = None
    if job.rpm:
        pace = job.rpm / 60
    if job.tpm and to_send:
        per_row = (prompt_tokens + completion_cap) / to_send
        pace = min(pace or float("inf"), job.tpm / 60 / per_row)
    return Plan(
        rows=scan.rows_kept,
        to_send=to_send,
        first_request=first or {},
        url=job.url,
        prompt_tokens=prompt_tokens,
        max_completion_tokens=completion_cap,
        cost_low=cost_low,
        cost_high=cost_high,
        currency=currency,
        pace_rows_per_s=pace,
        concurrency=job.concurrency,
    )

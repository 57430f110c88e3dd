"""Benchmark 8 of ``run.py`` (``BENCH_ONLY=batchapi``): a 20,000-row job against the
embedded endpoint's Batch API queue, three ways.

- **online**: ``mode = "online"``, concurrency 64: every row at the full price.
- **hybrid**: ``mode = "hybrid"`` with a deadline the queue alone cannot meet: a
  batch first, then, in time for the deadline, the rows it has not answered online.
- **batch alone**: ``mode = "batch"`` without a deadline: every row at the batch
  discount, whenever the queue gets to it.

The queue answers ``QUEUE_ROWS_PER_S`` rows per second after ``QUEUE_START_S`` of
validation, so the batch alone needs about START + ROWS / SPEED seconds, more than
``DEADLINE_S``. Costs use the example prices of ``jobs/prices.toml`` (USD per
million tokens) with the batch tier at a 50% discount, from each output's token
columns and ``tier``. Each run checks every row is ok and that the endpoint
answered one request per row, online and in batches together (``/_stats``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

QUEUE_ROWS_PER_S = 250.0
QUEUE_START_S = 2.0
QUEUE_CANCEL_S = 1.0
DEADLINE_S = 60
POLL_S = 5
CONCURRENCY = 64
PROMPT_PER_MILLION, COMPLETION_PER_MILLION = 0.60, 0.80
"""USD per million tokens: the example prices of jobs/prices.toml."""
BATCH_DISCOUNT = 0.5
MODES = ("online", "hybrid", "batch")

SERVER_ARGS = (
    "--batch-rows-per-s",
    f"{QUEUE_ROWS_PER_S:g}",
    "--batch-start-s",
    f"{QUEUE_START_S:g}",
    "--batch-cancel-s",
    f"{QUEUE_CANCEL_S:g}",
)


def _cost(rows: Sequence[dict[str, Any]]) -> float:
    total = 0.0
    for r in rows:
        price = (r["prompt_tokens"] or 0) * PROMPT_PER_MILLION
        price += (r["completion_tokens"] or 0) * COMPLETION_PER_MILLION
        total += price / 1e6 * (1 - BATCH_DISCOUNT if r["tier"] == "batch" else 1.0)
    return total


def _tiers_event(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text().splitlines()):
        event = json.loads(line)
        if event.get("event") == "tiers":
            return dict(event)
    return {}


def run_section(
    server: Any,
    workdir: Path,
    tickets: Path,
    rows: int,
    run_proc: Callable[..., Any],
    cpu: int | None,
    python: str,
    say: Callable[[str], None],
    error: type[Exception],
) -> dict[str, Any]:
    """The three runs against ``server`` (a ``run.MockServer`` started with SERVER_ARGS)."""
    import pyarrow.parquet as pq

    out: dict[str, Any] = {"rows": rows}
    for mode in MODES:
        output = workdir / f"batchapi-{mode}.parquet"
        log = workdir / f"batchapi-{mode}.jsonl"
        output.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        cmd = [python, "-m", "batchrun", "run", "--input", str(tickets), "--output", str(output)]
        cmd += ["--prompt-template", "Summarize this ticket: {ticket}", "--model", "m"]
        cmd += ["--base-url", server.base_url, "--api-key-env", "", "-q"]
        cmd += ["--concurrency", str(CONCURRENCY), "--mode", mode, "--batch-poll-s", str(POLL_S)]
        cmd += ["--log-file", str(log), "--log-format", "json"]
        if mode == "hybrid":
            cmd += ["--deadline", f"{DEADLINE_S}s"]
        server.reset()
        proc = run_proc(cmd, cpu=cpu, timeout_s=600, workdir=workdir)
        if proc.rc != 0:
            raise error(f"batchapi {mode} exited {proc.rc}: {proc.stderr[-3000:]}")
        table = pq.read_table(
            output, columns=["status", "tier", "prompt_tokens", "completion_tokens"]
        ).to_pylist()
        if len(table) != rows or any(r["status"] != "ok" for r in table):
            raise error(f"batchapi {mode}: not every one of {rows} rows is ok")
        # Some tickets share their text: count answers, not distinct bodies.
        answered = sum(json.loads(server._call("GET", "/_stats"))["bodies"].values())
        if answered != rows:
            raise error(
                f"batchapi {mode}: the endpoint answered {answered} requests for {rows} rows"
            )
        event = _tiers_event(log) if mode != "online" else {}
        run = {
            "wall_s": proc.wall_s,
            "cost": _cost(table),
            "batch_rows": sum(1 for r in table if r["tier"] == "batch"),
            "online_rows": sum(1 for r in table if r["tier"] != "batch"),
            "tokens": sum((r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0) for r in table),
            "before_deadline_s": event.get("before_deadline_s"),
        }
        out[mode] = run
        say(
            f"batchapi {mode}: {proc.wall_s:.1f}s, batch {run['batch_rows']:,} rows, "
            f"online {run['online_rows']:,}, ${run['cost']:.4f}"
        )
        output.unlink(missing_ok=True)
    return out


def render(report: dict[str, Any], md: list[str], summary: list[tuple[str, str, str, str]]) -> None:
    """Section 8 of results.md and its summary row."""
    b = report["batchapi"]
    online, hybrid, batch = b["online"], b["hybrid"], b["batch"]
    missed = batch["wall_s"] - DEADLINE_S
    md += [
        f"## 10. The Batch API with a deadline ({b['rows']:,} rows)",
        "",
        f"The embedded endpoint's queue answers {QUEUE_ROWS_PER_S:g} rows/s after "
        f"{QUEUE_START_S:g} s of validation (the batch alone needs about "
        f"{QUEUE_START_S + b['rows'] / QUEUE_ROWS_PER_S:.0f} s); the hybrid job's deadline is "
        f"{DEADLINE_S} s after its start; batches are looked at every {POLL_S} s; online "
        f"concurrency {CONCURRENCY}. Cost at ${PROMPT_PER_MILLION:.2f} / "
        f"${COMPLETION_PER_MILLION:.2f} per million prompt / completion tokens "
        f"(jobs/prices.toml's example), the batch tier at a {BATCH_DISCOUNT:.0%} discount.",
        "",
        "| mode | wall time | rows by batch | rows online | cost USD | vs online | finished |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in (("online", online), ("hybrid", hybrid), ("batch alone", batch)):
        if name == "hybrid":
            when = f"{hybrid['before_deadline_s']:.1f} s before the deadline"
        elif name == "batch alone":
            when = f"{missed:+.1f} s after the {DEADLINE_S} s deadline" if missed > 0 else "in time"
        else:
            when = "—"
        md.append(
            f"| {name} | {run['wall_s']:.1f} s | {run['batch_rows']:,} | {run['online_rows']:,} | "
            f"{run['cost']:.4f} | {run['cost'] / online['cost']:.0%} | {when} |"
        )
    saving = 1 - hybrid["cost"] / online["cost"]
    md += [
        "",
        f"Hybrid costs **{hybrid['cost'] / online['cost']:.0%}** of online (saves {saving:.0%}) and "
        f"**{hybrid['cost'] / batch['cost']:.2f}x** the batch alone, and finished "
        f"**{hybrid['before_deadline_s']:.1f} s** before its deadline; the batch alone would have "
        f"been {missed:.0f} s late. The endpoint answered one request per row in each run (/_stats).",
        "",
    ]
    summary.append(
        (
            "Batch API, hybrid with a deadline",
            f"hybrid {hybrid['cost'] / online['cost']:.0%} of online's cost "
            f"({hybrid['batch_rows']:,} rows by batch), batch alone {batch['cost'] / online['cost']:.0%}; "
            f"hybrid done {hybrid['before_deadline_s']:.1f} s before the deadline, "
            f"batch alone {missed:+.0f} s",
            "before the deadline, cheaper than online",
            "**met**"
            if hybrid["before_deadline_s"] > 0 and hybrid["cost"] < online["cost"]
            else "**not met**",
        )
    )

"""A large batchrun output made without sending anything, for the report benchmark.

``python benchmarks/report_outputs.py OUTPUT ROWS [PRICES]`` writes what a
finished ``batchrun run`` of ``ROWS`` rows leaves: batchrun's output schema and
metadata (``batchrun.outputs.output_schema``, a kept ``team`` column), 65,536
rows a row group, every id unique, and a mix a month of nightly runs has:

- three models (the priced ones of ``jobs/prices.toml``: DeepSeek-R1 with its
  cached and reasoning tokens and its price change on 2026-03-15);
- ``finished_at`` over March 2026 (UTC), so the rows straddle that change;
- 2% failed (half of them with usage: a paid re-ask), 0.5% invalid, 1% reused
  (``attempts`` 0), 0.5% answered without usage, retries on 3%;
- a third answered by a provider batch (``tier`` batch);
- ``team``: eight values and nulls;
- ``cost``: each row's usage priced at the rates in force on its day and
  tier, as ``batchrun run`` writes it (a float; null where nothing was sent).

Run as its own process by ``run.py``: a process forked from a large one starts
with the larger's peak RSS as its own.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.outputs import COST_FIELD, output_schema
from batchrun.prices import BATCH, ONLINE, Prices, load_prices

ROOT = Path(__file__).resolve().parent.parent
PRICES = ROOT / "jobs" / "prices.toml"
MODELS = (
    ("meta-llama/Llama-3.3-70B-Instruct", 0.45),
    ("meta-llama/Llama-3.1-8B-Instruct", 0.35),
    ("deepseek-ai/DeepSeek-R1", 0.20),
)
TEAMS = ("search", "support", "billing", "legal", "sales", "ops", "research", "web")
CHUNK = 65_536
MARCH = int(dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)
MONTH_US = 31 * 86_400 * 1_000_000


def write_output(path: Path, rows: int, prices_path: Path = PRICES, seed: int = 11) -> Path:
    """``rows`` output rows at ``path`` (see the module docstring)."""
    prices = load_prices(prices_path)
    keep = pa.schema([pa.field("team", pa.string())])
    metadata = {"batchrun_version": "bench", "run_id": "bench-report", "rows": rows}
    schema = output_schema(keep, metadata, [COST_FIELD])
    rng = np.random.default_rng(seed)
    names = np.array([m for m, _ in MODELS], dtype=object)
    shares = np.array([s for _, s in MODELS])
    teams = np.array([*TEAMS, None], dtype=object)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            numbers = np.arange(start, start + n, dtype=np.int64)
            model = names[rng.choice(len(names), n, p=shares)]
            r1 = model == "deepseek-ai/DeepSeek-R1"
            draw = rng.random(n)
            failed = draw < 0.02
            with_usage = failed & (draw < 0.01)  # half the failed rows paid for a re-ask
            invalid = (draw >= 0.02) & (draw < 0.025)
            reused = (draw >= 0.025) & (draw < 0.035)
            no_usage = (draw >= 0.035) & (draw < 0.04)
            usage = ~(failed & ~with_usage) & ~no_usage
            prompt = rng.integers(60, 1200, n)
            completion = rng.integers(20, 600, n)
            cached = np.where(r1, rng.integers(0, 60, n), 0)
            reasoning = np.where(r1, (completion * rng.uniform(0, 0.8, n)).astype(np.int64), 0)
            attempts = np.where(reused, 0, np.where(rng.random(n) < 0.03, 2, 1))
            attempts = np.where(failed, 5, attempts)
            batch = rng.random(n) < 1 / 3
            finished = MARCH + rng.integers(0, MONTH_US, n)
            latency = rng.gamma(2.0, 400.0, n)
            status = np.where(failed, "error", np.where(invalid, "invalid", "ok"))
            cost = _costs(prices, model, finished, batch, prompt, completion, cached, reasoning)
            sent_usage = usage & (attempts > 0)
            columns = {
                "id": pa.array([f"T-{i:09d}" for i in numbers.tolist()]),
                "row": pa.array(numbers),
                "team": pa.array(teams[rng.integers(0, len(teams), n)].tolist(), pa.string()),
                "model": pa.array(model.tolist()),
                "response_model": pa.array(model.tolist()),
                "completion": pa.array(np.where(failed, None, "a summary").tolist(), pa.string()),
                "finish_reason": pa.array(np.where(failed, None, "stop").tolist(), pa.string()),
                "prompt_tokens": _masked(prompt, usage),
                "completion_tokens": _masked(completion, usage),
                "total_tokens": _masked(prompt + completion, usage),
                "cached_tokens": _masked(cached, usage & r1),
                "reasoning_tokens": _masked(reasoning, usage & r1),
                "status": pa.array(status.tolist()),
                "error": pa.array(np.where(failed, "HTTP 503", None).tolist(), pa.string()),
                "http_status": pa.array(np.where(failed, 503, 200).astype(np.int32)),
                "attempts": pa.array(attempts.astype(np.int32)),
                "latency_ms": pa.array(np.where(reused, 0.0, latency)),
                "queued_ms": pa.array(np.zeros(n)),
                "response_id": pa.array([f"cmpl-{i}" for i in numbers.tolist()]),
                "request_hash": pa.array([f"{i:064x}" for i in numbers.tolist()]),
                "started_at": pa.array(finished - (latency * 1000).astype(np.int64)),
                "finished_at": pa.array(finished),
                "tier": pa.array(np.where(batch, BATCH, ONLINE).tolist()),
                "cost": pa.array(np.where(sent_usage, cost, np.nan), from_pandas=True),
            }
            table = pa.Table.from_arrays(
                [
                    columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
                    for f in schema
                ],
                schema=schema,
            )
            writer.write_table(table, row_group_size=CHUNK)
    return path


def _masked(values: np.ndarray, keep: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.int64), mask=~keep)


def _costs(
    prices: Prices,
    model: np.ndarray,
    finished: np.ndarray,
    batch: np.ndarray,
    prompt: np.ndarray,
    completion: np.ndarray,
    cached: np.ndarray,
    reasoning: np.ndarray,
) -> np.ndarray:
    """Each row's cost as a float: its tokens at the rates of its model, day and tier."""
    days = (finished // (86_400 * 1_000_000)).astype(np.int64)
    out = np.zeros(len(model))
    for name, price in prices.models.items():
        mine = model == name
        for day in np.unique(days[mine]):
            on = dt.date(1970, 1, 1) + dt.timedelta(days=int(day))
            rates = price.rates(on)
            here = mine & (days == day)
            amount = (
                float(rates.prompt_per_million) * (prompt[here] - cached[here])
                + float(rates.cached_prompt_per_million) * cached[here]
                + float(rates.completion_per_million) * (completion[here] - reasoning[here])
                + float(rates.reasoning_per_million) * reasoning[here]
            ) / 1e6
            off = 1 - float(rates.batch_discount)
            out[here] = np.where(batch[here], amount * off, amount)
    return out


if __name__ == "__main__":
    out, count, *rest = sys.argv[1:]
    write_output(Path(out), int(count), Path(rest[0]) if rest else PRICES)

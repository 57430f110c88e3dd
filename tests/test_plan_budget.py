"""Cost before and during a job: `batchrun plan` estimates, the max_cost budget."""

from __future__ import annotations

import re
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun.cli import main
from batchrun.config import load_job
from batchrun.engines.local import run_job
from batchrun.errors import BudgetReached, JobError
from batchrun.lifecycle import RunOptions
from batchrun.mock import MockConfig, serve
from batchrun.prices import load_prices
from batchrun.progress import Tally, status_text
from tests.conftest import REPO, make_job, tickets, write_jsonl

JOB = REPO / "jobs" / "summarize_tickets.toml"
PRICES = REPO / "jobs" / "prices.toml"
MODEL = "meta-llama/Llama-3.3-70B-Instruct"


def test_plan_estimates_the_sample_job_within_a_quarter(tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    runner = CliRunner()
    planned = runner.invoke(
        main, ["plan", str(JOB), "--mock", "--prices", str(PRICES), "--output", str(out)]
    )
    assert planned.exit_code == 0, planned.output
    text = planned.output
    estimate = int(re.search(r"prompt tokens ~([\d,]+)", text).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert "rows          200  (200 to send)" in text
    assert "Authorization: Bearer ***" in text
    low, high = re.search(r"cost +([\d.]+) \.\. ([\d.]+) USD", text).groups()  # type: ignore[union-attr]
    assert not out.exists() and not Path(f"{out}.partial").exists()  # plan writes nothing

    ran = runner.invoke(main, ["run", str(JOB), "--mock", "-q", "--output", str(out)])
    assert ran.exit_code == 0, ran.output
    table = pq.read_table(out)
    actual = sum(table.column("prompt_tokens").to_pylist())
    assert abs(estimate - actual) / actual < 0.25, (estimate, actual)
    price = load_prices(PRICES).price(MODEL)
    assert price is not None
    assert Decimal(low) == round(price.cost(estimate, 0), 4)
    assert Decimal(high) == round(price.cost(estimate, 200 * 120), 4)


def test_plan_fails_where_run_would_fail_before_sending(tmp_path: Path) -> None:
    runner = CliRunner()
    no_key = runner.invoke(main, ["plan", str(JOB), "--output", str(tmp_path / "o.parquet")])
    assert no_key.exit_code == 2 and "LLMTUNE_API_KEY" in no_key.output
    src = write_jsonl(tmp_path / "t.jsonl", tickets(3))
    bad_column = runner.invoke(
        main,
        [
            "plan",
            "--input",
            str(src),
            "--model",
            "m",
            "--prompt-template",
            "{nope}",
            "--mock",
            "--output",
            str(tmp_path / "o.parquet"),
        ],
    )
    assert (
        bad_column.exit_code == 2
        and "`nope`" in bad_column.output
        and "Traceback" not in bad_column.output
    )


def prices_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    # Expensive tokens, so a handful of rows reach the budget.
    path.write_text(
        'currency = "EUR"\n[models."m"]\nprompt_per_million = 1000\ncompletion_per_million = 2000\n'
    )
    return path


async def test_budget_stops_before_the_spend_passes_it_then_resumes(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", tickets(60))
    out = tmp_path / "o.parquet"
    prices = prices_file(tmp_path)
    price = load_prices(prices).price("m")
    assert price is not None
    max_cost = 0.5
    async with serve(MockConfig(latency_s=0.01)) as server:
        job = make_job(
            server.base_url,
            src,
            out,
            model="m",
            prompt_template="{ticket}",
            request_timeout_s=None,
            max_tokens=20,
            concurrency=8,
            prices=str(prices),
            max_cost=max_cost,
        )
        with pytest.raises(BudgetReached) as stopped:
            await run_job(job, RunOptions(progress=False))
        assert stopped.value.exit_code == 4
        assert "max_cost=0.5 EUR" in str(stopped.value)
        records = [
            orjson.loads(line)
            for line in (tmp_path / "o.parquet.partial" / "journal.jsonl").read_bytes().splitlines()
        ]
        spent = sum(
            price.cost(r["prompt_tokens"] or 0, r["completion_tokens"] or 0) for r in records
        )
        assert 0 < len(records) < 60
        assert spent <= Decimal("0.5"), spent
        # Every request the server answered is in the journal: nothing paid is lost.
        assert server.stats.requests == len(records)

        more = replace(job, max_cost=100.0)
        result = await run_job(more, RunOptions(progress=False))
    assert result.ok == 60 and result.requests == 60 - len(records)
    assert result.cost is not None
    total = sum(
        price.cost(p or 0, c or 0)
        for p, c in zip(
            pq.read_table(out).column("prompt_tokens").to_pylist(),
            pq.read_table(out).column("completion_tokens").to_pylist(),
            strict=True,
        )
    )
    assert result.cost == total  # the spend of all runs, to the last digit


def test_budget_needs_prices_and_a_priced_model(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", tickets(2))
    with pytest.raises(JobError, match="no `prices` file"):
        load_job(
            None, {"input": str(src), "model": "m", "prompt_template": "{ticket}", "max_cost": 1}
        )
    job = make_job(
        None,
        src,
        tmp_path / "o.parquet",
        model="other",
        prompt_template="{ticket}",
        request_timeout_s=None,
        max_cost=1,
        prices=str(prices_file(tmp_path)),
    )
    with pytest.raises(JobError, match="no price for model other"):
        import asyncio

        asyncio.run(run_job(job, RunOptions(progress=False, mock=True)))


def test_progress_line_shows_the_spend() -> None:
    tally = Tally(total=10, ok=4, cost=Decimal("0.1234"), currency="USD")
    assert "spent 0.12 USD" in status_text(tally)
    assert "spent" not in status_text(Tally(total=10))

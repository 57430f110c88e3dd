"""Costs that match the invoice: cached and reasoning tokens, batch discounts,
dated prices, a cost per row, the budget and the summary.

Expected costs are computed here from the token columns and rates written in
the test (Decimal arithmetic on plain numbers), never with ``batchrun.prices``,
so a wrong cost function cannot agree with itself.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from click.testing import CliRunner

from batchrun.cli import main
from batchrun.engines.local import run_job
from batchrun.errors import JobError
from batchrun.lifecycle import RunOptions
from batchrun.limits import CostBudget
from batchrun.mock import MockConfig, serve
from batchrun.payload import MAX_USAGE_TOKENS, parse_completion
from batchrun.prices import load_prices
from tests.conftest import make_job, run_app, tickets, write_jsonl

MILLION = Decimal(1_000_000)
CENT = Decimal("0.01")
# Dear rates, so a few hundred rows cost dollars and "to the cent" means something.
RATES = {
    "prompt": Decimal("3000"),
    "completion": Decimal("12000"),
    "cached": Decimal("750"),
    "reasoning": Decimal("15000"),
}
PRICES = """currency = "EUR"
[models."m"]
prompt_per_million = 3000
completion_per_million = 12000
cached_prompt_per_million = 750
reasoning_per_million = 15000
[[models."m".since]]
date = 2099-01-01            # not yet in force: rows finishing now keep the rates above
prompt_per_million = 1
"""


def expected_row_cost(row: dict[str, Any], rates: dict[str, Decimal] = RATES) -> Decimal:
    """The invoice's formula, written out."""
    prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
    cached, reasoning = row["cached_tokens"] or 0, row["reasoning_tokens"] or 0
    return (
        (prompt - cached) * rates["prompt"]
        + cached * rates["cached"]
        + (completion - reasoning) * rates["completion"]
        + reasoning * rates["reasoning"]
    ) / MILLION


def usage_of(**usage: Any) -> Any:
    return parse_completion({"choices": [{"message": {"content": "x"}}], "usage": usage})


# ---- usage details --------------------------------------------------------------------


def test_cached_and_reasoning_tokens_are_read_from_the_openai_shape() -> None:
    c = usage_of(
        prompt_tokens=100,
        completion_tokens=50,
        total_tokens=150,
        prompt_tokens_details={"cached_tokens": 64, "audio_tokens": 0},
        completion_tokens_details={"reasoning_tokens": 30},
    )
    assert (c.prompt_tokens, c.cached_tokens, c.completion_tokens, c.reasoning_tokens) == (
        100,
        64,
        50,
        30,
    )
    assert c.usage_problem is None


def test_cache_read_input_tokens_counts_as_cached() -> None:
    c = usage_of(prompt_tokens=100, completion_tokens=5, cache_read_input_tokens=80)
    assert c.cached_tokens == 80 and c.reasoning_tokens is None


def test_details_the_server_did_not_send_are_null_and_zero_is_zero() -> None:
    c = usage_of(prompt_tokens=10, completion_tokens=5)
    assert c.cached_tokens is None and c.reasoning_tokens is None
    c = usage_of(
        prompt_tokens=10,
        completion_tokens=5,
        prompt_tokens_details={"cached_tokens": 0},
        completion_tokens_details=None,
    )
    assert c.cached_tokens == 0 and c.reasoning_tokens is None


@pytest.mark.parametrize(
    ("details", "problem"),
    [
        ({"prompt_tokens_details": {"cached_tokens": -1}}, "cached_tokens = -1 is not a possible"),
        ({"prompt_tokens_details": {"cached_tokens": 1.5}}, "is not a possible count"),
        ({"prompt_tokens_details": {"cached_tokens": True}}, "is not a possible count"),
        ({"prompt_tokens_details": {"cached_tokens": "64"}}, "is not a possible count"),
        (
            {"prompt_tokens_details": {"cached_tokens": MAX_USAGE_TOKENS + 1}},
            "is not a possible count",
        ),
        ({"prompt_tokens_details": {"cached_tokens": 101}}, "is more than usage.prompt_tokens"),
        (
            {"completion_tokens_details": {"reasoning_tokens": 51}},
            "reasoning_tokens = 51 is more than usage.completion_tokens = 50",
        ),
        ({"cache_read_input_tokens": -5}, "cache_read_input_tokens = -5"),
    ],
)
def test_an_impossible_detail_is_missing_and_the_counts_stay(
    details: dict[str, Any], problem: str
) -> None:
    c = usage_of(prompt_tokens=100, completion_tokens=50, **details)
    assert c.prompt_tokens == 100 and c.completion_tokens == 50
    assert c.cached_tokens is None and c.reasoning_tokens is None
    assert c.usage_problem is not None and problem in c.usage_problem


def test_details_without_the_count_they_belong_to_are_dropped() -> None:
    c = usage_of(completion_tokens=5, prompt_tokens_details={"cached_tokens": 3})
    assert c.cached_tokens is None
    assert "comes without usage.prompt_tokens" in (c.usage_problem or "")
    # An impossible main count drops the whole usage, details with it.
    c = usage_of(prompt_tokens=-1, completion_tokens=5, prompt_tokens_details={"cached_tokens": 3})
    assert (c.prompt_tokens, c.cached_tokens) == (None, None)
    assert "prompt_tokens = -1" in (c.usage_problem or "")


# ---- prices -------------------------------------------------------------------------------


def write_prices(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    return path


def test_cached_and_reasoning_rates_default_to_the_prompt_and_completion_rates(
    tmp_path: Path,
) -> None:
    prices = load_prices(
        write_prices(
            tmp_path,
            '[models."a"]\nprompt_per_million = 2\ncompletion_per_million = 8\n'
            "[[models.a.since]]\ndate = 2026-03-15\nprompt_per_million = 4\n",
        )
    )
    price = prices.price("a")
    assert price is not None
    before, after = price.rates(dt.date(2026, 3, 14)), price.rates(dt.date(2026, 3, 15))
    assert (before.cached_prompt_per_million, before.reasoning_per_million) == (2, 8)
    # A cached rate never given follows the prompt rate in force.
    assert (after.prompt_per_million, after.cached_prompt_per_million) == (4, 4)
    assert after.completion_per_million == 8


def test_the_contract_discount_and_the_batch_discount(tmp_path: Path) -> None:
    prices = load_prices(
        write_prices(
            tmp_path,
            "discount = 0.1\nbatch_discount = 0.5\n"
            '[models."a"]\nprompt_per_million = 10\ncompletion_per_million = 20\n'
            '[models."b"]\nprompt_per_million = 10\ncompletion_per_million = 20\n'
            "batch_discount = 0.25\ndiscount = 0\n",
        )
    )
    tokens = (1000, 100)
    assert prices.cost("a", *tokens) == (Decimal(9) * 1000 + Decimal(18) * 100) / MILLION
    assert prices.cost("a", *tokens, tier="batch") == prices.cost("a", *tokens) * Decimal("0.5")
    assert prices.cost("b", *tokens, tier="batch") == (
        (Decimal(10) * 1000 + Decimal(20) * 100) / MILLION * Decimal("0.75")
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."a"]\nprompt_per_million = 1\ncompletion_per_million = 1\ncache = 1\n', "cache"),
        ("batch_discount = 1.5\n", "a discount is a fraction from 0 to 1"),
        (
            '[models."a"]\nprompt_per_million = 1\ncompletion_per_million = 1\n'
            "reasoning_per_million = -1\n",
            "at least 0",
        ),
        (
            '[models."a"]\nprompt_per_million = 1\ncompletion_per_million = 1\n'
            "[[models.a.since]]\nprompt_per_million = 2\n",
            "has no `date`",
        ),
        (
            '[models."a"]\nprompt_per_million = 1\ncompletion_per_million = 1\n'
            "[[models.a.since]]\ndate = 2026-03-15T00:00:00Z\nprompt_per_million = 2\n",
            "give a date, like 2026-03-15",
        ),
        (
            '[models."a"]\nprompt_per_million = 1\ncompletion_per_million = 1\n'
            '[[models.a.since]]\ndate = "March"\n',
            "must be a date like 2026-03-15",
        ),
        (
            '[models."a"]\nprompt_per_million = 1\ncompletion_per_million = 1\n'
            "[[models.a.since]]\ndate = 2026-04-01\n[[models.a.since]]\ndate = 2026-03-01\n",
            "list the [[since]] tables in date order",
        ),
        (
            '[models."a"]\nprompt_per_million = 1\ncompletion_per_million = 1\n'
            "[[models.a.since]]\ndate = 2026-04-01\nprompt = 2\n",
            "Unknown key prompt in [[since]] table 1",
        ),
        (
            '[models."a"]\nprompt_per_million = 1\ncompletion_per_million = 1\nsince = 3\n',
            "must be [[since]] tables",
        ),
    ],
)
def test_a_bad_prices_file_names_the_key_and_the_fix(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(JobError) as error:
        load_prices(write_prices(tmp_path, text))
    assert message in str(error.value)


def test_the_example_prices_file_parses_with_its_price_change() -> None:
    from tests.conftest import REPO

    prices = load_prices(REPO / "jobs" / "prices.toml")
    r1 = prices.price("deepseek-ai/DeepSeek-R1")
    assert r1 is not None and r1.changes == (dt.date(2026, 3, 15),)
    assert r1.rates(dt.date(2026, 3, 14)).prompt_per_million == Decimal("0.55")
    assert r1.rates(dt.date(2026, 3, 15)).cached_prompt_per_million == Decimal("0.125")
    assert r1.rates(dt.date(2026, 3, 15)).batch_discount == Decimal("0.5")


def test_the_budget_settles_at_the_cached_and_reasoning_rates(tmp_path: Path) -> None:
    price = load_prices(write_prices(tmp_path, PRICES)).price("m")
    assert price is not None
    budget = CostBudget(Decimal(100), price, max_tokens=10)
    worst = budget.reserve(100)
    # The worst case takes the dearest of each pair of rates.
    assert worst == (100 * RATES["prompt"] + 10 * RATES["reasoning"]) / MILLION
    answer = usage_of(
        prompt_tokens=100,
        completion_tokens=10,
        prompt_tokens_details={"cached_tokens": 60},
        completion_tokens_details={"reasoning_tokens": 4},
    )
    assert worst is not None
    budget.settle(worst, answer)
    row = {"prompt_tokens": 100, "completion_tokens": 10, "cached_tokens": 60}
    assert budget.spent == expected_row_cost({**row, "reasoning_tokens": 4})
    assert budget.reserved == 0


# ---- the cost column ---------------------------------------------------------------------


def _answer(n: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped answer whose usage varies by request: details, none, another shape."""
    prompt, completion = 200 + n, 40 + n
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if n % 4 == 0:
        usage["prompt_tokens_details"] = {"cached_tokens": 128}
        usage["completion_tokens_details"] = {"reasoning_tokens": 16 + n % 7}
    elif n % 4 == 1:
        usage["cache_read_input_tokens"] = 64
    elif n % 4 == 2:
        usage["completion_tokens_details"] = {"reasoning_tokens": 0}
    # n % 4 == 3: the server says nothing of caches or reasoning
    return {
        "id": f"chatcmpl-{n}",
        "model": body["model"],
        "choices": [{"message": {"content": f"answer {n}"}, "finish_reason": "stop"}],
        "usage": usage,
    }


def details_app() -> web.Application:
    count = 0

    async def complete(request: web.Request) -> web.Response:
        nonlocal count
        body = await request.json()
        count += 1
        return web.json_response(_answer(count, body))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    return app


async def test_a_run_writes_cached_reasoning_tier_and_cost_columns(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", tickets(40))
    out = tmp_path / "o.parquet"
    prices = write_prices(tmp_path, PRICES)
    async with run_app(details_app()) as base_url:
        job = make_job(base_url, src, out, model="m", prices=str(prices), concurrency=4)
        result = await run_job(job, RunOptions(progress=False))
    table = pq.read_table(out)
    for name, kind in (("cached_tokens", "int64"), ("reasoning_tokens", "int64")):
        assert str(table.schema.field(name).type) == kind
    assert str(table.schema.field("cost").type) == "double"
    rows = table.to_pylist()
    assert {r["tier"] for r in rows} == {"online"}
    assert {r["cached_tokens"] for r in rows} == {128, 64, None}
    assert None in {r["reasoning_tokens"] for r in rows} and 0 in {
        r["reasoning_tokens"] for r in rows
    }
    for r in rows:
        assert r["cost"] == float(expected_row_cost(r)), r
    total = sum(expected_row_cost(r) for r in rows)
    assert total > 10  # dollars
    assert result.cost == total  # the summary is the column's sum, exactly
    assert result.cached_tokens == sum(r["cached_tokens"] or 0 for r in rows)
    assert result.reasoning_tokens == sum(r["reasoning_tokens"] or 0 for r in rows)
    assert "(cached" in result.summary() and "(reasoning" in result.summary()

    # batchrun report agrees: its total, the sum of the column and the formula.
    report = CliRunner().invoke(
        main, ["report", str(out), "--prices", str(prices), "--format", "json"]
    )
    assert report.exit_code == 0, report.output
    data = json.loads(report.stdout, parse_float=Decimal)["total"]
    assert data["cost"] == total
    assert Decimal(str(sum(r["cost"] for r in rows))).quantize(CENT) == total.quantize(CENT)
    assert data["cached_tokens"] == result.cached_tokens
    assert data["reasoning_tokens"] == result.reasoning_tokens


async def test_streamed_answers_keep_the_usage_details(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", tickets(6))
    out = tmp_path / "o.parquet"
    async with serve(MockConfig(cached_share=0.5, reasoning_tokens=9)) as server:
        job = make_job(
            server.base_url,
            src,
            out,
            stream=True,
            prices=str(write_prices(tmp_path, PRICES)),
            model="m",
        )
        await run_job(job, RunOptions(progress=False))
    for r in pq.read_table(out).to_pylist():
        assert r["reasoning_tokens"] == 9 and r["completion_tokens"] > 9
        assert r["cached_tokens"] == r["prompt_tokens"] // 2
        assert r["cost"] == float(expected_row_cost(r))


async def test_without_prices_there_is_no_cost_column(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", tickets(3))
    out = tmp_path / "o.parquet"
    async with serve(MockConfig()) as server:
        result = await run_job(make_job(server.base_url, src, out), RunOptions(progress=False))
    names = pq.read_schema(out).names
    assert "cost" not in names and {"cached_tokens", "reasoning_tokens", "tier"} <= set(names)
    rows = pq.read_table(out).to_pylist()
    # The mock says nothing of caches by default: null, not 0.
    assert all(r["cached_tokens"] is None and r["reasoning_tokens"] is None for r in rows)
    assert result.cost is None


async def test_reused_rows_are_not_costed_and_a_rerun_with_prices_fills_the_column(
    tmp_path: Path,
) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", tickets(5))
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    prices = write_prices(tmp_path, PRICES)
    async with serve(MockConfig(cached_share=0.25)) as server:
        job = make_job(server.base_url, src, first, model="m")
        await run_job(job, RunOptions(progress=False))
        assert "cost" not in pq.read_schema(first).names
        # The same finished job again, now with prices: nothing sent, every row costed.
        again = await run_job(replace(job, prices=str(prices)), RunOptions(progress=False))
        assert again.requests == 0
        rows = pq.read_table(first).to_pylist()
        assert all(r["cost"] == float(expected_row_cost(r)) for r in rows)
        assert again.cost == sum(expected_row_cost(r) for r in rows)
        # Reused rows (attempts 0) cost nothing in the run that reused them.
        reused = await run_job(
            replace(job, output=second, prices=str(prices)),
            RunOptions(progress=False, reuse=(first,), mock=False),
        )
    assert reused.reused == 5
    rows = pq.read_table(second).to_pylist()
    assert all(r["attempts"] == 0 and r["cost"] is None for r in rows)
    assert all(r["tier"] == "online" for r in rows)
    assert reused.cost == 0


async def test_retry_failed_replaces_a_rows_cost_in_the_summary(tmp_path: Path) -> None:
    """A failed row's record is replaced by its retry's: the summary, like the
    column, counts the last record of each row (the budget still counts both:
    both were paid)."""
    src = write_jsonl(tmp_path / "t.jsonl", tickets(4))
    out = tmp_path / "o.parquet"
    prices = write_prices(tmp_path, PRICES)
    async with serve(MockConfig(fail_first=1, fail_first_kind="500")) as server:
        job = make_job(server.base_url, src, out, model="m", prices=str(prices), max_attempts=1)
        first = await run_job(job, RunOptions(progress=False))
        assert first.failed == 1
        # Make the failed row one that was paid (as a re-ask before the error would be).
        table = pq.read_table(out)
        rows = table.to_pylist()
        failed = next(r for r in rows if r["status"] == "error")
        failed.update(prompt_tokens=1000, completion_tokens=100, total_tokens=1100)
        failed["cost"] = float(expected_row_cost(failed))
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out)
        second = await run_job(job, RunOptions(progress=False, retry_failed=True))
    rows = pq.read_table(out).to_pylist()
    assert second.failed == 0 and second.requests == 1
    assert second.cost == sum(expected_row_cost(r) for r in rows)
    assert Decimal(str(sum(r["cost"] for r in rows))).quantize(CENT) == second.cost.quantize(CENT)


@pytest.mark.parametrize(
    ("field", "value"), [("cached_share", 1.5), ("cached_share", -0.1), ("reasoning_tokens", -1)]
)
def test_the_mock_refuses_an_impossible_usage_detail(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        MockConfig(**{field: value})


def test_mock_server_flags_set_the_usage_details() -> None:
    from batchrun.cli import _mock_config

    command = main.commands["mock-server"]
    args = ["--cached-share", "0.25", "--reasoning-tokens", "12"]
    config = _mock_config(command.make_context("mock-server", args).params)
    assert (config.cached_share, config.reasoning_tokens) == (0.25, 12)

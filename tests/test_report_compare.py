"""batchrun report over cached, reasoning, batch and dated prices; each paid
answer counted once; night over night with --compare and --fail-if.

Expected costs are computed from the columns with rates written here, not with
``batchrun.prices``.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchrun.cli import main
from batchrun.engines.local import run_job
from batchrun.lifecycle import RunOptions
from batchrun.mock import MockConfig, serve
from batchrun.outputs import COST_FIELD, output_schema
from tests.conftest import make_job, tickets, write_jsonl
from tests.test_report import KEEP, out_row

MILLION = Decimal(1_000_000)
CENT = Decimal("0.01")
R1 = "deepseek-ai/DeepSeek-R1"
CHANGE = datetime(2026, 3, 15, tzinfo=UTC)
PRICES = f"""currency = "USD"
batch_discount = 0.4
[models."{R1}"]
prompt_per_million = 550
completion_per_million = 2190
cached_prompt_per_million = 140
reasoning_per_million = 2500
batch_discount = 0.5
[[models."{R1}".since]]
date = 2026-03-15
prompt_per_million = 500
cached_prompt_per_million = 125
[models."small"]
prompt_per_million = 100
completion_per_million = 150
"""
# The same rates, written out: (prompt, cached, completion, reasoning, batch discount).
RATES = {
    (R1, "before"): (Decimal(550), Decimal(140), Decimal(2190), Decimal(2500), Decimal("0.5")),
    (R1, "after"): (Decimal(500), Decimal(125), Decimal(2190), Decimal(2500), Decimal("0.5")),
    ("small", "before"): (Decimal(100), Decimal(100), Decimal(150), Decimal(150), Decimal("0.4")),
    ("small", "after"): (Decimal(100), Decimal(100), Decimal(150), Decimal(150), Decimal("0.4")),
}


def expected_cost(row: dict[str, Any]) -> Decimal | None:
    """The invoice's formula at the rates in force on the row's finished_at."""
    if row["attempts"] == 0:
        return None
    period = "after" if row["finished_at"] >= CHANGE else "before"
    prompt_rate, cached_rate, completion_rate, reasoning_rate, discount = RATES[
        (row["model"], period)
    ]
    prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
    cached, reasoning = row["cached_tokens"] or 0, row["reasoning_tokens"] or 0
    cost = (
        (prompt - cached) * prompt_rate
        + cached * cached_rate
        + (completion - reasoning) * completion_rate
        + reasoning * reasoning_rate
    ) / MILLION
    return cost * (1 - discount) if row["tier"] == "batch" else cost


def total_cost(rows: list[dict[str, Any]]) -> Decimal:
    return sum((c for r in rows if (c := expected_cost(r)) is not None), Decimal(0))


def month_rows() -> list[dict[str, Any]]:
    """A month of nightly rows: two models, cached and reasoning tokens (and
    nulls), a quarter answered by a provider batch, the price changing mid-month."""
    rows = []
    for i in range(60):
        day = datetime(2026, 3, 1, 2, 0, tzinfo=UTC) + timedelta(days=i % 30, seconds=i)
        prompt, completion = 10_000 + 37 * i, 2_000 + 11 * i
        row = out_row(
            i,
            model=R1 if i % 3 else "small",
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cached_tokens=None if i % 5 == 0 else (prompt * (i % 4)) // 4,
            reasoning_tokens=None if i % 7 == 0 else completion // 3,
            tier="batch" if i % 4 == 0 else "online",
            finished_at=day,
            started_at=day - timedelta(seconds=2),
        )
        rows.append(row)
    rows.append(out_row(60, attempts=0, model=R1, tier="online", finished_at=CHANGE))  # reused
    for r in rows:
        cost = expected_cost(r)
        r["cost"] = float(cost) if cost is not None else None
    return rows


def write_output(path: Path, rows: list[dict[str, Any]], run_id: str = "night") -> Path:
    """An output as `batchrun run` writes it with a prices file (the cost column)."""
    schema = output_schema(KEEP, {"run_id": run_id}, [COST_FIELD])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def report(*args: str) -> Result:
    return CliRunner().invoke(main, ["report", *args], catch_exceptions=False)


def report_json(*args: str, code: int = 0) -> dict[str, Any]:
    result = report(*args, "--format", "json")
    assert result.exit_code == code, result.output
    data: dict[str, Any] = json.loads(result.stdout, parse_float=Decimal)
    return data


def prices_file(tmp_path: Path) -> str:
    path = tmp_path / "prices.toml"
    path.write_text(PRICES)
    return str(path)


# ---- prices -------------------------------------------------------------------------------


def test_a_month_is_priced_at_each_days_rates_with_cache_reasoning_and_batch(
    tmp_path: Path,
) -> None:
    rows = month_rows()
    path = write_output(tmp_path / "march.parquet", rows)
    data = report_json(str(path), "--prices", prices_file(tmp_path), "--by", "tier,day")
    expected = total_cost(rows)
    total = data["total"]
    assert expected > 100
    assert total["cost"] == expected  # exact
    # the sum of the cost column, to the cent
    column = sum(r["cost"] for r in rows if r["cost"] is not None)
    assert Decimal(str(column)).quantize(CENT) == total["cost"].quantize(CENT)
    assert total["cached_tokens"] == sum(r["cached_tokens"] or 0 for r in rows[:60])
    assert total["reasoning_tokens"] == sum(r["reasoning_tokens"] or 0 for r in rows[:60])
    assert sum(g["cost"] for g in data["groups"]) == expected
    for g in data["groups"]:
        mine = [
            r
            for r in rows
            if r["tier"] == g["tier"] and r["finished_at"].date().isoformat() == g["day"]
        ]
        assert g["cost"] == total_cost(mine)
    # What the batch saved: its rows priced online, less what they cost as batch rows.
    batch = [r for r in rows if r["tier"] == "batch"]
    as_online = total_cost([{**r, "tier": "online"} for r in batch])
    assert data["batch_saved"] == as_online - total_cost(batch) > 0
    table = report(str(path), "--prices", prices_file(tmp_path)).output
    assert f"that saved {data['batch_saved']:.4f} USD against sending them online" in table
    page = tmp_path / "march.html"
    report(str(path), "--prices", prices_file(tmp_path), "--html", str(page))
    assert "the batch saved" in page.read_text()


def test_the_price_change_and_the_batch_discount_both_matter(tmp_path: Path) -> None:
    """Priced without them (one rate, no discount), the total would differ."""
    rows = month_rows()
    path = write_output(tmp_path / "march.parquet", rows)
    flat = tmp_path / "flat.toml"
    flat.write_text(
        f'[models."{R1}"]\nprompt_per_million = 550\ncompletion_per_million = 2190\n'
        "cached_prompt_per_million = 140\nreasoning_per_million = 2500\n"
        '[models."small"]\nprompt_per_million = 100\ncompletion_per_million = 150\n'
    )
    dated = report_json(str(path), "--prices", prices_file(tmp_path))["total"]["cost"]
    undated = report_json(str(path), "--prices", str(flat))["total"]["cost"]
    assert undated - dated > 10


def test_the_table_and_html_show_cached_reasoning_and_tiers(tmp_path: Path) -> None:
    path = write_output(tmp_path / "march.parquet", month_rows())
    prices = prices_file(tmp_path)
    text = report(str(path), "--prices", prices).stdout
    assert "cached tokens" in text and "reasoning tokens" in text
    assert "Batch: 15 rows were answered by a provider batch" in text
    page = tmp_path / "r.html"
    assert report(str(path), "--prices", prices, "--html", str(page)).exit_code == 0
    html = page.read_text()
    for label in ("Cached share", "Reasoning share", "Tiers"):
        assert f'<div class="label">{label}</div>' in html
    assert "batch 15" in html and "online 46" in html


# ---- each paid answer once ---------------------------------------------------------------


async def test_shard_parts_beside_their_merged_file_count_once(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "t.jsonl", tickets(30))
    folder = tmp_path / "nightly"
    folder.mkdir()
    prices = tmp_path / "prices.toml"
    prices.write_text(
        '[models."test-model"]\nprompt_per_million = 300\ncompletion_per_million = 900\n'
    )
    # Some rows fail with no answer: they have no response_id, and match by run and row.
    config = MockConfig(fault_rate=0.2, faults=("500",), cached_share=0.3, reasoning_tokens=5)
    async with serve(config) as server:
        for k in range(3):
            job = make_job(
                server.base_url,
                src,
                folder / f"part-{k}.parquet",
                max_attempts=1,
                prices=str(prices),
            )
            await run_job(job, RunOptions(progress=False, shard=(k, 3)))
    merged = CliRunner().invoke(
        main, ["merge", str(folder / "part-*.parquet"), "-o", str(folder / "all.parquet"), "-q"]
    )
    assert merged.exit_code == 0, merged.output
    parts = [pq.read_table(folder / f"part-{k}.parquet") for k in range(3)]
    assert any(None in p.column("response_id").to_pylist() for p in parts)

    alone = report_json(str(folder / "all.parquet"), "--prices", str(prices))
    together = report_json(str(folder), "--prices", str(prices))
    assert together["total"] == alone["total"]
    assert alone["duplicates_skipped"] == 0
    assert together["duplicates_skipped"] == 30
    assert together["total"]["rows"] == 30
    column = sum(c for p in parts for c in p.column("cost").to_pylist() if c is not None)
    assert Decimal(str(column)).quantize(CENT) == alone["total"]["cost"].quantize(CENT)
    text = report(str(folder), "--prices", str(prices)).stdout
    assert "Duplicates: 30 rows were skipped" in text
    # Parts named after the merged file: the parts are kept, the merged rows skipped.
    files = [str(folder / f"part-{k}.parquet") for k in range(3)]
    assert report_json(*files, str(folder / "all.parquet"))["total"]["rows"] == 30


def test_a_copy_counts_once_but_reused_rows_are_never_taken_for_their_answers(
    tmp_path: Path,
) -> None:
    paid = [out_row(i, response_id=f"r-{i}", cached_tokens=None) for i in range(4)]
    night1 = write_output(tmp_path / "n1.parquet", paid, run_id="run-1")
    shutil.copy(night1, tmp_path / "n1-copy.parquet")
    # Night 2 reused night 1's answers: same response_id and finished_at, attempts 0.
    night2 = write_output(
        tmp_path / "n2.parquet", [{**r, "attempts": 0} for r in paid], run_id="run-2"
    )
    data = report_json(str(night1), str(tmp_path / "n1-copy.parquet"), str(night2))
    assert data["duplicates_skipped"] == 4
    assert data["total"]["rows"] == 8 and data["total"]["reused"] == 4
    # Two servers (or nights) that both answer with the same id are not merged either.
    other = [{**r, "finished_at": r["finished_at"] + timedelta(days=1)} for r in paid]
    night3 = write_output(tmp_path / "n3.parquet", other, run_id="run-3")
    assert report_json(str(night1), str(night3))["duplicates_skipped"] == 0


# ---- night over night ---------------------------------------------------------------------


def nights(tmp_path: Path, tonight_factor: float = 1.3) -> tuple[str, str]:
    """Last night and tonight: tonight's rows use ``tonight_factor`` times the
    completion tokens, and one of them failed."""
    last = [out_row(i, cached_tokens=500, reasoning_tokens=None) for i in range(20)]
    tonight = [
        out_row(
            i,
            completion_tokens=int((100 + i) * tonight_factor),
            total_tokens=1000 + i + int((100 + i) * tonight_factor),
            cached_tokens=800,
            reasoning_tokens=None,
            finished_at=datetime(2026, 3, 2, 1, tzinfo=UTC),
        )
        for i in range(20)
    ]
    tonight[3].update(status="error", error="HTTP 500", completion=None)
    a = write_output(tmp_path / "last.parquet", last, run_id="last")
    b = write_output(tmp_path / "tonight.parquet", tonight, run_id="tonight")
    return str(a), str(b)


def big_prices(tmp_path: Path) -> str:
    path = tmp_path / "big.toml"
    path.write_text(
        '[models."meta-llama/Llama-3.3-70B-Instruct"]\nprompt_per_million = 0.60\n'
        "completion_per_million = 30\ncached_prompt_per_million = 0.30\n"
    )
    return str(path)


def test_compare_shows_the_figures_side_by_side_with_the_change(tmp_path: Path) -> None:
    last, tonight = nights(tmp_path)
    prices = big_prices(tmp_path)
    data = report_json(tonight, "--compare", last, "--prices", prices)
    figures = data["compare"]["figures"]
    assert list(figures) == [
        "rows",
        "failure_rate",
        "invalid_rate",
        "tokens_per_row_mean",
        "tokens_per_row_p95",
        "cached_share",
        "reasoning_share",
        "cost",
        "cost_per_row",
        "latency_ms_p50",
        "latency_ms_p95",
    ]
    assert figures["rows"] == {"baseline": 20, "current": 20, "change_percent": 0}
    assert figures["failure_rate"]["current"] == Decimal("0.05")
    assert figures["failure_rate"]["change_percent"] is None  # a rise from 0: infinite
    cost_before, cost_now = figures["cost"]["baseline"], figures["cost"]["current"]
    assert cost_before == report_json(last, "--prices", prices)["total"]["cost"]
    assert cost_now == data["total"]["cost"]
    change = float(figures["cost_per_row"]["change_percent"])
    assert change == pytest.approx(float((cost_now - cost_before) / cost_before * 100), rel=1e-5)
    assert float(figures["cached_share"]["baseline"]) == pytest.approx(
        500 * 20 / sum(1000 + i for i in range(20)), rel=1e-5
    )
    assert data["compare"]["files"] == [last]
    assert data["checks"] == []

    text = report(tonight, "--compare", last, "--prices", prices).stdout
    assert f"compared with 1 file ({last}), 20 rows" in text
    line = next(x for x in text.splitlines() if x.startswith("cost/row USD"))
    assert line.split()[-1] == f"{change:+.1f}%"
    markdown = report(tonight, "--compare", last, "--prices", prices, "--format", "markdown")
    assert "| figure | baseline | current | change |" in markdown.stdout
    assert "| failure rate | 0.00% | 5.00% | +inf% |" in markdown.stdout


def test_fail_if_exits_5_when_a_bound_is_crossed_and_0_when_not(tmp_path: Path) -> None:
    last, tonight = nights(tmp_path, tonight_factor=1.5)
    prices = big_prices(tmp_path)
    base = [tonight, "--compare", last, "--prices", prices]

    crossed = report(*base, "--fail-if", "cost_per_row>+20%", "--fail-if", "rows<-10%")
    assert crossed.exit_code == 5, crossed.output
    assert "batchrun report: --fail-if cost_per_row>+20%: cost_per_row changed +" in crossed.stderr
    assert "rows<-10%" not in crossed.stderr  # that one holds
    assert "fail-if cost_per_row>+20%: CROSSED" in crossed.stdout
    assert "fail-if rows<-10%: ok" in crossed.stdout

    held = report(*base, "--fail-if", "cost_per_row>+80%", "--fail-if", "failure_rate>0.05")
    assert held.exit_code == 0, held.output
    assert held.stderr == ""

    absolute = report(tonight, "--fail-if", "failure_rate>=0.05")
    assert absolute.exit_code == 5
    assert "failure_rate>=0.05: failure_rate is 5.00%" in absolute.stderr

    data = report_json(*base, "--fail-if", "cost_per_row>+20%", "--fail-if", "rows<-10%", code=5)
    assert [(c["check"], c["crossed"]) for c in data["checks"]] == [
        ("cost_per_row>+20%", True),
        ("rows<-10%", False),
    ]
    assert data["checks"][0]["reason"].startswith("cost_per_row changed +")

    page = tmp_path / "r.html"
    result = report(*base, "--fail-if", "cost_per_row>+20%", "--html", str(page))
    assert result.exit_code == 5
    html = page.read_text()
    assert '<div class="table-wrap" id="compare">' in html
    assert '<li class="crossed">fail-if cost_per_row&gt;+20%: CROSSED' in html


def test_an_unknown_figure_crosses_its_check(tmp_path: Path) -> None:
    last, tonight = nights(tmp_path)
    # No prices: the cost is unknown, so a check on it cannot pass.
    result = report(tonight, "--compare", last, "--fail-if", "cost>+20%")
    assert result.exit_code == 5
    assert "cost is unknown in --compare's outputs" in result.stderr


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ("cost_per_row>>20%", "it is not FIGURE OP BOUND"),
        ("cost per row > 20%", "it is not FIGURE OP BOUND"),
        ("price>+20%", "'price' is not a figure of the report"),
        ("cost_per_row>lots", "it is not FIGURE OP BOUND"),
        ("cost_per_row=+20%", "it is not FIGURE OP BOUND"),
    ],
)
def test_a_bad_fail_if_is_a_clear_error(tmp_path: Path, check: str, message: str) -> None:
    last, tonight = nights(tmp_path)
    result = report(tonight, "--compare", last, "--fail-if", check)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Figures: rows, failure_rate" in result.stderr
    assert result.stdout == ""


def test_a_change_in_percent_needs_compare(tmp_path: Path) -> None:
    _, tonight = nights(tmp_path)
    result = report(tonight, "--fail-if", "cost_per_row>+20%")
    assert result.exit_code == 2
    assert "give the outputs to compare with (--compare LAST_NIGHT)" in result.stderr


def test_outputs_from_before_the_detail_columns_still_report(tmp_path: Path) -> None:
    """An output written before cached_tokens, reasoning_tokens, tier and cost
    existed: no cached or reasoning tokens, every row online."""
    rows = [out_row(i, model="small", cached_tokens=None, reasoning_tokens=None) for i in range(5)]
    old_columns = [
        f
        for f in output_schema(KEEP, {"run_id": "old"})
        if f.name not in ("cached_tokens", "reasoning_tokens", "tier")
    ]
    old = tmp_path / "old.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            rows, schema=pa.schema(old_columns, metadata={b"batchrun": b'{"run_id": "old"}'})
        ),
        old,
    )
    data = report_json(str(old), "--prices", prices_file(tmp_path), "--by", "tier")
    assert [(g["tier"], g["rows"]) for g in data["groups"]] == [("online", 5)]
    assert data["total"]["cached_tokens"] == 0
    assert data["total"]["cost"] == total_cost([{**r, "tier": "online"} for r in rows])

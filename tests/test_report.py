"""batchrun report: totals against the usage columns, pricing, groups, formats, HTML.

Outputs are written here with pyarrow under ``batchrun.outputs.output_schema``
(the schema ``batchrun run`` writes), or produced by running the sample job on
the embedded endpoint. Expected costs are computed in the tests from the token
columns and the prices written in the test, not with ``batchrun.prices``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchrun.cli import main
from batchrun.outputs import output_schema
from batchrun.report import STAT_NAMES, build_report, render
from tests.conftest import REPO

BIG = "meta-llama/Llama-3.3-70B-Instruct"
SMALL = "meta-llama/Llama-3.1-8B-Instruct"
MYSTERY = "acme/unpriced-model"
MILLION = Decimal(1_000_000)
PRICE = {BIG: (Decimal("0.60"), Decimal("0.80")), SMALL: (Decimal("0.10"), Decimal("0.15"))}
PRICES_TOML = f"""currency = "USD"
[models."{BIG}"]
prompt_per_million = 0.60
completion_per_million = 0.80
[models."{SMALL}"]
prompt_per_million = 0.10
completion_per_million = 0.15
"""
KEEP = pa.schema([pa.field("priority", pa.string())])
DAY1 = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 0, 0, 1, tzinfo=UTC)
CENT = Decimal("0.01")
JSON_STATS = [
    "rows",
    "ok",
    "failed",
    "invalid",
    "reused",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "reused_tokens",
    "no_usage",
    "cost",
    "priced_cost",
    "unpriced_tokens",
    "unpriced_rows",
    "currency",
    "tokens_per_row_mean",
    "tokens_per_row_p50",
    "tokens_per_row_p95",
    "latency_ms_p50",
    "latency_ms_p95",
    "retries",
]


# ---- helpers ----------------------------------------------------------------------------


def out_row(i: int, **values: Any) -> dict[str, Any]:
    """One output row: ok, sent once, 1000 + i prompt and 100 + i completion tokens."""
    prompt, completion = 1000 + i, 100 + i
    row: dict[str, Any] = {
        "id": f"T-{i:04d}",
        "row": i,
        "priority": "high" if i % 3 == 0 else "low",
        "model": BIG,
        "response_model": BIG,
        "completion": f"answer {i}",
        "finish_reason": "stop",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "status": "ok",
        "error": None,
        "http_status": 200,
        "attempts": 1,
        "latency_ms": 10.0 + i,
        "response_id": f"r-{i}",
        "request_hash": f"{i:064x}",
        "started_at": DAY1 - timedelta(seconds=1),
        "finished_at": DAY1,
    }
    row.update(values)
    return row


def failed(i: int, **values: Any) -> dict[str, Any]:
    """A row that failed with no usage reported."""
    return out_row(
        i,
        **{
            "status": "error",
            "error": "HTTP 500",
            "completion": None,
            "prompt_tokens": None,
            "completion_tokens": None,
            "total_tokens": None,
            "http_status": 500,
            **values,
        },
    )


def write_output(path: Path, rows: list[dict[str, Any]], keep: pa.Schema = KEEP) -> Path:
    schema = output_schema(keep, {"run_id": "test"})
    table = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def prices_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(PRICES_TOML)
    return path


def expected_cost(rows: list[dict[str, Any]]) -> Decimal:
    """Sum over the rows sent (attempts >= 1) of tokens x the price, row by row."""
    total = Decimal(0)
    for r in rows:
        if r["attempts"] == 0:
            continue
        prompt_price, completion_price = PRICE[r["model"]]
        total += (
            prompt_price * (r["prompt_tokens"] or 0)
            + completion_price * (r["completion_tokens"] or 0)
        ) / MILLION
    return total


def report(*args: str) -> Result:
    return CliRunner().invoke(main, ["report", *args], catch_exceptions=False)


def report_json(*args: str) -> dict[str, Any]:
    result = report(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout, parse_float=Decimal)
    return data


def groups_by(data: dict[str, Any], *keys: str) -> dict[Any, dict[str, Any]]:
    out = {}
    for g in data["groups"]:
        key = tuple(g[k] for k in keys)
        out[key[0] if len(keys) == 1 else key] = g
    return out


def mixed_rows() -> list[dict[str, Any]]:
    """Two priced models, large token counts (dollars, not fractions of a cent),
    an error with usage (paid re-ask), an error without, an invalid row, retries."""
    rows = [
        out_row(
            i,
            model=BIG if i % 2 else SMALL,
            prompt_tokens=1_234_567 + 7919 * i,
            completion_tokens=345_679 + 104_729 * i,
            total_tokens=1_234_567 + 7919 * i + 345_679 + 104_729 * i,
        )
        for i in range(12)
    ]
    rows.append(failed(12, attempts=5))
    rows.append(
        out_row(
            13,
            status="error",
            error="HTTP 400",
            http_status=400,
            prompt_tokens=2_000_003,
            completion_tokens=500_001,
            total_tokens=2_500_004,
            attempts=2,
        )
    )
    rows.append(
        out_row(
            14,
            status="invalid",
            error="not JSON",
            prompt_tokens=3_000_001,
            completion_tokens=700_003,
            total_tokens=3_700_004,
            attempts=3,
        )
    )
    return rows


# ---- totals and costs -------------------------------------------------------------------


def test_totals_equal_usage_columns_times_prices(tmp_path: Path) -> None:
    rows = mixed_rows()
    path = write_output(tmp_path / "out.parquet", rows)
    data = report_json(str(path), "--prices", str(prices_file(tmp_path)))
    total = data["total"]
    table = pq.read_table(path)
    for column in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert total[column] == pc.sum(table.column(column)).as_py()
    expected = expected_cost(rows)
    assert expected > 10  # dollars: the comparison to the cent means something
    assert total["cost"].quantize(CENT) == expected.quantize(CENT)
    assert total["cost"] == expected  # and exact: Decimal throughout
    assert total["priced_cost"] == expected
    assert total["currency"] == "USD"
    assert (total["rows"], total["ok"], total["failed"], total["invalid"]) == (15, 12, 2, 1)
    assert total["retries"] == 4 + 1 + 2
    assert total["unpriced_tokens"] == 0 and total["unpriced_rows"] == 0


def test_sample_job_end_to_end(tmp_path: Path) -> None:
    """The sample job on the embedded endpoint, then its report by priority."""
    out = tmp_path / "summaries.parquet"
    run = CliRunner().invoke(
        main,
        [
            "run",
            str(REPO / "jobs" / "summarize_tickets.toml"),
            "--mock",
            "-q",
            "--output",
            str(out),
        ],
    )
    assert run.exit_code == 0, run.output
    data = report_json(str(out), "--prices", str(REPO / "jobs" / "prices.toml"), "--by", "priority")
    table = pq.read_table(out)
    prompt = pc.sum(table.column("prompt_tokens")).as_py()
    completion = pc.sum(table.column("completion_tokens")).as_py()
    expected = (Decimal("0.60") * prompt + Decimal("0.80") * completion) / MILLION
    total = data["total"]
    assert total["rows"] == total["ok"] == 200
    assert (total["prompt_tokens"], total["completion_tokens"]) == (prompt, completion)
    assert total["total_tokens"] == pc.sum(table.column("total_tokens")).as_py()
    assert total["cost"] == expected
    groups = groups_by(data, "priority")
    assert set(groups) == set(table.column("priority").to_pylist())
    assert sum(g["rows"] for g in groups.values()) == 200
    assert sum(g["cost"] for g in groups.values()) == expected
    for name, g in groups.items():
        mine = table.filter(pc.equal(table.column("priority"), name))
        p = pc.sum(mine.column("prompt_tokens")).as_py()
        c = pc.sum(mine.column("completion_tokens")).as_py()
        assert g["cost"] == (Decimal("0.60") * p + Decimal("0.80") * c) / MILLION


def test_unpriced_model_is_null_never_zero(tmp_path: Path) -> None:
    rows = [out_row(i) for i in range(4)] + [out_row(i, model=MYSTERY) for i in range(4, 6)]
    path = write_output(tmp_path / "out.parquet", rows)
    prices = str(prices_file(tmp_path))
    data = report_json(str(path), "--prices", prices, "--by", "model")
    priced_part = expected_cost(rows[:4])
    assert data["total"]["cost"] is None
    assert data["total"]["priced_cost"] == priced_part
    assert data["total"]["unpriced_tokens"] == sum(1000 + i + 100 + i for i in (4, 5))
    assert data["total"]["unpriced_rows"] == 2
    groups = groups_by(data, "model")
    assert groups[MYSTERY]["cost"] is None
    assert groups[MYSTERY]["priced_cost"] == 0
    assert groups[BIG]["cost"] == priced_part

    text = report(str(path), "--prices", prices, "--by", "model").stdout
    mystery_line = next(line for line in text.splitlines() if line.startswith(MYSTERY))
    assert mystery_line.split()[-1] == "unpriced"
    total_line = next(line for line in text.splitlines() if line.startswith("total"))
    assert total_line.split()[-1] == "unpriced"
    assert f"Unpriced: {MYSTERY} has no price" in text

    # An unpriced failed row without usage still makes the cost unknown, not 0.
    path2 = write_output(tmp_path / "failed.parquet", [failed(0, model=MYSTERY)])
    assert report_json(str(path2), "--prices", prices)["total"]["cost"] is None


def test_without_prices_every_cost_is_null(tmp_path: Path) -> None:
    path = write_output(tmp_path / "out.parquet", [out_row(i) for i in range(3)])
    data = report_json(str(path), "--by", "priority")
    assert data["total"]["cost"] is None and data["total"]["priced_cost"] is None
    assert data["total"]["currency"] is None
    assert all(g["cost"] is None for g in data["groups"])
    assert "No prices" in report(str(path)).stdout


def test_reused_rows_shown_and_not_costed(tmp_path: Path) -> None:
    sent = [out_row(i) for i in range(3)]
    reused = [out_row(i, attempts=0) for i in range(3, 6)]
    # Reused rows of an unpriced model cost nothing in this run: not unpriced either.
    reused.append(out_row(6, attempts=0, model=MYSTERY))
    path = write_output(tmp_path / "out.parquet", sent + reused)
    data = report_json(str(path), "--prices", str(prices_file(tmp_path)))
    total = data["total"]
    assert total["rows"] == 7 and total["ok"] == 7 and total["reused"] == 4
    assert total["prompt_tokens"] == sum(r["prompt_tokens"] for r in sent)
    assert total["reused_tokens"] == sum(r["total_tokens"] for r in reused)
    assert total["cost"] == expected_cost(sent)
    assert total["retries"] == 0
    assert total["unpriced_rows"] == 0
    text = report(str(path), "--prices", str(prices_file(tmp_path))).stdout
    assert "Reused: 4 rows" in text


def test_failed_and_invalid_rows_counted_with_their_tokens(tmp_path: Path) -> None:
    rows = [
        out_row(0),
        failed(1, attempts=5),
        out_row(2, status="error", error="HTTP 400", attempts=2),  # usage of a re-ask
        out_row(3, status="invalid", error="missing field", attempts=3),
        failed(4, attempts=0, error="prompt column is null"),  # never sent
    ]
    path = write_output(tmp_path / "out.parquet", rows)
    data = report_json(str(path), "--prices", str(prices_file(tmp_path)), "--by", "status")
    total = data["total"]
    assert (total["rows"], total["ok"], total["failed"], total["invalid"]) == (5, 1, 3, 1)
    assert total["reused"] == 0
    assert total["prompt_tokens"] == 1000 + 1002 + 1003
    assert total["completion_tokens"] == 100 + 102 + 103
    assert total["cost"] == expected_cost(rows)
    assert total["retries"] == 4 + 1 + 2
    groups = groups_by(data, "status")
    assert groups["error"]["failed"] == 3 and groups["error"]["prompt_tokens"] == 1002
    assert groups["invalid"]["invalid"] == 1 and groups["invalid"]["failed"] == 0
    assert groups["invalid"]["total_tokens"] == 1003 + 103
    text = report(str(path), "--prices", str(prices_file(tmp_path))).stdout
    assert "Never sent: 1 failed rows" in text


def test_answers_without_usage_are_flagged(tmp_path: Path) -> None:
    rows = [out_row(0), out_row(1, prompt_tokens=None, completion_tokens=None, total_tokens=None)]
    path = write_output(tmp_path / "out.parquet", rows)
    data = report_json(str(path), "--prices", str(prices_file(tmp_path)))
    assert data["total"]["no_usage"] == 1
    assert data["total"]["total_tokens"] == 1100
    assert data["total"]["tokens_per_row_mean"] == 1100


def test_per_row_percentiles(tmp_path: Path) -> None:
    rows = [out_row(i, latency_ms=float(i * i)) for i in range(20)]
    rows.append(out_row(20, attempts=0, latency_ms=99999.0))  # reused: not in the latencies
    path = write_output(tmp_path / "out.parquet", rows)
    total = report_json(str(path))["total"]
    tokens = np.array([1100 + 2 * i for i in range(20)], dtype=float)
    latency = np.array([i * i for i in range(20)], dtype=float)
    assert float(total["tokens_per_row_mean"]) == pytest.approx(tokens.mean(), abs=1e-3)
    assert float(total["tokens_per_row_p50"]) == pytest.approx(np.percentile(tokens, 50), abs=1e-3)
    assert float(total["tokens_per_row_p95"]) == pytest.approx(np.percentile(tokens, 95), abs=1e-3)
    assert float(total["latency_ms_p50"]) == pytest.approx(np.percentile(latency, 50), abs=1e-3)
    assert float(total["latency_ms_p95"]) == pytest.approx(np.percentile(latency, 95), abs=1e-3)


# ---- groups -----------------------------------------------------------------------------


def test_by_model_and_by_a_kept_column(tmp_path: Path) -> None:
    rows = mixed_rows()
    path = write_output(tmp_path / "out.parquet", rows)
    prices = str(prices_file(tmp_path))
    by_model = groups_by(report_json(str(path), "--prices", prices, "--by", "model"), "model")
    assert set(by_model) == {BIG, SMALL}
    for model, g in by_model.items():
        mine = [r for r in rows if r["model"] == model]
        assert g["rows"] == len(mine)
        assert g["cost"] == expected_cost(mine)
    by_priority = groups_by(
        report_json(str(path), "--prices", prices, "--by", "priority"), "priority"
    )
    assert list(by_priority) == ["high", "low"]  # sorted
    for priority, g in by_priority.items():
        mine = [r for r in rows if r["priority"] == priority]
        assert g["cost"] == expected_cost(mine)
        assert g["prompt_tokens"] == sum(r["prompt_tokens"] or 0 for r in mine)


def test_by_several_columns(tmp_path: Path) -> None:
    rows = mixed_rows()
    path = write_output(tmp_path / "out.parquet", rows)
    data = report_json(
        str(path), "--prices", str(prices_file(tmp_path)), "--by", "model", "--by", "priority"
    )
    groups = groups_by(data, "model", "priority")
    assert len(groups) == 4
    for (model, priority), g in groups.items():
        mine = [r for r in rows if (r["model"], r["priority"]) == (model, priority)]
        assert g["rows"] == len(mine) and g["cost"] == expected_cost(mine)
    assert sum(g["cost"] for g in groups.values()) == data["total"]["cost"]
    # a,b is the same as --by a --by b
    assert (
        report_json(str(path), "--prices", str(prices_file(tmp_path)), "--by", "model,priority")
        == data
    )


def test_by_day_is_the_utc_date_of_finished_at(tmp_path: Path) -> None:
    rows = [out_row(i, finished_at=DAY1 if i < 3 else DAY2) for i in range(5)]
    rows.append(failed(5, attempts=0, finished_at=None))
    path = write_output(tmp_path / "out.parquet", rows)
    groups = groups_by(report_json(str(path), "--by", "day"), "day")
    assert list(groups) == ["2026-03-01", "2026-03-02", None]
    assert [g["rows"] for g in groups.values()] == [3, 2, 1]


def test_by_day_uses_a_day_column_when_there_is_one(tmp_path: Path) -> None:
    keep = pa.schema([pa.field("priority", pa.string()), pa.field("day", pa.string())])
    rows = [out_row(i, day="batch-a" if i < 2 else "batch-b") for i in range(5)]
    path = write_output(tmp_path / "out.parquet", rows, keep=keep)
    groups = groups_by(report_json(str(path), "--by", "day"), "day")
    assert {k: g["rows"] for k, g in groups.items()} == {"batch-a": 2, "batch-b": 3}


def test_null_and_numeric_keys(tmp_path: Path) -> None:
    keep = pa.schema([pa.field("priority", pa.string()), pa.field("level", pa.int64())])
    rows = [out_row(i, level=i % 2) for i in range(4)] + [out_row(4, level=None, priority=None)]
    path = write_output(tmp_path / "out.parquet", rows, keep=keep)
    data = report_json(str(path), "--by", "level")
    assert [(g["level"], g["rows"]) for g in data["groups"]] == [(0, 2), (1, 2), (None, 1)]
    data = report_json(str(path), "--by", "priority")
    assert [(g["priority"], g["rows"]) for g in data["groups"]] == [
        ("high", 2),
        ("low", 2),
        (None, 1),
    ]


# ---- inputs -----------------------------------------------------------------------------


def test_globs_folders_and_many_files(tmp_path: Path) -> None:
    parts = [[out_row(10 * k + i) for i in range(3 + k)] for k in range(4)]
    folder = tmp_path / "nightly"
    for k, rows in enumerate(parts):
        write_output(folder / ("2026" if k < 2 else "2027") / f"part-{k}.parquet", rows)
    (folder / "notes.txt").write_text("not an output")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "junk.parquet").write_text("not parquet")
    every = [r for rows in parts for r in rows]
    prices = str(prices_file(tmp_path))
    expected = expected_cost(every)

    from_folder = report_json(str(folder), "--prices", prices)["total"]
    assert from_folder["rows"] == len(every) and from_folder["cost"] == expected
    from_glob = report_json(str(folder / "**" / "*.parquet"), "--prices", prices)["total"]
    assert from_glob == from_folder
    one_year = report_json(str(folder / "2026" / "*.parquet"), "--prices", prices)["total"]
    assert one_year["rows"] == len(parts[0]) + len(parts[1])
    files = [str(p) for p in sorted(folder.rglob("part-*.parquet"))]
    from_files = report_json(*files, "--prices", prices)["total"]
    assert from_files == from_folder
    # A file named twice (directly and through its folder) is counted once.
    twice = report_json(files[0], str(folder), "--prices", prices)["total"]
    assert twice == from_folder


def test_not_a_batchrun_output(tmp_path: Path) -> None:
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": ["a"], "model": ["m"], "status": ["ok"]}), other)
    result = report(str(other))
    assert result.exit_code == 2
    assert str(other) in result.stderr
    assert "not a batchrun output" in result.stderr
    assert "prompt_tokens, completion_tokens, total_tokens, latency_ms, attempts, finished_at" in (
        result.stderr
    )

    text = tmp_path / "text.parquet"
    text.write_text("hello")
    result = report(str(text))
    assert result.exit_code == 2 and f"{text} is not a Parquet file" in result.stderr


def test_by_a_missing_column_lists_the_columns(tmp_path: Path) -> None:
    path = write_output(tmp_path / "out.parquet", [out_row(0)])
    result = report(str(path), "--by", "customer")
    assert result.exit_code == 2
    assert f"--by customer: {path} has no column customer" in result.stderr
    assert "id, row, priority, model" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.parquet"], "missing.parquet does not exist"),
        (["nothing/*.parquet"], "No file matches nothing/*.parquet"),
        (["OUT", "--prices", "nope.toml"], "Prices file nope.toml does not exist"),
        (["OUT", "--by", "rows"], "--by rows: rows is the name of a report column"),
        (["EMPTY"], "holds no .parquet file"),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    path = write_output(tmp_path / "out.parquet", [out_row(0)])
    (tmp_path / "empty").mkdir()
    args = [
        str(path) if a == "OUT" else str(tmp_path / "empty") if a == "EMPTY" else a for a in args
    ]
    result = report(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stdout == ""


def test_an_empty_output(tmp_path: Path) -> None:
    path = write_output(tmp_path / "out.parquet", [])
    data = report_json(str(path), "--prices", str(prices_file(tmp_path)), "--by", "day")
    assert data["groups"] == []
    assert data["total"]["rows"] == 0 and data["total"]["cost"] == 0


# ---- formats ----------------------------------------------------------------------------


def test_json_schema_is_exact(tmp_path: Path) -> None:
    path = write_output(tmp_path / "out.parquet", mixed_rows())
    data = report_json(str(path), "--prices", str(prices_file(tmp_path)), "--by", "priority")
    assert list(data) == [
        "total",
        "groups",
        "duplicates_skipped",
        "batch_saved",
        "compare",
        "checks",
    ]
    assert data["batch_saved"] is None  # no row here was answered by a provider batch
    assert data["compare"] is None and data["checks"] == []
    assert list(data["total"]) == JSON_STATS
    assert list(JSON_STATS) == [*STAT_NAMES[:16], "currency", *STAT_NAMES[16:]]
    for group in data["groups"]:
        assert list(group) == ["priority", *JSON_STATS]
    for obj in [data["total"], *data["groups"]]:
        for name in JSON_STATS:
            if name in ("cost", "priced_cost"):
                assert isinstance(obj[name], Decimal)  # a JSON number, not a string
            elif name == "currency":
                assert obj[name] == "USD"
            elif name.startswith(("tokens_per_row", "latency")):
                assert isinstance(obj[name], Decimal | int)
            else:
                assert type(obj[name]) is int
    no_groups = report_json(str(path))
    assert no_groups["groups"] == []


def test_csv_parses_back(tmp_path: Path) -> None:
    rows = mixed_rows()
    path = write_output(tmp_path / "out.parquet", rows)
    prices = str(prices_file(tmp_path))
    result = report(str(path), "--prices", prices, "--by", "priority", "--format", "csv")
    assert result.exit_code == 0
    records = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(records[0]) == ["scope", "priority", *JSON_STATS]
    assert [(r["scope"], r["priority"]) for r in records] == [
        ("group", "high"),
        ("group", "low"),
        ("total", ""),
    ]
    assert Decimal(records[-1]["cost"]) == expected_cost(rows)
    assert sum(Decimal(r["cost"]) for r in records[:-1]) == expected_cost(rows)
    assert int(records[-1]["rows"]) == len(rows)
    as_json = report_json(str(path), "--prices", prices, "--by", "priority")
    for record, group in zip(records, as_json["groups"], strict=False):
        assert int(record["total_tokens"]) == group["total_tokens"]


def test_markdown_table(tmp_path: Path) -> None:
    path = write_output(tmp_path / "out.parquet", mixed_rows())
    result = report(
        str(path),
        "--prices",
        str(prices_file(tmp_path)),
        "--by",
        "priority",
        "--format",
        "markdown",
    )
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    tables = [i for i, line in enumerate(lines) if line.startswith("| priority |")]
    assert len(tables) == 2
    first = lines[tables[0] : tables[0] + 5]
    assert first[0].startswith("| priority | rows | ok | failed | invalid | reused |")
    assert first[1].startswith("|:---|---:|")
    assert first[2].startswith("| high | ") and first[3].startswith("| low | ")
    assert first[4].startswith("| **total** | **15** |")
    assert len({line.count("|") for line in first}) == 1  # as many cells in every line


def test_terminal_table(tmp_path: Path) -> None:
    path = write_output(tmp_path / "out.parquet", mixed_rows())
    result = report(str(path), "--prices", str(prices_file(tmp_path)), "--by", "priority")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"batchrun report: 1 file ({path}), 15 rows, prices")
    header = lines[2].split()
    assert header[:7] == ["priority", "rows", "ok", "failed", "invalid", "reused", "prompt"]
    assert header[-2:] == ["cost", "USD"]
    total = next(line for line in lines if line.startswith("total"))
    assert total.split()[-1] == f"{expected_cost(mixed_rows()):,.4f}"


def test_python_api(tmp_path: Path) -> None:
    rows = mixed_rows()
    path = write_output(tmp_path / "out.parquet", rows)
    result = build_report([path], by=["model"], prices=prices_file(tmp_path))
    assert result.total.cost == expected_cost(rows)
    assert [g.key for g in result.groups] == [(SMALL,), (BIG,)]  # sorted
    assert (
        render(result, "json")
        == report(
            str(path), "--prices", str(prices_file(tmp_path)), "--by", "model", "--format", "json"
        ).stdout
    )


# ---- HTML -------------------------------------------------------------------------------


def html_report(tmp_path: Path, *args: str) -> str:
    page = tmp_path / "report.html"
    result = report(*args, "--html", str(page))
    assert result.exit_code == 0, result.output
    assert f"wrote {page}" in result.stderr
    return page.read_text()


def test_html_page_is_self_contained_with_three_charts(tmp_path: Path) -> None:
    rows = mixed_rows() + [out_row(20 + i, finished_at=DAY2, model=MYSTERY) for i in range(3)]
    path = write_output(tmp_path / "out.parquet", rows)
    page = html_report(tmp_path, str(path), "--prices", str(prices_file(tmp_path)), "--by", "model")
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "url(" not in page and "src=" not in page
    for chart in ("chart-cost", "chart-completion-tokens", "chart-rows-per-day"):
        assert f'<figure id="{chart}"' in page
    assert page.count("<svg") == 3
    assert "2026-03-01" in page and "2026-03-02" in page  # the days' axis
    assert "unpriced" in page
    assert "<table>" in page and MYSTERY in page


def test_html_escapes_the_data(tmp_path: Path) -> None:
    rows = [out_row(0, priority="<script>alert(1)</script>"), out_row(1)]
    path = write_output(tmp_path / "out.parquet", rows)
    page = html_report(tmp_path, str(path), "--by", "priority")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "No prices given" in page


def test_cli_help_does_not_import_pandas() -> None:
    code = (
        "import sys; from click.testing import CliRunner; from batchrun.cli import main; "
        "CliRunner().invoke(main, ['report', '--help']); "
        "print('pandas' in sys.modules, 'batchrun.report' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["False", "False"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_html_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    """The page opens in a real browser (no network): a PNG of the sample job's report."""
    spec = importlib.util.spec_from_file_location(
        "screenshot_report", REPO / "benchmarks" / "screenshot_report.py"
    )
    assert spec is not None and spec.loader is not None and CHROMIUM is not None
    screenshot_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshot_report)
    page = screenshot_report.sample_report(tmp_path)
    png = tmp_path / "report.png"
    screenshot_report.screenshot(CHROMIUM, page, png, width=1280, height=1600)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000

"""batchrun report over many groups: ``--by id`` on 20,000 rows against a count
made here row by row in plain Python (Decimal costs from the prices written in
the test), the text of every float and key against
Python's own formatting, the table's cap on groups, and costs past int64.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun.cli import main
from batchrun.outputs import output_schema

BIG, REASONER, MYSTERY = "big-model", "reasoner", "acme/unpriced"
CHANGE = dt.datetime(2026, 3, 15, tzinfo=dt.UTC)
PRICES_TOML = f"""currency = "EUR"
[models."{BIG}"]
prompt_per_million = 0.60
completion_per_million = 0.80
[models."{REASONER}"]
prompt_per_million = 0.55
completion_per_million = 2.19
cached_prompt_per_million = 0.14
reasoning_per_million = 2.5
batch_discount = 0.5
[[models."{REASONER}".since]]
date = 2026-03-15
prompt_per_million = 0.50
cached_prompt_per_million = 0.125
"""
MILLION = Decimal(1_000_000)


def rates(model: str, finished: dt.datetime | None) -> tuple[Decimal, ...] | None:
    """(prompt, completion, cached, reasoning, batch discount) per million, as PRICES_TOML says."""
    if model == BIG:
        return (Decimal("0.60"), Decimal("0.80"), Decimal("0.60"), Decimal("0.80"), Decimal(0))
    if model == REASONER:
        later = finished is None or finished >= CHANGE  # no date: today's rates
        prompt, cached = ("0.50", "0.125") if later else ("0.55", "0.14")
        return (Decimal(prompt), Decimal("2.19"), Decimal(cached), Decimal("2.5"), Decimal("0.5"))
    return None


def make_rows(n: int, seed: int, start: int = 0) -> list[dict[str, Any]]:
    """n output rows: every status, reused and never-sent rows, missing usage,
    three models (one unpriced), batch rows, dates either side of the price
    change, a few null ids and finished_at, latencies of every kind."""
    rng = np.random.default_rng(seed)
    models = [BIG, REASONER, MYSTERY]
    out = []
    for i in range(start, start + n):
        r = rng.random()
        status = "error" if r < 0.05 else "invalid" if r < 0.08 else "ok"
        attempts = 0 if rng.random() < 0.04 else int(rng.integers(1, 4))
        usage = not (status == "error" and rng.random() < 0.5) and rng.random() > 0.03
        prompt, completion = int(rng.integers(1, 5000)), int(rng.integers(0, 3000))
        finished = dt.datetime(2026, 3, 1, tzinfo=dt.UTC) + dt.timedelta(
            seconds=float(rng.uniform(0, 30 * 86400))
        )
        latency = [
            float(rng.gamma(2, 300)),
            float(rng.integers(1, 9000)),
            round(float(rng.uniform(0, 50)), 3) + 0.0005,  # on a rounding boundary
            None,
        ][int(rng.choice(4, p=[0.7, 0.1, 0.15, 0.05]))]
        out.append(
            {
                "id": None if rng.random() < 0.002 else f"T-{i:06d}",
                "row": i,
                "model": models[int(rng.choice(3, p=[0.55, 0.4, 0.05]))],
                "status": status,
                "prompt_tokens": prompt if usage else None,
                "completion_tokens": completion if usage else None,
                "total_tokens": prompt + completion if usage else None,
                "cached_tokens": int(rng.integers(0, 6000)) if usage and r > 0.5 else None,
                "reasoning_tokens": int(rng.integers(0, 3000)) if usage and r > 0.3 else None,
                "attempts": attempts,
                "latency_ms": latency,
                "response_id": f"resp-{seed}-{i}",
                "finished_at": None if rng.random() < 0.01 else finished,
                "tier": "batch" if rng.random() < 0.3 else "online",
            }
        )
    return out


def write(path: Path, rows: list[dict[str, Any]], run_id: str) -> Path:
    schema = output_schema(pa.schema([]), {"run_id": run_id})
    # Outputs of batchrun never have a null id; other tools' files may.
    schema = schema.set(schema.get_field_index("id"), pa.field("id", pa.string()))
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return path


def expected_groups(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """The figures of every id, counted row by row."""
    by_id: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_id[r["id"]].append(r)
    return {key: expected_figures(group) for key, group in by_id.items()}


def expected_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    f: dict[str, Any] = defaultdict(int)
    priced = Decimal(0)
    tokens, latencies = [], []
    for r in rows:
        f["rows"] += 1
        f[{"ok": "ok", "error": "failed", "invalid": "invalid"}[r["status"]]] += 1
        if r["attempts"] == 0:
            if r["status"] == "ok":
                f["reused"] += 1
                f["reused_tokens"] += r["total_tokens"] or 0
            continue
        f["retries"] += r["attempts"] - 1
        p, c = r["prompt_tokens"] or 0, r["completion_tokens"] or 0
        cached, reasoning = r["cached_tokens"] or 0, r["reasoning_tokens"] or 0
        for name, value in (
            ("prompt_tokens", p),
            ("completion_tokens", c),
            ("total_tokens", r["total_tokens"] or 0),
            ("cached_tokens", cached),
            ("reasoning_tokens", reasoning),
        ):
            f[name] += value
        if r["total_tokens"] is None and r["status"] != "error":
            f["no_usage"] += 1
        if r["total_tokens"] is not None:
            tokens.append(r["total_tokens"])
        if r["latency_ms"] is not None:
            latencies.append(r["latency_ms"])
        rate = rates(r["model"], r["finished_at"])
        if rate is None:
            f["unpriced_rows"] += 1
            f["unpriced_tokens"] += p + c
            continue
        cached, reasoning = min(cached, p), min(reasoning, c)
        cost = (
            (p - cached) * rate[0] + cached * rate[2] + (c - reasoning) * rate[1]
        ) + reasoning * rate[3]
        cost /= MILLION
        if r["tier"] == "batch":
            cost *= 1 - rate[4]
        priced += cost
    f["priced_cost"] = priced
    f["cost"] = priced if not f["unpriced_rows"] else None
    f["tokens_per_row_mean"] = sum(tokens) / len(tokens) if tokens else None
    for name, values in (("tokens_per_row", tokens), ("latency_ms", latencies)):
        for q in (50, 95):
            f[f"{name}_p{q}"] = percentile(values, q / 100) if values else None
    return dict(f)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the two closest ranks (numpy's and pandas' default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = int(position)
    frac = position - below
    if frac == 0:
        return float(ordered[below])
    return ordered[below] + (ordered[below + 1] - ordered[below]) * frac


def run_report(*args: str) -> str:
    result = CliRunner().invoke(main, ["report", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_by_id_over_20000_rows_matches_a_count_made_row_by_row(tmp_path: Path) -> None:
    first, second = make_rows(12_000, seed=1), make_rows(8_000, seed=2, start=9_000)
    # Ids 9000-11999 are in both files (two runs, two answers each): groups of two rows.
    files = [write(tmp_path / "a.parquet", first, "a"), write(tmp_path / "b.parquet", second, "b")]
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES_TOML)
    args = [*map(str, files), "--prices", str(prices), "--by", "id"]
    expected = expected_groups(first + second)
    assert len(expected) > 16_000 and None in expected

    text = run_report(*args, "--format", "json")
    data = json.loads(text, parse_float=Decimal)
    ids = [g["id"] for g in data["groups"]]
    assert ids == [*sorted(k for k in expected if k is not None), None]  # null last
    for group in data["groups"]:
        want = expected[group["id"]]
        for name, value in group.items():
            if name in ("id", "currency"):
                continue
            exact = want.get(name, 0)
            if name.startswith(("tokens_per_row", "latency_ms")):
                assert value == (None if exact is None else Decimal(repr(round(exact, 3)))), name
            else:
                assert value == exact, (group["id"], name)
        assert group["currency"] == "EUR"
    total = data["total"]
    priced = [g["priced_cost"] for g in data["groups"]]
    assert total["priced_cost"] == sum(priced) and total["cost"] is None  # a model is unpriced
    assert total["rows"] == 20_000 == sum(g["rows"] for g in data["groups"])

    # The float texts are Python's own: repr(round(value, 3)), boundaries included.
    floats = json.loads(text, parse_float=str)["groups"]
    for group in floats:
        for name in ("latency_ms_p50", "latency_ms_p95", "tokens_per_row_p95"):
            want = expected[group["id"]][name]
            assert group[name] == (None if want is None else repr(round(want, 3)))

    lines = list(csv.reader(io.StringIO(run_report(*args, "--format", "csv"))))
    header, body = lines[0], lines[1:]
    assert [line[0] for line in body] == ["group"] * len(expected) + ["total"]
    assert [line[1] for line in body[:-1]] == [g["id"] or "" for g in floats]
    for line, group in zip(body, floats, strict=False):
        row = dict(zip(header, line, strict=True))
        assert row["cost"] == ("" if group["cost"] is None else str(group["cost"]))
        assert row["latency_ms_p50"] == (group["latency_ms_p50"] or "")
        assert row["rows"] == str(group["rows"])


def test_the_table_lists_the_costliest_groups_and_says_what_it_leaves_out(
    tmp_path: Path,
) -> None:
    rows = make_rows(1_500, seed=3)
    for i, r in enumerate(rows):
        r["model"], r["attempts"], r["id"] = BIG, 1, f"T-{i:04d}"
    path = write(tmp_path / "out.parquet", rows, "t")
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES_TOML)
    text = run_report(str(path), "--prices", str(prices), "--by", "id")
    assert "the 1,000 costliest of 1,500 are shown, costliest first; 500 are left out" in text
    usage = text.split("\n\n")[1].splitlines()[1:-1]  # the group lines of the first table
    costs = [Decimal(line.split()[-1]) for line in usage]
    assert len(costs) == 1000 and costs == sorted(costs, reverse=True)
    expected = sorted(expected_groups(rows).values(), key=lambda f: f["cost"], reverse=True)
    assert costs[-1] == round(expected[999]["cost"], 4)
    markdown = run_report(str(path), "--prices", str(prices), "--by", "id", "--format", "markdown")
    assert markdown.count("\n| T-") == 2 * 1000
    every = run_report(str(path), "--prices", str(prices), "--by", "id", "--format", "csv")
    assert every.count("\ngroup,") == 1500


def test_keys_that_need_quoting_and_escaping(tmp_path: Path) -> None:
    keys = ['say "hi"', "a,b", "line\nbreak", "tab\there", "back\\slash", "", "naïve ☃", None]
    rows = make_rows(len(keys), seed=4)
    for r, key in zip(rows, keys, strict=True):
        r["id"] = key
    path = write(tmp_path / "out.parquet", rows, "k")
    text = run_report(str(path), "--by", "id", "--format", "json")
    assert [g["id"] for g in json.loads(text)["groups"]] == [*sorted(keys[:-1]), None]
    assert json.dumps("naïve ☃", ensure_ascii=False) in text
    body = list(csv.reader(io.StringIO(run_report(str(path), "--by", "id", "--format", "csv"))))
    assert [line[1] for line in body[1:-1]] == [*sorted(keys[:-1]), ""]


def test_costs_past_int64_stay_exact(tmp_path: Path) -> None:
    """Whole numbers of the cost's unit past int64 are Python ints: still exact."""
    rows = make_rows(4, seed=5)
    huge = 9 * 10**17
    for i, r in enumerate(rows):
        r.update(model=BIG, status="ok", attempts=1, tier="online", id=f"T-{i % 2}")
        r.update(prompt_tokens=huge + i, completion_tokens=huge, total_tokens=None)
        r.update(cached_tokens=None, reasoning_tokens=None)
    path = write(tmp_path / "out.parquet", rows, "h")
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES_TOML)
    data = json.loads(
        run_report(str(path), "--prices", str(prices), "--by", "id", "--format", "json"),
        parse_float=Decimal,
    )
    for group in data["groups"]:
        mine = [r for r in rows if r["id"] == group["id"]]
        want = sum(
            (Decimal("0.60") * r["prompt_tokens"] + Decimal("0.80") * r["completion_tokens"])
            / MILLION
            for r in mine
        )
        assert group["cost"] == want
    assert data["total"]["cost"] == sum(g["cost"] for g in data["groups"])


@pytest.mark.parametrize("by", [["model"], ["tier", "model"], ["day"]])
def test_few_groups_agree_with_the_count_too(tmp_path: Path, by: list[str]) -> None:
    rows = make_rows(3_000, seed=6)
    path = write(tmp_path / "out.parquet", rows, "f")
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES_TOML)
    args = ["--by", ",".join(by), "--format", "json"]
    data = json.loads(run_report(str(path), "--prices", str(prices), *args), parse_float=Decimal)

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        day = r["finished_at"].date().isoformat() if r["finished_at"] else None
        return tuple(day if k == "day" else r[k] for k in by)

    parts: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        parts[key(r)].append(r)
    assert [tuple(g[k] for k in by) for g in data["groups"]] == sorted(
        parts, key=lambda k: tuple((v is None, v or "") for v in k)
    )
    for group in data["groups"]:
        want = expected_figures(parts[tuple(group[k] for k in by)])
        assert group["priced_cost"] == want["priced_cost"]
        assert group["cost"] == want["cost"]
        assert (group["rows"], group["retries"]) == (want["rows"], want.get("retries", 0))
        p95 = want["latency_ms_p95"]
        assert group["latency_ms_p95"] == (None if p95 is None else Decimal(repr(round(p95, 3))))


def test_float_text_is_pythons_repr_of_the_rounded_value() -> None:
    """The figures' floats are made text a column at a time: the same text as
    ``json.dumps(round(value, 3))`` (``null`` for NaN), boundaries and all."""
    from batchrun.report.lines import _float_csv, _float_json

    rng = np.random.default_rng(7)
    values = np.concatenate(
        [
            rng.gamma(2, 400, 50_000),
            np.round(rng.uniform(-100, 100, 50_000), 3) + 0.0005,  # halfway, as typed
            rng.integers(0, 10**6, 1_000).astype(float),
            [0.0, -0.0, -0.0004, 0.0005, 1.0625, 2.675, 1e-7, 999_999_999_999.9995, 1e13, 1e17],
            [float("nan"), float("inf"), -float("inf")],
        ]
    )
    text = _float_json(values).to_pylist()
    for value, got in zip(values.tolist(), text, strict=True):
        want = "null" if not np.isfinite(value) else json.dumps(round(value, 3))
        assert got == want, value
    fields = _float_csv(values).to_pylist()
    for value, got in zip(values.tolist(), fields, strict=True):
        assert got == ("" if np.isnan(value) else repr(round(value, 3))), value

"""The Ray engine (``batchrun run --engine ray``) on a local Ray instance against the
embedded endpoint: its output must equal a local run's, column for column, apart
from the times, latencies and response ids.

The tests marked ``ray`` need ``batchrun[ray]`` and are skipped without it; run
them with ``make test-ray``. Each endpoint is served from a thread of this process
on 127.0.0.1 (Ray's actors run in other processes of this machine), and each run
gets a fresh endpoint, so its faults, drawn per request body and repeat, fall the
same way for both engines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun.cli import main
from batchrun.config import load_job
from batchrun.engines.local import run_job
from batchrun.errors import TooManyFailures
from batchrun.lifecycle import RunOptions, RunResult
from batchrun.mock import MockConfig, MockStats, serve
from tests.conftest import REPO, SAMPLE_JSONL, make_job, port_of, tickets, write_jsonl

MODEL = "test-org/test-model-7b"

VARYING = ["started_at", "finished_at", "latency_ms", "queued_ms", "ttft_ms", "response_id"]
"""Columns that differ between any two runs (those of them the output has)."""

# What this file's jobs lay over make_job's defaults.
JOB_KEYS: dict[str, Any] = {"model": MODEL, "keep_columns": ["customer"], "concurrency": 8}


# ---- helpers -----------------------------------------------------------------


@contextmanager
def endpoint(config: MockConfig, port: int = 0) -> Iterator[tuple[str, MockStats]]:
    """The embedded endpoint on 127.0.0.1 (``port``, 0: any), served from a thread:
    its base URL and stats."""
    ready: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event, Any]] = (
        concurrent.futures.Future()
    )

    async def serve_until_stopped() -> None:
        stop = asyncio.Event()
        async with serve(config, port=port) as server:
            ready.set_result((asyncio.get_running_loop(), stop, server))
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve_until_stopped(),), daemon=True)
    thread.start()
    loop, stop, server = ready.result(timeout=10)
    try:
        yield server.base_url, server.stats
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)


def run_both(
    input_path: Path, tmp_path: Path, config: MockConfig, **job_keys: Any
) -> tuple[RunResult, RunResult, MockStats, MockStats]:
    """The same job run by each engine, each against its own fresh endpoint."""
    from batchrun.engines.ray import run_on_ray

    options = RunOptions(progress=False)
    with endpoint(config) as (url, local_stats):
        job = make_job(url, input_path, tmp_path / "local.parquet", **(JOB_KEYS | job_keys))
        local = asyncio.run(run_job(job, options))
    with endpoint(config) as (url, ray_stats):
        job = make_job(url, input_path, tmp_path / "ray.parquet", **(JOB_KEYS | job_keys))
        on_ray = run_on_ray(job, options)
    return local, on_ray, local_stats, ray_stats


def assert_same_output(local: Path, on_ray: Path) -> None:
    """Same schema, same metadata (but the run id and output path), same values."""
    a, b = pq.read_table(local), pq.read_table(on_ray)
    assert a.schema.equals(b.schema, check_metadata=False)
    meta_a = orjson.loads(a.schema.metadata[b"batchrun"])
    meta_b = orjson.loads(b.schema.metadata[b"batchrun"])
    assert meta_a.keys() == meta_b.keys()
    # Each run has its own output and endpoint.
    per_run = ("output", "base_url", "answered_by")
    assert {k: v for k, v in meta_a["identity"].items() if k not in per_run} == {
        k: v for k, v in meta_b["identity"].items() if k not in per_run
    }
    assert meta_a["rows"] == meta_b["rows"]
    assert {k: v for k, v in meta_a["job"].items() if k not in per_run} == {
        k: v for k, v in meta_b["job"].items() if k not in per_run
    }
    varying = [c for c in VARYING if c in a.column_names]
    assert a.drop_columns(varying).to_pylist() == b.drop_columns(varying).to_pylist()
    assert pc.all(pc.is_valid(b.column("started_at"))).as_py()


# ---- the Ray engine ----------------------------------------------------------


@pytest.mark.ray
def test_ray_output_equals_a_local_run(local_ray: Any, tmp_path: Path) -> None:
    """50 rows with retried faults (429, 500, dropped connections), a row too long
    for the model (400, not retried) and a row that cannot become a request; rpm and
    concurrency split over two actors."""
    rows: list[dict[str, object]] = list(tickets(47))
    rows.append({"id": "T-long", "customer": "Big", "ticket": "word " * 400})
    rows.append({"id": "T-null", "customer": "Nobody", "ticket": None})
    rows.append({"id": "T-last", "customer": "Last", "ticket": "The very last ticket."})
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)
    config = MockConfig(
        fault_rate=0.2, faults=("429", "500", "drop"), retry_after_s=0.1, context_tokens=300
    )

    local, on_ray, local_stats, ray_stats = run_both(
        input_path, tmp_path, config, rpm=6000, max_attempts=4
    )

    assert_same_output(local.output, on_ray.output)
    assert (on_ray.rows, on_ray.ok, on_ray.failed) == (local.rows, local.ok, local.failed)
    assert local.failed >= 2  # the long row and the null one, at least
    assert (on_ray.requests, on_ray.retries) == (local.requests, local.retries)
    assert on_ray.retries > 0
    assert (on_ray.prompt_tokens, on_ray.completion_tokens) == (
        local.prompt_tokens,
        local.completion_tokens,
    )
    assert ray_stats.to_dict() == local_stats.to_dict()
    assert not (tmp_path / "ray.parquet.partial").exists()


@pytest.mark.ray
def test_ray_writes_the_same_usage_details_and_cost_column(local_ray: Any, tmp_path: Path) -> None:
    """With a prices file, a server that reports cached and reasoning tokens: the
    same cached_tokens, reasoning_tokens, tier and cost columns, and the same cost
    in the summary (the column's sum)."""
    input_path = write_jsonl(tmp_path / "in.jsonl", tickets(30))
    prices = tmp_path / "prices.toml"
    prices.write_text(
        f'[models."{MODEL}"]\nprompt_per_million = 300\ncompletion_per_million = 900\n'
        "cached_prompt_per_million = 30\nreasoning_per_million = 1200\n"
    )
    config = MockConfig(cached_share=0.5, reasoning_tokens=7)

    local, on_ray, _, _ = run_both(input_path, tmp_path, config, prices=str(prices))

    assert_same_output(local.output, on_ray.output)
    table = pq.read_table(on_ray.output)
    assert pc.all(pc.equal(table.column("reasoning_tokens"), 7)).as_py()
    assert pc.all(pc.is_valid(table.column("cost"))).as_py()
    assert on_ray.cost is not None and on_ray.cost == local.cost
    assert abs(float(on_ray.cost) - pc.sum(table.column("cost")).as_py()) < 1e-9


@pytest.mark.ray
def test_ray_resumes_a_local_run_and_retries_its_failed_rows(
    local_ray: Any, tmp_path: Path
) -> None:
    """A local run stopped by max_failures leaves a journal; the Ray engine resumes
    it (the same journal, the same identity) and, with retry_failed, resends the
    failed rows: the output equals an uninterrupted run's."""
    from batchrun.engines.ray import run_on_ray

    input_path = write_jsonl(tmp_path / "in.jsonl", list(tickets(40)))
    output = tmp_path / "out.parquet"
    keys = {"max_attempts": 1, "max_failures": 3, "concurrency": 2}
    with endpoint(MockConfig(fault_rate=0.25, faults=("500",))) as (url, _):
        job = make_job(url, input_path, output, **(JOB_KEYS | keys))
        with pytest.raises(TooManyFailures):
            asyncio.run(run_job(job, RunOptions(progress=False)))
    journal = (tmp_path / "out.parquet.partial" / "journal.jsonl").read_bytes().splitlines()
    statuses = [orjson.loads(line)["status"] for line in journal]
    assert statuses.count("error") == 4 and "ok" in statuses

    with endpoint(MockConfig(), port=port_of(url)) as (url, stats):
        job = make_job(url, input_path, output, **(JOB_KEYS | keys))
        resumed = run_on_ray(job, RunOptions(progress=False, retry_failed=True))
    with endpoint(MockConfig()) as (url, _):
        job = make_job(url, input_path, tmp_path / "clean.parquet", **(JOB_KEYS | keys))
        clean = asyncio.run(run_job(job, RunOptions(progress=False)))

    assert (resumed.ok, resumed.failed, resumed.resumed) == (40, 0, len(statuses))
    assert stats.requests == 40 - statuses.count("ok")  # the ok rows were not sent again
    assert_same_output(clean.output, resumed.output)


@pytest.mark.ray
def test_cli_engine_ray_structured_job_on_the_embedded_endpoint(
    local_ray: Any, tmp_path: Path
) -> None:
    """`batchrun run JOB --engine ray --mock`: a structured job (typed columns from a
    JSON schema, keep_columns) gives the same file as `--mock` alone."""
    lines = SAMPLE_JSONL.read_bytes().splitlines(keepends=True)[:40]
    input_path = tmp_path / "tickets.jsonl"
    input_path.write_bytes(b"".join(lines))
    job_file = REPO / "jobs" / "triage_tickets.toml"
    runner = CliRunner()
    outputs = {}
    for engine in ("local", "ray"):
        outputs[engine] = tmp_path / f"{engine}.parquet"
        result = runner.invoke(
            main,
            [
                "run",
                str(job_file),
                "--mock",
                "-q",
                "--engine",
                engine,
                "--input",
                str(input_path),
                "--output",
                str(outputs[engine]),
            ],
        )
        assert result.exit_code == 0, result.output
    assert_same_output(outputs["local"], outputs["ray"])
    assert "urgency" in pq.read_schema(outputs["ray"]).names


# ---- without Ray (these run in the default suite) ----------------------------


def test_engine_ray_without_ray_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    input_path = write_jsonl(tmp_path / "in.jsonl", list(tickets(3)))
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--engine",
            "ray",
            "--mock",
            "--input",
            str(input_path),
            "--prompt-template",
            "{ticket}",
            "--model",
            MODEL,
            "--output",
            str(tmp_path / "out.parquet"),
        ],
    )
    assert result.exit_code == 2
    assert "pip install 'batchrun[ray]'" in result.output
    assert not (tmp_path / "out.parquet").exists()
    assert not (tmp_path / "out.parquet.partial").exists()


def test_actor_plan_splits_concurrency_and_keeps_job_wide_limits_whole(tmp_path: Path) -> None:
    from batchrun.engines.ray import actor_plan

    input_path = write_jsonl(tmp_path / "in.jsonl", list(tickets(3)))
    job = make_job("http://127.0.0.1:9/v1", input_path, tmp_path / "o.parquet", **JOB_KEYS)
    job = load_job(
        None,
        {**job.settings(), "concurrency": 10, "rpm": 600.0, "tpm": 90000.0, "max_failures": 3},
    )
    actors, share = actor_plan(job, cpus=3, to_send=10_000)
    assert actors == 3
    assert share.concurrency == 3  # 3 x 3 <= 10: never more in flight than the job allows
    # Kept whole by the coordinator (rpm, tpm, max_cost, api_down) and the driver (max_failures).
    assert (share.rpm, share.tpm, share.max_cost, share.max_failures) == (None, None, None, None)
    assert share.api_down_after_s == float("inf")

    actors, share = actor_plan(job, cpus=64, to_send=50)
    assert actors == 4  # no more actors than rows to send / 16

    auto = load_job(None, {**job.settings(), "concurrency": "auto", "max_concurrency": 64})
    actors, share = actor_plan(auto, cpus=4, to_send=10_000)
    assert (actors, share.concurrency, share.max_concurrency) == (4, "auto", 16)


def test_help_does_not_import_ray() -> None:
    code = "import sys, batchrun.cli, batchrun.engines.ray; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""`batchrun plan` = `batchrun run` before its first request: the same checks,
the same resume state, the same --shard, --reuse and --retry-failed — and
nothing written. Each case plans, then runs, and compares."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner, Result

from batchrun.cli import main
from batchrun.engines.local import run_job
from batchrun.journal import partial_dir
from batchrun.lifecycle import RunOptions
from batchrun.mock import MockConfig, serve
from batchrun.plan import plan_job
from tests.conftest import make_job, tickets, write_jsonl
from tests.test_run import interrupted_run

N = 40


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def job_args(tmp_path: Path, *extra: str) -> list[str]:
    src = tmp_path / "in.jsonl"
    if not src.exists():
        write_jsonl(src, tickets(N))
    return [
        "--input", str(src), "--output", str(tmp_path / "out.parquet"), "--model", "m-1",
        "--prompt-template", "Summarize: {ticket}", "--mock", *extra,
    ]  # fmt: skip


def to_send(plan: Result) -> int:
    assert plan.exit_code == 0, plan.output
    found = re.search(r"rows +[\d,]+  \(([\d,]+) to send", plan.output)
    assert found, plan.output
    return int(found.group(1).replace(",", ""))


def sent(run: Result) -> int:
    assert run.exit_code in (0, 1), run.output
    found = re.search(r"requests +([\d,]+)", run.output)
    assert found, run.output
    return int(found.group(1).replace(",", ""))


def test_plan_of_a_finished_job_sends_nothing_like_its_rerun(tmp_path: Path) -> None:
    assert to_send(cli("plan", *job_args(tmp_path))) == N
    assert sent(cli("run", *job_args(tmp_path))) == N
    again = cli("plan", *job_args(tmp_path))
    assert to_send(again) == 0
    assert f"{N} with a result from an earlier run" in again.output
    assert sent(cli("run", *job_args(tmp_path))) == 0
    assert to_send(cli("plan", *job_args(tmp_path, "--restart"))) == N


def test_plan_of_a_changed_job_is_refused_like_its_run(tmp_path: Path) -> None:
    assert sent(cli("run", *job_args(tmp_path))) == N
    plan = cli("plan", *job_args(tmp_path, "--max-tokens", "99"))
    run = cli("run", *job_args(tmp_path, "--max-tokens", "99"))
    assert plan.exit_code == run.exit_code == 2
    assert "max_tokens" in plan.output and "--restart" in plan.output


def test_plan_counts_the_shard_like_run_and_writes_nothing(tmp_path: Path) -> None:
    first = cli("run", *job_args(tmp_path, "--shard", "0/2"))
    shard0 = sent(first)
    assert 0 < shard0 < N
    plan = cli("plan", *job_args(tmp_path, "--shard", "0/2"))
    assert to_send(plan) == 0
    other = cli(
        "plan", *job_args(tmp_path, "--shard", "1/2", "--output", str(tmp_path / "b.parquet"))
    )
    assert to_send(other) == N - shard0
    assert not (tmp_path / "b.parquet").exists()
    assert not partial_dir(tmp_path / "b.parquet").exists()
    assert not (tmp_path / "b.parquet.lock").exists()


def test_plan_counts_failed_rows_and_retry_failed_like_run(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    rows = tickets(N)
    for r in rows[:3]:
        r["ticket"] = None  # these rows cannot become requests: error, attempts 0
    write_jsonl(src, rows)
    assert sent(cli("run", *job_args(tmp_path))) == N - 3
    plan = cli("plan", *job_args(tmp_path))
    assert to_send(plan) == 0
    assert "3 of them failed: --retry-failed sends them again" in plan.output
    # Those rows still cannot be sent: retry-failed plans (and sends) none of them.
    assert to_send(cli("plan", *job_args(tmp_path, "--retry-failed"))) == 0


def test_plan_counts_reused_rows_like_run(tmp_path: Path) -> None:
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    write_jsonl(earlier / "in.jsonl", tickets(N // 2))
    assert sent(cli("run", *job_args(earlier))) == N // 2
    reuse = ("--reuse", str(earlier / "out.parquet"))
    plan = cli("plan", *job_args(tmp_path, *reuse))
    assert to_send(plan) == N - N // 2
    assert f"{N // 2} reused from earlier outputs" in plan.output
    run = cli("run", *job_args(tmp_path, *reuse))
    assert sent(run) == N - N // 2
    assert pq.read_table(tmp_path / "out.parquet").num_rows == N


async def test_plan_counts_an_unfinished_journal_like_the_resume(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(N))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(latency_s=0.02)) as server:
        job = make_job(server.base_url, src, out, concurrency=2)
        done = {r["row"] for r in await interrupted_run(job, min_lines=10)}
        journal = (partial_dir(out) / "journal.jsonl").read_bytes()
        plan = plan_job(job, RunOptions())
        assert (partial_dir(out) / "journal.jsonl").read_bytes() == journal  # untouched
        assert (plan.to_send, plan.done) == (N - len(done), len(done))
        before = server.stats.requests
        result = await run_job(job, RunOptions(progress=False))
        assert server.stats.requests - before == plan.to_send
    assert result.ok == N


def test_plan_shows_the_batch_estimate_beside_online(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(
        'currency = "USD"\nbatch_discount = 0.5\n[models."m-1"]\n'
        "prompt_per_million = 1000\ncompletion_per_million = 2000\n"
    )
    plan = cli(
        "plan",
        *job_args(tmp_path, "--prices", str(prices), "--mode", "hybrid", "--deadline", "30m"),
    )
    assert plan.exit_code == 0, plan.output
    online = re.search(r"cost +([\d.]+) \.\. ([\d.]+) USD .* online", plan.output)
    batch = re.search(r"([\d.]+) \.\. ([\d.]+) USD by a provider batch", plan.output)
    assert online and batch, plan.output
    for whole, half in zip(online.groups(), batch.groups(), strict=True):
        assert abs(float(whole) / 2 - float(half)) < 0.0001
    assert "mode          hybrid" in plan.output

"""mode = batch and hybrid: the provider's Batch API, with a deadline.

Every job talks to the embedded endpoint on 127.0.0.1, whose /v1/files and
/v1/batches imitate OpenAI's over a simulated queue (``MockConfig.batch_*``);
its ``/_stats`` counts every body answered, online or in a batch, so a row
answered twice shows as a body counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pyarrow.parquet as pq
import pytest

from batchrun.batch_client import BatchClient
from batchrun.batch_state import BatchState, state_folder
from batchrun.batch_submit import PartLimits
from batchrun.config import Job
from batchrun.deadline import local_text, parse_deadline, resolve
from batchrun.engines.batch import run_batch_job
from batchrun.engines.local import run_job
from batchrun.errors import JobError
from batchrun.lifecycle import RunOptions
from batchrun.mock import MockConfig, MockServer, serve
from tests.conftest import REPO, make_job, tickets, write_jsonl

pytestmark = pytest.mark.timeout(120)

FAST = {"batch_rows_per_s": 1000.0, "batch_start_s": 0.0, "batch_cancel_s": 0.0}
QUIET = RunOptions(progress=False)


def job_for(server: MockServer, tmp: Path, rows: int, **keys: Any) -> Job:
    """A job of ``rows`` tickets against ``server``, looking at its batches every second."""
    write_jsonl(tmp / "in.jsonl", tickets(rows))
    keys.setdefault("batch_poll_s", 1)
    return make_job(server.base_url, input=tmp / "in.jsonl", output=tmp / "out.parquet", **keys)


async def batch_stats(server: MockServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(server.url + "/_batch_stats") as resp:
        data: dict[str, Any] = await resp.json()
        return data


def rows_of(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def answered_once(server: MockServer, rows: int) -> None:
    """The endpoint answered ``rows`` bodies, each exactly once (online or in a batch)."""
    counts = server.stats.bodies
    assert len(counts) == rows, counts
    assert set(counts.values()) == {1}, [c for c in counts.values() if c != 1]


# ---- batch ----------------------------------------------------------------------------


async def test_batch_completed_gives_the_online_rows(tmp_path: Path) -> None:
    async with serve(MockConfig(**FAST)) as server:
        job = job_for(server, tmp_path, 30, mode="batch")
        result = await run_job(job, QUIET)
        assert result.exit_code == 0
        assert result.tiers == (("batch", 30), ("online", 0))
        assert (await batch_stats(server))["batches"] == 1
        answered_once(server, 30)
        server.stats.reset()
        online = await run_job(replace(job, mode="online", output=tmp_path / "on.parquet"), QUIET)
    batch_rows, online_rows = rows_of(result.output), rows_of(online.output)
    assert [r["id"] for r in batch_rows] == [r["id"] for r in online_rows]
    for b, o in zip(batch_rows, online_rows, strict=True):
        assert b["tier"] == "batch" and b["status"] == "ok" and b["attempts"] == 1
        for column in (
            "request_hash",
            "completion",
            "finish_reason",
            "prompt_tokens",
            "total_tokens",
        ):
            assert b[column] == o[column], column
        assert b["response_id"] == o["response_id"]  # the same body, answered the same way


async def test_completed_with_an_error_file(tmp_path: Path) -> None:
    async with serve(MockConfig(**FAST, batch_fail_rate=0.3)) as server:
        result = await run_job(job_for(server, tmp_path, 40, mode="batch"), QUIET)
        errors = (await batch_stats(server))["error_lines"]
    rows = rows_of(result.output)
    failed = [r for r in rows if r["status"] == "error"]
    assert 0 < len(failed) == errors < 40
    assert result.exit_code == 1 and result.failed == errors
    for r in failed:
        assert r["http_status"] == 500 and r["tier"] == "batch" and r["attempts"] == 1
        assert r["error"].startswith("HTTP 500: server_error: The server had an error")
    assert all(r["completion"] for r in rows if r["status"] == "ok")


async def test_retry_failed_submits_only_the_failed_rows_again(tmp_path: Path) -> None:
    async with serve(MockConfig(**FAST, batch_fail_rate=0.3)) as server:
        job = job_for(server, tmp_path, 40, mode="batch")
        first = await run_job(job, QUIET)
        retried = await run_job(job, RunOptions(progress=False, retry_failed=True))
        stats = await batch_stats(server)
    # The mock fails the same custom_ids again: what matters is what was resubmitted.
    assert stats["batches"] == 2 and stats["lines"] == 40 + first.failed
    assert retried.failed == first.failed and retried.resumed == 40


async def test_failed_validation(tmp_path: Path) -> None:
    async with serve(MockConfig(**FAST, batch_fail_validation=1)) as server:
        result = await run_job(job_for(server, tmp_path, 12, mode="batch"), QUIET)
        assert server.stats.requests == 0  # nothing was answered
    rows = rows_of(result.output)
    assert {r["status"] for r in rows} == {"error"}
    assert all("failed validation: Validation failed" in r["error"] for r in rows)
    assert all(r["attempts"] == 0 for r in rows)  # nothing paid


async def test_failed_validation_in_a_hybrid_job_goes_online(tmp_path: Path) -> None:
    async with serve(MockConfig(**FAST, batch_fail_validation=1)) as server:
        job = job_for(server, tmp_path, 12, mode="hybrid", deadline="10m")
        result = await run_job(job, QUIET)
        answered_once(server, 12)
        assert (await batch_stats(server))["batches"] == 1
    assert result.exit_code == 0
    assert result.tiers == (("batch", 0), ("online", 12))
    assert {r["tier"] for r in rows_of(result.output)} == {"online"}


async def test_expired_batch(tmp_path: Path) -> None:
    slow = {**FAST, "batch_rows_per_s": 20.0, "batch_expire_s": 0.4}
    async with serve(MockConfig(**slow)) as server:
        result = await run_job(job_for(server, tmp_path, 30, mode="batch"), QUIET)
        stats = await batch_stats(server)
    assert stats["by_status"] == {"expired": 1}
    rows = rows_of(result.output)
    ok = [r for r in rows if r["status"] == "ok"]
    expired = [r for r in rows if r["status"] == "error"]
    assert 0 < len(ok) == stats["answered"] < 30
    assert all("expired before answering this row" in r["error"] for r in expired)
    assert all(r["attempts"] == 0 for r in expired)


async def test_expired_batch_in_a_hybrid_job_sends_the_rest_online(tmp_path: Path) -> None:
    slow = {**FAST, "batch_rows_per_s": 20.0, "batch_expire_s": 0.4}
    async with serve(MockConfig(**slow)) as server:
        job = job_for(server, tmp_path, 30, mode="hybrid", deadline="10m")
        result = await run_job(job, QUIET)
        answered = (await batch_stats(server))["answered"]
        answered_once(server, 30)
    assert result.exit_code == 0
    assert dict(result.tiers) == {"batch": answered, "online": 30 - answered}


async def test_batch_rows_cost_the_batch_discount(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(
        'currency = "USD"\n[models."test-model"]\nprompt_per_million = 1.0\n'
        "completion_per_million = 2.0\nbatch_discount = 0.5\n"
    )
    async with serve(MockConfig(**FAST)) as server:
        job = job_for(server, tmp_path, 20, mode="hybrid", deadline="10m", prices=str(prices))
        hybrid = await run_job(job, QUIET)
        online = await run_job(replace(job, mode="online", output=tmp_path / "on.parquet"), QUIET)
    by_id = {r["id"]: r for r in rows_of(online.output)}
    rows = rows_of(hybrid.output)
    assert [r["tier"] for r in rows].count("batch") == 16
    for row in rows:
        full = by_id[row["id"]]["cost"]
        assert row["cost"] == pytest.approx(full / 2 if row["tier"] == "batch" else full)
    # The summary's cost is the column's sum: the batch rows at half price.
    assert float(hybrid.cost or 0) == pytest.approx(sum(r["cost"] for r in rows))
    assert float(hybrid.cost or 0) < float(online.cost or 0)
    # What the batch saved: its rows' online cost, less what they cost as batch rows.
    saved = sum(r["cost"] for r in rows if r["tier"] == "batch")
    assert float(hybrid.batch_saved or 0) == pytest.approx(saved)
    assert "the batch saved" in hybrid.summary()


# ---- hybrid ---------------------------------------------------------------------------


async def test_hybrid_switches_over_before_the_deadline(tmp_path: Path) -> None:
    """A queue too slow for the deadline: the batch is cancelled in time, its
    partial output kept, and only the rows it did not answer go online."""
    queue = {"batch_rows_per_s": 10.0, "batch_start_s": 0.0, "batch_cancel_s": 0.3}
    async with serve(MockConfig(**queue)) as server:
        job = job_for(server, tmp_path, 60, mode="hybrid", deadline="9s")
        started = time.monotonic()
        result = await run_job(job, QUIET)
        took = time.monotonic() - started
        stats = await batch_stats(server)
        answered_once(server, 60)
    assert result.exit_code == 0 and took < 9
    assert stats["cancels"] == 1 and stats["by_status"] == {"cancelled": 1}
    tiers = dict(result.tiers)
    assert tiers["batch"] == stats["answered"] > 0
    assert tiers["online"] == 60 - tiers["batch"] > 4
    assert "before it" in result.deadline
    rows = rows_of(result.output)
    assert all(r["status"] == "ok" for r in rows)
    assert {r["tier"] for r in rows} == {"batch", "online"}


async def test_hybrid_whose_batch_finishes_first_sends_nothing_more_online(
    tmp_path: Path,
) -> None:
    async with serve(MockConfig(**FAST)) as server:
        result = await run_job(job_for(server, tmp_path, 30, mode="hybrid", deadline="10m"), QUIET)
        answered_once(server, 30)
    # Only the calibration rows went online, before the batch was submitted.
    assert result.tiers == (("batch", 26), ("online", 4))


# ---- durability -------------------------------------------------------------------------


def _state(output: Path) -> dict[str, Any]:
    path = state_folder(output) / "state.json"
    with contextlib.suppress(FileNotFoundError, orjson.JSONDecodeError):
        data: dict[str, Any] = orjson.loads(path.read_bytes())
        return data
    return {}


def _wait_for_batch(output: Path, timeout_s: float = 30.0) -> dict[str, Any]:
    stop = time.monotonic() + timeout_s
    while time.monotonic() < stop:
        state = _state(output)
        if any(p.get("batch_id") for p in state.get("parts", ())):
            return state
        time.sleep(0.05)
    raise AssertionError(f"no batch recorded in {state_folder(output)} within {timeout_s}s")


def _batch_job_cmd(server: Any, output: Path, poll_s: float) -> list[str]:
    """``batchrun run`` of in.jsonl in batch mode, a deadline far off, the batch
    looked at every ``poll_s`` seconds (its last argument)."""
    cmd = [sys.executable, "-m", "batchrun", "run", "--input", "in.jsonl", "--output", str(output)]
    cmd += ["--model", "m", "--prompt-template", "Summarize: {ticket}", "--api-key-env", ""]
    cmd += ["--base-url", server.base_url, "--mode", "batch", "--deadline", "10m"]
    return [*cmd, "--batch-poll-s", f"{poll_s:g}"]


def test_kill_9_while_waiting_then_rerun_reattaches(tmp_path: Path, threaded: Any) -> None:
    server = threaded(lambda: serve(MockConfig(batch_rows_per_s=40.0, batch_start_s=1.0)))
    write_jsonl(tmp_path / "in.jsonl", tickets(60))
    output = tmp_path / "out.parquet"
    cmd = _batch_job_cmd(server, output, poll_s=1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([*cmd, "-q"], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    try:
        state = _wait_for_batch(output)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=90)
    assert rerun.returncode == 0, rerun.stderr.decode()
    answered_once(server, 60)
    stats = asyncio.run(batch_stats(server))
    assert stats["batches"] == 1 and stats["lines"] == 60
    rows = rows_of(output)
    assert {r["status"] for r in rows} == {"ok"} and {r["tier"] for r in rows} == {"batch"}
    # The deadline of the first start is kept.
    assert f"deadline    {local_text(state['deadline_at'])}" in rerun.stderr.decode()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_waiting_stops_at_once_and_the_rerun_reattaches(
    tmp_path: Path, threaded: Any, signum: int, code: int
) -> None:
    """Ctrl-C or SIGTERM while the job waits for its batch: the run stops within a
    second or two with its own exit code, the batch stays open and recorded, and
    the same command picks it up again (one batch, each row answered once)."""
    server = threaded(lambda: serve(MockConfig(batch_rows_per_s=40.0, batch_start_s=1.0)))
    write_jsonl(tmp_path / "in.jsonl", tickets(60))
    output = tmp_path / "out.parquet"
    cmd = _batch_job_cmd(server, output, poll_s=30)  # a stop must not wait for a look
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        state = _wait_for_batch(output)
        time.sleep(0.3)  # into the wait between two looks
        signalled = time.monotonic()
        first.send_signal(signum)
        _, err = first.communicate(timeout=10)
        stopped_s = time.monotonic() - signalled
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert first.returncode == code, err.decode()
    assert stopped_s < 5, stopped_s
    assert "Traceback" not in err.decode()
    assert not output.exists()
    kept = _state(output)
    assert [p["batch_id"] for p in kept["parts"]] == [p["batch_id"] for p in state["parts"]]
    rerun = subprocess.run([*cmd[:-1], "1"], cwd=tmp_path, env=env, capture_output=True, timeout=90)
    assert rerun.returncode == 0, rerun.stderr.decode()
    answered_once(server, 60)
    stats = asyncio.run(batch_stats(server))
    assert stats["batches"] == 1 and stats["lines"] == 60
    assert {r["tier"] for r in rows_of(output)} == {"batch"}


class Crash(BaseException):
    """A crash at a chosen point (kill -9 in one process)."""


async def test_crash_between_creating_a_batch_and_recording_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create = BatchClient.create

    async def create_then_crash(self: BatchClient, file_id: str, tags: Any) -> Any:
        await create(self, file_id, tags)
        raise Crash

    async with serve(MockConfig(**FAST)) as server:
        job = job_for(server, tmp_path, 20, mode="batch")
        monkeypatch.setattr(BatchClient, "create", create_then_crash)
        with pytest.raises(Crash):
            await run_job(job, QUIET)
        part = _state(job.output)["parts"][0]  # type: ignore[arg-type]
        assert part["file_id"] and part["batch_id"] is None
        monkeypatch.setattr(BatchClient, "create", create)
        result = await run_job(job, QUIET)
        stats = await batch_stats(server)
        answered_once(server, 20)
    assert stats["batches"] == 1 and stats["files"] == 1  # one upload: the rerun found the batch
    assert result.exit_code == 0 and result.tiers == (("batch", 20), ("online", 0))


async def test_parts_are_split_at_the_line_and_byte_limits(tmp_path: Path) -> None:
    async with serve(MockConfig(**FAST)) as server:
        job = job_for(server, tmp_path, 20, mode="batch")
        result = await run_batch_job(job, QUIET, limits=PartLimits(rows=7))
        assert result.tiers == (("batch", 20), ("online", 0))
        by_rows = await _input_files(server)
        assert [len(f.splitlines()) for f in by_rows] == [7, 7, 6]
        size = max(len(line) + 1 for line in by_rows[0].splitlines())
        limit = 3 * size
        job = replace(job, output=tmp_path / "by_size.parquet")
        result = await run_batch_job(job, QUIET, limits=PartLimits(bytes=limit))
        by_size = (await _input_files(server))[3:]
        answered_twice = [c for c in server.stats.bodies.values() if c != 2]
    assert result.exit_code == 0 and not answered_twice  # each job answered each row once
    assert len(by_size) >= 7 and all(len(f) <= limit for f in by_size)
    assert sum(len(f.splitlines()) for f in by_size) == 20


async def _input_files(server: MockServer) -> list[bytes]:
    """The input file of every batch, oldest first."""
    async with aiohttp.ClientSession() as http:
        async with http.get(server.base_url + "/batches?limit=100") as resp:
            batches = (await resp.json())["data"]
        files = []
        for batch in reversed(batches):
            url = f"{server.base_url}/files/{batch['input_file_id']}/content"
            async with http.get(url) as resp:
                files.append(await resp.read())
    return files


async def test_restart_cancels_the_open_batches(tmp_path: Path) -> None:
    async with serve(MockConfig(**{**FAST, "batch_rows_per_s": 1.0})) as server:
        job = job_for(server, tmp_path, 10, mode="batch")
        task = asyncio.create_task(run_job(job, QUIET))
        assert job.output is not None
        while not any(p.get("batch_id") for p in _state(job.output).get("parts", ())):
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        restarted = RunOptions(progress=False, restart=True)
        result = await run_job(replace(job, mode="online"), restarted)
        await asyncio.sleep(0.1)
        stats = await batch_stats(server)
    assert stats["cancels"] == 1 and stats["by_status"] == {"cancelled": 1}
    assert result.exit_code == 0 and dict(result.tiers)["online"] == 10


async def test_an_online_rerun_cancels_the_batches_and_keeps_their_answers(
    tmp_path: Path,
) -> None:
    async with serve(MockConfig(**{**FAST, "batch_rows_per_s": 20.0})) as server:
        job = job_for(server, tmp_path, 40, mode="batch")
        task = asyncio.create_task(run_job(job, QUIET))
        assert job.output is not None
        while not any(p.get("batch_id") for p in _state(job.output).get("parts", ())):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        result = await run_job(replace(job, mode="online"), QUIET)
        stats = await batch_stats(server)
        answered_once(server, 40)
    assert stats["cancels"] == 1 and stats["batches"] == 1
    tiers = dict(result.tiers)
    assert tiers["batch"] == stats["answered"] > 0 and tiers["online"] == 40 - tiers["batch"]


# ---- keys, deadline and the switch-over's timing ---------------------------------------------


def test_deadline_forms() -> None:
    start = dt.datetime(2026, 11, 29, 23, 0).astimezone().timestamp()
    six = resolve(parse_deadline("06:00"), start)
    assert dt.datetime.fromtimestamp(six).strftime("%d %H:%M") == "30 06:00"  # the next 06:00
    assert resolve(parse_deadline("23:30"), start) - start == 1800
    assert resolve(parse_deadline("45m"), start) == start + 2700
    assert resolve(parse_deadline("1h30m20s"), start) == start + 5420
    instant = resolve(parse_deadline("2026-11-30T06:00:00+00:00"), start)
    assert instant == dt.datetime(2026, 11, 30, 6, tzinfo=dt.UTC).timestamp()
    for bad in ("6", "25:00", "tomorrow", "0s", "2026-11-30", "45 min"):
        with pytest.raises(ValueError, match=r"deadline|time of day|no time"):
            parse_deadline(bad)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"mode": "hybrid"}, "no `deadline`"),
        ({"mode": "batch", "stream": True}, "stream = true"),
        ({"mode": "batch", "endpoint": "inference"}, 'endpoint = "inference"'),
        ({"mode": "nightly"}, "must be one of: online, batch, hybrid"),
        ({"deadline": "soon"}, "is not a deadline"),
        ({"batch_poll_s": 0.5}, "at least 1"),
        ({"mode": "batch", "prices": "p.toml", "max_cost": 1.0}, "cannot keep to `max_cost`"),
    ],
)
def test_bad_batch_keys(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError, match=message):
        make_job("http://127.0.0.1:1/v1", **keys)


def test_switch_over_leaves_time_for_the_open_rows() -> None:
    job = make_job("http://127.0.0.1:1/v1", mode="hybrid", deadline="1h", concurrency=10)
    state = BatchState(Path(), "run", started_at=1000.0, deadline_at=4600.0, latency_s=2.0)
    # 3,600 s window: 360 s for the cancel, 2 s of slack, and 1.5 x (rows / 5 per s + 2 s).
    assert state.switch_at("hybrid", 1000, job) == pytest.approx(4600 - 360 - 2 - 1.5 * 202)
    assert state.switch_at("hybrid", 0, job) == pytest.approx(4600 - 362)
    assert state.switch_at("batch", 1000, job) == pytest.approx(4600 - 362)
    paced = replace(job, rpm=60.0)  # one row a second
    assert state.switch_at("hybrid", 100, paced) == pytest.approx(4600 - 362 - 1.5 * 102)
    assert state.switch_at("online", 100, job) == 0.0
    assert BatchState(Path(), "run", started_at=0).switch_at("batch", 5, job) is None

"""A hostile or buggy server must not hang a job, poison its budget or break
its output: huge Retry-After asks, impossible usage counts, odd 2xx statuses.
Each test runs a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrun.config import Job
from batchrun.engines.local import run_job
from batchrun.errors import ApiDown, BudgetReached
from batchrun.lifecycle import RunOptions, RunResult
from tests.conftest import FakeSleep, make_job, run_app, tickets, write_jsonl

MODEL = "m-1"


def answer(body: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"resp-{body['messages'][-1]['content'][-12:]}",
        "model": MODEL,
        "choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": usage,
    }


def app_of(handler: Callable[[dict[str, Any], int], web.Response]) -> tuple[web.Application, Any]:
    """An app whose handler gets each body and the how-manieth request of its row it is."""
    seen: collections.Counter[str] = collections.Counter()

    async def chat(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        key = body["messages"][-1]["content"]
        seen[key] += 1
        return handler(body, seen[key])

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app, seen


def job_for(base_url: str, tmp_path: Path, n: int, **keys: Any) -> Job:
    """A job over ``n`` fresh tickets in ``tmp_path``."""
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    output = keys.pop("output", tmp_path / "out.parquet")
    return make_job(base_url, src, output, **({"model": MODEL, "concurrency": 4} | keys))


async def run(job: Job, **options: Any) -> RunResult:
    return await run_job(job, RunOptions(progress=False, **options), sleep=FakeSleep())


# ---- a huge Retry-After stops the job instead of pausing it for years ----------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "1000000000"},
        {"Retry-After": "1e300"},
        {"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"},
        {"Retry-After": "301"},
        {"Retry-After": "1", "retry-after-ms": "1000000000000"},  # read first: 31 years
        {"retry-after-ms": "301000", "x-ratelimit-remaining-requests": "0"},
    ],
)
async def test_a_retry_after_longer_than_batchrun_waits_stops_the_job(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    refuse = True

    def handler(body: dict[str, Any], n: int) -> web.Response:
        if refuse:
            return web.json_response(
                {"error": {"message": "slow down"}}, status=429, headers=headers
            )
        return web.json_response(answer(body, {"prompt_tokens": 5, "completion_tokens": 1}))

    app, seen = app_of(handler)
    async with run_app(app) as base_url:
        job = job_for(base_url, tmp_path, 40)
        started = time.monotonic()
        with pytest.raises(ApiDown) as stopped:
            await run(job)
        assert time.monotonic() - started < 10
        assert stopped.value.exit_code == 3
        assert "Retry-After" in str(stopped.value) and "run the same command again" in str(
            stopped.value
        )
        # Only the first requests went out; no row was recorded as failed.
        assert sum(seen.values()) <= job.workers + 1
        journal = tmp_path / "out.parquet.partial" / "journal.jsonl"
        assert not journal.exists() or journal.read_bytes() == b""
        refuse = False
        result = await run(job)
    assert result.ok == 40 and result.failed == 0


async def test_a_retry_after_within_the_cap_is_waited_for(tmp_path: Path) -> None:
    def handler(body: dict[str, Any], n: int) -> web.Response:
        if n == 1:
            return web.json_response({}, status=429, headers={"Retry-After": "120"})
        return web.json_response(answer(body, {"prompt_tokens": 5, "completion_tokens": 1}))

    app, _ = app_of(handler)
    async with run_app(app) as base_url:
        sleep = FakeSleep()
        result = await run_job(
            job_for(base_url, tmp_path, 3), RunOptions(progress=False), sleep=sleep
        )
    assert result.ok == 3
    assert 120.0 in sleep.waits


# ---- impossible usage never reaches the budget or the Parquet types ------------------


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 2**63, "completion_tokens": 5, "total_tokens": 2**63 + 5},
        {"prompt_tokens": -1_000_000, "completion_tokens": 5},
        {"prompt_tokens": 12.5, "completion_tokens": 5},
        {"prompt_tokens": "12", "completion_tokens": 5},
    ],
)
async def test_impossible_usage_is_recorded_as_not_reported(
    tmp_path: Path, usage: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = app_of(lambda body, n: web.json_response(answer(body, usage)))
    async with run_app(app) as base_url:
        with caplog.at_level(logging.WARNING, logger="batchrun"):
            result = await run(job_for(base_url, tmp_path, 5))
    assert result.ok == 5
    assert result.prompt_tokens == 0 and result.completion_tokens == 0
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["prompt_tokens"] for r in rows] == [None] * 5
    assert [r["total_tokens"] for r in rows] == [None] * 5
    assert "is not a possible count" in caplog.text


async def test_negative_usage_does_not_open_the_budget(tmp_path: Path) -> None:
    """A server reporting negative tokens must stop at max_cost like an honest one."""
    prices = tmp_path / "prices.toml"
    prices.write_text(
        'currency = "USD"\n[models."m-1"]\nprompt_per_million = 1000\ncompletion_per_million = 1000\n'
    )
    sent = {"honest": 0, "negative": 0}
    for kind, usage in (
        ("honest", {"prompt_tokens": 40, "completion_tokens": 5}),
        ("negative", {"prompt_tokens": -100_000, "completion_tokens": 5}),
    ):
        app, seen = app_of(lambda body, n, usage=usage: web.json_response(answer(body, usage)))
        folder = tmp_path / kind
        folder.mkdir()
        async with run_app(app) as base_url:
            job = job_for(
                base_url,
                folder,
                200,
                prices=str(prices),
                max_cost=1.0,
                max_tokens=16,
                concurrency=1,
            )
            with pytest.raises(BudgetReached) as stopped:
                await run(job)
        assert stopped.value.exit_code == 4
        sent[kind] = sum(seen.values())
    assert sent["negative"] <= sent["honest"] < 200


# ---- the status of a 2xx answer is kept as it came ------------------------------------


async def test_a_2xx_status_other_than_200_is_recorded_as_it_came(tmp_path: Path) -> None:
    app, _ = app_of(
        lambda body, n: web.json_response(
            answer(body, {"prompt_tokens": 5, "completion_tokens": 1}), status=299
        )
    )
    async with run_app(app) as base_url:
        result = await run(job_for(base_url, tmp_path, 3))
    assert result.ok == 3
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["http_status"] for r in rows] == [299, 299, 299]


# ---- provenance: the embedded endpoint's answers are never taken for real ones ------


async def test_a_run_against_another_endpoint_refuses_the_mock_output(tmp_path: Path) -> None:
    """make demo, then the real command: refuse (exit 2) rather than keep mock text."""
    from batchrun.errors import ResumeConflict

    app, seen = app_of(
        lambda body, n: web.json_response(
            answer(body, {"prompt_tokens": 5, "completion_tokens": 1})
        )
    )
    async with run_app(app) as base_url:
        job = job_for(base_url, tmp_path, 6)
        demo = await run(job, mock=True)
        assert demo.ok == 6
        meta = orjson.loads(pq.read_schema(tmp_path / "out.parquet").metadata[b"batchrun"])
        assert meta["answered_by"] == "the embedded endpoint (--mock)"
        with pytest.raises(ResumeConflict) as refused:
            await run(job)
        assert refused.value.exit_code == 2
        assert "answered_by" in str(refused.value) and "--restart" in str(refused.value)
        assert sum(seen.values()) == 0
        real = await run(job, restart=True)
    assert real.ok == 6 and sum(seen.values()) == 6
    meta = orjson.loads(pq.read_schema(tmp_path / "out.parquet").metadata[b"batchrun"])
    assert meta["answered_by"] == base_url


async def test_reuse_leaves_out_mock_answers_unless_the_run_is_mocked(tmp_path: Path) -> None:
    app, seen = app_of(
        lambda body, n: web.json_response(
            answer(body, {"prompt_tokens": 5, "completion_tokens": 1})
        )
    )
    async with run_app(app) as base_url:
        earlier = job_for(base_url, tmp_path, 6, output=str(tmp_path / "demo.parquet"))
        await run(earlier, mock=True)
        real = await run(job_for(base_url, tmp_path, 6), reuse=(tmp_path / "demo.parquet",))
        assert real.reused == 0 and sum(seen.values()) == 6
        mocked = await run(
            job_for(base_url, tmp_path, 6, output=str(tmp_path / "again.parquet")),
            mock=True,
            reuse=(tmp_path / "demo.parquet",),
        )
    assert mocked.reused == 6


# ---- latency is the API's time; the client's own throttle is queued_ms ---------------


async def test_latency_is_the_apis_time_and_the_throttle_is_queued(tmp_path: Path) -> None:
    app, _ = app_of(
        lambda body, n: web.json_response(
            answer(body, {"prompt_tokens": 5, "completion_tokens": 1})
        )
    )
    async with run_app(app) as base_url:
        # 40 rows at 1,200 requests a minute (20/s, a burst of one second's worth):
        # the last rows wait about a second for the budget, the server answers at once.
        job = job_for(base_url, tmp_path, 40, rpm=1200, concurrency=40)
        result = await run_job(job, RunOptions(progress=False))
    assert result.ok == 40
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert max(r["queued_ms"] for r in rows) >= 500
    assert max(r["latency_ms"] for r in rows) < 250
    assert all(r["latency_ms"] > 0 for r in rows)

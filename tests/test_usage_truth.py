"""Usage truth: rows answered without usage are counted and named, never shown as
0 tokens; and ``stream_options`` is sent only where the server takes it.

llama.cpp's server sends no usage when streaming, and a strict server that does
not know ``stream_options`` (LLMTune's guide does not list it) refuses the
request with a 400 naming it. The embedded endpoint plays both
(``MockConfig.unknown_fields``, with and without ``strict``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from click.testing import CliRunner

from batchrun.checks import check_job
from batchrun.cli import main
from batchrun.config import Job
from batchrun.engines.local import run_job as local_run_job
from batchrun.lifecycle import RunOptions, RunResult
from batchrun.mock import MockConfig, serve
from batchrun.payload import encode_body
from batchrun.progress import Tally, status_text
from batchrun.stream_options import STATE_FILE
from tests.conftest import (
    FakeSleep,
    assert_exit,
    invoke,
    make_job,
    port_of,
    run_app,
    tickets,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(60)

N = 8
LLAMA_CPP = MockConfig(unknown_fields=("stream_options",))
"""Takes stream_options without a word and sends no usage, as llama.cpp's server does."""
STRICT = MockConfig(strict=True, unknown_fields=("stream_options",))
"""Refuses stream_options with a 400 naming it."""


async def run(job: Job, **options: Any) -> RunResult:
    return await local_run_job(job, RunOptions(progress=False, **options), sleep=FakeSleep())


def rows_of(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def hashes_without_stream_options(job: Job) -> list[str]:
    """Each row's request hash, its body prepared without stream_options."""
    checked = check_job(job, RunOptions(progress=False))
    out = []
    for p in checked.rows():
        body = orjson.loads(p.body)
        del body["stream_options"]
        out.append(request_hash(encode_body(body)))
    return out


def request_hash(body: bytes) -> str:
    from batchrun.payload import request_hash as hash_of

    return hash_of(body)


# ---- rows without usage ------------------------------------------------------------------


async def test_rows_answered_without_usage_are_counted_not_shown_as_zero(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(N))
    async with serve(LLAMA_CPP) as server:
        job = make_job(server.base_url, src, tmp_path / "o.parquet", stream=True)
        result = await run(job)
        assert server.stats.by_outcome == {"ok": N}  # stream_options sent, and ignored
    assert (result.ok, result.no_usage) == (N, N)
    assert result.as_dict()["no_usage"] == N
    summary = result.summary()
    assert "usage not reported for 8 rows" in summary
    assert "prompt 0" not in summary and "total 0" not in summary
    assert all(r["total_tokens"] is None for r in rows_of(job.output))


async def test_a_partial_count_says_it_is_partial(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(N))
    config = MockConfig(fault_rate=0.5, faults=("no-usage",), seed=3)
    async with serve(config) as server:
        job = make_job(server.base_url, src, tmp_path / "o.parquet")
        result = await run(job)
        missing = server.stats.by_outcome["no-usage"]
    assert 0 < missing < N and result.no_usage == missing
    tokens_line = next(line for line in result.summary().splitlines() if line.startswith("tokens"))
    assert f"partial: usage not reported for {missing} rows" in tokens_line
    assert f"prompt {result.prompt_tokens:,}" in tokens_line


def test_the_progress_line_says_the_count_is_partial() -> None:
    tally = Tally(total=10, ok=4, prompt_tokens=0, completion_tokens=0, no_usage=4)
    assert "tokens - (usage not reported for 4 rows)" in status_text(tally)
    tally.prompt_tokens, tally.no_usage = 1200, 1
    assert "tokens 1200+ (usage not reported for 1 row)" in status_text(tally)
    tally.no_usage = 0
    assert "tokens 1200 " in status_text(tally)


async def test_the_report_names_the_rows_without_usage(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(N))
    async with serve(LLAMA_CPP) as server:
        await run(make_job(server.base_url, src, tmp_path / "o.parquet", stream=True))
    result = CliRunner().invoke(main, ["report", str(tmp_path / "o.parquet")])
    assert_exit(result, 0)
    assert "usage not reported for 8 rows" in result.output.lower()
    total = next(line for line in result.output.splitlines() if line.startswith("total"))
    assert total.count("not reported") == 3  # prompt, completion and total tokens
    as_json = CliRunner().invoke(main, ["report", str(tmp_path / "o.parquet"), "--format", "json"])
    assert orjson.loads(as_json.output)["total"]["no_usage"] == N


# ---- stream_options where it is accepted --------------------------------------------------


async def test_a_refused_stream_options_is_dropped_for_the_rest_of_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(N))
    out = tmp_path / "o.parquet"
    async with serve(STRICT) as server:
        job = make_job(server.base_url, src, out, stream=True, concurrency=1)
        with caplog.at_level(logging.INFO, logger="batchrun"):
            result = await run(job)
        assert server.stats.by_outcome == {"400": 1, "ok": N}
    assert (result.ok, result.failed, result.exit_code) == (N, 0, 0)
    assert result.stream_options_refused and "stream_options" in result.stream_options_refused
    assert "stream_options not sent: the server refused it" in result.summary()
    assert result.no_usage == N  # without stream_options, this server sends no usage
    events = [r for r in caplog.records if getattr(r, "event", "") == "stream_options"]
    assert len(events) == 1 and "stream_options" in events[0].getMessage()
    rows = rows_of(out)
    assert [r["attempts"] for r in rows] == [2] + [1] * (N - 1)  # the refused request counts
    assert all(r["status"] == "ok" for r in rows)
    assert [r["request_hash"] for r in rows] == hashes_without_stream_options(job)
    meta = orjson.loads(pq.read_schema(out).metadata[b"batchrun"])
    assert meta["stream_options"]["sent"] is False


async def test_with_many_in_flight_every_refused_row_is_sent_again(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(N))
    async with serve(
        MockConfig(strict=True, unknown_fields=("stream_options",), latency_s=0.02)
    ) as server:
        job = make_job(server.base_url, src, tmp_path / "o.parquet", stream=True, concurrency=4)
        result = await run(job)
        refused = server.stats.by_outcome["400"]
    assert (result.ok, result.failed) == (N, 0) and 1 <= refused <= 4
    assert result.requests == N + refused and result.retries == 0


async def test_rows_waiting_their_turn_go_without_a_refused_stream_options(
    tmp_path: Path,
) -> None:
    """The first request is refused while the other rows wait for the key
    probe's verdict: they go without the field, so the job has one refused
    request, not one per row in line (the Ray engine's searching sender gets
    the same count)."""
    src = write_jsonl(tmp_path / "in.jsonl", tickets(N))
    async with serve(STRICT) as server:
        job = make_job(server.base_url, src, tmp_path / "o.parquet", stream=True, concurrency=4)
        result = await run(job)
        assert server.stats.by_outcome == {"400": 1, "ok": N}
    assert (result.ok, result.requests) == (N, N + 1)


async def test_a_resume_keeps_stream_options_dropped(tmp_path: Path) -> None:
    n = 30
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "o.parquet"
    partial = out.with_name(out.name + ".partial")
    config = MockConfig(strict=True, unknown_fields=("stream_options",), latency_s=0.02)
    async with serve(config) as server:
        job = make_job(server.base_url, src, out, stream=True, concurrency=2)
        task = asyncio.create_task(run(job))
        journal = partial / "journal.jsonl"
        deadline = time.monotonic() + 10
        while not (journal.exists() and journal.read_bytes().count(b"\n") >= 6):
            assert not task.done() and time.monotonic() < deadline
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    kept = orjson.loads((partial / STATE_FILE).read_bytes())
    assert kept["sent"] is False and "stream_options" in kept["refused"]
    done = {orjson.loads(line)["row"] for line in journal.read_bytes().splitlines()}

    async with serve(config, port=port_of(server.base_url)) as again:
        result = await run(make_job(again.base_url, src, out, stream=True, concurrency=2))
        assert again.stats.by_outcome == {"ok": n - len(done)}  # no 400: it starts dropped
    assert result.ok == n and result.resumed == len(done)
    assert result.stream_options_refused == kept["refused"]
    assert [r["request_hash"] for r in rows_of(out)] == hashes_without_stream_options(job)


async def test_reuse_starts_from_what_the_earlier_output_recorded(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(N))
    last_night = tmp_path / "last.parquet"
    async with serve(STRICT) as server:
        await run(make_job(server.base_url, src, last_night, stream=True))
    async with serve(STRICT) as server:
        tonight = make_job(server.base_url, src, tmp_path / "tonight.parquet", stream=True)
        result = await run(tonight, reuse=(last_night,))
        assert server.stats.requests == 0
    assert (result.reused, result.ok) == (N, N)


async def test_a_server_that_takes_stream_options_keeps_getting_it(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(N))
    out = tmp_path / "o.parquet"
    async with serve() as server:
        result = await run(make_job(server.base_url, src, out, stream=True))
    assert (result.ok, result.no_usage, result.stream_options_refused) == (N, 0, None)
    assert "stream_options" not in result.summary() and "usage not reported" not in result.summary()
    assert "stream_options" not in orjson.loads(pq.read_schema(out).metadata[b"batchrun"])
    assert not out.with_name(out.name + ".partial").exists()


async def test_other_400s_are_not_taken_for_a_stream_options_refusal(tmp_path: Path) -> None:
    """Only a 400 whose text names stream_options drops it; any other is the row's error."""
    bodies: list[dict[str, Any]] = []

    async def refuse(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response({"error": {"message": "messages: too long"}}, status=400)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    async with run_app(app) as base_url:
        job = make_job(base_url, src, tmp_path / "o.parquet", stream=True)
        result = await run(job)
    assert result.stream_options_refused is None
    assert len(bodies) == 1 and "stream_options" in bodies[0]


def test_cli_summary_names_both(tmp_path: Path, threaded: Any) -> None:
    server = threaded(lambda: serve(STRICT))
    write_jsonl(tmp_path / "in.jsonl", tickets(N))
    result = invoke(
        "--input", "in.jsonl", "--output", "o.parquet", "--prompt-template", "Summarize: {ticket}",
        "--model", "m", "--base-url", server.base_url, "--api-key-env", "", "--stream",
    )  # fmt: skip
    assert_exit(result, 0)
    assert "stream_options not sent: the server refused it (HTTP 400" in result.stderr
    assert "usage not reported for 8 rows" in result.stderr
    assert "sending streamed requests without stream_options" in result.stderr


async def test_a_refusal_that_stands_without_the_field_is_the_rows_error(tmp_path: Path) -> None:
    """A server that still names stream_options once the field is gone (here: a
    metadata key of that name) gets each row once more, then the row's error:
    never a loop."""
    bodies: list[dict[str, Any]] = []

    async def refuse(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        message = "Unrecognized request argument supplied: stream_options"
        return web.json_response({"error": {"message": message}}, status=400)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    src = write_jsonl(tmp_path / "in.jsonl", tickets(2))
    async with run_app(app) as base_url:
        job = make_job(
            base_url, src, tmp_path / "o.parquet", stream=True, concurrency=1,
            metadata={"stream_options": "a key of ours"},
        )  # fmt: skip
        result = await run(job)
    assert (result.failed, result.stream_options_refused is not None) == (2, True)
    assert ["stream_options" in b for b in bodies] == [True, False, False]
    assert all(b["metadata"]["stream_options"] == "a key of ours" for b in bodies)
    assert [r["attempts"] for r in rows_of(tmp_path / "o.parquet")] == [2, 1]

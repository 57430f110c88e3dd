"""Integration tests of a whole job: ``run_job`` and the ``batchrun run`` command against a
real aiohttp server on 127.0.0.1 (the embedded endpoint, or a small echoing one).

``run_job`` tests run the endpoint in the test's own event loop and inject a fake
``sleep`` into the retry policy, so retry waits take no time and can be checked.
CLI tests are plain functions (the CLI runs its own event loop): their endpoint
runs in a background thread with its own loop, or in-process via ``--mock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrun import __version__, journal, outputs
from batchrun.config import Job
from batchrun.engines.local import run_job as run_engine
from batchrun.errors import JobError, KeyRejected, ResumeConflict
from batchrun.lifecycle import RunOptions, RunResult
from batchrun.mock import FAULT_KINDS_DEFAULT, MockConfig, MockServer, count_tokens, serve
from tests.conftest import (
    REPO,
    TEST_KEY,
    FakeSleep,
    assert_exit,
    invoke,
    make_job,
    port_of,
    run_app,
    tickets,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(30)

MODEL = "test-org/test-model-7b"
TEMPLATE = "Summarize: {ticket}"
SYSTEM = "You are terse."
WRONG_KEY = "sk-wrong-9876543210fedcba-nope"

# What this file's jobs lay over make_job's defaults (None: the Job's default stays,
# LLMTUNE_API_KEY); each call gives its concurrency and max_attempts.
JOB_KEYS: dict[str, Any] = {"model": MODEL, "prompt_template": TEMPLATE, "api_key_env": None}


# ---- helpers -----------------------------------------------------------------


def partial(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def journal_of(output: Path) -> Path:
    return partial(output) / "journal.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def user_prompt(row: dict[str, Any]) -> str:
    return TEMPLATE.format(ticket=row["ticket"])


def expected_completion(i: int) -> str:
    """What the mock answers to ``user_prompt(tickets(n)[i])``: "Summary: " + the first two sentences."""
    return f"Summary: Summarize: Ticket number {i} is broken. Please fix it soon."


def expected_prompt_tokens(*contents: str) -> int:
    return sum(count_tokens(c) + 4 for c in contents)  # 4: the mock's per-message overhead


async def run_job(job: Job, sleep: FakeSleep | None = None, **options: Any) -> RunResult:
    return await run_engine(job, RunOptions(progress=False, **options), sleep=sleep or FakeSleep())


def completion_requests(server: MockServer) -> int:
    return server.stats.requests


async def interrupted_run(job: Job, min_lines: int) -> list[dict[str, Any]]:
    """Start ``job``, cancel it once its journal holds ``min_lines`` results, and
    return the journal's records (the run is left unfinished on disk)."""
    journal = journal_of(job.output)  # type: ignore[arg-type]
    task = asyncio.create_task(run_job(job))
    deadline = time.monotonic() + 10
    while not (journal.exists() and journal.read_bytes().count(b"\n") >= min_lines):
        assert not task.done(), f"the run ended before it could be interrupted: {task.result()}"
        assert time.monotonic() < deadline, "the journal never filled"
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert journal.exists()
    assert not Path(job.output).exists()  # type: ignore[arg-type]
    return [orjson.loads(line) for line in journal.read_bytes().splitlines()]


# ---- a server in a background thread (for the CLI, which runs its own loop) --------


@dataclass
class EchoServer:
    """A small OpenAI-compatible endpoint that echoes the Authorization header in its errors."""

    base_url: str
    seen: dict[str, int]


def echo_app(mode: str) -> tuple[web.Application, dict[str, int]]:
    """mode "mixed": by ticket number i, i%4==0 → 400 echoing the header (LLMTune style),
    i%4==1 → first a 500 echoing it (OpenAI style), i%4==2 → first a plain-text 503
    echoing it, i%4==3 → ok. mode "reject": 401 echoing the header, always.
    mode "long": a plain-text 500 whose key starts near MAX_ERROR_TEXT, always."""
    seen: dict[str, int] = {}

    async def handler(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        body = await request.json()
        content = body["messages"][-1]["content"]
        n = int(re.search(r"Ticket number (\d+)", content).group(1))  # type: ignore[union-attr]
        count = seen[content] = seen.get(content, 0) + 1
        if mode == "reject":
            return web.json_response(
                {"error": "invalid_api_key", "message": f"key {auth!r} is not valid"}, status=401
            )
        if mode == "long":
            return web.Response(status=500, text="upstream failure " + "x" * 255 + f" with {auth}")
        if n % 4 == 0:
            return web.json_response(
                {"error": "invalid_request", "message": f"refused header {auth!r}"}, status=400
            )
        if n % 4 == 1 and count == 1:
            return web.json_response(
                {"error": {"code": "server_error", "message": f"upstream saw {auth}"}}, status=500
            )
        if n % 4 == 2 and count == 1:
            return web.Response(status=503, text=f"proxy error for {auth}")
        return web.json_response(
            {
                "id": f"cmpl-{n}",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"ok {n}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app, seen


@contextlib.asynccontextmanager
async def serve_echo(mode: str) -> AsyncIterator[EchoServer]:
    app, seen = echo_app(mode)
    async with run_app(app) as base_url:
        yield EchoServer(base_url, seen)


# ---- 1. end to end ---------------------------------------------------------------


def typed_tickets(n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(tickets(n)):
        rows.append(
            {
                **row,
                "priority": None if i == 3 else i,
                "score": i / 2,
                "vip": i % 2 == 0,
                "tags": ["a", str(i)],
            }
        )
    return rows


async def test_end_to_end_output(tmp_path: Path, api_key: str, endpoint: MockServer) -> None:
    n = 25
    rows = typed_tickets(n)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    keep = ["customer", "priority", "score", "vip", "tags"]
    job = make_job(
        endpoint.base_url,
        src,
        out,
        **JOB_KEYS,
        concurrency=8,
        max_attempts=5,
        system_prompt=SYSTEM,
        keep_columns=keep,
        metadata={"batch": "e2e"},
    )

    result = await run_job(job)

    assert result.exit_code == 0
    assert (result.rows, result.ok, result.failed, result.resumed) == (n, n, 0, 0)
    assert result.requests == n and result.retries == 0
    assert completion_requests(endpoint) == n
    assert not partial(out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    pf = pq.ParquetFile(out)
    keep_schema = pa.schema(
        [
            pa.field("customer", pa.string()),
            pa.field("priority", pa.int64()),
            pa.field("score", pa.float64()),
            pa.field("vip", pa.bool_()),
            pa.field("tags", pa.string()),  # not a scalar: kept as JSON text
        ]
    )
    schema = pf.schema_arrow
    assert schema.equals(outputs.output_schema(keep_schema), check_metadata=False), schema
    assert schema.names == ["id", "row", *keep, *[f.name for f in outputs.RESULT_FIELDS]]
    assert [str(f.type) for f in schema] == [
        str(f.type) for f in outputs.output_schema(keep_schema)
    ]

    meta_raw = schema.metadata[b"batchrun"]
    meta = orjson.loads(meta_raw)
    assert meta["batchrun_version"] == __version__
    assert meta["run_id"] == result.run_id and re.fullmatch(r"[0-9a-f]{12}", result.run_id)
    assert meta["rows"] == n
    assert meta["job"] == job.settings()
    assert meta["job"]["model"] == MODEL and meta["job"]["api_key_env"] == "LLMTUNE_API_KEY"
    assert TEST_KEY.encode() not in meta_raw
    assert TEST_KEY.encode() not in b"".join(k + v for k, v in schema.metadata.items())

    got = read_rows(out)
    assert len(got) == n
    hashes = set()
    for i, (src_row, r) in enumerate(zip(rows, got, strict=True)):
        assert r["row"] == i and r["id"] == src_row["id"]
        assert r["status"] == "ok" and r["error"] is None and r["http_status"] == 200
        assert r["model"] == MODEL and r["response_model"] == MODEL
        assert r["completion"] == expected_completion(i)
        assert r["finish_reason"] == "stop"
        prompt = expected_prompt_tokens(SYSTEM, user_prompt(src_row))
        completion = count_tokens(expected_completion(i))
        assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (
            prompt,
            completion,
            prompt + completion,
        )
        assert r["attempts"] == 1
        assert r["latency_ms"] > 0
        assert r["started_at"] <= r["finished_at"]
        assert r["response_id"].startswith("chatcmpl-")
        assert re.fullmatch(r"[0-9a-f]{32}", r["request_hash"])
        hashes.add(r["request_hash"])
        assert r["customer"] == src_row["customer"]
        assert r["priority"] == src_row["priority"]
        assert r["score"] == src_row["score"]
        assert r["vip"] is src_row["vip"]
        assert orjson.loads(r["tags"]) == src_row["tags"]
    assert len(hashes) == n
    # request_hash identifies the exact bytes the server received.
    assert {h[:32] for h in endpoint.stats.bodies} == hashes
    assert sum(r["prompt_tokens"] for r in got) == result.prompt_tokens
    assert sum(r["completion_tokens"] for r in got) == result.completion_tokens

    df = pd.read_parquet(out)
    assert len(df) == n
    assert df["id"].tolist() == [r["id"] for r in rows]
    assert df["row"].tolist() == list(range(n))
    assert (df["status"] == "ok").all()
    assert (df["started_at"] <= df["finished_at"]).all()
    assert str(df["started_at"].dt.tz) == "UTC"


async def test_rows_without_id_column_are_numbered(
    tmp_path: Path, api_key: str, endpoint: MockServer
) -> None:
    rows = [{"ticket": r["ticket"]} for r in tickets(12)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    result = await run_job(
        make_job(endpoint.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=5)
    )
    assert result.exit_code == 0
    got = read_rows(out)
    assert [r["id"] for r in got] == [str(i) for i in range(12)]
    assert [r["row"] for r in got] == list(range(12))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
async def test_keep_columns_naming_the_id_column(
    tmp_path: Path, api_key: str, endpoint: MockServer, fmt: str
) -> None:
    rows = tickets(6)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    if fmt == "parquet":
        src = tmp_path / "in.parquet"
        pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "out.parquet"
    job = make_job(
        endpoint.base_url,
        src,
        out,
        **JOB_KEYS,
        concurrency=8,
        max_attempts=5,
        keep_columns=["id", "customer"],
    )
    result = await run_job(job)
    assert result.exit_code == 0
    names = pq.read_schema(out).names
    assert names.count("id") == 1 and "customer" in names
    assert [r["id"] for r in read_rows(out)] == [r["id"] for r in rows]


# ---- 2. Parquet input -------------------------------------------------------------


async def test_parquet_input_matches_jsonl_input(
    tmp_path: Path, api_key: str, endpoint: MockServer
) -> None:
    rows = [{k: v for k, v in r.items() if k != "tags"} for r in typed_tickets(30)]
    jsonl = write_jsonl(tmp_path / "in.jsonl", rows)
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=7)  # several row groups
    keep = ["customer", "priority", "score", "vip"]

    r1 = await run_job(
        make_job(
            endpoint.base_url,
            jsonl,
            tmp_path / "a.parquet",
            **JOB_KEYS,
            concurrency=4,
            max_attempts=5,
            keep_columns=keep,
        )
    )
    r2 = await run_job(
        make_job(
            endpoint.base_url,
            parquet,
            tmp_path / "b.parquet",
            **JOB_KEYS,
            concurrency=4,
            max_attempts=5,
            keep_columns=keep,
        )
    )
    assert r1.exit_code == r2.exit_code == 0

    times = ["latency_ms", "queued_ms", "started_at", "finished_at"]
    a = pq.read_table(tmp_path / "a.parquet")
    b = pq.read_table(tmp_path / "b.parquet")
    assert a.schema.equals(b.schema, check_metadata=False)
    assert a.drop_columns(times).to_pylist() == b.drop_columns(times).to_pylist()
    assert a.num_rows == 30


# ---- 3. retries with Retry-After and backoff ---------------------------------------


def retry_waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits the retry policy chose, from the `retry` events (rounded to ms)."""
    return [r.wait_s for r in caplog.records if getattr(r, "event", None) == "retry"]  # type: ignore[attr-defined]


async def test_429_retry_after_is_waited(
    tmp_path: Path, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="batchrun")
    n = 10
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    config = MockConfig(api_key=TEST_KEY, fail_first=3, fail_first_kind="429", retry_after_s=2)
    async with serve(config) as server:
        sleep = FakeSleep()
        result = await run_job(
            make_job(server.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=5), sleep
        )
        assert server.stats.by_outcome == {"429": 3, "ok": n}
        assert completion_requests(server) == n + 3
    assert result.exit_code == 0 and result.retries == 3 and result.requests == n + 3
    assert retry_waits(caplog) == [2.0, 2.0, 2.0]
    # Every wait went through the injected sleep (the retries', and the job-wide
    # pause after a 429, which is never longer than the Retry-After).
    assert sleep.waits.count(2.0) >= 3
    assert all(0 < w <= 2.0 for w in sleep.waits), sleep.waits
    got = read_rows(out)
    assert all(r["status"] == "ok" for r in got)
    assert sum(r["attempts"] for r in got) == n + 3
    assert [r["id"] for r in got] == [t["id"] for t in tickets(n)]


@pytest.mark.parametrize("kind", ["500", "503", "429-no-retry-after"])
async def test_5xx_retries_use_backoff(
    tmp_path: Path, api_key: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="batchrun")
    n = 10
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    config = MockConfig(api_key=TEST_KEY, fail_first=3, fail_first_kind=kind, retry_after_s=2)
    async with serve(config) as server:
        sleep = FakeSleep()
        result = await run_job(
            make_job(server.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=5), sleep
        )
        assert completion_requests(server) == n + 3
    assert result.exit_code == 0 and result.retries == 3
    waits = retry_waits(caplog)
    # No Retry-After: a jittered backoff from 0.5 s, so a first retry waits at most about that.
    assert len(waits) == 3 and all(0 < w <= 1.0 for w in waits), waits
    assert all(any(abs(w - f) < 0.001 for f in sleep.waits) for w in waits), (waits, sleep.waits)
    assert 2.0 not in sleep.waits
    if kind != "429-no-retry-after":
        assert len(sleep.waits) == 3  # a 5xx does not pause the other rows
    got = read_rows(out)
    assert all(r["status"] == "ok" for r in got)
    assert sum(r["attempts"] for r in got) == n + 3


# ---- 4. a 4xx is not retried --------------------------------------------------------


def long_ticket_rows(n: int, long_row: int) -> list[dict[str, Any]]:
    rows = tickets(n)
    rows[long_row] = {
        **rows[long_row],
        "ticket": "Ticket number 99 " + "word " * 80 + "is too long.",
    }
    return rows


async def test_context_length_400_is_not_retried(tmp_path: Path, api_key: str) -> None:
    n, bad = 10, 4
    src = write_jsonl(tmp_path / "in.jsonl", long_ticket_rows(n, bad))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(api_key=TEST_KEY, context_tokens=40)) as server:
        sleep = FakeSleep()
        result = await run_job(
            make_job(server.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=5), sleep
        )
        assert completion_requests(server) == n
        assert server.stats.by_outcome == {"400": 1, "ok": n - 1}
    assert result.exit_code == 1
    assert (result.ok, result.failed, result.retries) == (n - 1, 1, 0)
    assert sleep.waits == []
    got = read_rows(out)
    row = got[bad]
    assert row["status"] == "error" and row["http_status"] == 400 and row["attempts"] == 1
    assert row["error"].startswith("HTTP 400: context_length_exceeded: Prompt is ")
    assert "over the model's context window of 40 tokens" in row["error"]
    assert row["completion"] is None and row["prompt_tokens"] is None
    assert all(r["status"] == "ok" for i, r in enumerate(got) if i != bad)


def test_cli_context_length_400_exits_1(tmp_path: Path, api_key: str, threaded: Any) -> None:
    server = threaded(lambda: serve(MockConfig(api_key=TEST_KEY, context_tokens=40)))
    src = write_jsonl(tmp_path / "in.jsonl", long_ticket_rows(10, 2))
    result = invoke(
        "--input",
        str(src),
        "--prompt-template",
        TEMPLATE,
        "--model",
        MODEL,
        "--base-url",
        server.base_url,
        "--output",
        "out.parquet",
        "-q",
    )
    assert_exit(result, 1)
    got = read_rows(tmp_path / "out.parquet")
    assert [r["status"] for r in got].count("error") == 1
    assert got[2]["http_status"] == 400


# ---- 5. a bad key ----------------------------------------------------------------


async def test_bad_key_stops_early_and_resumes_with_the_right_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: MockServer
) -> None:
    n, concurrency = 60, 4
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    job = make_job(endpoint.base_url, src, out, **JOB_KEYS, concurrency=concurrency, max_attempts=5)

    monkeypatch.setenv("LLMTUNE_API_KEY", WRONG_KEY)
    with pytest.raises(KeyRejected) as info:
        await run_job(job)
    assert info.value.exit_code == 3
    first = completion_requests(endpoint)
    assert endpoint.stats.by_outcome == {"401": first}
    assert 5 <= first <= concurrency + 5
    message = str(info.value)
    assert WRONG_KEY not in message and TEST_KEY not in message
    assert "LLMTUNE_API_KEY" in message
    assert not out.exists()
    # The 401 answers were held back, not journaled as failed rows.
    journal = journal_of(out)
    assert not journal.exists() or journal.read_bytes() == b""

    monkeypatch.setenv("LLMTUNE_API_KEY", TEST_KEY)
    result = await run_job(job)
    assert result.exit_code == 0
    assert (result.ok, result.failed, result.resumed) == (n, 0, 0)
    assert completion_requests(endpoint) - first == n
    got = read_rows(out)
    assert [r["id"] for r in got] == [t["id"] for t in tickets(n)]
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in got)


async def test_bad_key_on_a_job_smaller_than_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: MockServer
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(2))
    out = tmp_path / "out.parquet"
    monkeypatch.setenv("LLMTUNE_API_KEY", WRONG_KEY)
    with pytest.raises(KeyRejected):
        await run_job(
            make_job(endpoint.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=5)
        )
    assert completion_requests(endpoint) == 2
    assert not out.exists()


def test_cli_bad_key_exits_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threaded: Any
) -> None:
    server = threaded(lambda: serve(MockConfig(api_key=TEST_KEY)))
    monkeypatch.setenv("LLMTUNE_API_KEY", WRONG_KEY)
    src = write_jsonl(tmp_path / "in.jsonl", tickets(30))
    result = invoke(
        "--input",
        str(src),
        "--prompt-template",
        TEMPLATE,
        "--model",
        MODEL,
        "--base-url",
        server.base_url,
        "--output",
        "out.parquet",
        "--concurrency",
        "4",
    )
    assert_exit(result, 3)
    assert "LLMTUNE_API_KEY" in result.stderr
    assert WRONG_KEY not in result.output and TEST_KEY not in result.output
    assert "Traceback" not in result.output
    assert server.stats.requests <= 4 + 5
    assert not (tmp_path / "out.parquet").exists()


# ---- 6. no key variable ------------------------------------------------------------


async def test_missing_key_variable_sends_nothing(tmp_path: Path, endpoint: MockServer) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(5))
    out = tmp_path / "out.parquet"
    with pytest.raises(JobError) as info:
        await run_job(
            make_job(endpoint.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=5)
        )
    assert info.value.exit_code == 2
    assert "LLMTUNE_API_KEY" in str(info.value)
    assert completion_requests(endpoint) == 0
    assert not out.exists() and not partial(out).exists()


# ---- 7. faults ---------------------------------------------------------------------


async def test_random_faults_every_row_ends_ok(tmp_path: Path, api_key: str) -> None:
    n = 80
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    faults = tuple(k for k in FAULT_KINDS_DEFAULT if k != "hang")
    config = MockConfig(api_key=TEST_KEY, fault_rate=0.3, faults=faults, retry_after_s=0.5, seed=1)
    async with serve(config) as server:
        sleep = FakeSleep()
        result = await run_job(
            make_job(server.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=12), sleep
        )
        received = completion_requests(server)
        outcomes = dict(server.stats.by_outcome)
    assert result.exit_code == 0, outcomes
    got = read_rows(out)
    assert len(got) == n
    ids = [r["id"] for r in got]
    assert ids == [t["id"] for t in tickets(n)] and len(set(ids)) == n
    assert all(r["status"] == "ok" for r in got)
    assert sum(r["attempts"] for r in got) == received == result.requests
    assert result.retries == received - n
    # Every kind of fault was met, so every kind was handled.
    assert set(faults) <= set(outcomes), outcomes
    no_usage = [r for r in got if r["prompt_tokens"] is None]
    assert len(no_usage) == outcomes["no-usage"] > 0
    for r in no_usage:
        assert r["completion_tokens"] is None and r["total_tokens"] is None
        assert r["completion"] and r["finish_reason"] == "stop"
    assert 0.5 in sleep.waits  # the 429s' Retry-After


async def test_hang_fault_times_out_and_is_retried(tmp_path: Path, api_key: str) -> None:
    n = 10
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    config = MockConfig(api_key=TEST_KEY, fault_rate=0.3, faults=("hang",), hang_s=2, seed=3)
    async with serve(config) as server:
        started = time.monotonic()
        result = await run_job(
            make_job(
                server.base_url,
                src,
                out,
                **JOB_KEYS,
                concurrency=8,
                max_attempts=10,
                request_timeout_s=0.3,
            )
        )
        elapsed = time.monotonic() - started
        received = completion_requests(server)
        hangs = server.stats.by_outcome.get("hang", 0)
    assert hangs > 0
    assert elapsed < 2.0  # no attempt waited for a hang to end
    assert result.exit_code == 0
    got = read_rows(out)
    assert all(r["status"] == "ok" for r in got)
    assert sum(r["attempts"] for r in got) == received == n + hangs


# ---- 8. too few attempts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "text"),
    [
        ("500", 500, "HTTP 500: server_error: Internal server error"),
        ("429", 429, "HTTP 429: rate_limited: Rate limit exceeded"),
    ],
)
async def test_rows_fail_after_max_attempts(
    tmp_path: Path, api_key: str, kind: str, status: int, text: str
) -> None:
    # Fewer rows than failures.FIRST_ROWS: more, all failing alike, would stop the job.
    n = 4
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with serve(
        MockConfig(api_key=TEST_KEY, fail_first=1000, fail_first_kind=kind, retry_after_s=0.1)
    ) as server:
        result = await run_job(
            make_job(server.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=2)
        )
        assert completion_requests(server) == 2 * n
    assert result.exit_code == 1 and (result.ok, result.failed) == (0, n)
    got = read_rows(out)
    for r in got:
        assert r["status"] == "error" and r["attempts"] == 2 and r["http_status"] == status
        assert r["error"] == text
        assert r["completion"] is None and r["total_tokens"] is None


# ---- 9. resume ---------------------------------------------------------------------


async def test_interrupted_run_resumes_each_row_once(tmp_path: Path, api_key: str) -> None:
    n, concurrency = 40, 4
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(api_key=TEST_KEY, latency_s=0.03)) as server:
        job = make_job(
            server.base_url, src, out, **JOB_KEYS, concurrency=concurrency, max_attempts=5
        )
        done = await interrupted_run(job, min_lines=10)
        first = completion_requests(server)
        assert len(done) < n
        result = await run_job(job)
        total = completion_requests(server)
    assert result.exit_code == 0
    assert result.resumed == len({r["row"] for r in done})
    assert total <= n + concurrency
    assert total - first == n - result.resumed
    got = read_rows(out)
    assert [r["id"] for r in got] == [t["id"] for t in tickets(n)]
    assert all(r["status"] == "ok" for r in got)
    # The rows of the first run were kept, not sent again.
    for rec in done:
        assert got[rec["row"]]["started_at"] == pd.Timestamp(rec["started_at"], unit="us", tz="UTC")
    assert result.run_id == orjson.loads(pq.read_schema(out).metadata[b"batchrun"])["run_id"]


async def test_retry_failed_resends_only_failed_and_missing_rows(
    tmp_path: Path, api_key: str
) -> None:
    n = 30
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    sick = MockConfig(api_key=TEST_KEY, latency_s=0.02, fail_first=4, fail_first_kind="500")
    async with serve(sick) as server:
        done = await interrupted_run(
            make_job(server.base_url, src, out, **JOB_KEYS, concurrency=2, max_attempts=1),
            min_lines=12,
        )
    failed_rows = {r["row"] for r in done if r["status"] == "error"}
    ok_rows = {r["row"] for r in done if r["status"] == "ok"}
    assert len(failed_rows) == 4 and ok_rows

    async with serve(MockConfig(api_key=TEST_KEY), port=port_of(server.base_url)) as healthy:
        job = make_job(healthy.base_url, src, out, **JOB_KEYS, concurrency=2, max_attempts=1)
        result = await run_job(job, retry_failed=True)
        sent = {h[:32] for h in healthy.stats.bodies}
        assert completion_requests(healthy) == n - len(ok_rows)
    assert result.exit_code == 0 and (result.ok, result.failed) == (n, 0)
    got = read_rows(out)
    assert [r["id"] for r in got] == [t["id"] for t in tickets(n)]
    assert all(r["status"] == "ok" for r in got)
    assert sent == {r["request_hash"] for r in got if r["row"] not in ok_rows}
    assert not sent & {got[i]["request_hash"] for i in ok_rows}


async def test_resume_without_retry_failed_keeps_failed_rows(tmp_path: Path, api_key: str) -> None:
    n = 30
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    sick = MockConfig(api_key=TEST_KEY, latency_s=0.02, fail_first=4, fail_first_kind="500")
    async with serve(sick) as server:
        done = await interrupted_run(
            make_job(server.base_url, src, out, **JOB_KEYS, concurrency=2, max_attempts=1),
            min_lines=12,
        )
    async with serve(MockConfig(api_key=TEST_KEY), port=port_of(server.base_url)) as healthy:
        result = await run_job(
            make_job(healthy.base_url, src, out, **JOB_KEYS, concurrency=2, max_attempts=1)
        )
        assert completion_requests(healthy) == n - len({r["row"] for r in done})
    assert result.exit_code == 1 and result.failed == 4
    got = read_rows(out)
    assert sum(r["status"] == "error" for r in got) == 4


async def test_finished_failed_run_then_retry_failed(tmp_path: Path, api_key: str) -> None:
    # Fewer rows than failures.FIRST_ROWS: more, all failing alike, would stop the job.
    n = 4
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(api_key=TEST_KEY, fail_first=n, fail_first_kind="500")) as sick:
        first = await run_job(
            make_job(sick.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=1)
        )
        assert completion_requests(sick) == n
    assert first.exit_code == 1 and first.failed == n
    assert all(r["status"] == "error" for r in read_rows(out))
    async with serve(MockConfig(api_key=TEST_KEY), port=port_of(sick.base_url)) as healthy:
        result = await run_job(
            make_job(healthy.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=1),
            retry_failed=True,
        )
        assert completion_requests(healthy) == n
        assert set(healthy.stats.bodies.values()) == {1}
    assert result.exit_code == 0
    got = read_rows(out)
    assert [r["id"] for r in got] == [t["id"] for t in tickets(n)]
    assert all(r["status"] == "ok" for r in got)


async def test_restart_discards_an_unfinished_run(tmp_path: Path, api_key: str) -> None:
    n = 30
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(api_key=TEST_KEY, latency_s=0.02)) as server:
        job = make_job(server.base_url, src, out, **JOB_KEYS, concurrency=2, max_attempts=5)
        done = await interrupted_run(job, min_lines=6)
        first = completion_requests(server)
        result = await run_job(job, restart=True)
        assert completion_requests(server) - first == n
    assert done and result.resumed == 0 and result.exit_code == 0
    assert len(read_rows(out)) == n


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"model": "another-model"}, id="model"),
        pytest.param({"prompt_template": "Summarise this: {ticket}"}, id="prompt"),
        pytest.param({"max_tokens": 64}, id="max_tokens"),
        pytest.param("input", id="input"),
    ],
)
async def test_changed_job_on_unfinished_run_conflicts(
    tmp_path: Path, api_key: str, change: Any
) -> None:
    n = 20
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(api_key=TEST_KEY, latency_s=0.02)) as server:
        job = make_job(server.base_url, src, out, **JOB_KEYS, concurrency=2, max_attempts=5)
        done = await interrupted_run(job, min_lines=4)
        journal_bytes = journal_of(out).read_bytes()
        before = completion_requests(server)
        if change == "input":
            rows = tickets(n)
            row = done[0]["row"]
            rows[row] = {**rows[row], "ticket": "Something else entirely."}
            write_jsonl(src, rows)
            changed = job
        else:
            changed = make_job(
                server.base_url, src, out, **(JOB_KEYS | change), concurrency=2, max_attempts=5
            )
        with pytest.raises(ResumeConflict) as info:
            await run_job(changed)
        assert info.value.exit_code == 2
        assert "--restart" in str(info.value)
        assert completion_requests(server) == before
        assert journal_of(out).read_bytes() == journal_bytes  # nothing lost
        # --restart gets past it.
        result = await run_job(changed, restart=True)
        assert result.exit_code == 0 and result.resumed == 0


def test_cli_resume_conflict_then_restart(tmp_path: Path, api_key: str, threaded: Any) -> None:
    n = 20
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    server = threaded(lambda: serve(MockConfig(api_key=TEST_KEY, latency_s=0.02)))

    async def leave_unfinished() -> None:
        await interrupted_run(
            make_job(server.base_url, src, out, **JOB_KEYS, concurrency=2, max_attempts=5),
            min_lines=4,
        )

    asyncio.run(leave_unfinished())
    before = server.stats.requests
    args = [
        "--input",
        str(src),
        "--prompt-template",
        TEMPLATE,
        "--base-url",
        server.base_url,
        "--output",
        str(out),
        "--concurrency",
        "2",
        "-q",
    ]
    result = invoke(*args, "--model", "another-model")
    assert_exit(result, 2)
    assert "--restart" in result.stderr and "`model`" in result.stderr
    assert result.stderr.startswith("batchrun: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert server.stats.requests == before and journal_of(out).exists()

    result = invoke(*args, "--model", "another-model", "--restart")
    assert_exit(result, 0)
    assert server.stats.requests - before == n
    assert {r["model"] for r in read_rows(out)} == {"another-model"}


# ---- 10. the key stays secret --------------------------------------------------------


def test_cli_key_never_written_anywhere(
    tmp_path: Path, api_key: str, threaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    journals: list[bytes] = []
    real_finish = journal.Journal.finish

    def finish(self: journal.Journal, *args: Any, **kwargs: Any) -> Path:
        journals.append(self.path.read_bytes())
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(journal.Journal, "finish", finish)
    server = threaded(lambda: serve_echo("mixed"))
    src = write_jsonl(tmp_path / "in.jsonl", tickets(16))
    key = TEST_KEY.encode()
    for fmt in ("text", "json"):
        out = tmp_path / f"out-{fmt}.parquet"
        log = tmp_path / f"log-{fmt}.txt"
        server.seen.clear()
        result = invoke(
            "--input",
            str(src),
            "--prompt-template",
            TEMPLATE,
            "--model",
            MODEL,
            "--base-url",
            server.base_url,
            "--output",
            str(out),
            "--concurrency",
            "4",
            "--log-file",
            str(log),
            "--log-format",
            fmt,
            "-v",
        )
        assert_exit(result, 1)
        got = read_rows(out)
        assert [r["status"] for r in got].count("error") == 4
        errors = [r["error"] for r in got if r["status"] == "error"]
        assert all("[redacted]" in e for e in errors), errors
        assert key not in out.read_bytes()
        assert TEST_KEY not in repr(got)
        assert TEST_KEY not in repr(pq.read_schema(out).metadata)
        assert key not in journals[-1] and b"[redacted]" in journals[-1]
        log_text = log.read_text()
        assert (
            TEST_KEY not in log_text and "[redacted]" in log_text
        )  # the retries and failures are logged
        assert TEST_KEY not in result.output


def test_cli_key_rejected_message_redacts_an_echoed_key(
    tmp_path: Path, api_key: str, threaded: Any
) -> None:
    server = threaded(lambda: serve_echo("reject"))
    src = write_jsonl(tmp_path / "in.jsonl", tickets(20))
    log = tmp_path / "log.jsonl"
    result = invoke(
        "--input",
        str(src),
        "--prompt-template",
        TEMPLATE,
        "--model",
        MODEL,
        "--base-url",
        server.base_url,
        "--output",
        "out.parquet",
        "--concurrency",
        "2",
        "--log-file",
        str(log),
        "--log-format",
        "json",
    )
    assert_exit(result, 3)
    assert "[redacted]" in result.stderr and "LLMTUNE_API_KEY" in result.stderr
    assert TEST_KEY not in result.output
    assert TEST_KEY not in log.read_text()


async def test_key_prefix_not_leaked_by_truncated_error_text(tmp_path: Path, api_key: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    out = tmp_path / "out.parquet"
    async with serve_echo("long") as server:
        result = await run_job(
            make_job(server.base_url, src, out, **JOB_KEYS, concurrency=8, max_attempts=1)
        )
    assert result.failed == 3
    # The key starts a few characters before the error text's length cap: redacting
    # after the cut would leave its first characters in the output.
    for r in read_rows(out):
        assert r["error"].startswith("HTTP 500: upstream failure")
        assert TEST_KEY[:12] not in r["error"], r["error"][-40:]


# ---- 11. the command line -------------------------------------------------------------


def test_cli_job_file_with_mock(tmp_path: Path) -> None:
    out = tmp_path / "summaries.parquet"
    result = invoke(str(REPO / "jobs" / "summarize_tickets.toml"), "--mock", "--output", str(out))
    assert_exit(result, 0)
    assert "rows        200  (ok 200, failed 0)" in result.stderr
    table = pq.read_table(out)
    assert table.num_rows == 200
    assert table.column_names[:5] == ["id", "row", "customer", "priority", "product"]
    got = table.to_pylist()
    assert all(r["status"] == "ok" for r in got)
    assert [r["id"] for r in got] == [f"T-{i:06d}" for i in range(1, 201)]
    assert {r["model"] for r in got} == {"meta-llama/Llama-3.3-70B-Instruct"}
    meta = orjson.loads(table.schema.metadata[b"batchrun"])
    assert meta["job"]["max_tokens"] == 120 and meta["job"]["output"] == str(out)
    assert not (REPO / "out" / "summaries.parquet.partial").exists()


def test_cli_job_from_flags_alone(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "tickets.jsonl", tickets(15))
    result = invoke(
        "--input",
        "tickets.jsonl",
        "--prompt-template",
        "Summarize: {ticket}",
        "--model",
        "m",
        "--output",
        "out.parquet",
        "--mock",
    )
    assert_exit(result, 0)
    got = read_rows(tmp_path / "out.parquet")
    assert [r["id"] for r in got] == [t["id"] for t in tickets(15)]
    assert all(r["status"] == "ok" and r["model"] == "m" for r in got)
    assert got[0]["completion"] == expected_completion(0)


def test_cli_flag_overrides_job_file(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = invoke(
        str(REPO / "jobs" / "summarize_tickets.toml"),
        "--mock",
        "--output",
        str(out),
        "--max-tokens",
        "5",
        "-q",
    )
    assert_exit(result, 0)
    table = pq.read_table(out)
    assert table.num_rows == 200
    assert set(table.column("finish_reason").to_pylist()) == {"length"}
    assert set(table.column("completion_tokens").to_pylist()) == {5}
    assert orjson.loads(table.schema.metadata[b"batchrun"])["job"]["max_tokens"] == 5


def test_cli_unknown_template_column(tmp_path: Path, api_key: str, threaded: Any) -> None:
    server = threaded(lambda: serve(MockConfig(api_key=TEST_KEY)))
    write_jsonl(tmp_path / "in.jsonl", tickets(5))
    result = invoke(
        "--input",
        "in.jsonl",
        "--prompt-template",
        "Summarize: {body}",
        "--model",
        MODEL,
        "--base-url",
        server.base_url,
        "--output",
        "out.parquet",
    )
    assert_exit(result, 2)
    assert "`body`" in result.stderr
    assert "Columns present: id, customer, ticket" in result.stderr
    assert server.stats.requests == 0
    assert (
        not (tmp_path / "out.parquet").exists() and not (tmp_path / "out.parquet.partial").exists()
    )


def test_cli_json_log_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", tickets(10))
    log = tmp_path / "run.log"
    result = invoke(
        "--input",
        "in.jsonl",
        "--prompt-template",
        TEMPLATE,
        "--model",
        "m",
        "--output",
        "out.parquet",
        "--mock",
        "--log-format",
        "json",
        "--log-file",
        str(log),
    )
    assert_exit(result, 0)
    events = [orjson.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert events, "empty log file"
    names = [e["event"] for e in events]
    assert names[0] == "start" and names[-1] == "summary"
    start, summary = events[0], events[-1]
    assert start["rows_total"] == 10 and start["rows_to_send"] == 10 and start["model"] == "m"
    assert summary["rows_ok"] == 10 and summary["rows_failed"] == 0
    assert summary["output"].endswith("out.parquet")
    assert all({"time", "level", "message"} <= set(e) for e in events)


@pytest.mark.parametrize(
    "case",
    [
        "unknown_column",
        "missing_input",
        "job_file_typo",
        "insecure_http",
        "duplicate_ids",
        "no_output_dir",
        "no_key",
    ],
)
def test_cli_exit_2_is_one_paragraph(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = tickets(5)
    if case == "duplicate_ids":
        rows.append(rows[0])
    write_jsonl(tmp_path / "in.jsonl", rows)
    if case != "no_key":
        monkeypatch.setenv("LLMTUNE_API_KEY", TEST_KEY)
    args = [
        "--input",
        "in.jsonl",
        "--prompt-template",
        TEMPLATE,
        "--model",
        "m",
        "--output",
        "out.parquet",
        "--base-url",
        "http://127.0.0.1:9/v1",
    ]  # never reached: every case fails before sending
    if case == "unknown_column":
        args[3] = "Summarize: {nope}"
    elif case == "missing_input":
        args[1] = "nope.jsonl"
    elif case == "job_file_typo":
        (tmp_path / "job.toml").write_text(
            'input = "in.jsonl"\nmodel = "m"\nprompt_template = "{ticket}"\nmax_token = 5\n'
        )
        args = ["job.toml", "--output", "out.parquet"]
    elif case == "insecure_http":
        args[-1] = "http://example.com/v1"
    elif case == "no_output_dir":
        args[7] = "missing/out.parquet"
    result = invoke(*args)
    assert_exit(result, 2)
    err = result.stderr
    assert err.startswith("batchrun: ") and err.endswith("\n")
    assert err.count("\n") == 1, err  # one line, one paragraph
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.parquet.partial").exists()

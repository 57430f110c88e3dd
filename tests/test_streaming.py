"""Tests of streamed answers (``stream = true``): the request asks for SSE and a
usage chunk, the client assembles the chunks into the same completion a plain
answer gives, records the time to first token as ``ttft_ms``, and never stores
half an answer: a stream that is cut, malformed or ends early is retried whole.

End-to-end tests run ``run_job`` against the embedded endpoint (or a small
scripted SSE server) on 127.0.0.1 with a fake sleep, so retry backoffs take no
time. Client unit tests mock HTTP with ``aioresponses``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from aioresponses import aioresponses
from yarl import URL

from batchrun.client import ApiClient
from batchrun.config import Job
from batchrun.engines.local import run_job as api_run_job
from batchrun.errors import (
    BadResponse,
    ConnectionDropped,
    RateLimited,
    RequestTimeout,
    ServerError,
)
from batchrun.lifecycle import RunOptions, RunResult
from batchrun.mock import MockConfig, MockServer, count_tokens, create_app
from tests.conftest import FakeSleep, make_job, run_app, tickets, write_jsonl

pytestmark = pytest.mark.timeout(20)

MODEL = "test-model"
TEMPLATE = "Summarize: {ticket}"
USAGE_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens")

# What this file's jobs lay over make_job's defaults.
JOB_KEYS: dict[str, Any] = {"model": MODEL, "prompt_template": TEMPLATE, "concurrency": 4}


# ---- helpers -----------------------------------------------------------------


def expected_completion(i: int) -> str:
    """What the mock answers to ``TEMPLATE`` over ``tickets(n)[i]``."""
    return f"Summary: Summarize: Ticket number {i} is broken. Please fix it soon."


async def run_job(job: Job, sleep: FakeSleep | None = None) -> RunResult:
    return await api_run_job(job, RunOptions(progress=False), sleep=sleep or FakeSleep())


def read_table(job: Job) -> pa.Table:
    return pq.read_table(job.output)


def read_rows(job: Job) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = read_table(job).to_pylist()
    return rows


@dataclass
class Received:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


@asynccontextmanager
async def recording_serve(
    config: MockConfig | None = None,
) -> AsyncIterator[tuple[MockServer, Received]]:
    """The embedded endpoint plus a middleware that keeps every request body."""
    app = create_app(config or MockConfig())
    received = Received()

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.endswith("/chat/completions"):
            received.bodies.append(orjson.loads(await request.read()))
            received.headers.append(dict(request.headers))
        return await handler(request)  # type: ignore[no-any-return]

    app.middlewares.append(record)
    async with run_app(app) as base_url:
        port = int(URL(base_url).port or 0)
        yield MockServer(app, "127.0.0.1", port), received


def chunk(
    content: str | None = None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
    *,
    role: bool = False,
    choices: Any = None,
) -> dict[str, Any]:
    """One chat.completion.chunk, OpenAI style."""
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    out: dict[str, Any] = {
        "id": "chatcmpl-xyz",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "served-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        if choices is None
        else choices,
    }
    if usage is not None:
        out["usage"] = usage
    return out


def sse(*events: dict[str, Any] | bytes, done: bool = True) -> bytes:
    """An SSE body: each event as ``data: …`` (raw bytes are sent as they are)."""
    out = b""
    for e in events:
        out += e if isinstance(e, bytes) else b"data: " + orjson.dumps(e) + b"\n\n"
    if done:
        out += b"data: [DONE]\n\n"
    return out


USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
FULL = sse(
    chunk("Hello", role=True),
    chunk(", wor"),
    chunk("ld."),
    chunk(finish="stop"),
    chunk(choices=[], usage=USAGE),
)


@asynccontextmanager
async def scripted(*answers: bytes, then: bytes = FULL) -> AsyncIterator[tuple[str, Received]]:
    """A chat endpoint that answers the i-th request with ``answers[i]`` (as an SSE
    stream), and every later one with ``then``."""
    received = Received()

    async def handler(request: web.Request) -> web.Response:
        i = len(received.bodies)
        received.bodies.append(orjson.loads(await request.read()))
        body = answers[i] if i < len(answers) else then
        return web.Response(body=body, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with run_app(app) as base_url:
        yield base_url, received


# ---- the request ------------------------------------------------------------------


async def test_stream_request_asks_for_sse_and_usage(tmp_path: Path) -> None:
    n = 5
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    async with recording_serve() as (server, received):
        result = await run_job(
            make_job(server.base_url, src, tmp_path / "s.parquet", **JOB_KEYS, stream=True)
        )
        assert result.exit_code == 0
        assert len(received.bodies) == n
        for body in received.bodies:
            assert body["stream"] is True
            assert body["stream_options"] == {"include_usage": True}
        received.bodies.clear()
        await run_job(make_job(server.base_url, src, tmp_path / "p.parquet", **JOB_KEYS))
        assert len(received.bodies) == n
        for body in received.bodies:
            assert "stream" not in body and "stream_options" not in body


# ---- stream vs. plain answers --------------------------------------------------------


async def test_streamed_output_equals_plain_output(tmp_path: Path) -> None:
    n = 8
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    async with recording_serve(MockConfig(latency_s=0.02)) as (server, _):
        streamed = make_job(
            server.base_url, src, tmp_path / "streamed.parquet", **JOB_KEYS, stream=True
        )
        plain = make_job(server.base_url, src, tmp_path / "plain.parquet", **JOB_KEYS)
        r1 = await run_job(streamed)
        r2 = await run_job(plain)
    assert r1.exit_code == r2.exit_code == 0
    assert r1.requests == r2.requests == n
    s_rows, p_rows = read_rows(streamed), read_rows(plain)
    same = ["id", "row", "status", "model", "response_model", "completion", "finish_reason",
            *USAGE_COLUMNS, "error", "http_status", "attempts"]  # fmt: skip
    assert [{k: r[k] for k in same} for r in s_rows] == [{k: r[k] for k in same} for r in p_rows]
    assert [r["completion"] for r in s_rows] == [expected_completion(i) for i in range(n)]
    for r in s_rows:
        assert r["status"] == "ok" and r["finish_reason"] == "stop"
        assert r["response_id"] and r["response_id"].startswith("chatcmpl-")
        assert r["completion_tokens"] == count_tokens(r["completion"])
        assert r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"]
    assert r1.prompt_tokens == r2.prompt_tokens and r1.completion_tokens == r2.completion_tokens


async def test_ttft_ms_column_only_for_streamed_jobs(tmp_path: Path) -> None:
    n, latency_s = 6, 0.03
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    async with recording_serve(MockConfig(latency_s=latency_s)) as (server, _):
        streamed = make_job(
            server.base_url, src, tmp_path / "streamed.parquet", **JOB_KEYS, stream=True
        )
        plain = make_job(server.base_url, src, tmp_path / "plain.parquet", **JOB_KEYS)
        await run_job(streamed)
        await run_job(plain)
    s_table, p_table = read_table(streamed), read_table(plain)
    assert s_table.schema.field("ttft_ms").type == pa.float64()
    assert "ttft_ms" not in p_table.schema.names
    assert s_table.schema.names[: len(p_table.schema.names)] == p_table.schema.names
    for r in s_table.to_pylist():
        ttft = r["ttft_ms"]
        assert ttft is not None
        # The server holds every answer latency_s before its first chunk.
        assert latency_s * 1000 * 0.9 <= ttft <= r["latency_ms"]


async def test_stream_without_usage_chunk_leaves_usage_null(tmp_path: Path) -> None:
    n = 4
    config = MockConfig(fault_rate=1.0, faults=("no-usage",))
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    async with recording_serve(config) as (server, _):
        job = make_job(server.base_url, src, tmp_path / "out.parquet", **JOB_KEYS, stream=True)
        result = await run_job(job)
        assert server.stats.by_outcome == {"no-usage": n}
    assert result.exit_code == 0 and result.ok == n
    for i, r in enumerate(read_rows(job)):
        assert r["status"] == "ok" and r["attempts"] == 1
        assert r["completion"] == expected_completion(i)
        assert [r[c] for c in USAGE_COLUMNS] == [None, None, None]
        assert r["ttft_ms"] is not None


async def test_usage_null_on_every_chunk_is_null_usage(tmp_path: Path) -> None:
    # Some servers put "usage": null on every chunk and never send a usage chunk.
    body = sse(chunk("Hi", role=True, usage=None) | {"usage": None},
               chunk(finish="stop") | {"usage": None})  # fmt: skip
    src = write_jsonl(tmp_path / "in.jsonl", tickets(2))
    async with scripted(then=body) as (base_url, _):
        job = make_job(base_url, src, tmp_path / "out.parquet", **JOB_KEYS, stream=True)
        assert (await run_job(job)).exit_code == 0
    for r in read_rows(job):
        assert r["completion"] == "Hi" and r["finish_reason"] == "stop"
        assert [r[c] for c in USAGE_COLUMNS] == [None, None, None]


# ---- broken streams are retried whole ---------------------------------------------------


async def test_cut_stream_is_retried_and_stored_whole(tmp_path: Path) -> None:
    n = 4
    config = MockConfig(fail_first=n, fail_first_kind="stream-cut")
    sleep = FakeSleep()
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    async with recording_serve(config) as (server, _):
        job = make_job(
            server.base_url,
            src,
            tmp_path / "out.parquet",
            **(JOB_KEYS | {"concurrency": n}),
            stream=True,
        )
        result = await run_job(job, sleep)
        assert server.stats.by_outcome == {"stream-cut": n, "ok": n}
    assert result.exit_code == 0 and result.retries == n and len(sleep.waits) == n
    rows = read_rows(job)
    # Which row meets which cut depends on arrival order (the first request goes
    # alone while the key is unproven); every cut costs exactly one more attempt.
    assert sum(r["attempts"] for r in rows) == 2 * n
    for i, r in enumerate(rows):
        assert r["status"] == "ok" and r["attempts"] >= 1
        assert r["completion"] == expected_completion(i)
        assert r["total_tokens"] is not None and r["error"] is None


async def test_cut_stream_without_retries_fails_with_no_partial_answer(tmp_path: Path) -> None:
    n = 3
    config = MockConfig(fail_first=n, fail_first_kind="stream-cut")
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    async with recording_serve(config) as (server, _):
        job = make_job(
            server.base_url, src, tmp_path / "out.parquet", **JOB_KEYS, stream=True, max_attempts=1
        )
        result = await run_job(job)
    assert result.exit_code == 1 and result.failed == n
    for r in read_rows(job):
        assert r["status"] == "error" and r["attempts"] == 1
        assert "stream ended" in r["error"] or "connection" in r["error"].lower(), r["error"]
        assert r["completion"] is None and r["finish_reason"] is None
        assert [r[c] for c in USAGE_COLUMNS] == [None, None, None]
        assert r["ttft_ms"] is None


@pytest.mark.parametrize(
    ("kind", "errors"),
    [
        ("malformed", ("stream chunk is not JSON",)),
        # Cut at half its bytes: the last line is half a chunk (unless the cut
        # falls between events), and no [DONE] comes.
        ("truncated", ("stream chunk is not JSON", "stream ended before data: [DONE]")),
    ],
    ids=["malformed", "truncated"],
)
async def test_broken_stream_is_retried_then_fails_with_no_partial_answer(
    tmp_path: Path, kind: str, errors: tuple[str, ...]
) -> None:
    n = 3
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    async with recording_serve(MockConfig(fail_first=n, fail_first_kind=kind)) as (server, _):
        retried = make_job(
            server.base_url,
            src,
            tmp_path / "retried.parquet",
            **(JOB_KEYS | {"concurrency": n}),
            stream=True,
        )
        assert (await run_job(retried)).exit_code == 0
        assert server.stats.by_outcome == {kind: n, "ok": n}
        server.stats.reset()  # re-arms fail_first
        once = make_job(
            server.base_url, src, tmp_path / "once.parquet", **JOB_KEYS, stream=True, max_attempts=1
        )
        assert (await run_job(once)).exit_code == 1
    rows = read_rows(retried)
    assert sum(r["attempts"] for r in rows) == 2 * n  # one more attempt per broken stream
    for i, r in enumerate(rows):
        assert (r["status"], r["completion"]) == ("ok", expected_completion(i))
    for r in read_rows(once):
        assert r["status"] == "error" and any(e in r["error"] for e in errors), r["error"]
        assert r["completion"] is None and r["ttft_ms"] is None


async def test_malformed_chunk_midway_is_retried_never_stored_half(tmp_path: Path) -> None:
    half = sse(chunk("Hello", role=True), chunk(", wor"), b"data: {oops\n\n", chunk("ld."))
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    async with scripted(half) as (base_url, received):
        job = make_job(base_url, src, tmp_path / "out.parquet", **JOB_KEYS, stream=True)
        result = await run_job(job)
    assert result.exit_code == 0 and len(received.bodies) == 2
    (r,) = read_rows(job)
    assert (r["status"], r["attempts"], r["completion"]) == ("ok", 2, "Hello, world.")
    assert (r["prompt_tokens"], r["total_tokens"]) == (9, 13)


async def test_stream_ending_early_is_retried_never_stored_half(tmp_path: Path) -> None:
    early = sse(chunk("Hello", role=True), chunk(", wor"), done=False)
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    async with scripted(early, early) as (base_url, received):
        job = make_job(base_url, src, tmp_path / "out.parquet", **JOB_KEYS, stream=True)
        result = await run_job(job)
    assert result.exit_code == 0 and len(received.bodies) == 3
    (r,) = read_rows(job)
    assert (r["status"], r["attempts"], r["completion"]) == ("ok", 3, "Hello, world.")


async def test_error_event_in_stream_is_retried_not_stored_half(tmp_path: Path) -> None:
    failed = sse(
        chunk("Hello", role=True),
        {"error": {"message": "engine overloaded", "type": "server_error", "code": 500}},
    )
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    async with scripted(failed) as (base_url, received):
        job = make_job(base_url, src, tmp_path / "out.parquet", **JOB_KEYS, stream=True)
        await run_job(job)
    (r,) = read_rows(job)
    assert (r["status"], r["completion"]) == ("ok", "Hello, world.")
    assert r["attempts"] == 2 and len(received.bodies) == 2


async def test_chunk_of_the_wrong_shape_is_retried_not_a_crash(tmp_path: Path) -> None:
    odd = sse(chunk(choices=["not an object"]))
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    async with scripted(odd) as (base_url, received):
        job = make_job(base_url, src, tmp_path / "out.parquet", **JOB_KEYS, stream=True)
        result = await run_job(job)
    assert result.exit_code == 0 and len(received.bodies) == 2
    (r,) = read_rows(job)
    assert (r["status"], r["attempts"], r["completion"]) == ("ok", 2, "Hello, world.")


# ---- client unit tests (aioresponses) ---------------------------------------------------

BASE_URL = "https://api.example.test/v1"
CHAT_URL = f"{BASE_URL}/chat/completions"
BODY = b'{"model":"test-model","messages":[{"role":"user","content":"hi"}],"stream":true}'


@pytest.fixture
async def client() -> AsyncIterator[ApiClient]:
    job = make_job(
        BASE_URL,
        model=MODEL,
        prompt_template=TEMPLATE,
        api_key_env=None,
        request_timeout_s=None,
        stream=True,
    )
    async with ApiClient(job, None) as c:
        yield c


def stream_reply(mocked: aioresponses, body: bytes, status: int = 200) -> None:
    mocked.post(CHAT_URL, status=status, body=body, content_type="text/event-stream")


async def test_client_assembles_chunks(mocked: aioresponses, client: ApiClient) -> None:
    stream_reply(mocked, FULL)
    got = await client.complete(BODY)
    assert got.text == "Hello, world."
    assert got.finish_reason == "stop"
    assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == (9, 4, 13)
    assert got.response_id == "chatcmpl-xyz" and got.response_model == "served-model"
    assert got.ttft_ms is not None and got.ttft_ms > 0


async def test_client_skips_comments_blank_and_event_lines(
    mocked: aioresponses, client: ApiClient
) -> None:
    body = (
        b": keep-alive comment\n\n"
        b"event: message\n"
        b"id: 1\n"
        b"retry: 3000\n"
        b"data: " + orjson.dumps(chunk("Hel", role=True)) + b"\n\n"
        b"\n\n\n"
        b": another comment\n"
        b"event: message\r\n"
        b"data:" + orjson.dumps(chunk("lo")) + b"\r\n\r\n"  # no space after "data:", CRLF
        b"data: " + orjson.dumps(chunk(finish="stop")) + b"\n\n"
        b"data:[DONE]\n\n"
    )
    stream_reply(mocked, body)
    got = await client.complete(BODY)
    assert (got.text, got.finish_reason) == ("Hello", "stop")
    assert got.total_tokens is None


async def test_client_finish_reason_from_the_last_chunk_that_has_one(
    mocked: aioresponses, client: ApiClient
) -> None:
    body = sse(
        chunk("a", role=True, finish=None),
        chunk("b", finish=None),
        chunk(finish="length"),
        chunk(choices=[], usage=USAGE),
    )
    stream_reply(mocked, body)
    got = await client.complete(BODY)
    assert (got.text, got.finish_reason, got.total_tokens) == ("ab", "length", 13)


async def test_client_usage_from_the_final_chunk_ignores_null_usage(
    mocked: aioresponses, client: ApiClient
) -> None:
    body = sse(
        chunk("a", role=True) | {"usage": None},
        chunk(finish="stop") | {"usage": None},
        chunk(choices=[], usage={"prompt_tokens": 5, "completion_tokens": 1}),
    )
    stream_reply(mocked, body)
    got = await client.complete(BODY)
    assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == (5, 1, 6)


async def test_client_ignores_anything_after_done(mocked: aioresponses, client: ApiClient) -> None:
    body = sse(chunk("a", role=True), chunk(finish="stop")) + sse(chunk("junk"), b"data: {x\n\n")
    stream_reply(mocked, body)
    got = await client.complete(BODY)
    assert got.text == "a"


async def test_client_ttft_is_the_first_content_not_the_role(
    mocked: aioresponses, client: ApiClient
) -> None:
    stream_reply(mocked, sse(chunk(role=True), chunk(role=True), chunk("a"), chunk(finish="stop")))
    got = await client.complete(BODY)
    assert got.text == "a" and got.ttft_ms is not None
    # A stream with no content at all is an empty answer (test_answers), not an ok one.
    stream_reply(mocked, sse(chunk(role=True), chunk(finish="stop")))
    with pytest.raises(BadResponse, match="no text"):
        await client.complete(BODY)


@pytest.mark.parametrize(
    "body",
    [
        sse(chunk("Hello", role=True), chunk(", wor"), done=False),
        sse(
            chunk("Hello", role=True),
            chunk(finish="stop"),
            chunk(choices=[], usage=USAGE),
            done=False,
        ),
        b"",
        b": only a comment\n\n",
    ],
    ids=["midway", "all-but-done", "empty", "comment-only"],
)
async def test_client_missing_done_is_connection_dropped(
    mocked: aioresponses, client: ApiClient, body: bytes
) -> None:
    stream_reply(mocked, body)
    with pytest.raises(ConnectionDropped, match=r"stream ended before data: \[DONE\]") as info:
        await client.complete(BODY)
    assert info.value.retryable


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (b"data: {not json\n\n", "not JSON"),
        (b'data: "just a string"\n\n', "not a JSON object"),
        (b"data: [1, 2]\n\n", "not a JSON object"),
    ],
    ids=["not-json", "string", "array"],
)
async def test_client_unreadable_chunk_is_bad_response(
    mocked: aioresponses, client: ApiClient, bad: bytes, match: str
) -> None:
    stream_reply(mocked, sse(chunk("Hello", role=True), bad, chunk(finish="stop")))
    with pytest.raises(BadResponse, match=match) as info:
        await client.complete(BODY)
    assert info.value.retryable and info.value.status == 200


@pytest.mark.parametrize(
    "odd",
    [
        chunk(choices=["not an object"]),
        chunk(choices=[{"index": 0, "delta": "text", "finish_reason": None}]),
        chunk(choices=[{"index": 0, "delta": {"content": 5}, "finish_reason": None}]),
        chunk(choices={"index": 0}),
    ],
    ids=["choice-str", "delta-str", "content-int", "choices-object"],
)
async def test_client_chunk_of_the_wrong_shape_is_bad_response(
    mocked: aioresponses, client: ApiClient, odd: dict[str, Any]
) -> None:
    stream_reply(mocked, sse(odd, chunk(finish="stop")))
    with pytest.raises(BadResponse):
        await client.complete(BODY)


async def test_client_stream_job_error_statuses_are_read_as_errors(
    mocked: aioresponses, client: ApiClient
) -> None:
    mocked.post(
        CHAT_URL,
        status=429,
        headers={"Retry-After": "2"},
        payload={"error": "rate_limited", "message": "slow down"},
    )
    with pytest.raises(RateLimited) as info:
        await client.complete(BODY)
    assert info.value.retry_after == 2.0 and "slow down" in str(info.value)
    mocked.post(CHAT_URL, status=503, body="busy", content_type="text/plain")
    with pytest.raises(ServerError, match="HTTP 503: busy"):
        await client.complete(BODY)


async def test_client_stream_read_timeout_is_request_timeout() -> None:
    """A server that sends a first chunk and then stalls hits the request timeout."""

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse(chunk("Hel", role=True), done=False))
        await asyncio.sleep(5)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stall)
    async with run_app(app) as base_url:
        job = make_job(
            base_url,
            model=MODEL,
            prompt_template=TEMPLATE,
            api_key_env=None,
            stream=True,
            request_timeout_s=0.2,
        )
        t0 = time.monotonic()
        async with ApiClient(job, None) as c:
            with pytest.raises(RequestTimeout):
                await c.complete(BODY)
        assert time.monotonic() - t0 < 2.0

"""Honest answers: what batchrun records for answers that are not plain text.

A real server may answer with ``content: null``, a list of content parts, a
refusal, only tool calls, a stream whose events are not OpenAI chunks, or a
stream that ends (``data: [DONE]``) before any finish reason. None of these is
an ``ok`` row with an empty completion: text parts are joined; a refusal and
tool calls the request did not offer are ``invalid`` rows with their own
columns; an answer that says nothing, a stream with no chat chunk and a stream
without a finish reason are retried like an unreadable body and end ``error``.

End to end against the embedded endpoint (its answer kinds, ``MockConfig.faults``)
on 127.0.0.1 with a fake sleep; unit tests of ``parse_completion`` and of the
stream reading with ``aioresponses``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aioresponses import aioresponses

from batchrun.client import ApiClient
from batchrun.config import Job
from batchrun.engines.local import run_job as local_run_job
from batchrun.errors import BadResponse, EmptyAnswer
from batchrun.lifecycle import RunOptions, RunResult
from batchrun.mock import MockConfig, serve
from batchrun.mock.answers import REFUSAL, TOOL_NAME
from batchrun.payload import parse_completion
from tests.conftest import FakeSleep, make_job, tickets, write_jsonl
from tests.test_streaming import chunk, sse

pytestmark = pytest.mark.timeout(30)

N = 3
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


def expected(i: int) -> str:
    return f"Summary: Summarize: Ticket number {i} is broken. Please fix it soon."


async def run(
    tmp_path: Path, config: MockConfig, **keys: Any
) -> tuple[RunResult, list[dict[str, Any]], dict[str, int]]:
    """A job of N tickets against the embedded endpoint set up by ``config``:
    its result, its output rows and what the endpoint counted."""
    src = write_jsonl(tmp_path / "in.jsonl", tickets(N))
    out = tmp_path / "out.parquet"
    async with serve(config) as server:
        job: Job = make_job(
            server.base_url, src, out, **{"concurrency": 2, "max_attempts": 3, **keys}
        )
        result = await local_run_job(job, RunOptions(progress=False), sleep=FakeSleep())
        outcomes = dict(server.stats.by_outcome)
    return result, pq.read_table(out).to_pylist(), outcomes


STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])


# ---- content parts are text ----------------------------------------------------------------


@STREAMS
async def test_text_content_parts_are_joined(tmp_path: Path, stream: bool) -> None:
    config = MockConfig(fault_rate=1.0, faults=("content-parts",))
    result, rows, _ = await run(tmp_path, config, stream=stream)
    assert result.exit_code == 0
    assert [r["completion"] for r in rows] == [expected(i) for i in range(N)]
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in rows)


def test_only_text_parts_are_text() -> None:
    content = [
        {"type": "text", "text": "Hello, "},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "world."},
        "stray",
    ]
    got = parse_completion(answer({"content": content}))
    assert got.text == "Hello, world."


# ---- refusals and tool calls are not ok answers --------------------------------------------


@STREAMS
async def test_a_refusal_is_an_invalid_row_with_its_own_column(
    tmp_path: Path, stream: bool
) -> None:
    config = MockConfig(fault_rate=1.0, faults=("refusal",))
    result, rows, outcomes = await run(tmp_path, config, stream=stream)
    assert outcomes == {"refusal": N}  # not asked again: a refusal is an answer
    assert (result.ok, result.invalid, result.exit_code) == (0, N, 1)
    for r in rows:
        assert r["status"] == "invalid" and r["attempts"] == 1
        assert r["refusal"] == REFUSAL and r["completion"] is None
        assert r["error"] == f"the model refused: {REFUSAL}"
        assert r["prompt_tokens"] and r["completion_tokens"]  # it was paid


@STREAMS
async def test_tool_calls_the_request_did_not_offer_are_an_invalid_row(
    tmp_path: Path, stream: bool
) -> None:
    config = MockConfig(fault_rate=1.0, faults=("tool-calls",))
    result, rows, outcomes = await run(tmp_path, config, stream=stream)
    assert outcomes == {"tool-calls": N}
    assert (result.ok, result.invalid, result.exit_code) == (0, N, 1)
    for i, r in enumerate(rows):
        assert r["status"] == "invalid" and r["finish_reason"] == "tool_calls"
        assert r["completion"] is None
        [call] = orjson.loads(r["tool_calls"])
        assert call["function"]["name"] == TOOL_NAME and call["id"].startswith("call_")
        assert orjson.loads(call["function"]["arguments"]) == {"summary": expected(i)}
        assert "tool call" in r["error"] and "offered no tools" in r["error"]


@STREAMS
async def test_tool_calls_are_the_answer_when_the_request_offers_tools(
    tmp_path: Path, stream: bool
) -> None:
    tools = [{"type": "function", "function": {"name": TOOL_NAME, "parameters": {}}}]
    config = MockConfig(fault_rate=1.0, faults=("tool-calls",))
    result, rows, _ = await run(tmp_path, config, stream=stream, params={"tools": tools})
    assert (result.ok, result.exit_code) == (N, 0)
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None and r["completion"] is None
        assert orjson.loads(r["tool_calls"])[0]["function"]["name"] == TOOL_NAME


async def test_plain_answers_leave_the_new_columns_null(tmp_path: Path) -> None:
    result, rows, _ = await run(tmp_path, MockConfig())
    assert result.exit_code == 0
    assert [(r["refusal"], r["tool_calls"]) for r in rows] == [(None, None)] * N


# ---- answers that say nothing are retried, then errors ----------------------------------------


@STREAMS
async def test_an_empty_answer_is_retried_then_an_error(tmp_path: Path, stream: bool) -> None:
    config = MockConfig(fault_rate=1.0, faults=("no-content",))
    result, rows, outcomes = await run(tmp_path, config, stream=stream)
    assert outcomes == {"no-content": 3 * N}
    assert (result.ok, result.failed, result.exit_code) == (0, N, 1)
    for r in rows:
        assert r["status"] == "error" and r["attempts"] == 3 and r["completion"] is None
        assert "no text, no tool call and no refusal" in r["error"]
        assert r["prompt_tokens"] and r["prompt_tokens"] % 3 == 0  # three paid answers


@STREAMS
async def test_an_empty_answer_once_is_retried_to_the_real_one(
    tmp_path: Path, stream: bool
) -> None:
    config = MockConfig(fail_first=1, fail_first_kind="no-content")
    result, rows, _ = await run(tmp_path, config, stream=stream, concurrency=1)
    assert (result.ok, result.retries) == (N, 1)
    assert rows[0]["attempts"] == 2
    assert rows[0]["prompt_tokens"] == 2 * rows[1]["prompt_tokens"]  # both answers were paid
    assert [r["completion"] for r in rows] == [expected(i) for i in range(N)]


async def test_a_stream_of_events_that_are_not_chat_chunks_is_an_error(tmp_path: Path) -> None:
    config = MockConfig(fault_rate=1.0, faults=("token-stream",))
    result, rows, _ = await run(tmp_path, config, stream=True)
    assert (result.ok, result.failed, result.exit_code) == (0, N, 1)
    for r in rows:
        assert r["status"] == "error" and r["completion"] is None
        assert "not OpenAI chat chunks" in r["error"] and '{"token"' in r["error"]
        assert "stream = false" in r["error"]


@pytest.mark.parametrize("always", [False, True], ids=["once", "always"])
async def test_a_stream_ending_without_a_finish_reason_is_never_stored(
    tmp_path: Path, always: bool
) -> None:
    """llama.cpp's server ends a running stream with [DONE] when another request
    arrives: the half answer is retried whole, never an ok row."""
    config = (
        MockConfig(fault_rate=1.0, faults=("early-done",))
        if always
        else MockConfig(fail_first=1, fail_first_kind="early-done")
    )
    result, rows, _ = await run(tmp_path, config, stream=True, concurrency=1)
    if always:
        assert (result.ok, result.failed) == (0, N)
        for r in rows:
            assert r["status"] == "error" and r["completion"] is None
            assert "without a finish_reason" in r["error"]
    else:
        assert (result.ok, result.retries) == (N, 1)
        assert [r["completion"] for r in rows] == [expected(i) for i in range(N)]
        assert {r["finish_reason"] for r in rows} == {"stop"}


# ---- parse_completion ---------------------------------------------------------------------


def answer(message: Any, finish: str | None = "stop", usage: Any = USAGE) -> dict[str, Any]:
    return {
        "id": "r",
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": None},
        {"role": "assistant"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": []},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": 5},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "assistant", "content": None, "refusal": ""},
        "just text",
        None,
    ],
    ids=[
        "null",
        "missing",
        "empty",
        "no-parts",
        "image-part",
        "number",
        "no-calls",
        "empty-refusal",
        "message-str",
        "message-null",
    ],
)
def test_an_answer_that_says_nothing_is_an_empty_answer(message: Any) -> None:
    with pytest.raises(EmptyAnswer, match="no text, no tool call and no refusal") as info:
        parse_completion(answer(message))
    assert isinstance(info.value, BadResponse) and info.value.retryable
    paid = info.value.answer  # what the answer cost, for the row's usage
    assert (paid.prompt_tokens, paid.completion_tokens, paid.total_tokens) == (9, 4, 13)


def test_refusal_and_tool_calls_are_read() -> None:
    refused = parse_completion(answer({"content": None, "refusal": "No."}))
    assert (refused.text, refused.refusal, refused.tool_calls) == (None, "No.", None)
    parts = parse_completion(answer({"content": [{"type": "refusal", "refusal": "Not that."}]}))
    assert (parts.text, parts.refusal) == (None, "Not that.")
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    called = parse_completion(answer({"content": None, "tool_calls": calls}, "tool_calls"))
    assert called.text is None and orjson.loads(called.tool_calls or "") == calls
    both = parse_completion(answer({"content": "Let me look.", "tool_calls": calls}))
    assert both.text == "Let me look." and both.tool_calls is not None


# ---- stream reading -----------------------------------------------------------------------

BASE_URL = "https://api.example.test/v1"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'


@pytest.fixture
async def client() -> Any:
    job = make_job(BASE_URL, api_key_env=None, stream=True)
    async with ApiClient(job, None) as c:
        yield c


def reply(mocked: aioresponses, body: bytes) -> None:
    mocked.post(f"{BASE_URL}/chat/completions", body=body, content_type="text/event-stream")


async def test_tool_call_deltas_are_assembled(mocked: aioresponses, client: ApiClient) -> None:
    first = {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "lookup", "arguments": ""}}  # fmt: skip
    second = {"index": 1, "id": "call_2", "type": "function",
              "function": {"name": "other", "arguments": "{}"}}  # fmt: skip
    deltas = [
        {"role": "assistant", "content": None, "tool_calls": [first]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}, second]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]},
    ]
    events = [chunk(choices=[{"index": 0, "delta": d, "finish_reason": None}]) for d in deltas]
    reply(mocked, sse(*events, chunk(finish="tool_calls"), chunk(choices=[], usage=USAGE)))
    got = await client.complete(BODY)
    assert got.text is None and got.finish_reason == "tool_calls"
    assert orjson.loads(got.tool_calls or "") == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"q": "x"}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "other", "arguments": "{}"}},
    ]
    assert got.total_tokens == 13


@pytest.mark.parametrize(
    "body",
    [
        sse({"token": "Hel"}, {"token": "lo"}),
        sse({"text": "Hello", "done": True}),
        sse(chunk(choices=[], usage=USAGE)),
        sse(),
    ],
    ids=["tokens", "text", "usage-only", "done-only"],
)
async def test_a_stream_without_a_chat_chunk_is_a_bad_response(
    mocked: aioresponses, client: ApiClient, body: bytes
) -> None:
    reply(mocked, body)
    with pytest.raises(BadResponse, match="not OpenAI chat chunks"):
        await client.complete(BODY)


async def test_a_stream_without_a_finish_reason_is_a_bad_response(
    mocked: aioresponses, client: ApiClient
) -> None:
    reply(mocked, sse(chunk("Hel", role=True), chunk("lo")))
    with pytest.raises(BadResponse, match="without a finish_reason"):
        await client.complete(BODY)


async def test_an_empty_stream_is_an_empty_answer(mocked: aioresponses, client: ApiClient) -> None:
    reply(mocked, sse(chunk(role=True), chunk(finish="stop"), chunk(choices=[], usage=USAGE)))
    with pytest.raises(EmptyAnswer) as info:
        await client.complete(BODY)
    assert info.value.answer.total_tokens == 13 and info.value.status == 200


async def test_refusals_and_tool_calls_are_redacted(mocked: aioresponses) -> None:
    """A server echoing the key in a refusal or a tool call's arguments: neither
    column, nor the error made from them, holds it."""
    from tests.conftest import TEST_KEY

    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": TEST_KEY}}]
    refused = answer({"content": None, "refusal": f"No, {TEST_KEY}.", "tool_calls": calls})
    mocked.post(f"{BASE_URL}/chat/completions", payload=refused)
    async with ApiClient(make_job(BASE_URL, api_key_env=None), TEST_KEY) as c:
        got = await c.complete(b"{}")
    assert got.refusal == "No, [redacted]." and TEST_KEY not in (got.tool_calls or "")

"""Tests of the embedded mock endpoint, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest

from batchrun.mock import (
    ANSWER_KINDS,
    FAULT_KINDS,
    FAULT_KINDS_DEFAULT,
    INVALID_KINDS,
    MockConfig,
    count_tokens,
    serve,
)

TEXT = (
    "The quick brown fox jumps over the lazy dog.   It was not amused!\n"
    "Did the dog care? Nobody knows. The end."
)
SUMMARY = "Summary: The quick brown fox jumps over the lazy dog. It was not amused!"
REPO_ROOT = Path(__file__).resolve().parents[1]


def request_body(text: str = TEXT, **extra: Any) -> dict[str, Any]:
    """A valid chat-completions request asking to summarise ``text``."""
    return {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Summarise."},
            {"role": "user", "content": text},
        ],
        **extra,
    }


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` (JSON-encoded unless already bytes); return status, headers, raw body."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(url, data=data, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def sse_events(raw: bytes) -> list[bytes]:
    """Split a server-sent-events body into the payloads of its ``data:`` lines."""
    return [line[len(b"data: ") :] for line in raw.split(b"\n\n") if line.startswith(b"data: ")]


def test_count_tokens() -> None:
    assert count_tokens("") == 0
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("  don't   stop\n") == 4  # don ' t stop
    assert count_tokens("über-cool 42") == 4


def test_config_validation() -> None:
    assert "stream-cut" not in FAULT_KINDS_DEFAULT
    assert not set(ANSWER_KINDS) & set(FAULT_KINDS_DEFAULT)
    assert "429-exhausted" not in FAULT_KINDS_DEFAULT  # it pauses a whole job: only by name
    assert set(FAULT_KINDS_DEFAULT) | {"stream-cut", "429-exhausted", *ANSWER_KINDS} == set(
        FAULT_KINDS
    )
    with pytest.raises(ValueError, match="unknown_fields"):
        MockConfig(unknown_fields=("messages",))
    with pytest.raises(ValueError, match="unknown fault"):
        MockConfig(faults=("418",))
    with pytest.raises(ValueError, match="unknown fault"):
        MockConfig(fail_first=1, fail_first_kind="nope")
    with pytest.raises(ValueError, match="fault_rate"):
        MockConfig(fault_rate=1.5)
    with pytest.raises(ValueError, match="rpm_limit"):
        MockConfig(rpm_limit=-1)
    assert MockConfig(faults=["500"]).faults == ("500",)  # type: ignore[arg-type]
    assert MockConfig().invalid_kinds == INVALID_KINDS
    kinds: Any = ["cut-off"]  # any sequence is accepted and stored as a tuple
    assert MockConfig(invalid_kinds=kinds).invalid_kinds == ("cut-off",)
    with pytest.raises(ValueError, match="unknown invalid kind"):
        MockConfig(invalid_kinds=("garbage",))
    with pytest.raises(ValueError, match="invalid_rate"):
        MockConfig(invalid_rate=-0.1)
    with pytest.raises(ValueError, match="fence_rate"):
        MockConfig(fence_rate=1.01)
    with pytest.raises(ValueError, match="invalid_kinds"):
        MockConfig(invalid_rate=0.5, invalid_kinds=())


async def test_summary_usage_and_shape() -> None:
    async with serve() as server, aiohttp.ClientSession() as session:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        body = request_body(temperature=0.3, metadata={"row": 1}, whatever=[1, 2])
        raw = orjson.dumps(body)
        status, headers, data = await post(session, server.base_url + "/chat/completions", raw)
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    doc = orjson.loads(data)
    assert doc["id"] == "chatcmpl-" + hashlib.sha256(raw).hexdigest()[:24]
    assert doc["object"] == "chat.completion"
    assert doc["model"] == "test-model"
    assert isinstance(doc["created"], int) and abs(doc["created"] - time.time()) < 60
    [choice] = doc["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": SUMMARY},
        "finish_reason": "stop",
    }
    prompt_tokens = count_tokens("Summarise.") + 4 + count_tokens(TEXT) + 4
    completion_tokens = count_tokens(SUMMARY)
    assert doc["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def test_last_user_message_is_summarised() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "First question. Ignored."},
            {"role": "assistant", "content": "An answer."},
            {"role": "user", "content": "Only sentence here"},
        ],
    }
    async with serve() as server, aiohttp.ClientSession() as session:
        _, _, data = await post(session, server.base_url + "/chat/completions", body)
    assert orjson.loads(data)["choices"][0]["message"]["content"] == "Summary: Only sentence here"


async def test_max_tokens_cuts_with_finish_reason_length() -> None:
    async with serve() as server, aiohttp.ClientSession() as session:
        _, _, data = await post(
            session, server.base_url + "/chat/completions", request_body(max_tokens=5)
        )
        # Exactly as many tokens as the full answer: not cut.
        exact = count_tokens(SUMMARY)
        _, _, data_exact = await post(
            session, server.base_url + "/chat/completions", request_body(max_tokens=exact)
        )
    doc = orjson.loads(data)
    # Summary : The quick brown -> cut right after the fifth token.
    assert doc["choices"][0]["message"]["content"] == "Summary: The quick brown"
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"]["completion_tokens"] == 5
    doc_exact = orjson.loads(data_exact)
    assert doc_exact["choices"][0]["message"]["content"] == SUMMARY
    assert doc_exact["choices"][0]["finish_reason"] == "stop"


async def test_inference_route_with_slashed_model_id() -> None:
    model = "meta-llama/Llama-3.3-70B-Instruct"
    async with serve() as server, aiohttp.ClientSession() as session:
        url = f"{server.base_url}/models/{model}/inference"
        body = request_body()
        del body["model"]
        status, _, data = await post(session, url, body)
        status_own, _, data_own = await post(session, url, request_body())
    assert status == 200
    doc = orjson.loads(data)
    assert doc["model"] == model
    assert doc["choices"][0]["message"]["content"] == SUMMARY
    assert status_own == 200
    assert orjson.loads(data_own)["model"] == "test-model"  # the body's model wins


async def test_api_key_required_and_never_echoed() -> None:
    config = MockConfig(api_key="sk-right")
    async with serve(config) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        wrong = await post(
            session, url, request_body(), headers={"Authorization": "Bearer sk-WRONG-123"}
        )
        missing = await post(session, url, request_body())
        right = await post(
            session, url, request_body(), headers={"Authorization": "Bearer sk-right"}
        )
        stats = server.stats.to_dict()
    for status, _, data in (wrong, missing):
        assert status == 401
        assert orjson.loads(data)["error"] == "invalid_api_key"
        assert b"sk-" not in data and b"WRONG" not in data
    assert right[0] == 200
    assert stats["by_outcome"] == {"401": 2, "ok": 1}


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json", b"not valid JSON"),
        (b"", b"not valid JSON"),
        (b"[1, 2]", b"JSON object"),
        ({"messages": [{"role": "user", "content": "x"}]}, b"'model'"),
        ({"model": "", "messages": [{"role": "user", "content": "x"}]}, b"'model'"),
        ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, b"'model'"),
        ({"model": "m"}, b"'messages'"),
        ({"model": "m", "messages": []}, b"'messages'"),
        ({"model": "m", "messages": "hi"}, b"'messages'"),
        ({"model": "m", "messages": ["hi"]}, b"'content'"),
        ({"model": "m", "messages": [{"role": "user"}]}, b"'content'"),
        ({"model": "m", "messages": [{"role": "user", "content": None}]}, b"'content'"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            b"max_tokens",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
            b"max_tokens",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": "json",
            },
            b"'response_format'",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "xml"},
            },
            b"'response_format'",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema"},
            },
            b"'response_format.json_schema'",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"schema": [1]}},
            },
            b"'response_format.json_schema'",
        ),
    ],
)
async def test_invalid_requests_get_400(payload: Any, fragment: bytes) -> None:
    async with serve() as server, aiohttp.ClientSession() as session:
        status, headers, data = await post(session, server.base_url + "/chat/completions", payload)
        stats = server.stats.to_dict()
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    doc = orjson.loads(data)
    assert doc["error"] == "invalid_request"
    assert fragment in doc["message"].encode()
    assert stats["by_outcome"] == {"400": 1}


async def test_context_length_exceeded() -> None:
    config = MockConfig(context_tokens=20)
    async with serve(config) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        status, _, data = await post(session, url, request_body("word " * 30))
        status_ok, _, _ = await post(session, url, request_body("word " * 5))
    assert status == 400
    assert orjson.loads(data)["error"] == "context_length_exceeded"
    assert status_ok == 200


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("429", 429, "rate_limited"),
        ("429-no-retry-after", 429, "rate_limited"),
        ("429-exhausted", 429, "rate_limited"),
        ("500", 500, "server_error"),
        ("502", 502, "bad_gateway"),
        ("503", 503, "service_unavailable"),
        ("504", 504, "gateway_timeout"),
    ],
)
async def test_status_faults(kind: str, status: int, code: str) -> None:
    config = MockConfig(fail_first=1, fail_first_kind=kind, retry_after_s=0.05)
    async with serve(config) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        first = await post(session, url, request_body())
        second = await post(session, url, request_body())
        stats = server.stats.to_dict()
    assert first[0] == status
    assert orjson.loads(first[2])["error"] == code
    if kind in ("429", "429-exhausted"):
        assert first[1]["Retry-After"] == "0.05"
    else:
        assert "Retry-After" not in first[1]
    assert "retry-after-ms" not in first[1]
    if kind == "429-exhausted":
        assert first[1]["x-ratelimit-remaining-requests"] == "0"
    else:
        assert "x-ratelimit-remaining-requests" not in first[1]
    assert second[0] == 200  # fail_first covers only the first request
    assert stats["by_outcome"] == {kind: 1, "ok": 1}


async def test_retry_after_is_compact() -> None:
    config = MockConfig(fail_first=1, fail_first_kind="429", retry_after_s=1.0)
    async with serve(config) as server, aiohttp.ClientSession() as session:
        _, headers, _ = await post(session, server.base_url + "/chat/completions", request_body())
    assert headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("seconds", "retry_after", "ms"), [(0.25, "1", "250"), (2.0, "2", "2000"), (0.0, "0", "0")]
)
async def test_send_retry_after_ms(seconds: float, retry_after: str, ms: str) -> None:
    config = MockConfig(
        fail_first=1, fail_first_kind="429", retry_after_s=seconds, send_retry_after_ms=True
    )
    async with serve(config) as server, aiohttp.ClientSession() as session:
        _, headers, _ = await post(session, server.base_url + "/chat/completions", request_body())
    assert (headers["Retry-After"], headers["retry-after-ms"]) == (retry_after, ms)


async def test_rpm_limit_refuses_past_a_seconds_worth_and_says_so() -> None:
    # 120 a minute: a bucket of 2 requests, refilled one every 0.5 s.
    config = MockConfig(rpm_limit=120, send_retry_after_ms=True)
    async with serve(config) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        answers = [await post(session, url, request_body()) for _ in range(4)]
        stream = await post(session, url, request_body(stream=True))
        await asyncio.sleep(0.55)  # one request's worth comes back
        again = await post(session, url, request_body(stream=True))
        stats = server.stats.to_dict()
    assert [status for status, _, _ in answers] == [200, 200, 429, 429]
    assert stream[0] == 429
    assert again[0] == 200 and again[1]["Content-Type"] == "text/event-stream"
    assert again[1]["x-ratelimit-remaining-requests"] == "0"
    first, second, refused = answers[0][1], answers[1][1], answers[2][1]
    assert first["x-ratelimit-limit-requests"] == "120"
    assert (first["x-ratelimit-remaining-requests"], second["x-ratelimit-remaining-requests"]) == (
        "1",
        "0",
    )
    assert orjson.loads(answers[2][2])["error"] == "rate_limit_exceeded"
    assert refused["x-ratelimit-remaining-requests"] == "0"
    # The wait it asks for: until the bucket is full again (about 1 s).
    assert refused["Retry-After"] == "1"
    assert 900 <= int(refused["retry-after-ms"]) <= 1000
    assert refused["x-ratelimit-reset-requests"].endswith("s")
    assert 0.9 <= float(refused["x-ratelimit-reset-requests"][:-1]) <= 1.0
    assert stats["by_outcome"] == {"ok": 3, "rpm-limit": 3}


async def test_rpm_limit_and_faults_together() -> None:
    # A request the limit admits can still get a fault; the fault carries the budget too.
    config = MockConfig(rpm_limit=600, fail_first=1, fail_first_kind="503")
    async with serve(config) as server, aiohttp.ClientSession() as session:
        status, headers, _ = await post(
            session, server.base_url + "/chat/completions", request_body()
        )
    assert status == 503
    assert headers["x-ratelimit-remaining-requests"] == "9"


async def test_hang_fault_outlives_client_timeout_then_answers() -> None:
    config = MockConfig(fail_first=2, fail_first_kind="hang", hang_s=0.3)
    async with serve(config) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        with pytest.raises(asyncio.TimeoutError):
            await post(session, url, request_body(), timeout=aiohttp.ClientTimeout(total=0.1))
        started = time.monotonic()
        status, _, data = await post(session, url, request_body())
        elapsed = time.monotonic() - started
        stats = server.stats.to_dict()
    assert status == 200 and elapsed >= 0.29
    assert orjson.loads(data)["choices"][0]["message"]["content"] == SUMMARY
    assert stats["by_outcome"] == {"hang": 2}


@pytest.mark.parametrize("kind", ["drop", "stream-cut"])
async def test_drop_fault_disconnects(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    config = MockConfig(fail_first=1, fail_first_kind=kind)
    caplog.set_level(logging.WARNING)
    async with serve(config) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(session, url, request_body())
        status, _, _ = await post(session, url, request_body())
        stats = server.stats.to_dict()
    assert status == 200
    assert stats["by_outcome"] == {kind: 1, "ok": 1}
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")]


async def test_malformed_truncated_and_no_usage_faults() -> None:
    results: dict[str, tuple[int, dict[str, str], bytes]] = {}
    async with aiohttp.ClientSession() as session:
        for kind in ("malformed", "truncated", "no-usage"):
            config = MockConfig(fail_first=1, fail_first_kind=kind)
            async with serve(config) as server:
                url = server.base_url + "/chat/completions"
                results[kind] = await post(session, url, request_body())
                results["ok"] = await post(session, url, request_body())
    full = results["ok"][2]
    status, headers, data = results["malformed"]
    assert status == 200 and data == b"{not json"
    assert headers["Content-Type"].startswith("application/json")
    status, _, data = results["truncated"]
    assert status == 200
    assert len(data) == len(full) // 2
    assert full.startswith(data[:40])  # same id prefix; "created" may tick over later
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(data)
    status, _, data = results["no-usage"]
    doc = orjson.loads(data)
    assert status == 200 and "usage" not in doc
    assert doc["choices"][0]["message"]["content"] == SUMMARY


def expected_fault(seed: int, repeat: int, raw: bytes, rate: float, kinds: tuple[str, ...]) -> str:
    """The draw the spec prescribes, computed independently of the server."""
    digest = hashlib.sha256(f"{seed}:{repeat}:".encode() + raw).digest()
    if int.from_bytes(digest[:8], "big") / 2**64 >= rate:
        return "ok"
    return kinds[int.from_bytes(digest[8:16], "big") % len(kinds)]


async def test_fault_draws_are_deterministic_and_order_independent() -> None:
    kinds = ("429", "500", "503")
    bodies = [orjson.dumps(request_body(f"Row {i}. Some text.")) for i in range(40)]
    outcome_of_status = {200: "ok", 429: "429", 500: "500", 503: "503"}

    async def run(seed: int, order: list[bytes]) -> dict[bytes, list[str]]:
        config = MockConfig(fault_rate=0.5, faults=kinds, seed=seed)
        seen: dict[bytes, list[str]] = {raw: [] for raw in bodies}
        async with serve(config) as server, aiohttp.ClientSession() as session:
            url = server.base_url + "/chat/completions"

            async def attempts(raw: bytes) -> None:
                for _ in range(3):  # the client "retries" the same body
                    status, _, _ = await post(session, url, raw)
                    seen[raw].append(outcome_of_status[status])

            await asyncio.gather(*(attempts(raw) for raw in order))
            stats = server.stats.to_dict()
        assert stats["requests"] == 3 * len(bodies)
        assert set(stats["bodies"].values()) == {3}
        return seen

    first = await run(7, bodies)
    second = await run(7, list(reversed(bodies)))
    other_seed = await run(8, bodies)
    assert first == second
    assert first != other_seed
    for raw, outcomes in first.items():
        assert outcomes == [expected_fault(7, n, raw, 0.5, kinds) for n in range(3)]
    # A retry gets a fresh draw: some body must fail and then succeed.
    assert any(o[0] != "ok" and "ok" in o[1:] for o in first.values())
    flat = [o for outcomes in first.values() for o in outcomes]
    assert 0.3 < flat.count("ok") / len(flat) < 0.7


async def stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, str, bytes]:
    """POST a streaming request; return status, content type and the raw event bytes."""
    async with session.post(url, data=orjson.dumps(body)) as resp:
        return resp.status, resp.headers["Content-Type"], await resp.read()


@pytest.mark.parametrize("include_usage", [False, True])
async def test_sse_stream(include_usage: bool) -> None:
    body = request_body(stream=True, stream_options={"include_usage": include_usage})
    async with serve() as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        status, content_type, raw = await stream(session, url, body)
        plain = orjson.loads((await post(session, url, request_body()))[2])
    assert status == 200 and content_type.startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    usage_chunks = [c for c in chunks if not c["choices"]]
    content_chunks = [c for c in chunks if c["choices"]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert content_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in content_chunks[1:])
    pieces = [c["choices"][0]["delta"].get("content") for c in content_chunks[:-1]]
    assert "".join(pieces) == SUMMARY
    assert len(pieces) > 2 and all(count_tokens(p) <= 4 for p in pieces)
    assert all(c["choices"][0]["finish_reason"] is None for c in content_chunks[:-1])
    assert content_chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
        assert usage_chunks[0]["usage"] == plain["usage"]
    else:
        assert usage_chunks == []


async def test_stream_cut_sends_first_chunk_then_breaks() -> None:
    config = MockConfig(fail_first=1, fail_first_kind="stream-cut")
    body = request_body(stream=True, stream_options={"include_usage": True})
    received = b""
    async with serve(config) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(url, data=orjson.dumps(body)) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_any():
                    received += chunk
        status, _, raw = await stream(session, url, body)
    events = sse_events(received)
    assert len(events) == 1 and b"[DONE]" not in received
    assert orjson.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    assert status == 200 and sse_events(raw)[-1] == b"[DONE]"


async def test_stream_variants_of_body_faults() -> None:
    body = request_body(stream=True, stream_options={"include_usage": True})
    out: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as session:
        for kind in ("malformed", "truncated", "no-usage"):
            async with serve(MockConfig(fail_first=1, fail_first_kind=kind)) as server:
                status, _, out[kind] = await stream(
                    session, server.base_url + "/chat/completions", body
                )
                assert status == 200
                _, _, out["ok"] = await stream(session, server.base_url + "/chat/completions", body)
    assert sse_events(out["malformed"]) == [b"{not json", b"[DONE]"]
    assert len(out["truncated"]) == len(out["ok"]) // 2 and b"[DONE]" not in out["truncated"]
    no_usage = [orjson.loads(e) for e in sse_events(out["no-usage"])[:-1]]
    assert all(c["choices"] for c in no_usage)


async def test_answer_kinds_of_a_plain_answer() -> None:
    """The answers real servers give besides plain text, one request each."""
    out: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as session:
        for kind in (*ANSWER_KINDS, None):
            config = MockConfig(fail_first=1, fail_first_kind=kind or "500")
            async with serve(config) as server:
                url = server.base_url + "/chat/completions"
                if kind is None:
                    await post(session, url, request_body())  # the 500
                _, _, data = await post(session, url, request_body())
                out[kind or "ok"] = orjson.loads(data)
                assert server.stats.by_outcome[kind or "ok"] == 1
    choice = {k: v["choices"][0] for k, v in out.items()}
    assert choice["no-content"]["message"] == {"role": "assistant", "content": None}
    parts = choice["content-parts"]["message"]["content"]
    assert [p["type"] for p in parts] == ["text", "text"]
    assert "".join(p["text"] for p in parts) == SUMMARY
    refusal = choice["refusal"]["message"]
    assert refusal["content"] is None and refusal["refusal"].startswith("I'm sorry")
    tool = choice["tool-calls"]
    assert tool["finish_reason"] == "tool_calls" and tool["message"]["content"] is None
    [call] = tool["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert orjson.loads(call["function"]["arguments"]) == {"summary": SUMMARY}
    # Stream-only kinds answer a plain request plainly; every kind reports its usage.
    for kind in ("early-done", "token-stream"):
        assert choice[kind] == choice["ok"]
    assert all(v["usage"] == out["ok"]["usage"] for v in out.values())


async def test_answer_kinds_of_a_stream() -> None:
    body = request_body(stream=True, stream_options={"include_usage": True})
    out: dict[str, list[Any]] = {}
    async with aiohttp.ClientSession() as session:
        for kind in ANSWER_KINDS:
            async with serve(MockConfig(fail_first=1, fail_first_kind=kind)) as server:
                _, _, raw = await stream(session, server.base_url + "/chat/completions", body)
            events = sse_events(raw)
            assert events[-1] == b"[DONE]"
            out[kind] = [orjson.loads(e) for e in events[:-1]]

    def deltas(kind: str) -> list[dict[str, Any]]:
        return [c["choices"][0]["delta"] for c in out[kind] if c["choices"]]

    def finish(kind: str) -> list[Any]:
        return [c["choices"][0]["finish_reason"] for c in out[kind] if c["choices"]]

    def usage(kind: str) -> list[Any]:
        return [c["usage"] for c in out[kind] if "usage" in c]

    assert out["token-stream"] and all(set(e) == {"token"} for e in out["token-stream"])
    assert "".join(e["token"] for e in out["token-stream"]) == SUMMARY
    early = "".join(d.get("content", "") for d in deltas("early-done"))
    assert early and SUMMARY.startswith(early) and early != SUMMARY
    assert set(finish("early-done")) == {None} and usage("early-done") == []
    assert all("content" not in d for d in deltas("no-content"))
    text = "".join(p["text"] for d in deltas("content-parts") for p in d.get("content", []))
    assert text == SUMMARY
    refusal = "".join(d.get("refusal") or "" for d in deltas("refusal"))
    assert refusal.startswith("I'm sorry") and all(not d.get("content") for d in deltas("refusal"))
    calls = [c for d in deltas("tool-calls") for c in d.get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"]
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert orjson.loads(arguments) == {"summary": SUMMARY}
    assert finish("tool-calls")[-1] == "tool_calls"
    for kind in ("no-content", "content-parts", "refusal", "tool-calls"):
        assert finish(kind)[-1] in ("stop", "tool_calls") and len(usage(kind)) == 1


async def test_unknown_fields_are_refused_when_strict_else_ignored() -> None:
    body = request_body(stream=True, stream_options={"include_usage": True})
    async with aiohttp.ClientSession() as session:
        strict = MockConfig(strict=True, unknown_fields=("stream_options",))
        async with serve(strict) as server:
            url = server.base_url + "/chat/completions"
            status, _, data = await post(session, url, body)
            assert (status, server.stats.by_outcome) == (400, {"400": 1})
            assert b"Unrecognized request argument supplied: stream_options" in data
            del body["stream_options"]
            status, _, raw = await stream(session, url, body)
            assert status == 200
        async with serve(MockConfig(unknown_fields=("stream_options",))) as server:
            url = server.base_url + "/chat/completions"
            status, _, ignored = await stream(
                session, url, {**body, "stream_options": {"include_usage": True}}
            )
    assert status == 200
    for events in (sse_events(raw), sse_events(ignored)):
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert chunks and all("usage" not in c for c in chunks)


async def test_stream_respects_max_tokens() -> None:
    body = request_body(stream=True, max_tokens=5)
    async with serve() as server, aiohttp.ClientSession() as session:
        _, _, raw = await stream(session, server.base_url + "/chat/completions", body)
    chunks = [orjson.loads(e) for e in sse_events(raw)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Summary: The quick brown"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_latency_is_added() -> None:
    async with serve(MockConfig(latency_s=0.15)) as server, aiohttp.ClientSession() as session:
        started = time.monotonic()
        status, _, _ = await post(session, server.base_url + "/chat/completions", request_body())
    assert status == 200 and time.monotonic() - started >= 0.14


async def test_stats_endpoint_and_reset() -> None:
    config = MockConfig(fail_first=1, fail_first_kind="503")
    raw_a = orjson.dumps(request_body("A."))
    raw_b = orjson.dumps(request_body("B."))
    async with serve(config) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        for raw in (raw_a, raw_a, raw_b):
            await post(session, url, raw)
        await post(session, url, b"{broken")
        async with session.get(server.url + "/_stats") as resp:
            over_http = orjson.loads(await resp.read())
        assert over_http == server.stats.to_dict()
        async with session.post(server.url + "/_reset") as resp:
            assert resp.status == 200
        assert server.stats.to_dict() == {"requests": 0, "by_outcome": {}, "bodies": {}}
        # fail_first is re-armed by the reset.
        status, _, _ = await post(session, url, raw_a)
        assert status == 503
    assert over_http["requests"] == 4
    assert over_http["by_outcome"] == {"503": 1, "ok": 2, "400": 1}
    assert over_http["bodies"] == {
        hashlib.sha256(raw_a).hexdigest(): 2,
        hashlib.sha256(raw_b).hexdigest(): 1,
        hashlib.sha256(b"{broken").hexdigest(): 1,
    }


@pytest.mark.parametrize(
    "command",
    [["batchrun", "mock-server"], ["batchrun.mock"]],
    ids=["batchrun mock-server", "python -m batchrun.mock"],
)
def test_serve_forever_in_subprocess(tmp_path: Path, command: list[str]) -> None:
    ready = tmp_path / "ready"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            *command,
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--fail-first",
            "1",
        ],
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "mock server did not get ready"
            time.sleep(0.02)
        base_url = ready.read_text()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")

        async def check() -> tuple[list[int], dict[str, Any]]:
            async with aiohttp.ClientSession() as session:
                statuses = [
                    (await post(session, base_url + "/chat/completions", request_body()))[0]
                    for _ in range(2)
                ]
                async with session.get(base_url.removesuffix("/v1") + "/_stats") as resp:
                    return statuses, orjson.loads(await resp.read())

        statuses, stats = asyncio.run(check())
        assert statuses == [500, 200]
        assert stats["by_outcome"] == {"500": 1, "ok": 1}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert f"batchrun mock endpoint on {base_url}".encode() in stderr


# --- structured output (response_format) ------------------------------------------

TRIAGE_SCHEMA: dict[str, Any] = {
    "title": "ticket_triage",
    "type": "object",
    "additionalProperties": False,
    "required": ["summary", "category", "urgency", "needs_human"],
    "properties": {
        "summary": {"type": "string", "maxLength": 300},
        "category": {
            "type": "string",
            "enum": [
                "billing",
                "login",
                "bug",
                "feature_request",
                "data_export",
                "integrations",
                "other",
            ],
        },
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "needs_human": {"type": "boolean"},
    },
}

# ticket, expected category, expected urgency range, expected needs_human (None: any)
TICKETS: list[tuple[str, str, tuple[int, int], bool | None]] = [
    (
        "I was charged twice on my last invoice and need a refund. Billing support never "
        "answered! Please help.",
        "billing",
        (2, 4),
        True,
    ),
    (
        "Our whole team is locked out: login fails with error 500 since this morning. The "
        "dashboard is down, this is urgent.",
        "login",
        (5, 5),
        True,
    ),
    (
        "Minor thing: a feature request for dark mode. No rush at all.",
        "feature_request",
        (1, 1),
        None,
    ),
    ("The CSV data export drops the last row. Repro steps attached.", "data_export", (2, 4), None),
    ("How do I connect the Slack integration? The docs are unclear.", "integrations", (2, 4), None),
]


def structured_body(
    text: str, schema: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """A request for a ``json_schema`` answer (default: the triage schema) about ``text``."""
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "ticket_triage", "schema": schema or TRIAGE_SCHEMA, "strict": True},
    }
    return request_body(text, response_format=response_format, **extra)


def extractive_summary(text: str) -> str:
    """The first two sentences of ``text`` (what the mock's summaries are made of)."""
    return " ".join(re.split(r"(?<=[.!?])\s+", " ".join(text.split()))[:2])


async def complete(
    session: aiohttp.ClientSession, url: str, body: Any
) -> tuple[str, str, dict[str, Any]]:
    """POST ``body``; return the message content, the finish reason and the whole doc."""
    status, _, data = await post(session, url, body)
    assert status == 200, data
    doc = orjson.loads(data)
    choice = doc["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], doc


def is_valid(instance: Any, schema: dict[str, Any]) -> bool:
    """Whether ``instance`` validates against ``schema``."""
    try:
        jsonschema.validate(instance, schema)
    except jsonschema.ValidationError:
        return False
    return True


async def test_triage_answers_are_valid_keyword_driven_and_deterministic() -> None:
    async def run(seed: int, model: str, system: str) -> list[tuple[str, str, dict[str, Any]]]:
        async with serve(MockConfig(seed=seed)) as server, aiohttp.ClientSession() as session:
            url = server.base_url + "/chat/completions"
            out = []
            for text, *_ in TICKETS:
                body = structured_body(text, model=model)
                body["messages"][0]["content"] = system
                out.append(await complete(session, url, body))
            return out

    first = await run(0, "a", "Triage this ticket.")
    # Another server, seed, model and system prompt: the same ticket, the same answer.
    second = await run(99, "b", "You are a support triage bot.")
    assert [c for c, _, _ in first] == [c for c, _, _ in second]
    for (text, category, (low, high), needs_human), (content, finish, doc) in zip(
        TICKETS, first, strict=True
    ):
        assert finish == "stop"
        assert content == orjson.dumps(orjson.loads(content)).decode()  # compact JSON
        answer = orjson.loads(content)
        jsonschema.validate(answer, TRIAGE_SCHEMA)
        assert list(answer) == ["summary", "category", "urgency", "needs_human"]
        assert answer["summary"] == extractive_summary(text)
        assert answer["category"] == category
        assert low <= answer["urgency"] <= high
        if needs_human is not None:
            assert answer["needs_human"] is needs_human
        assert doc["usage"]["completion_tokens"] == count_tokens(content)


async def test_summary_is_cut_to_max_length_at_a_word() -> None:
    text = "word " * 100 + "end. Second sentence."
    async with serve() as server, aiohttp.ClientSession() as session:
        content, _, _ = await complete(
            session, server.base_url + "/chat/completions", structured_body(text)
        )
    summary = orjson.loads(content)["summary"]
    assert 290 <= len(summary) <= 300
    assert summary == ("word " * 60).strip()


KITCHEN_SINK: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["title", "tags", "count", "flag", "nested", "maybe", "either"],
    "properties": {
        "title": {"type": "string"},
        "tags": {
            "type": "array",
            "items": {"type": "string", "enum": ["billing", "login", "bug"]},
            "minItems": 1,
            "maxItems": 3,
            "uniqueItems": True,
        },
        "score": {"type": "number", "minimum": -2.5, "maximum": 2.5},
        "ratio": {"type": "number"},
        "count": {"type": "integer"},
        "big": {"type": "integer", "minimum": 1000},
        "neg": {"type": "integer", "maximum": -10},
        "open_int": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3},
        "open_num": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.01},
        "flag": {"type": "boolean"},
        "nested": {
            "type": "object",
            "additionalProperties": False,
            "required": ["inner"],
            "properties": {
                "inner": {
                    "type": "object",
                    "required": ["depth"],
                    "properties": {"depth": {"type": "integer", "minimum": 7, "maximum": 7}},
                },
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["k"],
                        "properties": {"k": {"type": "string", "maxLength": 4}},
                    },
                },
            },
        },
        "maybe": {"type": ["string", "null"], "maxLength": 10},
        "either": {"anyOf": [{"type": "integer", "minimum": 10, "maximum": 20}, {"type": "null"}]},
        "fixed": {"const": "v1"},
        "when": {"type": "string", "format": "date"},
        "stamp": {"type": "string", "format": "date-time"},
        "contact": {"type": "string", "format": "email"},
        "uid": {"type": "string", "format": "uuid"},
        "anything": {},
        "short": {"type": "string", "maxLength": 5},
        "padded": {"type": "string", "minLength": 40, "maxLength": 45},
        "levels": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 2},
            "minItems": 4,
            "maxItems": 4,
        },
        "nothing": {"type": "array", "maxItems": 0},
        "untyped_items": {"type": "array"},
        "priority": {"type": "integer", "minimum": 0, "maximum": 10},
        "kind": {"enum": [1, 2, None]},
        "nil": {"type": "null"},
    },
}


async def test_every_schema_type_is_honoured() -> None:
    texts = [
        f"Ticket {i}: something about item {i * 7}. More words follow here." for i in range(200)
    ]
    texts += ["", "!!!", "Login broke after the billing change, a bug. Urgent: prod is down."]
    async with serve() as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        results = await asyncio.gather(
            *(complete(session, url, structured_body(t, KITCHEN_SINK)) for t in texts)
        )
        stats = server.stats.to_dict()
    assert stats["by_outcome"] == {"ok": len(texts)}
    answers = [orjson.loads(content) for content, _, _ in results]
    checker = jsonschema.FormatChecker()
    for answer in answers:
        jsonschema.validate(answer, KITCHEN_SINK, format_checker=checker)
        assert set(answer) == set(KITCHEN_SINK["properties"])  # optional ones too
        assert answer["fixed"] == "v1" and answer["nil"] is None
        assert 1 <= answer["count"] <= 5
        assert 1000 <= answer["big"] <= 1004 and -14 <= answer["neg"] <= -10
        assert answer["open_int"] in (1, 2) and 0 < answer["open_num"] < 0.01
        assert 0 <= answer["ratio"] <= 1
        assert answer["nested"]["inner"] == {"depth": 7}
        assert 1 <= len(answer["nested"]["rows"]) <= 3
        assert 1 <= len(answer["untyped_items"]) <= 3
        assert all(isinstance(v, str) for v in answer["untyped_items"])
        assert answer["nothing"] == [] and len(answer["levels"]) == 4
        assert isinstance(answer["anything"], str) and isinstance(answer["title"], str)
        assert 40 <= len(answer["padded"]) <= 45 and len(answer["short"]) <= 5
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", answer["stamp"])
    # Nullable values are usually, but not always, non-null.
    for key in ("maybe", "either", "kind"):
        nulls = sum(a[key] is None for a in answers)
        assert 0 < nulls < len(answers) / 4, (key, nulls)
    # Hashed choices spread over their range.
    assert {a["count"] for a in answers} == {1, 2, 3, 4, 5}
    assert {a["flag"] for a in answers} == {True, False}
    assert {len(a["tags"]) for a in answers} == {1, 2, 3}
    # The last text: enum items in order of mention, urgency words, the title.
    last = answers[-1]
    assert last["tags"] == ["login", "billing", "bug"][: len(last["tags"])]
    assert last["priority"] == 10 and last["flag"] is True
    assert last["title"] == "Login broke after the billing change"
    assert answers[-3]["title"] == "n/a"  # empty text


async def test_structured_answers_depend_only_on_the_text() -> None:
    text = TICKETS[0][0]
    async with serve() as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        a, _, _ = await complete(session, url, structured_body(text, KITCHEN_SINK))
        b, _, _ = await complete(session, url, structured_body(text, KITCHEN_SINK, temperature=1))
        c, _, _ = await complete(session, url, structured_body(text + " ", KITCHEN_SINK))
    assert a == b
    assert a != c


async def test_json_object_and_text_response_formats() -> None:
    async with serve() as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        content, finish, doc = await complete(
            session, url, request_body(response_format={"type": "json_object"})
        )
        text, _, _ = await complete(session, url, request_body(response_format={"type": "text"}))
    assert content == orjson.dumps({"summary": SUMMARY.removeprefix("Summary: ")}).decode()
    assert finish == "stop" and doc["usage"]["completion_tokens"] == count_tokens(content)
    assert text == SUMMARY


async def test_max_tokens_cuts_structured_answers() -> None:
    async with serve() as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        full, _, _ = await complete(session, url, structured_body(TICKETS[0][0]))
        cut, finish, doc = await complete(
            session, url, structured_body(TICKETS[0][0], max_tokens=7)
        )
    assert finish == "length" and full.startswith(cut) and count_tokens(cut) == 7
    assert doc["usage"]["completion_tokens"] == 7
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(cut)


async def valid_and_spoiled(
    kind: str, schema: dict[str, Any], text: str = TICKETS[0][0]
) -> tuple[str, str, str, dict[str, int]]:
    """Answer ``text`` without and with ``kind`` of defect; return both, finish, outcomes."""
    async with aiohttp.ClientSession() as session:
        async with serve() as server:
            valid, _, _ = await complete(
                session, server.base_url + "/chat/completions", structured_body(text, schema)
            )
        config = MockConfig(invalid_rate=1.0, invalid_kinds=(kind,))
        async with serve(config) as server:
            spoiled, finish, doc = await complete(
                session, server.base_url + "/chat/completions", structured_body(text, schema)
            )
            outcomes = server.stats.to_dict()["by_outcome"]
    assert doc["usage"]["completion_tokens"] == count_tokens(spoiled)
    return valid, spoiled, finish, outcomes


async def test_invalid_not_json() -> None:
    valid, spoiled, finish, outcomes = await valid_and_spoiled("not-json", TRIAGE_SCHEMA)
    assert outcomes == {"invalid:not-json": 1} and finish == "stop"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(spoiled)
    assert "{" not in spoiled and orjson.loads(valid)["summary"] in spoiled


async def test_invalid_wrong_type() -> None:
    valid, spoiled, finish, outcomes = await valid_and_spoiled("wrong-type", TRIAGE_SCHEMA)
    assert outcomes == {"invalid:wrong-type": 1} and finish == "stop"
    good, bad = orjson.loads(valid), orjson.loads(spoiled)
    assert bad == {**good, "urgency": "high"}  # the first integer property, nothing else
    with pytest.raises(jsonschema.ValidationError) as caught:
        jsonschema.validate(bad, TRIAGE_SCHEMA)
    assert caught.value.validator == "type"
    # Without integers, a boolean is spoiled; with no single-typed property, "not-json".
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string"}, "b": {"type": "boolean"}},
    }
    valid, spoiled, _, _ = await valid_and_spoiled("wrong-type", schema)
    good, bad = orjson.loads(valid), orjson.loads(spoiled)
    assert bad == {**good, "b": "yes" if good["b"] else "no"}
    # No single-typed property: the root object itself becomes a (JSON) string.
    schema = {"type": "object", "properties": {"x": {}}}
    valid, spoiled, _, outcomes = await valid_and_spoiled("wrong-type", schema)
    assert outcomes == {"invalid:wrong-type": 1}
    assert orjson.loads(spoiled) == valid and not is_valid(orjson.loads(spoiled), schema)
    # Nothing typed at all: falls back to "not-json".
    schema = {"properties": {"x": {}}}
    _, spoiled, _, outcomes = await valid_and_spoiled("wrong-type", schema)
    assert outcomes == {"invalid:not-json": 1} and spoiled.startswith("Sure!")


async def test_invalid_missing_required() -> None:
    valid, spoiled, finish, outcomes = await valid_and_spoiled("missing-required", TRIAGE_SCHEMA)
    assert outcomes == {"invalid:missing-required": 1} and finish == "stop"
    good, bad = orjson.loads(valid), orjson.loads(spoiled)
    [gone] = set(good) - set(bad)
    assert gone in TRIAGE_SCHEMA["required"]
    assert bad == {k: v for k, v in good.items() if k != gone}
    with pytest.raises(jsonschema.ValidationError) as caught:
        jsonschema.validate(bad, TRIAGE_SCHEMA)
    assert caught.value.validator == "required"
    # Nothing required: falls back to "not-json".
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    _, spoiled, _, outcomes = await valid_and_spoiled("missing-required", schema)
    assert outcomes == {"invalid:not-json": 1}
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(spoiled)


async def test_invalid_cut_off() -> None:
    valid, spoiled, finish, outcomes = await valid_and_spoiled("cut-off", TRIAGE_SCHEMA)
    assert outcomes == {"invalid:cut-off": 1}
    assert finish == "length" and spoiled == valid[: len(valid) // 2]
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(spoiled)


async def test_fence_wraps_valid_answers_only() -> None:
    body = structured_body(TICKETS[1][0])
    async with aiohttp.ClientSession() as session:
        async with serve() as server:
            valid, _, _ = await complete(session, server.base_url + "/chat/completions", body)
        async with serve(MockConfig(fence_rate=1.0)) as server:
            fenced, finish, doc = await complete(
                session, server.base_url + "/chat/completions", body
            )
            assert server.stats.to_dict()["by_outcome"] == {"fenced": 1}
        config = MockConfig(fence_rate=1.0, invalid_rate=1.0, invalid_kinds=("cut-off",))
        async with serve(config) as server:
            spoiled, _, _ = await complete(session, server.base_url + "/chat/completions", body)
            assert server.stats.to_dict()["by_outcome"] == {"invalid:cut-off": 1}
    assert finish == "stop" and fenced != fenced.strip()
    assert fenced.strip() == f"```json\n{valid}\n```"
    assert doc["usage"]["completion_tokens"] == count_tokens(fenced)
    assert "```" not in spoiled


async def test_faults_take_precedence_over_spoiling() -> None:
    config = MockConfig(fail_first=1, fail_first_kind="no-usage", invalid_rate=1.0, fence_rate=1.0)
    async with serve(config) as server, aiohttp.ClientSession() as session:
        content, _, doc = await complete(
            session, server.base_url + "/chat/completions", structured_body(TICKETS[0][0])
        )
        stats = server.stats.to_dict()
    assert "usage" not in doc and is_valid(orjson.loads(content), TRIAGE_SCHEMA)
    assert stats["by_outcome"] == {"no-usage": 1}


def expected_structured(
    seed: int, repeat: int, raw: bytes, invalid_rate: float, fence_rate: float
) -> str:
    """The structured-answer draw the spec prescribes, computed independently of the server."""
    digest = hashlib.sha256(f"{seed}:invalid:{repeat}:".encode() + raw).digest()
    if int.from_bytes(digest[:8], "big") / 2**64 < invalid_rate:
        return "invalid:" + INVALID_KINDS[int.from_bytes(digest[8:16], "big") % len(INVALID_KINDS)]
    digest = hashlib.sha256(f"{seed}:fence:{repeat}:".encode() + raw).digest()
    return "fenced" if int.from_bytes(digest[:8], "big") / 2**64 < fence_rate else "ok"


def classify(content: str, finish: str, schema: dict[str, Any]) -> str:
    """Tell from an answer alone which outcome the server recorded for it."""
    stripped = content.strip()
    if stripped.startswith("```json\n") and stripped.endswith("\n```"):
        assert is_valid(orjson.loads(stripped[len("```json\n") : -len("\n```")]), schema)
        return "fenced"
    try:
        answer = orjson.loads(content)
    except orjson.JSONDecodeError:
        return "invalid:cut-off" if finish == "length" else "invalid:not-json"
    try:
        jsonschema.validate(answer, schema)
    except jsonschema.ValidationError as exc:
        kinds = {"type": "invalid:wrong-type", "required": "invalid:missing-required"}
        return kinds[str(exc.validator)]
    return "ok"


async def test_invalid_and_fence_rates_are_drawn_per_body_and_retry() -> None:
    seed, invalid_rate, fence_rate = 3, 0.3, 0.25
    config = MockConfig(seed=seed, invalid_rate=invalid_rate, fence_rate=fence_rate)
    bodies = [
        orjson.dumps(structured_body(f"Ticket {i}: {TICKETS[i % len(TICKETS)][0]}"))
        for i in range(150)
    ]
    async with serve(config) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"

        async def attempts(raw: bytes) -> list[str]:
            out = []
            for _ in range(2):  # the client "retries" the same body
                content, finish, _ = await complete(session, url, raw)
                out.append(classify(content, finish, TRIAGE_SCHEMA))
            return out

        seen = await asyncio.gather(*(attempts(raw) for raw in bodies))
        stats = server.stats.to_dict()
    for raw, outcomes in zip(bodies, seen, strict=True):
        assert outcomes == [
            expected_structured(seed, n, raw, invalid_rate, fence_rate) for n in range(2)
        ]
    flat = [o for outcomes in seen for o in outcomes]
    assert stats["by_outcome"] == {o: flat.count(o) for o in set(flat)}
    assert {o.removeprefix("invalid:") for o in flat if o.startswith("invalid:")} == set(
        INVALID_KINDS
    )
    invalid = sum(o.startswith("invalid:") for o in flat) / len(flat)
    fenced = flat.count("fenced") / len(flat)
    assert 0.22 < invalid < 0.38
    assert 0.12 < fenced < 0.24  # 0.25 of the ~70 % that are not spoiled
    # A retry gets a fresh draw: some body must be spoiled and then come back valid.
    assert any(o[0].startswith("invalid:") and o[1] == "ok" for o in seen)


async def test_stream_structured_answer() -> None:
    body = structured_body(TICKETS[0][0], stream=True, stream_options={"include_usage": True})
    async with serve() as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        status, _, raw = await stream(session, url, body)
        plain, _, doc = await complete(session, url, structured_body(TICKETS[0][0]))
    config = MockConfig(invalid_rate=1.0, invalid_kinds=("cut-off",))
    async with serve(config) as server, aiohttp.ClientSession() as session:
        _, _, raw_cut = await stream(session, server.base_url + "/chat/completions", body)
    assert status == 200
    chunks = [orjson.loads(e) for e in sse_events(raw)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain and len(chunks) > 3
    jsonschema.validate(orjson.loads(text), TRIAGE_SCHEMA)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == doc["usage"]
    cut = [orjson.loads(e) for e in sse_events(raw_cut)[:-1]]
    cut_text = "".join(c["choices"][0]["delta"].get("content", "") for c in cut if c["choices"])
    assert cut_text == plain[: len(plain) // 2]
    assert cut[-2]["choices"][0]["finish_reason"] == "length"


# ---- the ways of carrying a schema (schema_via) and strict mode ------------------------

SCHEMA_WAYS: dict[str, dict[str, Any]] = {
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "t", "schema": TRIAGE_SCHEMA, "strict": True},
        }
    },
    "json_object_schema": {"response_format": {"type": "json_object", "schema": TRIAGE_SCHEMA}},
    "vllm": {"structured_outputs": {"json": TRIAGE_SCHEMA}},
}


def prompt_body(text: str) -> dict[str, Any]:
    """The schema at the end of the system prompt, as batchrun's ``prompt`` way puts it."""
    body = request_body(text)
    body["messages"][0]["content"] = (
        "Triage.\n\nFit this schema:\n" + orjson.dumps(TRIAGE_SCHEMA).decode()
    )
    return body


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # way -> (status, what the answer is: "schema" an instance, "text" the summary)
        (
            "any",
            {"json_schema": 200, "json_object_schema": 200, "vllm": 200},
        ),
        ("json_schema", {"json_schema": 200, "json_object_schema": 400, "vllm": "text"}),
        ("json_object_schema", {"json_schema": 500, "json_object_schema": 200, "vllm": "text"}),
        ("vllm", {"json_schema": 400, "json_object_schema": 400, "vllm": 200}),
        ("none", {"json_schema": 400, "json_object_schema": 400, "vllm": "text"}),
    ],
)
async def test_schema_via_modes(mode: str, expected: dict[str, Any]) -> None:
    text = TICKETS[0][0]
    async with serve(MockConfig(schema_via=mode)) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        for way, outcome in expected.items():
            status, _, data = await post(session, url, request_body(text, **SCHEMA_WAYS[way]))
            if outcome == "text":  # the field is ignored, as llama.cpp ignores unknown ones
                assert status == 200
                content = orjson.loads(data)["choices"][0]["message"]["content"]
                assert content.startswith("Summary: ")
            elif outcome == 200:
                assert status == 200, data
                answer = orjson.loads(orjson.loads(data)["choices"][0]["message"]["content"])
                jsonschema.validate(answer, TRIAGE_SCHEMA)
            else:
                assert status == outcome, (way, data)
                doc = orjson.loads(data)
                if outcome == 500:  # llama-cpp-python's validation error
                    assert doc["error"]["type"] == "internal_server_error"
                    assert "'response_format', 'type'" in doc["error"]["message"]
                else:
                    assert "response_format" in doc["message"]
        # Every mode follows a schema given in the prompt.
        content, _, _ = await complete(session, url, prompt_body(text))
        jsonschema.validate(orjson.loads(content), TRIAGE_SCHEMA)
        stats = server.stats.to_dict()
    refused = [v for v in expected.values() if v in (400, 500)]
    for status in set(refused):
        assert stats["by_outcome"][f"refused:{status}"] == refused.count(status)


async def test_strict_refuses_unknown_fields_by_name() -> None:
    async with (
        serve(
            MockConfig(strict=True, schema_via="json_object_schema", format_error_status=422)
        ) as server,
        aiohttp.ClientSession() as session,
    ):
        url = server.base_url + "/chat/completions"
        status, _, data = await post(session, url, request_body(guided_json={"type": "object"}))
        assert status == 400
        assert (
            orjson.loads(data)["message"] == "Unrecognized request argument supplied: guided_json"
        )
        status, _, data = await post(session, url, request_body(**SCHEMA_WAYS["vllm"]))
        assert status == 400 and b"structured_outputs" in data
        status, _, _ = await post(session, url, request_body(**SCHEMA_WAYS["json_schema"]))
        assert status == 422  # format_error_status replaces llama.cpp's 500
        ok, _, _ = await post(session, url, request_body(seed=1, top_p=0.9, metadata={"a": 1}))
        assert ok == 200
        stats = server.stats.to_dict()
    assert stats["by_outcome"] == {"400": 2, "refused:422": 1, "ok": 1}


def test_schema_via_config_validation() -> None:
    with pytest.raises(ValueError, match="schema_via must be one of"):
        MockConfig(schema_via="grammar")
    with pytest.raises(ValueError, match="format_error_status"):
        MockConfig(format_error_status=200)


def config_from_flags(*args: str) -> MockConfig:
    """The MockConfig that ``batchrun mock-server ARGS`` serves."""
    from batchrun.cli import _mock_config, mock_server

    ctx = mock_server.make_context("mock-server", list(args))
    return _mock_config(
        {k: v for k, v in ctx.params.items() if k not in ("host", "port", "ready_file")}
    )


def test_mock_server_flags_set_schema_via_strict_and_status() -> None:
    config = config_from_flags("--schema-via", "vllm", "--strict", "--format-error-status", "422")
    assert (config.schema_via, config.strict, config.format_error_status) == ("vllm", True, 422)
    plain = config_from_flags()
    assert (plain.schema_via, plain.strict, plain.format_error_status) == ("any", False, 0)


def test_mock_server_flags_set_the_rate_limits() -> None:
    config = config_from_flags(
        "--rpm-limit", "600", "--send-retry-after-ms", "--faults", "429-exhausted,503"
    )
    assert (config.rpm_limit, config.send_retry_after_ms) == (600.0, True)
    assert config.faults == ("429-exhausted", "503")
    plain = config_from_flags()
    assert (plain.rpm_limit, plain.send_retry_after_ms) == (0.0, False)

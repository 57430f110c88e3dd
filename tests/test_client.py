"""Unit tests of ApiClient: every HTTP outcome mapped onto the RequestError tree.

All HTTP is mocked with ``aioresponses``: no socket is opened, no server runs.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aioresponses import aioresponses
from yarl import URL

from batchrun import __version__
from batchrun.client import MAX_ERROR_TEXT, ApiClient, parse_retry_after
from batchrun.errors import (
    BadResponse,
    ConnectionDropped,
    FatalRequestError,
    RateLimited,
    RequestTimeout,
    RetryableError,
    ServerError,
)
from batchrun.payload import Completion
from tests.conftest import make_job

BASE_URL = "https://api.example.test/v1"
TEST_KEY = "sk-test-0123456789abcdef-secret"
MODEL = "test-model"
CHAT_URL = f"{BASE_URL}/chat/completions"
INFERENCE_URL = f"{BASE_URL}/models/{MODEL}/inference"
BODY = b'{"model":"test-model","messages":[{"role":"user","content":"hi"}]}'

ANSWER: dict[str, Any] = {
    "id": "chatcmpl-123",
    "object": "chat.completion",
    "model": "test-model-2024",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
}


# What this file's jobs lay over make_job's defaults (None: the Job's default stays).
JOB_KEYS: dict[str, Any] = {"model": MODEL, "api_key_env": None, "request_timeout_s": None}


@pytest.fixture
async def client() -> AsyncIterator[ApiClient]:
    async with ApiClient(make_job(BASE_URL, **JOB_KEYS), TEST_KEY) as c:
        yield c


def sent_requests(mocked: aioresponses, url: str = CHAT_URL) -> list[Any]:
    return mocked.requests.get(("POST", URL(url)), [])


# --- success -----------------------------------------------------------------


async def test_200_becomes_completion(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=200, payload=ANSWER)
    result = await client.complete(BODY)
    assert result == Completion(
        text="Hello there.",
        finish_reason="stop",
        prompt_tokens=11,
        completion_tokens=3,
        total_tokens=14,
        response_id="chatcmpl-123",
        response_model="test-model-2024",
    )


async def test_chat_endpoint_posts_to_chat_completions(mocked: aioresponses) -> None:
    mocked.post(CHAT_URL, status=200, payload=ANSWER)
    async with ApiClient(make_job(BASE_URL, **JOB_KEYS, endpoint="chat"), TEST_KEY) as c:
        await c.complete(BODY)
    assert len(sent_requests(mocked, CHAT_URL)) == 1
    assert list(mocked.requests) == [("POST", URL(CHAT_URL))]


async def test_inference_endpoint_posts_to_model_path(mocked: aioresponses) -> None:
    mocked.post(INFERENCE_URL, status=200, payload=ANSWER)
    async with ApiClient(make_job(BASE_URL, **JOB_KEYS, endpoint="inference"), TEST_KEY) as c:
        result = await c.complete(BODY)
    assert result.text == "Hello there."
    assert list(mocked.requests) == [("POST", URL(INFERENCE_URL))]


async def test_trailing_slash_on_base_url_is_not_doubled(mocked: aioresponses) -> None:
    mocked.post(CHAT_URL, status=200, payload=ANSWER)
    async with ApiClient(make_job(BASE_URL + "/", **JOB_KEYS), TEST_KEY) as c:
        await c.complete(BODY)
    assert list(mocked.requests) == [("POST", URL(CHAT_URL))]


async def test_headers_carry_bearer_key_and_json_content_type(
    mocked: aioresponses, client: ApiClient
) -> None:
    mocked.post(CHAT_URL, status=200, payload=ANSWER)
    await client.complete(BODY)
    (call,) = sent_requests(mocked)
    headers = call.kwargs["headers"]
    assert headers["Authorization"] == f"Bearer {TEST_KEY}"
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept"] == "application/json"
    assert headers["User-Agent"] == f"batchrun/{__version__}"


@pytest.mark.parametrize("key", [None, ""])
async def test_no_authorization_header_without_key(mocked: aioresponses, key: str | None) -> None:
    mocked.post(CHAT_URL, status=200, payload=ANSWER)
    async with ApiClient(make_job(BASE_URL, **JOB_KEYS), key) as c:
        await c.complete(BODY)
    (call,) = sent_requests(mocked)
    headers = call.kwargs["headers"]
    assert "Authorization" not in headers
    assert headers["Content-Type"] == "application/json"


async def test_body_sent_is_exactly_the_bytes_given(
    mocked: aioresponses, client: ApiClient
) -> None:
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "é ✓ \u2028"}]})
    mocked.post(CHAT_URL, status=200, payload=ANSWER)
    await client.complete(body)
    (call,) = sent_requests(mocked)
    assert call.kwargs["data"] == body
    assert isinstance(call.kwargs["data"], bytes)


async def test_session_is_reused_across_requests(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=200, payload=ANSWER, repeat=True)
    for _ in range(3):
        await client.complete(BODY)
    assert len(sent_requests(mocked)) == 3


async def test_complete_outside_context_manager_is_refused() -> None:
    c = ApiClient(make_job(BASE_URL, **JOB_KEYS), TEST_KEY)
    with pytest.raises(AssertionError, match="async with"):
        await c.complete(BODY)


async def test_session_closed_on_exit(mocked: aioresponses) -> None:
    c = ApiClient(make_job(BASE_URL, **JOB_KEYS), TEST_KEY)
    async with c:
        session = c._session
        assert session is not None and not session.closed
    assert session.closed
    assert c._session is None


# --- 429 and retryable statuses -----------------------------------------------


async def test_429_with_retry_after_seconds(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(
        CHAT_URL,
        status=429,
        headers={"Retry-After": "3"},
        payload={"error": "rate_limited", "message": "slow down"},
    )
    with pytest.raises(RateLimited) as info:
        await client.complete(BODY)
    exc = info.value
    assert exc.status == 429
    assert exc.retry_after == 3.0
    assert exc.retryable
    assert "slow down" in str(exc)


async def test_429_with_retry_after_http_date(mocked: aioresponses, client: ApiClient) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    mocked.post(CHAT_URL, status=429, headers={"Retry-After": when}, body="")
    with pytest.raises(RateLimited) as info:
        await client.complete(BODY)
    assert info.value.retry_after is not None
    # The date has whole-second precision: 119 < wait <= 120 (plus scheduling slack).
    assert 115.0 <= info.value.retry_after <= 121.0


async def test_429_without_retry_after(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=429, body="")
    with pytest.raises(RateLimited) as info:
        await client.complete(BODY)
    assert info.value.retry_after is None
    assert str(info.value) == "HTTP 429"


async def test_429_with_unreadable_retry_after(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=429, headers={"Retry-After": "soon"}, body="")
    with pytest.raises(RateLimited) as info:
        await client.complete(BODY)
    assert info.value.retry_after is None


async def test_429_retry_after_ms_is_read_before_retry_after(
    mocked: aioresponses, client: ApiClient
) -> None:
    mocked.post(CHAT_URL, status=429, headers={"Retry-After": "1", "retry-after-ms": "250"})
    with pytest.raises(RateLimited) as info:
        await client.complete(BODY)
    assert info.value.retry_after == 0.25


@pytest.mark.parametrize(
    ("ms", "expected"), [("soon", 2.0), ("nan", 2.0), ("", 2.0), ("-40", 0.0), ("1500", 1.5)]
)
async def test_429_unreadable_retry_after_ms_falls_back_to_retry_after(
    mocked: aioresponses, client: ApiClient, ms: str, expected: float
) -> None:
    mocked.post(CHAT_URL, status=429, headers={"Retry-After": "2", "Retry-After-Ms": ms})
    with pytest.raises(RateLimited) as info:
        await client.complete(BODY)
    assert info.value.retry_after == expected


@pytest.mark.parametrize(
    ("headers", "requests", "tokens", "exhausted"),
    [
        ({}, None, None, False),
        ({"x-ratelimit-remaining-requests": "0"}, 0, None, True),
        ({"X-RateLimit-Remaining-Tokens": " 0 "}, None, 0, True),
        (
            {"x-ratelimit-remaining-requests": "59", "x-ratelimit-remaining-tokens": "1500"},
            59,
            1500,
            False,
        ),
        ({"x-ratelimit-remaining-requests": "none"}, None, None, False),  # unreadable: not spent
    ],
)
async def test_429_carries_the_remaining_budgets(
    mocked: aioresponses,
    client: ApiClient,
    headers: dict[str, str],
    requests: int | None,
    tokens: int | None,
    exhausted: bool,
) -> None:
    mocked.post(CHAT_URL, status=429, headers=headers, body="")
    with pytest.raises(RateLimited) as info:
        await client.complete(BODY)
    exc = info.value
    assert (exc.remaining_requests, exc.remaining_tokens) == (requests, tokens)
    assert exc.exhausted is exhausted
    assert exc.sent_at is None  # the scheduler sets it


async def test_503_reads_retry_after_ms(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=503, headers={"retry-after-ms": "750"}, body="")
    with pytest.raises(ServerError) as info:
        await client.complete(BODY)
    assert info.value.retry_after == 0.75


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
async def test_retryable_statuses_become_server_error(
    mocked: aioresponses, client: ApiClient, status: int
) -> None:
    mocked.post(CHAT_URL, status=status, body="upstream trouble", content_type="text/plain")
    with pytest.raises(ServerError) as info:
        await client.complete(BODY)
    exc = info.value
    assert isinstance(exc, RetryableError)
    assert exc.retryable
    assert exc.status == status
    assert exc.retry_after is None
    assert str(exc) == f"HTTP {status}: upstream trouble"


async def test_503_keeps_retry_after(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=503, headers={"Retry-After": "7"}, body="")
    with pytest.raises(ServerError) as info:
        await client.complete(BODY)
    assert info.value.retry_after == 7.0


# --- fatal statuses -------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_fatal_statuses_llmtune_error_format(
    mocked: aioresponses, client: ApiClient, status: int
) -> None:
    mocked.post(
        CHAT_URL,
        status=status,
        payload={"error": "bad_request", "message": "max_tokens is too large"},
    )
    with pytest.raises(FatalRequestError) as info:
        await client.complete(BODY)
    exc = info.value
    assert not exc.retryable
    assert not isinstance(exc, RetryableError)
    assert exc.status == status
    assert str(exc) == f"HTTP {status}: bad_request: max_tokens is too large"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_fatal_statuses_openai_error_format(
    mocked: aioresponses, client: ApiClient, status: int
) -> None:
    mocked.post(
        CHAT_URL,
        status=status,
        payload={
            "error": {"message": "The model `x` does not exist", "type": "invalid_request_error"}
        },
    )
    with pytest.raises(FatalRequestError) as info:
        await client.complete(BODY)
    assert info.value.status == status
    assert str(info.value) == f"HTTP {status}: invalid_request_error: The model `x` does not exist"


async def test_openai_error_format_prefers_code_over_type(
    mocked: aioresponses, client: ApiClient
) -> None:
    mocked.post(
        CHAT_URL,
        status=401,
        payload={
            "error": {
                "message": "Incorrect API key",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        },
    )
    with pytest.raises(FatalRequestError, match=r"^HTTP 401: invalid_api_key: Incorrect API key$"):
        await client.complete(BODY)


async def test_openai_error_format_without_type(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=400, payload={"error": {"message": "bad messages"}})
    with pytest.raises(FatalRequestError, match=r"^HTTP 400: bad messages$"):
        await client.complete(BODY)


async def test_message_or_detail_only(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=422, payload={"detail": "field required: messages"})
    with pytest.raises(FatalRequestError, match=r"^HTTP 422: field required: messages$"):
        await client.complete(BODY)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_fatal_statuses_plain_text(
    mocked: aioresponses, client: ApiClient, status: int
) -> None:
    mocked.post(CHAT_URL, status=status, body="  Not allowed here\n", content_type="text/plain")
    with pytest.raises(FatalRequestError) as info:
        await client.complete(BODY)
    assert info.value.status == status
    assert str(info.value) == f"HTTP {status}: Not allowed here"


async def test_fatal_empty_body(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=404, body="")
    with pytest.raises(FatalRequestError) as info:
        await client.complete(BODY)
    assert str(info.value) == "HTTP 404"


async def test_long_plain_text_error_is_truncated(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=400, body="x" * 5000, content_type="text/plain")
    with pytest.raises(FatalRequestError) as info:
        await client.complete(BODY)
    assert str(info.value) == "HTTP 400: " + "x" * MAX_ERROR_TEXT


@pytest.mark.parametrize(
    "payload",
    [
        {"error": {"message": "y" * 5000, "type": "invalid_request_error"}},
        {"error": "bad_request", "message": "y" * 5000},
    ],
    ids=["openai", "llmtune"],
)
async def test_long_structured_error_is_truncated(
    mocked: aioresponses, client: ApiClient, payload: dict[str, Any]
) -> None:
    mocked.post(CHAT_URL, status=400, payload=payload)
    with pytest.raises(FatalRequestError) as info:
        await client.complete(BODY)
    assert len(str(info.value)) <= len("HTTP 400: ") + MAX_ERROR_TEXT


# --- redaction ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs"),
    [
        {
            "payload": {
                "error": {"message": f"Incorrect API key provided: {TEST_KEY}.", "type": "auth"}
            }
        },
        {"payload": {"error": "invalid_key", "message": f"key {TEST_KEY} is not valid"}},
        {"body": f"bad key {TEST_KEY} (Bearer {TEST_KEY})", "content_type": "text/plain"},
    ],
    ids=["openai", "llmtune", "text"],
)
async def test_error_echoing_key_is_redacted(
    mocked: aioresponses, client: ApiClient, kwargs: dict[str, Any]
) -> None:
    mocked.post(CHAT_URL, status=401, **kwargs)
    with pytest.raises(FatalRequestError) as info:
        await client.complete(BODY)
    assert TEST_KEY not in str(info.value)
    assert "[redacted]" in str(info.value)
    assert TEST_KEY not in repr(info.value.args)


async def test_retryable_error_echoing_key_is_redacted(
    mocked: aioresponses, client: ApiClient
) -> None:
    mocked.post(CHAT_URL, status=503, body=f"proxy saw Authorization: Bearer {TEST_KEY}")
    with pytest.raises(ServerError) as info:
        await client.complete(BODY)
    assert TEST_KEY not in str(info.value)
    assert "[redacted]" in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"body": "x" * (MAX_ERROR_TEXT - 16) + TEST_KEY, "content_type": "text/plain"},
        {"payload": {"message": "x" * (MAX_ERROR_TEXT - 16) + TEST_KEY}},
    ],
    ids=["text", "message"],
)
async def test_key_cut_by_truncation_does_not_leak(
    mocked: aioresponses, client: ApiClient, kwargs: dict[str, Any]
) -> None:
    mocked.post(CHAT_URL, status=401, **kwargs)
    with pytest.raises(FatalRequestError) as info:
        await client.complete(BODY)
    assert TEST_KEY[:16] not in str(info.value)


# --- unreadable 2xx answers -------------------------------------------------------


async def test_malformed_json_200_is_bad_response(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=200, body='{"choices": [')
    with pytest.raises(BadResponse) as info:
        await client.complete(BODY)
    exc = info.value
    assert exc.retryable
    assert exc.status == 200
    assert "not JSON" in str(exc)
    assert isinstance(exc.__cause__, orjson.JSONDecodeError)


@pytest.mark.parametrize(
    "payload",
    [{"id": "x", "choices": []}, {"id": "x"}, {"choices": None}, {"choices": ["text"]}],
    ids=["empty", "missing", "null", "not-object"],
)
async def test_200_without_choices_is_bad_response(
    mocked: aioresponses, client: ApiClient, payload: dict[str, Any]
) -> None:
    mocked.post(CHAT_URL, status=200, payload=payload)
    with pytest.raises(BadResponse, match="no `choices`") as info:
        await client.complete(BODY)
    assert info.value.status == 200


async def test_200_json_array_is_bad_response(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(CHAT_URL, status=200, body="[1, 2]")
    with pytest.raises(BadResponse, match="not an object") as info:
        await client.complete(BODY)
    assert info.value.status == 200


# --- transport failures --------------------------------------------------------------


async def test_timeout_is_request_timeout(mocked: aioresponses, client: ApiClient) -> None:
    # asyncio.TimeoutError is the builtin TimeoutError on Python 3.11+.
    mocked.post(CHAT_URL, exception=TimeoutError())
    with pytest.raises(RequestTimeout) as info:
        await client.complete(BODY)
    exc = info.value
    assert exc.retryable
    assert exc.status is None
    assert "request_timeout_s=60s" in str(exc)
    assert isinstance(exc.__cause__, TimeoutError)


async def test_aiohttp_server_timeout_is_request_timeout(
    mocked: aioresponses, client: ApiClient
) -> None:
    # ServerTimeoutError is both a ClientError and a TimeoutError: timeout wins.
    mocked.post(CHAT_URL, exception=aiohttp.ServerTimeoutError("read timed out"))
    with pytest.raises(RequestTimeout):
        await client.complete(BODY)


@pytest.mark.parametrize(
    "error",
    [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectionError("Connection reset by peer"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    ],
    ids=["disconnected", "connection", "payload"],
)
async def test_connection_failures_are_connection_dropped(
    mocked: aioresponses, client: ApiClient, error: Exception
) -> None:
    mocked.post(CHAT_URL, exception=error)
    with pytest.raises(ConnectionDropped) as info:
        await client.complete(BODY)
    exc = info.value
    assert exc.retryable
    assert exc.status is None
    assert exc.__cause__ is error
    assert str(exc).startswith(f"connection failed: {type(error).__name__}")


async def test_connection_error_message_is_redacted(
    mocked: aioresponses, client: ApiClient
) -> None:
    mocked.post(
        CHAT_URL, exception=aiohttp.ClientConnectionError(f"proxy refused Bearer {TEST_KEY}")
    )
    with pytest.raises(ConnectionDropped) as info:
        await client.complete(BODY)
    assert TEST_KEY not in str(info.value)


# --- parse_retry_after ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("0", 0.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("0.25", 0.25),
        ("-5", 0.0),
    ],
)
def test_parse_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date_in_future() -> None:
    now = 1_700_000_000.0
    value = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(value, now=now) == pytest.approx(30.0)


def test_parse_retry_after_http_date_in_past_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0


@pytest.mark.parametrize(
    "value", [None, "", "   ", "garbage", "soon", "3 seconds", "Wed, 99 Foo 2015"]
)
def test_parse_retry_after_unreadable_is_none(value: str | None) -> None:
    assert parse_retry_after(value) is None


@pytest.mark.parametrize("value", ["nan", "inf", "Infinity"])
def test_parse_retry_after_non_finite_is_none(value: str) -> None:
    assert parse_retry_after(value) is None

"""The embedded endpoint's HTTP side: request validation, the aiohttp handlers (faults,
streams, ``/_stats``, ``/_reset``), :func:`serve` and :func:`serve_forever` with its
ready file. What it answers comes from :mod:`.answers`.

Everything is deterministic: the answer depends only on the request body (a structured
answer only on the schema and the last user message), and whether a request gets a fault
(or a spoiled or fenced structured answer) depends only on ``(seed, body bytes, how many
times that exact body was received before)``. Arrival order of *different* bodies does
not matter, so two servers with the same seed inject the same faults into the same
workload even when the client runs it concurrently; a retry of the same body gets a
fresh draw.

The hot path is kept small on purpose (a client pushes thousands of requests per second
at it): one SHA-256 of the body, one ``orjson`` parse, a few regex scans, one ``orjson``
dump, no per-request logging. Structured answers add a walk over the schema with one
SHA-256 per generated value.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web

from batchrun.aio import run_coroutine
from batchrun.files import write_atomic
from batchrun.mock.answers import (
    _TOKEN_RE,
    _answer,
    count_tokens,
    shaped_deltas,
    shaped_message,
)
from batchrun.mock.batches import add_batch_api
from batchrun.mock.config import MockConfig, MockStats
from batchrun.mock.dialects import Refusal, known_fields, requested_schema
from batchrun.mock.limit import JSON_HEADERS, RequestLimit, retry_after_headers

# Grace period (seconds) that server shutdown gives in-flight handlers before cancelling
# them. aiohttp's default is 60 s, which would make every test that leaves a "hang"
# handler behind wait a minute on exit.
_SHUTDOWN_TIMEOUT_S: Final = 2.0

_PIECE_TOKENS: Final = 4  # tokens per streamed delta, roughly what real servers send

# Per-message overhead added to the prompt count, like the role/separator tokens of
# real chat templates.
_MESSAGE_OVERHEAD_TOKENS: Final = 4

_JSON_HEADERS: Final = JSON_HEADERS
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_SSE_DONE: Final = b"data: [DONE]\n\n"
_MALFORMED_BODY: Final = b"{not json"

# status, error code, message for the faults that are plain error responses.
_STATUS_FAULTS: Final[dict[str, tuple[int, str, str]]] = {
    "429": (429, "rate_limited", "Rate limit exceeded"),
    "429-no-retry-after": (429, "rate_limited", "Rate limit exceeded"),
    "429-exhausted": (429, "rate_limited", "Rate limit exceeded"),
    "500": (500, "server_error", "Internal server error"),
    "502": (502, "bad_gateway", "Bad gateway"),
    "503": (503, "service_unavailable", "Service unavailable"),
    "504": (504, "gateway_timeout", "Gateway timeout"),
}


class _BadRequest(Exception):
    """Raised during validation; carries the 400 error code and message."""

    def __init__(self, code: str, message: str) -> None:
        """Store the LLMTune-style error ``code`` and human-readable ``message``."""
        super().__init__(message)
        self.code = code
        self.message = message


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Build an LLMTune-style error response: ``{"error": code, "message": message}``."""
    body = orjson.dumps({"error": code, "message": message})
    return web.Response(status=status, body=body, headers=headers or _JSON_HEADERS)


def _drop(request: web.Request) -> web.Response:
    """Close the client connection without sending anything (client sees a disconnect).

    ``transport.close()`` sends a FIN (the client reports ``ServerDisconnectedError``),
    unlike ``abort()`` which may send a RST. The returned response is never delivered:
    aiohttp's write to the closing transport raises ``ConnectionResetError``, which it
    treats as a premature client disconnection and does not log. Raising here instead
    would make aiohttp log an error and try to send a 500.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=200, body=b"")


def _validate(body: Any, path_model: str | None) -> tuple[str, list[dict[str, Any]], int]:
    """Check a parsed request body; return ``(model, messages, prompt_tokens)``.

    ``path_model`` is the model from the inference route's path, used when the body has
    no ``model``. Raises :class:`_BadRequest` (``invalid_request``) on a body that is
    not an object, a missing/empty/non-string model, ``messages`` that is not a
    non-empty list of objects with string ``content``, or a ``max_tokens`` that is not
    a positive int. The schema fields are read by :func:`.dialects.requested_schema`.
    """
    if not isinstance(body, dict):
        raise _BadRequest("invalid_request", "Request body must be a JSON object")
    model = body.get("model")
    if model is None and path_model:
        model = path_model
    if not isinstance(model, str) or not model:
        raise _BadRequest("invalid_request", "Field 'model' must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("invalid_request", "Field 'messages' must be a non-empty list")
    prompt_tokens = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _BadRequest(
                "invalid_request",
                "Every entry of 'messages' must be an object with a string 'content'",
            )
        prompt_tokens += count_tokens(message["content"]) + _MESSAGE_OVERHEAD_TOKENS
    max_tokens = body.get("max_tokens")
    # bool is an int subclass; reject it so {"max_tokens": true} is not read as 1.
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise _BadRequest("invalid_request", "Field 'max_tokens' must be a positive integer")
    return model, messages, prompt_tokens


def _pieces(completion: str) -> list[str]:
    """Split ``completion`` into stream deltas of about four tokens each.

    Cuts fall right after every fourth token, so whitespace goes to the start of the
    following piece and the pieces concatenate back to exactly ``completion``.
    """
    ends = [m.end() for m in _TOKEN_RE.finditer(completion)]
    cuts = ends[_PIECE_TOKENS - 1 :: _PIECE_TOKENS]
    pieces: list[str] = []
    start = 0
    for cut in cuts:
        pieces.append(completion[start:cut])
        start = cut
    if start < len(completion) or not pieces:
        pieces.append(completion[start:])
    return pieces


def _sse(payload: dict[str, Any]) -> bytes:
    """Encode one server-sent event carrying ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class _Endpoint:
    """Request handlers plus the per-app state they share (config, stats, precomputed bits)."""

    def __init__(self, config: MockConfig) -> None:
        """Precompute what every request would otherwise recompute."""
        self.config = config
        self.stats = MockStats()
        # Compared as bytes with hmac.compare_digest: constant time, and no key is
        # ever formatted into a response.
        self._auth: bytes | None = (
            f"Bearer {config.api_key}".encode() if config.api_key is not None else None
        )
        self._retry_after = retry_after_headers(config.retry_after_s, config.send_retry_after_ms)
        self._fault_headers = {
            "429": self._retry_after,
            "429-exhausted": {**self._retry_after, "x-ratelimit-remaining-requests": "0"},
        }
        self._limit = RequestLimit(config.rpm_limit) if config.rpm_limit > 0 else None
        self._seed_prefix = f"{config.seed}:"
        self._invalid_prefix = f"{config.seed}:invalid:"
        self._fence_prefix = f"{config.seed}:fence:"

    def _outcome(self, outcome: str) -> None:
        """Count one request outcome."""
        by_outcome = self.stats.by_outcome
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1

    def _draw_fault(self, raw: bytes, repeat: int) -> str | None:
        """Return the fault for this body's ``repeat``-th arrival (0-based), or ``None``.

        ``u`` = first 8 bytes of ``sha256(f"{seed}:{repeat}:" + body)`` as a big-endian
        integer / 2**64; a fault happens when ``u < fault_rate`` and its kind is
        ``faults[next 8 bytes % len(faults)]``. Depends only on seed, body and repeat.
        """
        config = self.config
        if config.fault_rate <= 0.0:
            return None
        digest = hashlib.sha256(f"{self._seed_prefix}{repeat}:".encode() + raw).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= config.fault_rate:
            return None
        return config.faults[int.from_bytes(digest[8:16], "big") % len(config.faults)]

    def _draw_structured(self, raw: bytes, repeat: int) -> tuple[str | None, int, bool]:
        """Return ``(defect, pick, fenced)`` for this body's ``repeat``-th structured answer.

        Like :meth:`_draw_fault` with ``sha256(f"{seed}:invalid:{repeat}:" + body)``: a
        defect when ``u < invalid_rate``, of kind ``invalid_kinds[bytes 8..16 %
        len(invalid_kinds)]``, and ``pick`` = bytes 16..24 (which required property
        ``"missing-required"`` removes). Without a defect, ``fenced`` is
        ``u' < fence_rate`` with ``u'`` from ``sha256(f"{seed}:fence:{repeat}:" + body)``.
        """
        config = self.config
        if config.invalid_rate > 0.0:
            digest = hashlib.sha256(f"{self._invalid_prefix}{repeat}:".encode() + raw).digest()
            if int.from_bytes(digest[:8], "big") / 2**64 < config.invalid_rate:
                kinds = config.invalid_kinds
                kind = kinds[int.from_bytes(digest[8:16], "big") % len(kinds)]
                return kind, int.from_bytes(digest[16:24], "big"), False
        if config.fence_rate > 0.0:
            digest = hashlib.sha256(f"{self._fence_prefix}{repeat}:".encode() + raw).digest()
            return None, 0, int.from_bytes(digest[:8], "big") / 2**64 < config.fence_rate
        return None, 0, False

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        return await self._complete(request, None)

    async def model_inference(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/models/{model_id}/inference``: the path's model is the default."""
        return await self._complete(request, request.match_info["model_id"])

    async def get_stats(self, request: web.Request) -> web.Response:
        """``GET /_stats``: the :class:`MockStats` as JSON."""
        return web.Response(body=orjson.dumps(self.stats.to_dict()), headers=_JSON_HEADERS)

    async def reset_stats(self, request: web.Request) -> web.Response:
        """``POST /_reset``: zero the stats; answers the (zeroed) stats as JSON."""
        self.stats.reset()
        return web.Response(body=orjson.dumps(self.stats.to_dict()), headers=_JSON_HEADERS)

    async def _complete(self, request: web.Request, path_model: str | None) -> web.StreamResponse:
        """Shared handler of both completion routes: count, authenticate, validate, fault, answer."""
        raw = await request.read()
        config = self.config
        stats = self.stats

        # Bookkeeping first, so every request counts whatever happens next.
        body_hash = hashlib.sha256(raw).hexdigest()
        arrival = stats.requests
        stats.requests = arrival + 1
        repeat = stats.bodies.get(body_hash, 0)
        stats.bodies[body_hash] = repeat + 1

        if config.latency_s > 0.0:
            await asyncio.sleep(config.latency_s)

        if self._auth is not None:
            sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(sent, self._auth):
                self._outcome("401")
                return _error(401, "invalid_api_key", "Invalid or missing API key")
        headers = _JSON_HEADERS
        limit = self._limit
        if limit is not None:
            if not limit.take():
                self._outcome("rpm-limit")
                wait = retry_after_headers(limit.reset_s(), config.send_retry_after_ms)
                message = f"Rate limit of {config.rpm_limit:g} requests a minute reached"
                return _error(429, "rate_limit_exceeded", message, wait | limit.headers())
            headers = _JSON_HEADERS | limit.headers()

        try:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise _BadRequest("invalid_request", "Request body is not valid JSON") from None
            model, _, prompt_tokens = _validate(body, path_model)
            body = known_fields(body, config.unknown_fields, config.strict)
            if prompt_tokens > config.context_tokens:
                raise _BadRequest(
                    "context_length_exceeded",
                    f"Prompt is {prompt_tokens} tokens, over the model's context window "
                    f"of {config.context_tokens} tokens",
                )
            schema = requested_schema(
                body, config.schema_via, config.strict, config.format_error_status
            )
        except _BadRequest as exc:
            self._outcome("400")
            return _error(400, exc.code, exc.message)
        except Refusal as exc:
            self._outcome(exc.outcome)
            return web.Response(status=exc.status, body=exc.body, headers=_JSON_HEADERS)

        fault = (
            config.fail_first_kind if arrival < config.fail_first else self._draw_fault(raw, repeat)
        )
        stream = body.get("stream") is True
        # A request gets at most one injected problem: structured answers are only
        # spoiled or fenced when there is no fault.
        defect: str | None = None
        pick = 0
        fenced = False
        faulted = fault is not None  # fault itself is cleared after a "hang"
        if fault is not None:
            self._outcome(fault)
        elif schema is not None:
            defect, pick, fenced = self._draw_structured(raw, repeat)

        if fault is not None:
            if fault == "hang":
                # Meant to outlive the client's timeout; if the client gives up and
                # disconnects, aiohttp cancels this handler (handler_cancellation).
                await asyncio.sleep(config.hang_s)
                fault = None
            elif fault in _STATUS_FAULTS:
                status, code, message = _STATUS_FAULTS[fault]
                return _error(status, code, message, headers | self._fault_headers.get(fault, {}))
            elif fault == "drop" or (fault == "stream-cut" and not stream):
                return _drop(request)

        completion, finish_reason, outcome = _answer(
            body, schema, defect, pick, fenced, config.echo_chars
        )
        if not faulted:
            self._outcome(outcome)
        completion_tokens = count_tokens(completion) + config.reasoning_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if config.cached_share or config.reasoning_tokens:
            usage["prompt_tokens_details"] = {
                "cached_tokens": int(prompt_tokens * config.cached_share)
            }
            usage["completion_tokens_details"] = {"reasoning_tokens": config.reasoning_tokens}
        completion_id = "chatcmpl-" + body_hash[:24]
        created = int(time.time())
        if stream:
            return await self._stream(
                request,
                body,
                fault,
                completion_id,
                created,
                model,
                completion,
                finish_reason,
                usage,
                headers,
            )

        answer, finish_reason = shaped_message(
            fault, completion, finish_reason, "call_" + body_hash[:24]
        )
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": answer, "finish_reason": finish_reason}],
            "usage": usage,
        }
        if fault == "no-usage":
            del payload["usage"]
        elif fault == "malformed":
            return web.Response(body=_MALFORMED_BODY, headers=headers)
        encoded = orjson.dumps(payload)
        if fault == "truncated":
            encoded = encoded[: len(encoded) // 2]
        return web.Response(body=encoded, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        fault: str | None,
        completion_id: str,
        created: int,
        model: str,
        completion: str,
        finish_reason: str,
        usage: dict[str, Any],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Answer as server-sent events; see the module docs of the stream fault variants.

        Faults on streams: ``"malformed"`` sends an event whose data is not JSON (then
        ``[DONE]``); ``"truncated"`` ends the response cleanly after the first half of
        the event bytes (no ``[DONE]``); ``"stream-cut"`` sends the first event and then
        closes the connection mid-response; ``"no-usage"`` omits the usage event;
        ``"early-done"`` sends ``[DONE]`` after the first half of the content events
        (no finish reason, no usage); ``"token-stream"`` sends ``{"token": piece}``
        events; the other answer kinds shape the deltas (:func:`.answers.shaped_deltas`).
        """
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        events: list[bytes] = []
        if fault == "malformed":
            events.append(b"data: " + _MALFORMED_BODY + b"\n\n")
        elif fault == "token-stream":
            events.extend(_sse({"token": piece}) for piece in _pieces(completion))
        else:
            deltas, finish_reason = shaped_deltas(
                fault, _pieces(completion), finish_reason, "call_" + completion_id[9:]
            )
            if fault == "early-done":
                deltas = deltas[: (len(deltas) + 1) // 2]
            for delta in deltas:
                events.append(
                    _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                )
        if fault not in ("malformed", "token-stream", "early-done"):
            events.append(
                _sse(
                    {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]}
                )
            )
            options = body.get("stream_options")
            if (
                fault != "no-usage"
                and isinstance(options, dict)
                and options.get("include_usage") is True
            ):
                events.append(_sse({**head, "choices": [], "usage": usage}))
        events.append(_SSE_DONE)

        # The SSE content type, and the rate-limit headers when a limit is enforced.
        response = web.StreamResponse(headers=headers | _SSE_HEADERS)
        await response.prepare(request)
        if fault == "stream-cut":
            await response.write(events[0])
            _drop(request)  # close mid-body: the chunked encoding is never terminated
            return response
        data = b"".join(events)
        if fault == "truncated":
            data = data[: len(data) // 2]
        # One write for the whole stream: there is no per-piece delay to imitate, and
        # every write is a syscall on the hot path.
        await response.write(data)
        await response.write_eof()
        return response


_ENDPOINT_KEY: Final = web.AppKey("batchrun_mock_endpoint", _Endpoint)


def create_app(config: MockConfig) -> web.Application:
    """Build the aiohttp application of the mock endpoint for ``config``.

    Run it with ``handler_cancellation=True`` (as :func:`serve` does) so handlers of
    clients that gave up, e.g. on a ``"hang"`` fault, are cancelled.
    """
    endpoint = _Endpoint(config)
    # Bodies are small JSON; the default 1 MiB limit would reject very long prompts
    # before they could get a proper context_length_exceeded answer.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_ENDPOINT_KEY] = endpoint
    app.router.add_post("/v1/chat/completions", endpoint.chat_completions)
    app.router.add_post("/v1/models/{model_id:.+}/inference", endpoint.model_inference)
    app.router.add_get("/_stats", endpoint.get_stats)
    app.router.add_post("/_reset", endpoint.reset_stats)
    add_batch_api(app, config)
    return app


def _url_host(host: str) -> str:
    """Return ``host`` as it goes into a URL (IPv6 literals need brackets)."""
    return f"[{host}]" if ":" in host else host


class MockServer:
    """A running mock endpoint, as yielded by :func:`serve`."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        """Wrap the running ``app`` listening on ``host``:``port``."""
        self.app = app
        self.host = host
        self.port = port

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{_url_host(self.host)}:{self.port}/v1"

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:PORT`` (``/_stats`` lives here)."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def stats(self) -> MockStats:
        """The live stats object (mutated in place as requests arrive)."""
        return self.app[_ENDPOINT_KEY].stats

    @property
    def config(self) -> MockConfig:
        """The configuration the server runs with."""
        return self.app[_ENDPOINT_KEY].config


@asynccontextmanager
async def serve(
    config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[MockServer]:
    """Run the mock endpoint on ``host``:``port`` in the current event loop while the block runs.

    ``port=0`` picks a free port (see :attr:`MockServer.port`). No access log. On exit
    the server stops; in-flight handlers get a short grace period, then are cancelled.
    """
    app = create_app(config or MockConfig())
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
        yield MockServer(app, host, bound_port)
    finally:
        await runner.cleanup()


def _write_ready_file(path: str, content: str) -> None:
    """Write ``content`` to ``path`` atomically, so a polling reader never sees it half-written."""
    write_atomic(Path(os.path.abspath(path)), content.encode("utf-8"))


async def _serve_until_signal(
    config: MockConfig, host: str, port: int, ready_file: str | None
) -> None:
    """Serve until SIGINT or SIGTERM arrives, announcing readiness on stderr and in ``ready_file``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not available on Windows event loops; Ctrl-C still raises KeyboardInterrupt there.
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        async with serve(config, host, port) as server:
            print(f"batchrun mock endpoint on {server.base_url}", file=sys.stderr, flush=True)
            if ready_file is not None:
                _write_ready_file(ready_file, server.base_url)
            await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def serve_forever(
    config: MockConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready_file: str | None = None,
) -> None:
    """Run the mock endpoint in the foreground until SIGINT or SIGTERM, then stop cleanly.

    Uses uvloop when importable. Once listening it prints
    ``batchrun mock endpoint on http://HOST:PORT/v1`` to stderr and, if ``ready_file``
    is given, writes that base URL (no newline) to it atomically, so a parent process
    can poll for the file and read the URL, including the real port when ``port=0``.
    """
    run_coroutine(_serve_until_signal(config, host, port, ready_file))

"""The HTTP client: owns the aiohttp session and sends one request at a time.

Everything aiohttp or asyncio can raise is translated here into the
``batchrun.errors.RequestError`` tree (with ``from exc``), so the rest of the code
never sees an aiohttp exception. The API key is only ever held here.

Three promises hold whatever the server does:

- Every text it sends back (error bodies, stream chunks, the answer's own
  fields) leaves with the key and the job's header secrets redacted, written
  as they are or escaped (``_redact``).
- The key and headers go to ``base_url``'s origin only: a redirect is followed
  when it is a 307 or 308 within that origin, and is a row error otherwise
  (``_redirect_target``).
- No more than ``max_response_bytes`` of an answer is read or held, counted
  after decompression, streamed answers included (``_read_body``, ``_lines``).
"""

from __future__ import annotations

import contextlib
import email.utils
import math
import re
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from yarl import URL

from batchrun._version import __version__
from batchrun.config import Job
from batchrun.errors import (
    AnswerTooLarge,
    BadResponse,
    CannotConnect,
    ConnectionDropped,
    FatalRequestError,
    RateLimited,
    RequestError,
    RequestTimeout,
    ServerError,
)
from batchrun.payload import Completion, content_text, parse_completion

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_ERROR_TEXT = 300
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
FOLLOWED_REDIRECTS = frozenset({307, 308})
"""Redirects that keep the method and body; followed within the job's origin only."""
MAX_REDIRECTS = 5
READ_CHUNK = 1 << 16


def _origin(url: URL) -> tuple[str, str, int | None]:
    """(scheme, host, port): two URLs may share a key and headers only when these match.
    ``localhost`` and 127.0.0.1 are different origins."""
    return url.scheme.lower(), (url.host or "").lower(), url.port


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP
    date. None when absent or unreadable; never negative."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def wait_asked(headers: Mapping[str, str]) -> float | None:
    """The wait in seconds an error answer asks for: ``retry-after-ms`` (OpenAI's
    and Azure's, in milliseconds, more precise than whole seconds) when it is
    readable, else ``Retry-After``. None when neither is; never negative.
    ``headers`` must match names in any case (aiohttp's do)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms.strip())
        except ValueError:
            pass
        else:
            if math.isfinite(value):
                return max(0.0, value / 1000)
    return parse_retry_after(headers.get("Retry-After"))


def _count(value: str | None) -> int | None:
    """A whole count from a header (``x-ratelimit-remaining-requests: 0``); None
    when absent or unreadable, so a missing header never reads as "spent"."""
    if value is None:
        return None
    try:
        return max(0, int(value.strip()))
    except ValueError:
        return None


REDACTED = "[redacted]"
# JSON's short escapes (and Python's, in a repr), by the character they stand for.
_SHORT_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "'": "'",
    "\b": "b",
    "\f": "f",
    "\n": "n",
    "\r": "r",
    "\t": "t",
}


def _hex(value: int, digits: int) -> str:
    """``value`` as a regex matching its hex digits in either case."""
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{value:0{digits}x}")


def _char_pattern(char: str) -> str:
    """A regex matching ``char`` as it is, or as a JSON or Python escape would
    write it: ``\\u002d``, ``\\x2d``, a surrogate pair, the UTF-8 bytes as
    ``\\xe2\\x82\\xac``, ``\\n``, ``\\/`` … The backslash may be doubled (text
    escaped twice, as JSON inside a JSON string)."""
    code = ord(char)
    forms = [re.escape(char)]
    if code > 0xFFFF:
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        forms.append(rf"\\+u{_hex(high, 4)}\\+u{_hex(low, 4)}")
    else:
        forms.append(rf"\\+u{_hex(code, 4)}")
    if code <= 0xFF:
        forms.append(rf"\\+x{_hex(code, 2)}")
    if code > 0x7F:
        forms.append("".join(rf"\\+x{_hex(b, 2)}" for b in char.encode()))
    if char in _SHORT_ESCAPES:
        forms.append(rf"\\+{re.escape(_SHORT_ESCAPES[char])}")
    return "(?:" + "|".join(forms) + ")"


def secrets_pattern(secrets: Sequence[str]) -> re.Pattern[str] | None:
    """One regex matching any of ``secrets`` written as it is or with any of its
    characters escaped (see ``_char_pattern``); None when there is none.
    Longest first, so a secret containing another is redacted whole."""
    ordered = sorted({s for s in secrets if s}, key=len, reverse=True)
    if not ordered:
        return None
    return re.compile("|".join("".join(map(_char_pattern, s)) for s in ordered))


def _add_tool_calls(calls: dict[int, dict[str, Any]], pieces: list[Any]) -> None:
    """Add a stream delta's ``tool_calls`` pieces to ``calls`` (by ``index``): the
    id, type and function name as they come, the arguments text appended."""
    for position, piece in enumerate(pieces):
        if not isinstance(piece, dict):
            continue
        index = piece.get("index")
        call = calls.setdefault(index if isinstance(index, int) else position, {})
        for key in ("id", "type"):
            if isinstance(piece.get(key), str):
                call[key] = piece[key]
        function = piece.get("function")
        if isinstance(function, dict):
            target = call.setdefault("function", {"name": None, "arguments": ""})
            if isinstance(function.get("name"), str):
                target["name"] = function["name"]
            if isinstance(function.get("arguments"), str):
                target["arguments"] += function["arguments"]


def _error_text(raw: bytes) -> str:
    """The API's own words from an error body: LLMTune's {"error", "message"},
    OpenAI's {"error": {"message", "type", "code"}}, or the raw text."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            code = err.get("code") or err.get("type")
            msg = err.get("message") or ""
            return f"{code}: {msg}" if code else str(msg)
        msg = data.get("message") or data.get("detail") or ""
        if err and msg:
            return f"{err}: {msg}"
        return str(err or msg or raw.decode("utf-8", "replace"))
    return raw.decode("utf-8", "replace")


class ApiClient:
    """One aiohttp session for the whole job, with its pool sized to the job's
    concurrency. Use as ``async with ApiClient(job, key) as client``."""

    def __init__(
        self,
        job: Job,
        api_key: str | None,
        headers: Mapping[str, str] | None = None,
        secrets: Sequence[str] = (),
    ) -> None:
        self.job = job
        self._api_key = api_key
        self._extra_headers = dict(headers or {})
        self._secrets = tuple({s for s in (api_key, *secrets) if s})
        self._secrets_re = secrets_pattern(self._secrets)
        self._url = URL(job.url)
        self._origin_key = _origin(self._url)
        self._origin = str(self._url.origin())
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"batchrun/{__version__}",
        }
        headers.update(self._extra_headers)
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # A pool as large as the concurrency (aiohttp's default caps at 100),
        # DNS cached for the job, no cookies: each request stands alone.
        connector = aiohttp.TCPConnector(
            limit=self.job.workers,
            limit_per_host=self.job.workers,
            ttl_dns_cache=300,
            keepalive_timeout=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=self.job.request_timeout_s),
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _redact(self, text: str) -> str:
        """``text`` (anything a server sent) with every secret the job holds
        replaced, whether written as it is or escaped. Most texts hold neither a
        secret nor a backslash, and cost two substring searches."""
        pattern = self._secrets_re
        if pattern is None or (
            "\\" not in text and not any(secret in text for secret in self._secrets)
        ):
            return text
        return pattern.sub(REDACTED, text)

    def _redact_answer(self, answer: Completion) -> Completion:
        """The answer with every text the server wrote in it redacted."""
        if self._secrets_re is None:
            return answer
        texts = (
            answer.text,
            answer.finish_reason,
            answer.response_id,
            answer.response_model,
            answer.refusal,
            answer.tool_calls,
        )
        clean = tuple(None if t is None else self._redact(t) for t in texts)
        if clean == texts:
            return answer
        return replace(
            answer,
            text=clean[0],
            finish_reason=clean[1],
            response_id=clean[2],
            response_model=clean[3],
            refusal=clean[4],
            tool_calls=clean[5],
        )

    async def complete(self, body: bytes) -> Completion:
        """POST one request body and return the completion it got.

        Raises a RetryableError (429, 408, 409, 5xx, timeout, dropped connection,
        unreadable 2xx body) or a FatalRequestError (any other 4xx, a redirect
        it does not follow: see ``_redirect_target``).
        """
        assert self._session is not None, "use ApiClient in `async with`"
        sent = time.perf_counter()
        url = self._url
        left: dict[str, Any] = {}
        try:
            # aiohttp would follow a redirect anywhere, dropping the key but not
            # the job's other headers: batchrun follows only its own origin's.
            for _ in range(MAX_REDIRECTS + 1):
                async with self._session.post(
                    url, data=body, allow_redirects=False, **left
                ) as resp:
                    status = resp.status
                    if status in REDIRECT_STATUS:
                        url = self._redirect_target(resp)
                        # The redirected request gets what is left of the attempt's time.
                        rest = self.job.request_timeout_s - (time.perf_counter() - sent)
                        left = {"timeout": aiohttp.ClientTimeout(total=max(rest, 0.001))}
                        continue
                    if (
                        self.job.stream
                        and 200 <= status < 300
                        and resp.content_type != "application/json"
                    ):
                        return self._redact_answer(await self._read_stream(resp, sent))
                    raw = await self._read_body(resp)
                    headers = resp.headers if status >= 300 else None
                    break
            else:
                raise FatalRequestError(
                    f"HTTP {status}: more than {MAX_REDIRECTS} redirects within {self._origin}; "
                    "set base_url to where the API answers.",
                    status,
                )
        except TimeoutError as exc:
            raise RequestTimeout(
                f"no answer within request_timeout_s={self.job.request_timeout_s:g}s"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise CannotConnect(
                self._redact(f"cannot connect: {type(exc).__name__}: {exc}".rstrip(": "))
            ) from exc
        except aiohttp.ClientError as exc:
            raise ConnectionDropped(
                self._redact(f"connection failed: {type(exc).__name__}: {exc}".rstrip(": "))
            ) from exc
        if 200 <= status < 300:
            return self._redact_answer(self._read_answer(raw, status))
        raise self._status_error(status, raw, headers)

    def _redirect_target(self, resp: aiohttp.ClientResponse) -> URL:
        """Where a redirect points, when batchrun follows it: a 307 or 308 within
        the job's origin (scheme, host and port), which repeat the POST as it
        was. Any other redirect raises FatalRequestError naming the target: the
        key and the job's headers never go to a server the job did not name,
        and a 301, 302 or 303 would turn the POST into a GET."""
        status = resp.status
        location = resp.headers.get("Location")
        if not location:
            raise FatalRequestError(f"HTTP {status}: a redirect without a Location header", status)
        try:
            target = resp.url.join(URL(location))
            origin = _origin(target)
        except ValueError:
            origin = None
        shown = self._redact(location if origin is None else str(target))[:MAX_ERROR_TEXT]
        if origin != self._origin_key:
            raise FatalRequestError(
                f"HTTP {status}: redirected to {shown}, which is not {self._origin} (the origin of "
                "base_url). batchrun does not follow redirects to another origin, so that neither "
                "the key nor a header goes there; if the API has moved, set base_url to it.",
                status,
            )
        if status not in FOLLOWED_REDIRECTS:
            raise FatalRequestError(
                f"HTTP {status}: redirected to {shown}; only a 307 or 308 redirect keeps the "
                "request a POST, so batchrun does not follow it. Set base_url to where the API "
                "answers.",
                status,
            )
        return target

    async def _read_stream(self, resp: aiohttp.ClientResponse, sent: float) -> Completion:
        """Assemble a completion from SSE chunks until ``data: [DONE]``: the text,
        refusal and tool-call pieces of every delta, the last finish reason and
        the usage of the final chunk.

        A half answer is never returned: a stream that ends before [DONE], or at
        [DONE] without a finish reason (llama.cpp's server ends a running stream
        so when another request arrives), carries an unreadable chunk, or has no
        OpenAI chat chunk at all raises, and is retried whole.
        """
        status = resp.status
        ttft_ms: float | None = None
        parts: list[str] = []
        refusal: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish_reason = response_id = response_model = None
        usage: Any = None
        chat = False  # whether any event was an OpenAI chat chunk (a choice in `choices`)
        first: bytes | None = None
        async with contextlib.aclosing(self._lines(resp)) as lines:
            async for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                first = first or data
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError as exc:
                    # Redact the whole chunk before cutting: a cut secret would not match.
                    shown = self._redact(data.decode("utf-8", "replace"))[:80]
                    raise BadResponse(f"stream chunk is not JSON: {shown!r}", status) from exc
                if not isinstance(chunk, dict):
                    raise BadResponse("stream chunk is not a JSON object", status)
                if chunk.get("error"):
                    # Servers (vLLM among them) report a failure mid-generation as an error event.
                    error = chunk["error"]
                    detail = error.get("message") if isinstance(error, dict) else error
                    raise ServerError(self._redact(f"error event in the stream: {detail}"), status)
                response_id = response_id or chunk.get("id")
                response_model = response_model or chunk.get("model")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if not isinstance(choices, list):
                    raise BadResponse("stream chunk's `choices` is not a list", status)
                for choice in choices:
                    if not isinstance(choice, dict):
                        raise BadResponse("stream chunk's choice is not an object", status)
                    chat = True
                    delta = choice.get("delta") or {}
                    if not isinstance(delta, dict):
                        raise BadResponse("stream chunk's delta is not an object", status)
                    piece = delta.get("content")
                    if piece is not None and not isinstance(piece, str | list):
                        raise BadResponse("stream chunk's content is not text", status)
                    text, refused = content_text(piece)
                    refused = (
                        delta.get("refusal") if isinstance(delta.get("refusal"), str) else refused
                    )
                    if text:
                        parts.append(text)
                    if refused:
                        refusal.append(refused)
                    if isinstance(delta.get("tool_calls"), list):
                        _add_tool_calls(calls, delta["tool_calls"])
                    if ttft_ms is None and (text or refused or delta.get("tool_calls")):
                        ttft_ms = (time.perf_counter() - sent) * 1000
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
            else:
                raise ConnectionDropped("the stream ended before data: [DONE]", status)
        if not chat:
            opening = self._redact(first.decode("utf-8", "replace"))[:80] if first else None
            raise BadResponse(
                "the stream's events are not OpenAI chat chunks (no choice in any; "
                + (f"the first: {opening!r}" if opening else "no event before data: [DONE]")
                + "): if the server streams another format, set stream = false",
                status,
            )
        if finish_reason is None:
            raise BadResponse(
                "the stream ended (data: [DONE]) without a finish_reason: the server cut the "
                "answer short",
                status,
            )
        message: dict[str, Any] = {"content": "".join(parts) if parts else None}
        if refusal:
            message["refusal"] = "".join(refusal)
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        choice = {"message": message, "finish_reason": finish_reason}
        try:
            answer = parse_completion(
                {"id": response_id, "model": response_model, "choices": [choice], "usage": usage}
            )
        except BadResponse as exc:
            exc.status = status
            raise
        return replace(answer, ttft_ms=ttft_ms, http_status=status)

    async def _lines(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
        """The body's lines (without their newline) as they arrive. Raises
        AnswerTooLarge once more than max_response_bytes came, so neither a long
        stream nor one endless line is held whole."""
        limit = self.job.max_response_bytes
        size = 0
        pending: list[bytes] = []  # the start of a line still arriving
        async for data in resp.content.iter_any():
            size += len(data)
            if size > limit:
                raise self._too_large(resp.status)
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                line = data[start:end]
                if pending:
                    pending.append(line)
                    line = b"".join(pending)
                    pending.clear()
                yield line
                start = end + 1
            if start < len(data):
                pending.append(data[start:])
        if pending:
            yield b"".join(pending)

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body, decompressed, of at most max_response_bytes. A larger
        2xx answer raises AnswerTooLarge; of a larger error body the start is
        enough (only its first words make the message)."""
        limit = self.job.max_response_bytes
        status = resp.status
        length = resp.content_length
        if length is not None and "Content-Encoding" not in resp.headers:
            # Content-Length is the size read: no need to count.
            if length <= limit:
                return await resp.read()
            if 200 <= status < 300:
                raise self._too_large(status)
        parts: list[bytes] = []
        size = 0
        async for data in resp.content.iter_chunked(READ_CHUNK):
            size += len(data)
            if size > limit:
                if 200 <= status < 300:
                    raise self._too_large(status)
                parts.append(data[: len(data) - (size - limit)])
                break
            parts.append(data)
        return b"".join(parts)

    def _too_large(self, status: int) -> AnswerTooLarge:
        limit = self.job.max_response_bytes
        return AnswerTooLarge(
            f"HTTP {status}: the answer is larger than max_response_bytes={limit} "
            f"({limit / 2**20:.3g} MiB, decompressed); batchrun stopped reading it. Raise "
            "max_response_bytes if answers this large are expected.",
            status,
        )

    def _read_answer(self, raw: bytes, status: int) -> Completion:
        try:
            data: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadResponse(
                f"HTTP {status} body is not JSON ({len(raw)} bytes): {exc}", status
            ) from exc
        try:
            answer = parse_completion(data)
        except BadResponse as exc:
            exc.status = status
            raise
        return answer if status == 200 else replace(answer, http_status=status)

    def _status_error(
        self, status: int, raw: bytes, headers: Mapping[str, str] | None
    ) -> RequestError:
        """Our error for an error answer, classified by its status; a 429 or 5xx
        also carries the wait it asked for, and a 429 what it says is left of
        the API's budgets (``x-ratelimit-remaining-*``)."""
        # Redact before cutting: a key split by the cut would no longer match.
        text = self._redact(_error_text(raw))[:MAX_ERROR_TEXT]
        message = f"HTTP {status}: {text}" if text else f"HTTP {status}"
        headers = headers or {}
        if status == 429:
            return RateLimited(
                message,
                status,
                wait_asked(headers),
                remaining_requests=_count(headers.get("x-ratelimit-remaining-requests")),
                remaining_tokens=_count(headers.get("x-ratelimit-remaining-tokens")),
            )
        if status in RETRYABLE_STATUS or status >= 500:
            return ServerError(message, status, wait_asked(headers))
        return FatalRequestError(message, status)

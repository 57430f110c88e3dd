"""Embedded OpenAI-compatible chat-completions endpoint for the demo, tests and benchmarks.

The server answers every valid request with a deterministic "extractive summary" of the
last user message and honest token counts, and can inject faults (rate limits, 5xx,
hangs, dropped connections, broken bodies, cut streams) at a configurable rate.

Requests with a ``response_format`` of type ``"json_schema"`` get a JSON instance of the
schema built from the last user message (see :func:`_answer`), ``"json_object"`` gets
``{"summary": ...}``; such structured answers can be spoiled (not JSON, a wrong type, a
missing required property, cut off) or wrapped in a Markdown code fence at configurable
rates, as real models do.

Everything is deterministic: the answer depends only on the request body (a structured
answer only on the schema and the last user message), and whether a request gets a fault
(or a spoiled or fenced structured answer) depends only on ``(seed, body bytes, how many
times that exact body was received before)``. Arrival order of *different* bodies does
not matter, so two servers with the same seed inject the same faults into the same
workload even when the client runs it concurrently; a retry of the same body gets a
fresh draw.

Endpoints (``/_stats`` and ``/_reset`` are outside ``/v1`` on purpose: they are test
controls, not part of the API being imitated):

* ``POST /v1/chat/completions``
* ``POST /v1/models/{model_id}/inference`` (``model_id`` may contain slashes)
* ``GET /_stats`` — :class:`MockStats` as JSON
* ``POST /_reset`` — zero the stats (this also re-arms ``fail_first`` and restarts the
  per-body retry counters, i.e. the server behaves as if freshly started)

The hot path is kept small on purpose (a client pushes thousands of requests per second
at it): one SHA-256 of the body, one ``orjson`` parse, a few regex scans, one ``orjson``
dump, no per-request logging. Structured answers add a walk over the schema with one
SHA-256 per generated value.

Run standalone with ``python -m batchrun.mock --port 8000`` (see :func:`serve_forever`).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import hmac
import math
import os
import re
import signal
import string
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web

from batchrun.aio import run_coroutine
from batchrun.files import write_atomic

__all__ = [
    "FAULT_KINDS",
    "FAULT_KINDS_DEFAULT",
    "INVALID_KINDS",
    "MockConfig",
    "MockServer",
    "MockStats",
    "count_tokens",
    "create_app",
    "serve",
    "serve_forever",
]

FAULT_KINDS: tuple[str, ...] = (
    "429",
    "429-no-retry-after",
    "500",
    "502",
    "503",
    "504",
    "hang",
    "drop",
    "malformed",
    "truncated",
    "no-usage",
    "stream-cut",
)
"""Every fault the mock can inject (see :class:`MockConfig`)."""

FAULT_KINDS_DEFAULT: tuple[str, ...] = tuple(k for k in FAULT_KINDS if k != "stream-cut")
"""Faults drawn from by default: all but ``"stream-cut"`` (only meaningful for streams)."""

INVALID_KINDS: tuple[str, ...] = ("not-json", "wrong-type", "missing-required", "cut-off")
"""Every way the mock can spoil a structured answer (see :class:`MockConfig`)."""

DEFAULT_MAX_TOKENS: Final = 512
"""``max_tokens`` used when the request does not set one."""

# Grace period (seconds) that server shutdown gives in-flight handlers before cancelling
# them. aiohttp's default is 60 s, which would make every test that leaves a "hang"
# handler behind wait a minute on exit.
_SHUTDOWN_TIMEOUT_S: Final = 2.0

_TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")
_SENTENCE_SPLIT_RE: Final = re.compile(r"(?<=[.!?])\s+")
_PIECE_TOKENS: Final = 4  # tokens per streamed delta, roughly what real servers send

# Per-message overhead added to the prompt count, like the role/separator tokens of
# real chat templates.
_MESSAGE_OVERHEAD_TOKENS: Final = 4

_JSON_HEADERS: Final = {"Content-Type": "application/json"}
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_SSE_DONE: Final = b"data: [DONE]\n\n"
_MALFORMED_BODY: Final = b"{not json"

# Schema a {"type": "json_object"} request is answered with.
_JSON_OBJECT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["summary"],
    "properties": {"summary": {"type": "string"}},
}
_NO_BRACKETS: Final = str.maketrans("", "", "{}[]")
_WORD_RE: Final = re.compile("\\w+(?:['\u2019]\\w+)*")  # words, with apostrophes
# Words (of the lower-cased text) that make urgency-like integers high or low and
# booleans true. Set lookups: a regex alternation scan costs several times more.
_HIGH_URGENCY_WORDS: Final = frozenset(
    [
        "urgent",
        "urgently",
        "urgency",
        "asap",
        "emergency",
        "critical",
        "immediately",
        "outage",
        "outages",
        "down",
        "broken",
        "crash",
        "crashed",
        "crashes",
        "crashing",
        "blocked",
        "blocking",
    ]
)
_LOW_URGENCY_WORDS: Final = frozenset(
    [
        "whenever",
        "minor",
        "suggestion",
        "suggestions",
        "suggest",
        "idea",
        "ideas",
        "wish",
        "curious",
    ]
)
_LOW_URGENCY_PHRASES: Final = ("no rush", "nice to have")
_PUNCTUATION_TO_SPACE: Final = str.maketrans(
    dict.fromkeys(string.punctuation + "\u2018\u2019\u201c\u201d", " ")
)
_FLAG_WORDS: Final = frozenset(
    [
        "urgent",
        "urgently",
        "asap",
        "refund",
        "refunds",
        "refunded",
        "angry",
        "angrily",
        "furious",
        "cancel",
        "cancels",
        "cancelled",
        "canceled",
        "cancelling",
        "canceling",
        "cancellation",
        "chargeback",
        "chargebacks",
        "lawyer",
        "lawyers",
        "lawsuit",
        "unacceptable",
        "escalate",
        "escalated",
        "escalation",
    ]
)
_URGENCY_NAME_RE: Final = re.compile(r"urgen|priorit|severit|importan", re.IGNORECASE)
_TITLE_NAME_RE: Final = re.compile(r"title|subject|headline", re.IGNORECASE)
_NULL_CHANCE: Final = 0.125  # how often a nullable value is null
_MAX_DEPTH: Final = 32  # schemas nested deeper get strings, instead of a RecursionError
_INT_LIMIT: Final = 2**63 - 1  # orjson writes 64-bit integers only
_FIRST_DAY: Final = datetime.date(2024, 1, 1)  # dates for "format": "date" are in 2024
# Which property "wrong-type" spoils: the first of the lowest rank.
_WRONG_TYPE_RANK: Final = {
    "integer": 0,
    "number": 1,
    "boolean": 2,
    "string": 3,
    "array": 4,
    "object": 5,
}

# status, error code, message for the faults that are plain error responses.
_STATUS_FAULTS: Final[dict[str, tuple[int, str, str]]] = {
    "429": (429, "rate_limited", "Rate limit exceeded"),
    "429-no-retry-after": (429, "rate_limited", "Rate limit exceeded"),
    "500": (500, "server_error", "Internal server error"),
    "502": (502, "bad_gateway", "Bad gateway"),
    "503": (503, "service_unavailable", "Service unavailable"),
    "504": (504, "gateway_timeout", "Gateway timeout"),
}


def count_tokens(text: str) -> int:
    """Return the mock's token count of ``text``: the number of matches of ``\\w+|[^\\w\\s]``.

    Words (Unicode letters, digits, underscore runs) count one each, every other
    non-space character counts one, whitespace counts nothing.
    """
    return len(_TOKEN_RE.findall(text))


def _format_seconds(seconds: float) -> str:
    """Format a non-negative number of seconds compactly for a header: 1.0 -> "1", 0.05 -> "0.05".

    Goes through ``Decimal(repr(x))`` so tiny values are written positionally
    ("0.0000001") instead of in exponent form, which HTTP clients do not parse.
    """
    text = format(Decimal(repr(float(seconds))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


@dataclass(frozen=True)
class MockConfig:
    """Behaviour of the mock endpoint. All durations are in seconds.

    Attributes:
        api_key: If set, requests must carry ``Authorization: Bearer <api_key>``, else
            401 ``invalid_api_key``. If ``None``, any or no ``Authorization`` is accepted.
        latency_s: Sleep added before every answer of the completion endpoints
            (before the first chunk of a stream). 0 = none.
        fault_rate: Probability in [0, 1] that a valid request gets a fault.
        faults: Kinds (from :data:`FAULT_KINDS`) a fault is drawn from, uniformly.
        retry_after_s: Value of the ``Retry-After`` header on ``"429"`` faults.
        hang_s: How long a ``"hang"`` fault sleeps before answering normally (meant
            to exceed the client's timeout).
        seed: Seed of the deterministic fault draws.
        context_tokens: Prompts with more tokens than this get 400
            ``context_length_exceeded``.
        fail_first: The first N requests the server receives (in arrival order,
            counting every request to the completion endpoints, since start or the
            last ``/_reset``) get fault ``fail_first_kind`` instead of a random draw,
            provided they pass authentication and validation. For tests.
        fail_first_kind: Fault kind used by ``fail_first``.
        invalid_rate: Probability in [0, 1] that a structured answer (a request with a
            ``response_format`` of type ``"json_schema"`` or ``"json_object"`` that got
            no fault) is spoiled. Drawn like the faults, from
            ``sha256(f"{seed}:invalid:{n}:" + body)`` with ``n`` the per-body counter, so
            a re-sent identical request gets a fresh draw.
        invalid_kinds: Kinds (from :data:`INVALID_KINDS`) a spoiling is drawn from,
            uniformly: ``"not-json"`` answers a plain sentence; ``"wrong-type"`` gives one
            property a value of the wrong type (the first integer property becomes
            ``"high"``, else the first number a numeric string, boolean ``"yes"``/``"no"``,
            string ``[the string]``, array a comma-joined string, object its JSON text);
            ``"missing-required"`` removes one required property; ``"cut-off"`` cuts the
            JSON text in half with finish reason ``"length"``. A kind that cannot apply to
            the schema (nothing required, no single-typed property) falls back to
            ``"not-json"``.
        fence_rate: Probability in [0, 1] that a structured answer that was not spoiled
            is wrapped in a Markdown code fence, ``"\\n```json\\n{...}\\n```\\n"``. Own
            draw, from ``sha256(f"{seed}:fence:{n}:" + body)``.
    """

    api_key: str | None = None
    latency_s: float = 0.0
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULT_KINDS_DEFAULT
    retry_after_s: float = 1.0
    hang_s: float = 30.0
    seed: int = 0
    context_tokens: int = 32768
    fail_first: int = 0
    fail_first_kind: str = "500"
    invalid_rate: float = 0.0
    invalid_kinds: tuple[str, ...] = INVALID_KINDS
    fence_rate: float = 0.0

    def __post_init__(self) -> None:
        """Validate the fields; raise ``ValueError`` on nonsense so typos fail loudly."""
        # Accept any sequence for convenience but store a tuple so the config stays
        # hashable and immutable.
        object.__setattr__(self, "faults", tuple(self.faults))
        unknown = [k for k in (*self.faults, self.fail_first_kind) if k not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown}; expected any of {FAULT_KINDS}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {self.fault_rate}")
        if self.fault_rate > 0.0 and not self.faults:
            raise ValueError("fault_rate > 0 needs at least one fault kind in faults")
        for name in ("latency_s", "retry_after_s", "hang_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.context_tokens < 1:
            raise ValueError(f"context_tokens must be >= 1, got {self.context_tokens}")
        if self.fail_first < 0:
            raise ValueError(f"fail_first must be >= 0, got {self.fail_first}")
        object.__setattr__(self, "invalid_kinds", tuple(self.invalid_kinds))
        unknown = [k for k in self.invalid_kinds if k not in INVALID_KINDS]
        if unknown:
            raise ValueError(f"unknown invalid kind(s) {unknown}; expected any of {INVALID_KINDS}")
        for name in ("invalid_rate", "fence_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.invalid_rate > 0.0 and not self.invalid_kinds:
            raise ValueError("invalid_rate > 0 needs at least one kind in invalid_kinds")


@dataclass
class MockStats:
    """What the server has received since start (or the last ``POST /_reset``).

    Attributes:
        requests: Requests received on the completion endpoints (any outcome).
        by_outcome: Count per outcome, one per request: ``"ok"``, a fault kind,
            ``"401"``, ``"400"``, ``"invalid:<kind>"`` (a spoiled structured answer, see
            :attr:`MockConfig.invalid_kinds`) or ``"fenced"`` (a structured answer
            wrapped in a code fence).
        bodies: SHA-256 hex digest of the raw request body -> times that exact body
            was received. Also the per-body counter of the fault and structured-answer draws.
    """

    requests: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)
    bodies: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        """Zero everything in place (so references held by tests stay valid)."""
        self.requests = 0
        self.by_outcome.clear()
        self.bodies.clear()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready snapshot (copies, so later requests do not mutate it)."""
        return {
            "requests": self.requests,
            "by_outcome": dict(self.by_outcome),
            "bodies": dict(self.bodies),
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


def _validate(
    body: Any, path_model: str | None
) -> tuple[str, list[dict[str, Any]], int, dict[str, Any] | None]:
    """Check a parsed request body; return ``(model, messages, prompt_tokens, schema)``.

    ``path_model`` is the model from the inference route's path, used when the body has
    no ``model``. ``schema`` is the JSON schema the answer must follow: the
    ``response_format.json_schema.schema`` of a ``"json_schema"`` request, an implied
    ``{"summary": string}`` object schema for ``"json_object"``, ``None`` otherwise (no
    or a ``"text"`` ``response_format``). Raises :class:`_BadRequest`
    (``invalid_request``) on a body that is not an object, a missing/empty/non-string
    model, ``messages`` that is not a non-empty list of objects with string ``content``,
    a ``max_tokens`` that is not a positive int, or a ``response_format`` that is not an
    object with a known ``type`` (``"json_schema"`` needs a ``json_schema`` object whose
    ``schema`` is an object; its ``name`` and ``strict`` are not checked).
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
    return model, messages, prompt_tokens, _schema_of(body.get("response_format"))


def _schema_of(response_format: Any) -> dict[str, Any] | None:
    """Return the schema a ``response_format`` asks for (see :func:`_validate`)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return _JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _BadRequest(
                "invalid_request",
                "Field 'response_format.json_schema' must be an object with an object 'schema'",
            )
        return schema
    raise _BadRequest(
        "invalid_request",
        "Field 'response_format' must be an object with 'type' one of "
        "'text', 'json_object', 'json_schema'",
    )


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    """Return the content of the last ``"user"`` message, or ``""`` if there is none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            text: str = message["content"]
            return text
    return ""


def _summary_of(text: str) -> str:
    """Return the extractive summary of ``text``: its first two sentences.

    ``text`` is whitespace-normalised and split into sentences after ``.``, ``!`` or ``?``.
    """
    normalised = " ".join(text.split())
    sentences = _SENTENCE_SPLIT_RE.split(normalised) if normalised else []
    return " ".join(sentences[:2])


def _cut_tokens(completion: str, max_tokens: int) -> tuple[str, str]:
    """Cut ``completion`` right after its ``max_tokens``-th token if it has more.

    Returns ``(completion, "length")`` if cut, else ``(completion, "stop")``.
    """
    # Cheap upper bound first: every token is at least one character, so a completion
    # no longer than max_tokens characters cannot exceed max_tokens tokens.
    if len(completion) > max_tokens:
        for i, match in enumerate(_TOKEN_RE.finditer(completion), start=1):
            if i == max_tokens:
                end = match.end()
                if end < len(completion) and _TOKEN_RE.search(completion, end):
                    return completion[:end], "length"
                break
    return completion, "stop"


def _answer(
    body: dict[str, Any],
    schema: dict[str, Any] | None = None,
    defect: str | None = None,
    pick: int = 0,
    fenced: bool = False,
) -> tuple[str, str, str]:
    """Produce the completion for a validated request body.

    Returns ``(completion, finish_reason, outcome)``.

    Without ``schema`` the answer is an "extractive summary": ``"Summary: "`` plus the
    first two sentences (see :func:`_summary_of`) of the last ``"user"`` message; the
    outcome is ``"ok"``.

    With ``schema`` (see :func:`_validate`) it is the compact JSON text of the instance
    :class:`_Instance` derives from that message. ``defect`` (from
    :data:`INVALID_KINDS`) spoils it as :class:`MockConfig` describes (``pick`` chooses
    the required property ``"missing-required"`` removes; a defect that cannot apply
    becomes ``"not-json"``) and the outcome is ``"invalid:<kind>"``; else ``fenced``
    wraps it in a Markdown code fence (outcome ``"fenced"``) or it is left alone
    (``"ok"``).

    In every case, if the completion is longer than ``max_tokens`` (default 512) tokens
    it is cut right after the ``max_tokens``-th token; the finish reason is
    ``"length"`` if it was cut (here or by ``"cut-off"``), else ``"stop"``.
    """
    text = _last_user_text(body["messages"])
    max_tokens = body.get("max_tokens") or DEFAULT_MAX_TOKENS
    if schema is None:
        completion, finish_reason = _cut_tokens("Summary: " + _summary_of(text), max_tokens)
        return completion, finish_reason, "ok"

    instance = _Instance(text).value(schema)
    if defect == "wrong-type":
        spoiled, instance = _wrong_type(instance, schema)
        if not spoiled:
            defect = "not-json"
    elif defect == "missing-required":
        smaller = _drop_required(instance, schema, pick)
        if smaller is None:
            defect = "not-json"
        else:
            instance = smaller
    cut_off = False
    if defect == "not-json":
        summary = _summary_of(text).translate(_NO_BRACKETS) or "the message gave no details."
        completion = "Sure! Here is what I found: " + summary
    else:
        completion = orjson.dumps(instance).decode()
        if defect == "cut-off":
            completion = completion[: len(completion) // 2]
            cut_off = True
        elif fenced:
            completion = f"\n```json\n{completion}\n```\n"
    completion, finish_reason = _cut_tokens(completion, max_tokens)
    if cut_off:
        finish_reason = "length"
    if defect is not None:
        return completion, finish_reason, "invalid:" + defect
    return completion, finish_reason, "fenced" if fenced else "ok"


def _int_or_none(value: Any) -> int | None:
    """Return ``value`` if it is an int (not a bool), else ``None``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number_or_none(value: Any) -> float | None:
    """Return ``value`` if it is an int or float (not a bool), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _integer_bounds(schema: dict[str, Any]) -> tuple[int, int]:
    """Return the inclusive integer range allowed by ``schema``'s (exclusive) minimum/maximum.

    Without bounds 1..5; with one bound, the four integers next to it as well. Clamped
    to the 64-bit range orjson can write.
    """
    low: int | None = None
    high: int | None = None
    minimum = _number_or_none(schema.get("minimum"))
    if minimum is not None:
        low = math.ceil(minimum)
    exclusive = _number_or_none(schema.get("exclusiveMinimum"))
    if exclusive is not None:
        low = max(low, math.floor(exclusive) + 1) if low is not None else math.floor(exclusive) + 1
    maximum = _number_or_none(schema.get("maximum"))
    if maximum is not None:
        high = math.floor(maximum)
    exclusive = _number_or_none(schema.get("exclusiveMaximum"))
    if exclusive is not None:
        high = min(high, math.ceil(exclusive) - 1) if high is not None else math.ceil(exclusive) - 1
    if low is None and high is None:
        return 1, 5
    if low is None:
        low = high - 4 if high is not None else 1
    if high is None:
        high = low + 4
    low = min(max(low, -_INT_LIMIT), _INT_LIMIT)
    high = min(max(high, low), _INT_LIMIT)
    return low, high


def _fit(value: str, min_length: int, max_length: int | None) -> str:
    """Make ``value`` between ``min_length`` and ``max_length`` characters long.

    Too long: cut to ``max_length``, backing up to the end of the last whole word if the
    cut fell inside one (unless that would go below ``min_length``). Too short: repeat
    it (or ``"n/a"`` if empty), space-separated, and cut to ``min_length``.
    """
    if max_length is not None and len(value) > max_length >= 0:
        cut = value[:max_length]
        space = cut.rfind(" ")
        if value[max_length] != " " and space >= max(min_length, 1):
            cut = cut[:space]
        stripped = cut.rstrip()
        value = stripped if len(stripped) >= min_length else cut
    if len(value) < min_length:
        base = value or "n/a"
        value = " ".join([base] * (min_length // (len(base) + 1) + 1))[:min_length]
    return value


@functools.lru_cache(maxsize=4096)
def _enum_pattern(value: str) -> tuple[str, re.Pattern[str]] | None:
    """Return ``(needle, regex)`` finding ``value`` as whole words in a lower-cased text.

    Spaces, ``_`` and ``-`` in ``value`` match any run of them or nothing, and a plural
    ``s``/``es`` is optional, so ``"feature_request"`` finds "feature requests" and
    ``"integrations"`` finds "integration". ``needle`` is a substring every match
    contains, for a cheap check before the regex search. ``None`` if ``value`` has
    nothing to find.
    """
    parts = [part for part in re.split(r"[\s_-]+", value.lower()) if part]
    if not parts:
        return None
    if len(parts[-1]) > 3 and parts[-1][-1] == "s":
        parts[-1] = parts[-1][:-1]
    body = r"[\s_-]*".join(map(re.escape, parts))
    return parts[0], re.compile(r"(?<!\w)" + body + r"(?:e?s)?(?!\w)")


def _is_null_schema(schema: Any) -> bool:
    """Whether ``schema`` allows only ``null`` (``{"type": "null"}`` or ``{"const": null}``)."""
    return isinstance(schema, dict) and (
        schema.get("type") == "null" or ("const" in schema and schema["const"] is None)
    )


class _Instance:
    """Derives a deterministic instance of a JSON schema from a message text.

    Every choice is drawn from ``sha256(sha256(text) + path)``, where ``path`` names the
    place of the value (like ``/tags/0``) plus the purpose of the draw, so the same text
    always gets the same instance, and a value does not change when other properties
    are added to the schema. :meth:`value` describes how each schema maps to a value.
    The features of the text are computed on first use, so a schema pays only for
    what it needs.
    """

    __slots__ = ("_keywords", "_lowered", "_seed", "_summary", "_text", "_words")

    def __init__(self, text: str) -> None:
        """Remember ``text`` and hash it (the seed of every choice)."""
        self._text = text
        self._seed = hashlib.sha256(text.encode()).digest()
        self._lowered = text.lower()  # what keywords and enum values are searched in
        self._summary: str | None = None
        self._words: list[str] | None = None
        self._keywords: tuple[bool, int] | None = None

    def _text_summary(self) -> str:
        """Return the extractive summary of the text (see :func:`_summary_of`)."""
        if self._summary is None:
            self._summary = _summary_of(self._text)
        return self._summary

    def _text_words(self) -> list[str]:
        """Return the words of the text, punctuation dropped."""
        if self._words is None:
            self._words = _WORD_RE.findall(self._text)
        return self._words

    def _text_keywords(self) -> tuple[bool, int]:
        """Return ``(flag, urgency)`` of the text.

        ``flag``: whether it has words like "urgent", "refund", "angry", "cancel".
        ``urgency``: 2 if it has words like "urgent", "asap", "down", "outage"; else 0
        if it has words like "minor", "whenever", "suggestion", "no rush"; else 1.
        """
        if self._keywords is None:
            words = frozenset(self._lowered.translate(_PUNCTUATION_TO_SPACE).split())
            if not _HIGH_URGENCY_WORDS.isdisjoint(words):
                urgency = 2
            elif not _LOW_URGENCY_WORDS.isdisjoint(words) or any(
                phrase in self._lowered for phrase in _LOW_URGENCY_PHRASES
            ):
                urgency = 0
            else:
                urgency = 1
            self._keywords = (not _FLAG_WORDS.isdisjoint(words), urgency)
        return self._keywords

    def _digest(self, path: str) -> bytes:
        """Return the SHA-256 the choice named ``path`` is drawn from."""
        return hashlib.sha256(self._seed + path.encode()).digest()

    def _below(self, path: str, n: int) -> int:
        """Return a deterministic integer in ``[0, n)`` for the choice named ``path``."""
        return int.from_bytes(self._digest(path), "big") % n

    def _null(self, path: str) -> bool:
        """Whether the nullable value at ``path`` is null (one time in eight)."""
        return int.from_bytes(self._digest(path + "#null")[:8], "big") / 2**64 < _NULL_CHANCE

    def value(
        self, schema: Any, path: str = "", name: str = "", ordinal: int = 0, depth: int = 0
    ) -> Any:
        """Return the value for ``schema`` at ``path``.

        ``name`` is the nearest property name (array items inherit their array's) and
        ``ordinal`` the index within an array. In order of precedence:

        * a non-object schema (``true``), or nesting deeper than 32, is treated as
          ``{"type": "string"}``;
        * ``const`` → that value;
        * ``enum`` → see :meth:`_enum`;
        * ``anyOf``/``oneOf`` → ``null`` one time in eight if a branch is
          ``{"type": "null"}``, else a hashed non-null branch;
        * ``type`` ``[X, "null"]`` → ``null`` one time in eight, else type ``X``;
        * no ``type`` → ``"object"`` if there are ``properties``, ``"array"`` if there
          are ``items``, else ``"string"``;
        * ``"object"`` → every property of ``properties`` (required or not, in order;
          nullable ones may be ``null``), plus ``required`` names not declared there,
          as strings;
        * ``"array"`` → ``minItems``..``maxItems`` items (default 1..3, or min..min+2)
          of ``items`` (missing: strings); ``uniqueItems`` is honoured;
        * ``"integer"`` → within (exclusive) minimum/maximum (default 1..5); if the
          property is named like urgency/priority/severity/importance, the maximum when
          the text has words like "urgent", "asap", "down", "outage", the minimum when
          it has words like "minor", "whenever", "suggestion", else a hashed value
          strictly between them (if there is room);
        * ``"number"`` → within (exclusive) minimum/maximum (default 0..1, or ten next
          to a single bound), rounded to two decimals where that stays within;
        * ``"boolean"`` → ``true`` if the text has words like "urgent", "refund",
          "angry", "cancel", else a hashed bit;
        * ``"null"`` → ``null``;
        * anything else is a string: a known ``format`` (``date``, ``date-time``,
          ``time``, ``email``, ``uri``, ``uuid``) gets a value of that format; a
          property named like "summary" gets the extractive summary of the text (see
          :func:`_summary_of`), one named like "title"/"subject" its first six words,
          any other three to five consecutive words of it (``"n/a"`` if it has none);
          then fitted to ``minLength``/``maxLength`` (see :func:`_fit`).
        """
        if depth > _MAX_DEPTH or not isinstance(schema, dict):
            return self._string({}, path, name)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return self._enum(enum, path, ordinal)
        branches = schema.get("anyOf")
        if not isinstance(branches, list) or not branches:
            branches = schema.get("oneOf")
        if isinstance(branches, list) and branches:
            options = [branch for branch in branches if not _is_null_schema(branch)]
            if not options or (len(options) < len(branches) and self._null(path)):
                return None
            chosen = options[self._below(path + "#branch", len(options))]
            return self.value(chosen, path, name, ordinal, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            types = [t for t in kind if t != "null"]
            if not types or (len(types) < len(kind) and self._null(path)):
                return None
            kind = types[0]
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, name, depth)
        if kind == "integer":
            return self._integer(schema, path, name)
        if kind == "number":
            return self._number(schema, path)
        if kind == "boolean":
            return self._text_keywords()[0] or self._below(path, 2) == 1
        if kind == "null":
            return None
        return self._string(schema, path, name)

    def _enum(self, values: list[Any], path: str, ordinal: int) -> Any:
        """Pick an ``enum`` value.

        ``null`` (if listed) one time in eight; else the ``ordinal``-th of the string
        values found in the text (see :func:`_enum_pattern`), ordered by where they are
        first found; else a hashed pick among the non-null values.
        """
        options = [option for option in values if option is not None]
        if not options or (len(options) < len(values) and self._null(path)):
            return None
        found: list[tuple[int, int]] = []
        lowered = self._lowered
        for index, option in enumerate(options):
            finder = _enum_pattern(option) if isinstance(option, str) else None
            if finder is None or finder[0] not in lowered:
                continue
            match = finder[1].search(lowered)
            if match is not None:
                found.append((match.start(), index))
        if ordinal < len(found):
            found.sort()
            return options[found[ordinal][1]]
        return options[self._below(path, len(options))]

    def _object(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        """Build an object: every declared property, plus undeclared required ones."""
        out: dict[str, Any] = {}
        properties = schema.get("properties")
        if isinstance(properties, dict):
            for key, sub in properties.items():
                out[key] = self.value(sub, f"{path}/{key}", key, 0, depth + 1)
        required = schema.get("required")
        if isinstance(required, list):
            for key in required:
                if isinstance(key, str) and key not in out:
                    out[key] = self._string({}, f"{path}/{key}", key)
        return out

    def _array(self, schema: dict[str, Any], path: str, name: str, depth: int) -> list[Any]:
        """Build an array of a hashed length within minItems..maxItems (default 1..3)."""
        low = _int_or_none(schema.get("minItems"))
        high = _int_or_none(schema.get("maxItems"))
        if low is None:
            low = 1 if high is None else min(1, high)
        low = max(low, 0)
        high = max(low + 2, 3) if high is None else max(high, low)
        count = low + self._below(path + "#len", high - low + 1)
        unique = schema.get("uniqueItems") is True
        items = schema.get("items")
        out: list[Any] = []
        # With uniqueItems, duplicates are skipped and a few more tries made.
        for i in range(count * 4 + 8 if unique else count):
            if len(out) == count:
                break
            item = self.value(items, f"{path}/{i}", name, i, depth + 1)
            if not unique or item not in out:
                out.append(item)
        return out

    def _integer(self, schema: dict[str, Any], path: str, name: str) -> int:
        """Pick an integer within the bounds; urgency-like names follow the text's urgency."""
        low, high = _integer_bounds(schema)
        if _URGENCY_NAME_RE.search(name):
            urgency = self._text_keywords()[1]
            if urgency == 2:
                return high
            if urgency == 0:
                return low
            if high - low >= 2:
                return low + 1 + self._below(path, high - low - 1)
        return low + self._below(path, high - low + 1)

    def _number(self, schema: dict[str, Any], path: str) -> float:
        """Pick a number within the (exclusive) bounds, two decimals where possible."""
        low = _number_or_none(schema.get("minimum"))
        high = _number_or_none(schema.get("maximum"))
        low_open = high_open = False
        exclusive = _number_or_none(schema.get("exclusiveMinimum"))
        if exclusive is not None and (low is None or exclusive >= low):
            low, low_open = exclusive, True
        exclusive = _number_or_none(schema.get("exclusiveMaximum"))
        if exclusive is not None and (high is None or exclusive <= high):
            high, high_open = exclusive, True
        if low is None and high is None:
            low, high = 0.0, 1.0
        elif low is None:
            low = high - 10.0 if high is not None else 0.0
        elif high is None:
            high = low + 10.0
        high = max(high if high is not None else low, low)
        # Stay off the bounds (5% of the span), so exclusive ones hold too.
        fraction = 0.05 + 0.9 * self._below(path, 2**53) / 2**53
        value = low + (high - low) * fraction
        rounded = round(value, 2)
        if (low < rounded if low_open else low <= rounded) and (
            rounded < high if high_open else rounded <= high
        ):
            return rounded
        return value

    def _string(self, schema: dict[str, Any], path: str, name: str) -> str:
        """Make a string: formatted, the summary, a title or a phrase; fitted to its lengths."""
        fmt = schema.get("format")
        if isinstance(fmt, str):
            formatted = self._formatted(fmt, path)
            if formatted is not None:
                return formatted
        if "summar" in name.lower():
            value = self._text_summary()
        elif _TITLE_NAME_RE.search(name):
            value = " ".join(self._text_words()[:6]) or "n/a"
        else:
            value = self._phrase(path)
        min_length = _int_or_none(schema.get("minLength")) or 0
        return _fit(value, max(min_length, 0), _int_or_none(schema.get("maxLength")))

    def _phrase(self, path: str) -> str:
        """Return three to five consecutive words of the text from a hashed start."""
        words = self._text_words()
        if not words:
            return "n/a"
        digest = self._digest(path)
        size = 3 + digest[0] % 3
        start = int.from_bytes(digest[1:9], "big") % max(1, len(words) - size + 1)
        return " ".join(words[start : start + size])

    def _formatted(self, fmt: str, path: str) -> str | None:
        """Return a hashed value of string format ``fmt``, or ``None`` for other formats."""
        digest = self._digest(path + "#format")
        n = int.from_bytes(digest[:8], "big")
        day = (_FIRST_DAY + datetime.timedelta(days=n % 366)).isoformat()
        clock = f"{(n >> 16) % 24:02d}:{(n >> 24) % 60:02d}:{(n >> 32) % 60:02d}Z"
        if fmt == "date":
            return day
        if fmt == "date-time":
            return f"{day}T{clock}"
        if fmt == "time":
            return clock
        if fmt == "email":
            return f"user{n % 10000}@example.com"
        if fmt in ("uri", "url", "uri-reference", "iri"):
            return f"https://example.com/items/{n % 100000}"
        if fmt == "uuid":
            return str(uuid.UUID(bytes=digest[:16], version=4))
        return None


def _declared_type(schema: Any) -> str | None:
    """Return the single non-null type ``schema`` declares, or ``None`` (none or several).

    Looks at ``type`` (a string or a list) or, without it, the ``type`` of every
    ``anyOf``/``oneOf`` branch.
    """
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    types: set[Any]
    if isinstance(kind, str):
        types = {kind}
    elif isinstance(kind, list):
        types = set(kind)
    else:
        branches = schema.get("anyOf") or schema.get("oneOf")
        if not isinstance(branches, list):
            return None
        types = {branch.get("type") if isinstance(branch, dict) else None for branch in branches}
        if not all(isinstance(t, str) for t in types):
            return None
    types.discard("null")
    if len(types) != 1:
        return None
    only = types.pop()
    return only if isinstance(only, str) else None


def _wrong_value(value: Any, kind: str) -> Any:
    """Return a stand-in for ``value`` that is not of (non-null) type ``kind``."""
    if kind == "integer":
        return "high"
    if kind == "number":
        return str(value) if _number_or_none(value) is not None else "0.5"
    if kind == "boolean":
        return "yes" if value else "no"
    if kind == "string":
        return [value]
    if kind == "array":
        return ", ".join(map(str, value)) if isinstance(value, list) else ""
    return orjson.dumps(value).decode()  # an object as its JSON text


def _wrong_type(instance: Any, schema: dict[str, Any]) -> tuple[bool, Any]:
    """Give ``instance`` one value of the wrong type (see :func:`_wrong_value`).

    Changes the first top-level property whose schema declares a single non-null type,
    preferring integer, then number, boolean, string, array, object; without one, the
    whole instance if the root declares a single type. Returns ``(changed, instance)``.
    """
    properties = schema.get("properties")
    if isinstance(instance, dict) and isinstance(properties, dict):
        best: tuple[int, str, str] | None = None
        for key, sub in properties.items():
            kind = _declared_type(sub)
            if kind is None or kind not in _WRONG_TYPE_RANK or key not in instance:
                continue
            if best is None or _WRONG_TYPE_RANK[kind] < best[0]:
                best = (_WRONG_TYPE_RANK[kind], key, kind)
        if best is not None:
            _, key, kind = best
            return True, {**instance, key: _wrong_value(instance[key], kind)}
    kind = _declared_type(schema)
    if kind is not None and kind in _WRONG_TYPE_RANK:
        return True, _wrong_value(instance, kind)
    return False, instance


def _drop_required(instance: Any, schema: dict[str, Any], pick: int) -> dict[str, Any] | None:
    """Return ``instance`` without its ``pick % n``-th required property, ``None`` if none."""
    required = schema.get("required")
    if not isinstance(instance, dict) or not isinstance(required, list):
        return None
    present = [key for key in dict.fromkeys(required) if isinstance(key, str) and key in instance]
    if not present:
        return None
    gone = present[pick % len(present)]
    return {key: value for key, value in instance.items() if key != gone}


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
        self._retry_after = {
            **_JSON_HEADERS,
            "Retry-After": _format_seconds(config.retry_after_s),
        }
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

        try:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise _BadRequest("invalid_request", "Request body is not valid JSON") from None
            model, _, prompt_tokens, schema = _validate(body, path_model)
            if prompt_tokens > config.context_tokens:
                raise _BadRequest(
                    "context_length_exceeded",
                    f"Prompt is {prompt_tokens} tokens, over the model's context window "
                    f"of {config.context_tokens} tokens",
                )
        except _BadRequest as exc:
            self._outcome("400")
            return _error(400, exc.code, exc.message)

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
                headers = self._retry_after if fault == "429" else None
                return _error(status, code, message, headers)
            elif fault == "drop" or (fault == "stream-cut" and not stream):
                return _drop(request)

        completion, finish_reason, outcome = _answer(body, schema, defect, pick, fenced)
        if not faulted:
            self._outcome(outcome)
        completion_tokens = count_tokens(completion)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
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
            )

        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
        if fault == "no-usage":
            del payload["usage"]
        elif fault == "malformed":
            return web.Response(body=_MALFORMED_BODY, headers=_JSON_HEADERS)
        encoded = orjson.dumps(payload)
        if fault == "truncated":
            encoded = encoded[: len(encoded) // 2]
        return web.Response(body=encoded, headers=_JSON_HEADERS)

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
        usage: dict[str, int],
    ) -> web.StreamResponse:
        """Answer as server-sent events; see the module docs of the stream fault variants.

        Faults on streams: ``"malformed"`` sends an event whose data is not JSON (then
        ``[DONE]``); ``"truncated"`` ends the response cleanly after the first half of
        the event bytes (no ``[DONE]``); ``"stream-cut"`` sends the first event and then
        closes the connection mid-response; ``"no-usage"`` omits the usage event.
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
        else:
            for i, piece in enumerate(_pieces(completion)):
                delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                events.append(
                    _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                )
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

        response = web.StreamResponse(headers=_SSE_HEADERS)
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

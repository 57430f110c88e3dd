"""What the embedded endpoint is told and what it counts: :class:`MockConfig` (with its
validation), the fault and invalid kinds it can inject, and :class:`MockStats`.

Each field of MockConfig carries the ``batchrun mock-server`` flag that sets it
(:class:`Flag`), from which the CLI generates its options. No aiohttp here, so the CLI
reads this module without importing the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ANSWER_KINDS: tuple[str, ...] = (
    "no-content",
    "content-parts",
    "refusal",
    "tool-calls",
    "early-done",
    "token-stream",
)
"""Answers real servers give that are not a plain text completion (see
:class:`MockConfig`): drawn only when named in ``faults``."""

FAULT_KINDS: tuple[str, ...] = (
    "429",
    "429-no-retry-after",
    "429-exhausted",
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
    *ANSWER_KINDS,
)
"""Every fault the mock can inject (see :class:`MockConfig`)."""

FAULT_KINDS_DEFAULT: tuple[str, ...] = tuple(
    k for k in FAULT_KINDS if k not in ("stream-cut", "429-exhausted") and k not in ANSWER_KINDS
)
"""Faults drawn from by default: all but ``"stream-cut"`` (only meaningful for
streams), ``"429-exhausted"`` (a spent budget, which pauses a whole job: asked
for by name) and the :data:`ANSWER_KINDS`."""

INVALID_KINDS: tuple[str, ...] = ("not-json", "wrong-type", "missing-required", "cut-off")
"""Every way the mock can spoil a structured answer (see :class:`MockConfig`)."""

SCHEMA_VIA_MODES: tuple[str, ...] = ("any", "json_schema", "json_object_schema", "vllm", "none")
"""Which way of carrying a response schema the mock takes (see :class:`MockConfig`)."""


@dataclass(frozen=True)
class Flag:
    """How ``batchrun mock-server`` sets one :class:`MockConfig` field: the field's
    ``metadata["flag"]``, read by ``cli.mock_options``.

    Attributes:
        help: The flag's help text.
        name: The flag, if not the field's name with dashes (``--fault-rate``).
        scale: The flag's unit per the field's: the flag takes the field's value times
            ``scale`` (``--latency-ms`` sets ``latency_s``: 1000).
        parse: Turns the flag's text into the field's value (a comma list); a
            ``ValueError`` is a bad value of the flag. The field keeps its default when
            the flag is not given or empty.
        env: The flag names the environment variable that holds the value; the field
            keeps its default when the flag is not given or empty.
    """

    help: str
    name: str = ""
    scale: float = 1.0
    parse: Callable[[str], Any] | None = None
    env: bool = False


def _fault_kinds(text: str) -> tuple[str, ...]:
    """``--faults A,B``: the kinds; ``ValueError`` naming the unknown ones."""
    faults = tuple(f.strip() for f in text.split(","))
    unknown = [f for f in faults if f not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    return faults


def _names(text: str) -> tuple[str, ...]:
    """``A, B,`` → ``("A", "B")``: a comma list, blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _flag(
    default: Any,
    help: str,
    *,
    name: str = "",
    scale: float = 1.0,
    parse: Callable[[str], Any] | None = None,
    env: bool = False,
) -> Any:
    """A :class:`MockConfig` field with ``default`` that the :class:`Flag` so described sets."""
    return field(default=default, metadata={"flag": Flag(help, name, scale, parse, env)})


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
            Besides errors and broken bodies, the :data:`ANSWER_KINDS` answer the
            way some real servers do: ``"no-content"`` (``content: null``, a stream
            with no content delta), ``"content-parts"`` (content as a list of
            ``{"type": "text"}`` parts), ``"refusal"`` (``message.refusal``, no
            content), ``"tool-calls"`` (only ``tool_calls``, finish reason
            ``"tool_calls"``), and for streams only ``"early-done"`` (``data:
            [DONE]`` halfway, with no finish reason and no usage, as llama.cpp's
            server does when another request arrives) and ``"token-stream"``
            (events ``{"token": ...}`` that are not OpenAI chunks); a plain request
            drawing one of those two gets the plain answer.
        retry_after_s: Value of the ``Retry-After`` header on ``"429"`` faults.
        retry_after_s: Value of the ``Retry-After`` header on ``"429"`` and
            ``"429-exhausted"`` faults. ``"429-exhausted"`` also says
            ``x-ratelimit-remaining-requests: 0`` (the budget is spent);
            ``"429-no-retry-after"`` sends no header.
        send_retry_after_ms: Every ``Retry-After`` the mock sends also comes as
            ``retry-after-ms`` (milliseconds), and ``Retry-After`` itself in whole
            seconds rounded up, as servers that send both do.
        rpm_limit: Requests a minute the mock admits (0: no limit), as a bucket of
            one second's worth (at least one request) refilled evenly; a request that
            finds it empty gets 429 ``rate_limit_exceeded`` (outcome ``"rpm-limit"``)
            with ``x-ratelimit-remaining-requests: 0`` and a ``Retry-After`` of the
            time until the bucket is full again. With a limit, every answer carries
            ``x-ratelimit-limit-requests``, ``-remaining-requests`` and
            ``-reset-requests``. Counted after authentication, before validation.
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
        schema_via: The way of carrying a response schema the mock takes (see
            :mod:`.dialects`): ``"any"`` (all of them), ``"json_schema"`` (OpenAI's
            ``response_format``; a ``json_object`` one with a ``schema`` is refused),
            ``"json_object_schema"`` (llama.cpp: a ``json_schema`` ``response_format``
            gets its HTTP 500, ``structured_outputs`` is ignored unless ``strict``),
            ``"vllm"`` (``structured_outputs: {"json": schema}`` only) or ``"none"`` (no
            ``response_format`` but ``text``). Whatever the mode, a system message ending
            with a JSON object schema is followed, as an instructed model would.
        format_error_status: Status of the refusal of a schema sent a way
            ``schema_via`` does not take; 0: as the imitated server (500 for llama.cpp's
            json_schema refusal, else 400).
        strict: Refuse (400, naming it) a body field that is not an OpenAI chat field
            (``structured_outputs`` is one where ``schema_via`` takes it); when False,
            unknown fields are ignored.
        unknown_fields: OpenAI chat fields this endpoint does not know, as a server
            with fewer fields (LLMTune's guide lists no ``stream_options``): refused
            like any unknown field when ``strict``, ignored otherwise (without
            ``stream_options``, a stream has no usage event).
        echo_chars: A text answer ends with ``"\nYou wrote: …"`` and the last
            ``echo_chars`` characters of the last user message, as a model repeating a
            customer's details (and any placeholders batchrun's ``pii`` put there). 0: off.
        cached_share: Share in [0, 1] of each prompt's tokens the usage reports as
            read from a cache (``usage.prompt_tokens_details.cached_tokens``, rounded
            down), as OpenAI does. 0 with ``reasoning_tokens`` 0: no usage details.
        reasoning_tokens: Hidden reasoning tokens each answer reports
            (``usage.completion_tokens_details.reasoning_tokens``), counted in its
            ``completion_tokens`` as a reasoning model's are.
        batch_rows_per_s, batch_start_s, batch_cancel_s, batch_expire_s,
            batch_fail_rate, batch_fail_validation: the simulated Batch API queue
            (``/v1/files``, ``/v1/batches``; see :mod:`.batches`).
    """

    api_key: str | None = _flag(
        None,
        "Require the key held by this environment variable.",
        name="--api-key-env",
        env=True,
    )
    latency_s: float = _flag(0.0, "Delay before every answer.", name="--latency-ms", scale=1000)
    fault_rate: float = _flag(0.0, "Share of requests (0..1) that get a fault.")
    faults: tuple[str, ...] = _flag(
        FAULT_KINDS_DEFAULT,
        "Fault kinds to draw from (default: all but stream-cut and the answer kinds).",
        parse=_fault_kinds,
    )
    retry_after_s: float = _flag(1.0, "Retry-After sent with 429 faults.")
    send_retry_after_ms: bool = _flag(
        False, "Send retry-after-ms too, and Retry-After in whole seconds rounded up."
    )
    rpm_limit: float = _flag(
        0.0,
        "Admit this many requests a minute, 429 with x-ratelimit headers past it (0: no limit).",
    )
    hang_s: float = _flag(30.0, "How long a hang fault holds the answer.")
    seed: int = _flag(0, "Seed of the fault draws.")
    context_tokens: int = _flag(32768, "Prompts longer than this get 400 context_length_exceeded.")
    fail_first: int = _flag(0, "The first N requests get --fail-first-kind (for tests).")
    fail_first_kind: str = _flag("500", "Fault kind of the first N requests.")
    invalid_rate: float = _flag(0.0, "Share of structured answers (0..1) made invalid.")
    invalid_kinds: tuple[str, ...] = _flag(
        INVALID_KINDS,
        f"Invalid kinds to draw from: {', '.join(INVALID_KINDS)}.",
        parse=_names,
    )
    fence_rate: float = _flag(0.0, "Share of valid structured answers wrapped in a ```json fence.")
    schema_via: str = _flag(
        "any",
        f"The way of carrying a response schema it takes: {', '.join(SCHEMA_VIA_MODES)}.",
    )
    format_error_status: int = _flag(
        0,
        "Status for a schema sent another way (0: 500 as llama.cpp for json_object_schema, else 400).",
    )
    strict: bool = _flag(False, "Refuse unknown body fields with a 400 naming the field.")
    unknown_fields: tuple[str, ...] = _flag(
        (),
        "OpenAI fields it does not know (e.g. stream_options): refused with --strict, else ignored.",
        parse=_names,
    )
    echo_chars: int = _flag(
        0, "End each text answer with the prompt's last N characters, quoted (0: off)."
    )
    cached_share: float = _flag(
        0.0, "Share of each prompt's tokens (0..1) reported as cached (prompt_tokens_details)."
    )
    reasoning_tokens: int = _flag(
        0, "Reasoning tokens per answer, in completion_tokens (completion_tokens_details)."
    )
    batch_rows_per_s: float = _flag(
        5.0, "Rows per second the Batch API's queue answers (all batches together)."
    )
    batch_start_s: float = _flag(2.0, "Seconds a new batch spends validating before its first row.")
    batch_cancel_s: float = _flag(0.5, "Seconds a cancelling batch takes to become cancelled.")
    batch_expire_s: float = _flag(
        86400.0, "Seconds a batch may run before it expires, its unanswered rows in the error file."
    )
    batch_fail_rate: float = _flag(
        0.0, "Share of batch rows (0..1) answered with an error line (HTTP 500)."
    )
    batch_fail_validation: int = _flag(0, "The first N batches fail validation (for tests).")

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
        for name in ("latency_s", "retry_after_s", "hang_s", "rpm_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.context_tokens < 1:
            raise ValueError(f"context_tokens must be >= 1, got {self.context_tokens}")
        for name in ("fail_first", "reasoning_tokens", "echo_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "invalid_kinds", tuple(self.invalid_kinds))
        unknown = [k for k in self.invalid_kinds if k not in INVALID_KINDS]
        if unknown:
            raise ValueError(f"unknown invalid kind(s) {unknown}; expected any of {INVALID_KINDS}")
        for name in ("invalid_rate", "fence_rate", "cached_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.invalid_rate > 0.0 and not self.invalid_kinds:
            raise ValueError("invalid_rate > 0 needs at least one kind in invalid_kinds")
        if self.schema_via not in SCHEMA_VIA_MODES:
            raise ValueError(
                f"schema_via must be one of {SCHEMA_VIA_MODES}, got {self.schema_via!r}"
            )
        object.__setattr__(self, "unknown_fields", tuple(self.unknown_fields))
        if {"model", "messages"} & set(self.unknown_fields):
            raise ValueError("unknown_fields cannot hold model or messages: every request has them")
        if self.batch_rows_per_s <= 0:
            raise ValueError(f"batch_rows_per_s must be > 0, got {self.batch_rows_per_s}")
        for name in ("batch_start_s", "batch_cancel_s", "batch_expire_s", "batch_fail_validation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.batch_fail_rate <= 1.0:
            raise ValueError(f"batch_fail_rate must be within [0, 1], got {self.batch_fail_rate}")
        if self.format_error_status and not 400 <= self.format_error_status <= 599:
            raise ValueError(
                f"format_error_status must be 0 or an error status (400-599), got {self.format_error_status}"
            )


@dataclass
class MockStats:
    """What the server has received since start (or the last ``POST /_reset``).

    Attributes:
        requests: Requests received on the completion endpoints (any outcome).
        by_outcome: Count per outcome, one per request: ``"ok"``, a fault kind,
            ``"401"``, ``"400"``, ``"rpm-limit"`` (refused by :attr:`MockConfig.rpm_limit`),
            ``"invalid:<kind>"`` (a spoiled structured answer, see
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

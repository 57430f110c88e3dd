"""Pure functions between rows and the wire: input rows → prepared requests
(body, hash, prompt-token estimate, completion cap), and response JSON →
completion and usage. No I/O here."""

from __future__ import annotations

import functools
import hashlib
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from batchrun.config import Job
from batchrun.errors import BadResponse, EmptyAnswer, JobError, RowError
from batchrun.pii import scanner_for

if TYPE_CHECKING:
    from batchrun.inputs import RowBatch
    from batchrun.pii import RowPii

_TEXT_SCALARS = (str, int, float)


@functools.lru_cache(maxsize=64)
def template_columns(template: str) -> tuple[str, ...]:
    """The column names a prompt template's ``{column}`` placeholders refer to."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise JobError(
            f"`prompt_template` is not a valid template ({exc}). Placeholders look like {{column}}; "
            "write a literal brace as {{ or }}."
        ) from None
    columns: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or "." in name or "[" in name:
            raise JobError(
                f"`prompt_template` has a placeholder {{{name}}} that is not a column name. "
                "Use {column} with a column of the input; write a literal brace as {{ or }}."
            )
        if conversion not in (None, "r", "s", "a"):
            raise JobError(
                f"`prompt_template` has {{{name}!{conversion}}}, an unknown conversion: the only "
                f"ones are !s, !r and !a. Write {{{name}}} to put the value in as it is."
            )
        if spec and conversion and "{" not in spec:
            # A conversion makes every value text: the spec must format text.
            problem = _spec_problem(spec, "sample text")
            if problem:
                raise JobError(
                    f"`prompt_template` has {{{name}!{conversion}:{spec}}}: !{conversion} makes the "
                    f"value text, and :{spec} cannot format text ({problem}). {_SPEC_FIX.format(spec)}"
                )
        if name not in columns:
            columns.append(name)
    return tuple(columns)


_SPEC_FIX = "Drop :{}, or use a spec made for text, such as :.200 (at most 200 characters) or :>20."


def _spec_problem(spec: str, value: Any) -> str | None:
    """Why ``format(value, spec)`` fails, or None when it works."""
    try:
        format(value, spec)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def check_template_specs(job: Job, rows: Sequence[Mapping[str, Any]]) -> None:
    """JobError for a ``{column:spec}`` of ``prompt_template`` that fails on every
    value of ``rows`` (the input's first rows) in its column: ``{text:d}`` over a
    column of text would make every row an error. A spec that fits the values
    (``{price:.2f}`` over numbers) passes, and an odd value later is that row's
    error, as before."""
    if not job.prompt_template or job.messages_column:
        return
    template_columns(job.prompt_template)  # its own checks first
    for _, name, spec, conversion in string.Formatter().parse(job.prompt_template):
        if not name or not spec or conversion or "{" in spec:
            continue
        values = [
            row[name]
            for row in rows
            if isinstance(row.get(name), _TEXT_SCALARS) and not isinstance(row.get(name), bool)
        ]
        problems = [_spec_problem(spec, v) for v in values]
        if values and all(problems):
            kinds = " and ".join(sorted({_KIND_NAMES.get(type(v), "text") for v in values}))
            raise JobError(
                f"`prompt_template` has {{{name}:{spec}}}, a format spec that fits none of the "
                f"values of `{name}` in the input's first {len(rows):,} rows (they hold {kinds}: "
                f"{problems[0]}), so every row would fail. {_SPEC_FIX.format(spec)}"
            )


_KIND_NAMES = {str: "text", int: "whole numbers", float: "numbers"}


def prompt_columns(job: Job) -> tuple[str, ...]:
    """The input columns a row's prompt is built from."""
    if job.input_format == "openai-batch":
        return ("body",)
    if job.messages_column:
        return (job.messages_column,)
    return template_columns(job.prompt_template or "")


def build_messages(
    job: Job, row: Mapping[str, Any], columns: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """The chat messages for one row. Raises RowError when a prompt column is
    missing, null or not text in this row. ``columns``: ``prompt_columns(job)``,
    when the caller has it already (once per job, not once per row)."""
    if job.messages_column:
        messages = row.get(job.messages_column)
        if not isinstance(messages, list) or not messages:
            raise RowError(
                f"`{job.messages_column}` is {'null' if messages is None else type(messages).__name__} in this row; "
                'it must be a list of messages like [{"role": "user", "content": "..."}].'
            )
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise RowError(
                    f"`{job.messages_column}` holds {m!r}, which is not a chat message with `role` and `content`."
                )
        if job.system_prompt and not any(m.get("role") == "system" for m in messages):
            return [{"role": "system", "content": job.system_prompt}, *messages]
        return list(messages)
    values: dict[str, Any] = {}
    for column in prompt_columns(job) if columns is None else columns:
        value = row.get(column)
        if value is None:
            raise RowError(f"Prompt column `{column}` is null or missing in this row.")
        if isinstance(value, bool) or not isinstance(value, _TEXT_SCALARS):
            raise RowError(f"Prompt column `{column}` holds a {type(value).__name__}, not text.")
        values[column] = value
    try:
        user = (job.prompt_template or "").format_map(values)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise RowError(f"This row's values do not fit `prompt_template`: {exc!s}.") from None
    if job.system_prompt:
        return [{"role": "system", "content": job.system_prompt}, {"role": "user", "content": user}]
    return [{"role": "user", "content": user}]


Shape = Callable[[dict[str, Any]], str | None]
"""Puts a structured job's schema into a request body, in place (a field, or the
system prompt), and returns the way it used (a ``schema_via`` dialect), or None
when the job has no dialect to choose (``structured.SchemaVia.shape``)."""


def build_body(
    job: Job, messages: list[dict[str, Any]], row_id: str, shape: Shape | None = None
) -> dict[str, Any]:
    """The JSON body of one request: the job's ``params`` first, then the fields
    batchrun owns, the response schema as ``shape`` puts it among them.
    ``metadata`` is sent only when the job sets it, with the row id added as
    ``row_id``: some servers reject unknown fields."""
    return _body(job, messages, row_id, shape)[0]


AFTER_SCHEMA = ("stream", "stream_options", "metadata")
"""The fields a body has after the schema's (none of them can come from ``params``)."""


def _body(
    job: Job, messages: list[dict[str, Any]], row_id: str, shape: Shape | None
) -> tuple[dict[str, Any], str | None]:
    """``build_body``, and the way ``shape`` carried the schema."""
    body: dict[str, Any] = {
        **job.params,
        "model": job.model,
        "messages": messages,
        "temperature": job.temperature,
        "max_tokens": job.max_tokens,
    }
    # The schema's field goes where response_format always went, so a
    # json_schema job's bodies (and request hashes) stay what they were.
    via = shape(body) if shape is not None else None
    if job.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if job.metadata:
        body["metadata"] = {**job.metadata, "row_id": row_id}
    return body, via


def encode_body(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body)


def request_hash(body: bytes, pii: bytes = b"") -> str:
    """Identifies the exact request: same bytes, same hash (for resume and reuse).
    ``pii``: the values a pseudonymized body's placeholders stand for
    (``pii.RowPii.key``), so rows whose bodies differ only in them differ."""
    digest = hashlib.sha256(body)
    if pii:
        digest.update(pii)
    return digest.hexdigest()[:32]


@dataclass(slots=True)
class Prepared:
    """One row ready to send, or (``error`` set) one that cannot be sent."""

    row: int
    id: str
    body: bytes
    request_hash: str
    error: str | None = None
    prompt_tokens: int = 0
    """Estimated prompt tokens (characters / 4); 0 when the job makes no estimates."""
    max_tokens: int = 0
    """The completion cap this request asks for (the job's max_tokens, or the
    request's own in OpenAI batch input); 0 when the job makes no estimates."""
    prompt_bound: int = 0
    """At most this many prompt tokens (for the max_cost worst case)."""
    model: str | None = None
    """The model a batch request names (else the job's)."""
    schema_via: str | None = None
    """How ``body`` carries the job's response schema (a ``schema_via`` dialect);
    None when the job has no dialect to choose."""
    pii: RowPii | None = None
    """The row's placeholders and their values (jobs with ``pii``): kept only
    while the row is in flight, to restore its answer."""

    def rehash(self, body: bytes) -> str:
        """``request_hash`` of ``body`` as this row's request (its pii values included)."""
        return request_hash(body, self.pii.key if self.pii is not None else b"")

    @property
    def est_tokens(self) -> int:
        """Tokens this request may use before its answer says: prompt estimate + cap."""
        return self.prompt_tokens + self.max_tokens


def prepare_rows(
    job: Job,
    batches: Iterator[RowBatch],
    skip: Any = None,
    shape: Shape | None = None,
    estimates: bool | None = None,
) -> Iterator[Prepared]:
    """Input rows → request bodies, in input order, each with the response
    schema as ``shape`` puts it at that moment. The token estimates are made
    only when asked, or (``estimates`` None) for jobs that use them: tpm, a
    prices file."""
    any_skipped = skip is not None and bool(skip.any())
    if estimates is None:
        estimates = bool(job.tpm or job.prices)
    batch_requests = job.input_format == "openai-batch"
    scanner = scanner_for(job)
    columns = None if batch_requests or job.messages_column else prompt_columns(job)
    for batch in batches:
        for i, row in enumerate(batch.rows):
            number = batch.start + i
            if any_skipped and skip[number]:
                continue
            row_id = batch.ids[i]
            model = via = row_pii = None
            max_tokens = job.max_tokens
            if batch_requests:
                # An OpenAI batch request line: its body goes as it is.
                request = row["body"]
                if scanner is not None:
                    request, row_pii = scanner.pseudonymize_body(request)
                messages = [m for m in request["messages"] if isinstance(m, dict)]
                model = request.get("model")
                if isinstance(request.get("max_tokens"), int):
                    max_tokens = request["max_tokens"]
            else:
                try:
                    messages = build_messages(job, row, columns)
                except RowError as exc:
                    error = str(exc) if scanner is None else scanner.scrub(str(exc))
                    yield Prepared(number, row_id, b"", "", error=error)
                    continue
                if scanner is not None:
                    messages, row_pii = scanner.pseudonymize(messages)
                request, via = _body(job, messages, row_id, shape)
                messages = request["messages"]  # the schema may have joined the system prompt
            body = encode_body(request)
            prepared = Prepared(number, row_id, body, "", model=model, schema_via=via, pii=row_pii)
            prepared.request_hash = prepared.rehash(body)
            if estimates or batch_requests:
                prepared.prompt_tokens, prepared.prompt_bound = prompt_sizes(messages)
                prepared.max_tokens = max_tokens
            yield prepared


def prompt_sizes(messages: list[dict[str, Any]]) -> tuple[int, int]:
    """``estimate_prompt_tokens`` and ``prompt_token_bound`` of ``messages`` in
    one pass (text that is all ASCII has as many bytes as characters: no need
    to encode it to count them)."""
    chars = size = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            n = len(content)
            chars += n
            size += n if content.isascii() else len(content.encode())
    return chars // 4, size + 8 * len(messages) + 8


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens before the answer says: characters / 4."""
    return prompt_sizes(messages)[0]


def prompt_token_bound(messages: list[dict[str, Any]]) -> int:
    """At most this many prompt tokens: a token covers at least one byte, plus a
    few tokens of chat framing per message."""
    return prompt_sizes(messages)[1]


@dataclass(frozen=True)
class Completion:
    """What one successful answer said."""

    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    response_id: str | None
    response_model: str | None
    refusal: str | None = None
    """What the model said instead of answering (``message.refusal``)."""
    tool_calls: str | None = None
    """The answer's ``tool_calls``, as JSON text."""
    ttft_ms: float | None = None
    http_status: int = 200
    usage_problem: str | None = None
    """Why usage the server sent was dropped as impossible (negative, not an
    integer, absurdly large); the token columns are then null (or, for a
    detail count that cannot be true, that detail's column only)."""
    cached_tokens: int | None = None
    """Prompt tokens the server read from its cache (part of ``prompt_tokens``)."""
    reasoning_tokens: int | None = None
    """Completion tokens spent on hidden reasoning (part of ``completion_tokens``)."""


MAX_USAGE_TOKENS = 100_000_000
"""More tokens than this in one answer's usage is taken as a server bug, not a bill."""


def _usage(usage: Any) -> tuple[int | None, int | None, int | None, str | None]:
    """prompt, completion and total tokens from a ``usage`` object, and the
    problem when a count that is present cannot be true (then all three are
    None: a count that cannot be trusted must not reach the budget or the
    report)."""
    if type(usage) is not dict:
        return None, None, None, None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    total = usage.get("total_tokens")
    if (
        type(prompt) is int
        and type(completion) is int
        and type(total) is int
        and 0 <= prompt <= MAX_USAGE_TOKENS
        and 0 <= completion <= MAX_USAGE_TOKENS
        and 0 <= total <= MAX_USAGE_TOKENS
    ):
        return prompt, completion, total, None  # what nearly every answer says
    counts: list[int | None] = []
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(name)
        if value is None or _count(value) is not None:
            counts.append(value)
        else:
            return None, None, None, f"usage.{name} = {str(value)[:40]} is not a possible count"
    prompt, completion, total = counts
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return prompt, completion, total, None


def content_text(content: Any) -> tuple[str | None, str | None]:
    """The text and the refusal of a message's (or a stream delta's) ``content``:
    a string is the text; a list of content parts gives its ``text`` parts joined
    and its ``refusal`` parts joined (other parts, such as images, are not text).
    None for what is absent."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        return None, None
    texts: list[str] = []
    refusals: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
            refusals.append(part["refusal"])
    return ("".join(texts) if texts else None), ("".join(refusals) or None)


_FINISH_HINTS = {
    "length": "max_tokens ran out before any text (a model that reasons first?): raise max_tokens",
    "content_filter": "the server's content filter withheld the answer",
}


def _count(value: Any) -> int | None:
    """A usage count that can be true, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_USAGE_TOKENS:
        return value
    return None


_CACHED_AT = (("prompt_tokens_details", "cached_tokens"), (None, "cache_read_input_tokens"))
"""Where a usage object holds the cached prompt tokens: OpenAI's shape first, then
the ``cache_read_input_tokens`` some OpenAI-compatible proxies send beside it."""
_REASONING_AT = (("completion_tokens_details", "reasoning_tokens"),)
_DETAIL_KEYS = frozenset(
    parent or key for places in (_CACHED_AT, _REASONING_AT) for parent, key in places
)
"""The keys of a usage object under which a detail may be."""


def _usage_details(
    usage: Any, prompt: int | None, completion: int | None
) -> tuple[int | None, int | None, str | None]:
    """Cached prompt tokens and reasoning tokens from a ``usage`` object (None
    where it does not say), and the problem when one it gives cannot be true:
    negative, not an integer, over MAX_USAGE_TOKENS, or more than the prompt (or
    completion) tokens it is part of. Such a detail is None, as if not reported
    (then every cached token costs the prompt rate: a cost is never
    under-reported); the other counts stay."""
    if type(usage) is not dict or _DETAIL_KEYS.isdisjoint(usage):
        return None, None, None
    found: list[int | None] = []
    problems: list[str] = []
    for places, whole, whole_name in (
        (_CACHED_AT, prompt, "prompt_tokens"),
        (_REASONING_AT, completion, "completion_tokens"),
    ):
        value, name = _detail(usage, places)
        count = _count(value)
        if value is not None and (count is None or whole is None or count > whole):
            shown = f"usage.{name} = {str(value)[:40]}"
            problems.append(
                f"{shown} is not a possible count"
                if count is None
                else f"{shown} comes without usage.{whole_name}"
                if whole is None
                else f"{shown} is more than usage.{whole_name} = {whole}"
            )
            count = None
        found.append(count)
    return found[0], found[1], "; ".join(problems) or None


def _detail(usage: Any, places: tuple[tuple[str | None, str], ...]) -> tuple[Any, str]:
    """The first value found at ``places`` (``(object, key)``, None: usage itself) and its name."""
    if not isinstance(usage, dict):
        return None, ""
    for parent, key in places:
        holder = usage.get(parent) if parent else usage
        if isinstance(holder, dict) and holder.get(key) is not None:
            return holder[key], f"{parent}.{key}" if parent else key
    return None, ""


def parse_completion(data: Any) -> Completion:
    """Read a chat-completion answer: its first choice's text (a string, or its
    text parts joined), refusal and tool calls (as JSON text), finish reason and
    usage. Raises BadResponse when it has no choice, and EmptyAnswer when the
    choice says nothing (no text, no tool call, no refusal): both are retried
    like an unreadable body."""
    if not isinstance(data, dict):
        raise BadResponse(f"answer is a JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse("answer has no `choices`")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        message = {}
    text, refusal = content_text(message.get("content"))
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        refusal = message["refusal"]
    calls = message.get("tool_calls")
    finish_reason = choice.get("finish_reason")
    prompt, completion, total, problem = _usage(data.get("usage"))
    cached, reasoning, detail_problem = _usage_details(data.get("usage"), prompt, completion)
    answer = Completion(
        text=text,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        response_id=data.get("id") if isinstance(data.get("id"), str) else None,
        response_model=data.get("model") if isinstance(data.get("model"), str) else None,
        refusal=refusal,
        tool_calls=orjson.dumps(calls).decode() if isinstance(calls, list) and calls else None,
        usage_problem=problem or detail_problem,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
    )
    if not text and refusal is None and answer.tool_calls is None:
        said = _nothing_said(choice)
        hint = _FINISH_HINTS.get(answer.finish_reason or "")
        raise EmptyAnswer(
            f"the answer has no text, no tool call and no refusal ({said}"
            + (f"; finish_reason {answer.finish_reason}: {hint}" if hint else "")
            + ")",
            answer,
        )
    return answer


def _nothing_said(choice: dict[str, Any]) -> str:
    """What the choice of an answer that says nothing held, for its error."""
    message = choice.get("message")
    if message is None:
        return "no message"
    if not isinstance(message, dict):
        return "its message is not an object"
    if "content" not in message:
        return "no message.content"
    content = message["content"]
    if content is None:
        return "message.content is null"
    if content == "":
        return "message.content is empty"
    if isinstance(content, list):
        return f"message.content holds {len(content)} parts, none of them text"
    return f"message.content is a {type(content).__name__}, not text"


def unwanted(answer: Completion, body: bytes) -> str | None:
    """Why an answer that says something is still not the one the job asked for
    (the row is then ``invalid``): a refusal, or tool calls the request (its
    ``body``) did not offer. None for an answer to keep."""
    if answer.refusal is not None:
        refusal = answer.refusal
        return "the model refused: " + (refusal if len(refusal) <= 300 else refusal[:300] + "…")
    if answer.tool_calls is not None and not _offers_tools(body):
        calls = orjson.loads(answer.tool_calls)
        names = [c.get("function", {}).get("name") if isinstance(c, dict) else None for c in calls]
        named = ", ".join(str(n)[:60] for n in names if isinstance(n, str)) or "unnamed"
        return (
            f"the model answered with a tool call ({named}) though the request offered no tools; "
            "its calls are in `tool_calls`"
        )
    return None


def _offers_tools(body: bytes) -> bool:
    if b'"tools"' not in body and b'"functions"' not in body:
        return False
    request = orjson.loads(body)
    return isinstance(request, dict) and bool(request.get("tools") or request.get("functions"))

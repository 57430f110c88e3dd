"""What the embedded endpoint answers: the mock's token count, the text answer (an
extractive summary of the last user message) and the structured answers.

Requests with a ``response_format`` of type ``"json_schema"`` get a JSON instance of the
schema built from the last user message (see :func:`_answer` and :mod:`.instance`),
``"json_object"`` gets ``{"summary": ...}``; such structured answers can be spoiled (not
JSON, a wrong type, a missing required property, cut off) or wrapped in a Markdown code
fence at configurable rates, as real models do.
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

from batchrun.mock.instance import _Instance, _number_or_none, _summary_of

DEFAULT_MAX_TOKENS: Final = 512
"""``max_tokens`` used when the request does not set one."""

_TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")

# Schema a {"type": "json_object"} request is answered with.
_JSON_OBJECT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["summary"],
    "properties": {"summary": {"type": "string"}},
}
_NO_BRACKETS: Final = str.maketrans("", "", "{}[]")
# Which property "wrong-type" spoils: the first of the lowest rank.
_WRONG_TYPE_RANK: Final = {
    "integer": 0,
    "number": 1,
    "boolean": 2,
    "string": 3,
    "array": 4,
    "object": 5,
}


def count_tokens(text: str) -> int:
    """Return the mock's token count of ``text``: the number of matches of ``\\w+|[^\\w\\s]``.

    Words (Unicode letters, digits, underscore runs) count one each, every other
    non-space character counts one, whitespace counts nothing.
    """
    return len(_TOKEN_RE.findall(text))


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    """Return the content of the last ``"user"`` message, or ``""`` if there is none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            text: str = message["content"]
            return text
    return ""


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
    echo_chars: int = 0,
) -> tuple[str, str, str]:
    """Produce the completion for a validated request body.

    Returns ``(completion, finish_reason, outcome)``.

    Without ``schema`` the answer is an "extractive summary": ``"Summary: "`` plus the
    first two sentences (see :func:`_summary_of`) of the last ``"user"`` message, and
    with ``echo_chars`` a line ``"You wrote: …"`` quoting that message's last
    ``echo_chars`` characters; the outcome is ``"ok"``.

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
        completion = "Summary: " + _summary_of(text)
        if echo_chars:
            completion += f'\nYou wrote: "…{text[-echo_chars:]}"'
        completion, finish_reason = _cut_tokens(completion, max_tokens)
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


# ---- the other answers real servers give (the ANSWER_KINDS faults) -------------------------

REFUSAL: Final = "I'm sorry, but I can't help with that request."
"""What a ``"refusal"`` answer says in ``message.refusal``."""
TOOL_NAME: Final = "record_summary"
"""The function a ``"tool-calls"`` answer calls, with ``{"summary": <the answer>}``."""


def shaped_message(
    kind: str | None, completion: str, finish_reason: str, call_id: str
) -> tuple[dict[str, Any], str]:
    """The ``message`` and finish reason of a plain answer, shaped as ``kind``
    (one of ``ANSWER_KINDS``) says; any other kind leaves it a plain text answer."""
    message: dict[str, Any] = {"role": "assistant", "content": completion}
    if kind == "no-content":
        message["content"] = None
    elif kind == "content-parts":
        half = len(completion) // 2
        message["content"] = [
            {"type": "text", "text": completion[:half]},
            {"type": "text", "text": completion[half:]},
        ]
    elif kind == "refusal":
        message.update(content=None, refusal=REFUSAL)
    elif kind == "tool-calls":
        arguments = orjson.dumps({"summary": completion}).decode()
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": TOOL_NAME, "arguments": arguments},
        }
        message.update(content=None, tool_calls=[call])
        finish_reason = "tool_calls"
    return message, finish_reason


def shaped_deltas(
    kind: str | None, pieces: list[str], finish_reason: str, call_id: str
) -> tuple[list[dict[str, Any]], str]:
    """The ``delta`` of each chunk of a streamed answer (whose text comes in
    ``pieces``) and its finish reason, shaped as ``kind`` says, as OpenAI streams
    them: a refusal in ``delta.refusal`` pieces, a tool call's arguments in
    ``delta.tool_calls[].function.arguments`` pieces after its id and name."""
    if kind == "no-content":
        return [{"role": "assistant"}], finish_reason
    if kind == "refusal":
        words = REFUSAL.split(" ")
        parts = [w if i == 0 else " " + w for i, w in enumerate(words)]
        return [{"role": "assistant", "content": None, "refusal": parts[0]}] + [
            {"refusal": p} for p in parts[1:]
        ], finish_reason
    if kind == "tool-calls":
        arguments = orjson.dumps({"summary": "".join(pieces)}).decode()
        step = max(1, len(arguments) // 4)
        head = {"index": 0, "id": call_id, "type": "function"}
        first = {**head, "function": {"name": TOOL_NAME, "arguments": ""}}
        deltas: list[dict[str, Any]] = [
            {"role": "assistant", "content": None, "tool_calls": [first]}
        ]
        for start in range(0, len(arguments), step):
            piece = arguments[start : start + step]
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        return deltas, "tool_calls"
    if kind == "content-parts":
        return [
            {"role": "assistant", "content": [{"type": "text", "text": p}]}
            if i == 0
            else {"content": [{"type": "text", "text": p}]}
            for i, p in enumerate(pieces)
        ], finish_reason
    return [
        {"role": "assistant", "content": p} if i == 0 else {"content": p}
        for i, p in enumerate(pieces)
    ], finish_reason

"""Which ways of carrying a response schema the embedded endpoint takes, so tests
and demos can play a real server: OpenAI (``response_format`` json_schema),
llama.cpp (``{"type": "json_object", "schema": ...}``; a json_schema
``response_format`` gets the HTTP 500 its Python server sends), vLLM
(``structured_outputs``) or a server that takes none (the schema can only come
in the prompt). With ``strict``, a body field the endpoint does not know is a
400 naming it, as strict servers answer; without, it is ignored, as llama.cpp
ignores ``structured_outputs``. :func:`known_fields` plays a server that does
not know some OpenAI fields (``MockConfig.unknown_fields``) the same way.

:func:`requested_schema` reads a validated body and says what the answer must
follow, or raises :class:`Refusal` with the status and body to send back. The
prompt is followed too, as an instruction-following model would: a system
message whose last line is a JSON object schema is answered with an instance of it.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from batchrun.mock.answers import _JSON_OBJECT_SCHEMA

KNOWN_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "seed",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "metadata",
        "store",
        "service_tier",
        "reasoning_effort",
    }
)
"""The OpenAI chat-completion fields: what a ``strict`` endpoint accepts (plus
``structured_outputs`` where it takes vLLM's way)."""

# What llama-cpp-python's server answers a json_schema response_format (its
# request model allows only "text" and "json_object"), shortened.
_LLAMA_CPP_MESSAGE: Final = (
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
    "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}"
)


class Refusal(Exception):
    """A request the endpoint turns down: ``status``, the JSON ``body`` to answer
    with, and the ``outcome`` :class:`MockStats` counts (``"400"`` for a malformed
    request, ``"refused:<status>"`` for a schema sent a way the endpoint does not take)."""

    def __init__(self, status: int, body: dict[str, Any], outcome: str = "") -> None:
        super().__init__(status)
        self.status = status
        self.body = orjson.dumps(body)
        self.outcome = outcome or f"refused:{status}"


def _invalid(message: str, status: int = 0) -> Refusal:
    """A 400 for a malformed request, or (``status`` given) a refused way."""
    return Refusal(
        status or 400, {"error": "invalid_request", "message": message}, "" if status else "400"
    )


def known_fields(body: dict[str, Any], unknown: tuple[str, ...], strict: bool) -> dict[str, Any]:
    """``body`` as an endpoint that does not know the ``unknown`` fields reads it:
    without them, or (``strict``) refused with a 400 naming the first one present."""
    present = [name for name in unknown if name in body]
    if not present:
        return body
    if strict:
        raise _invalid(f"Unrecognized request argument supplied: {present[0]}")
    return {name: value for name, value in body.items() if name not in present}


def requested_schema(body: dict[str, Any], mode: str, strict: bool, status: int) -> Any:
    """The schema the answer to ``body`` must follow (``None``: plain text).

    ``mode`` is :attr:`MockConfig.schema_via`, ``strict`` and ``status`` (0: as the
    server imitated) the other two fields. Raises :class:`Refusal` for an unknown
    field of a strict endpoint, a malformed ``response_format``, or a schema sent a
    way ``mode`` does not take.
    """
    takes_vllm = mode in ("any", "vllm")
    if strict:
        for name in body:
            if name not in KNOWN_FIELDS and not (name == "structured_outputs" and takes_vllm):
                raise _invalid(f"Unrecognized request argument supplied: {name}")
    schema = _response_format_schema(body.get("response_format"), mode, status)
    if schema is not None:
        return schema
    carried = body.get("structured_outputs")
    if carried is not None and takes_vllm:
        spec = carried.get("json") if isinstance(carried, dict) else None
        if not isinstance(spec, dict):
            raise _invalid("Field 'structured_outputs' must be an object with an object 'json'")
        return spec
    return _prompt_schema(body["messages"])


def _response_format_schema(response_format: Any, mode: str, status: int) -> Any:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise _invalid(
            "Field 'response_format' must be an object with 'type' one of "
            "'text', 'json_object', 'json_schema'"
        )
    schema: Any = None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _invalid(
                "Field 'response_format.json_schema' must be an object with an object 'schema'"
            )
    elif "schema" in response_format:
        schema = response_format["schema"]
        if not isinstance(schema, dict):
            raise _invalid("Field 'response_format.schema' must be an object")
    way = "json_schema" if kind == "json_schema" else "json_object_schema"
    if mode in ("vllm", "none") or (schema is not None and mode not in ("any", way)):
        raise _refused(kind, schema is not None, mode, status)
    return schema if schema is not None else _JSON_OBJECT_SCHEMA


def _refused(kind: str, with_schema: bool, mode: str, status: int) -> Refusal:
    """The answer to a ``response_format`` of type ``kind`` that an endpoint in
    ``mode`` does not take (``status`` 0: what the imitated server sends)."""
    if mode == "json_object_schema" and kind == "json_schema":
        return Refusal(
            status or 500,
            {
                "error": {
                    "message": _LLAMA_CPP_MESSAGE,
                    "type": "internal_server_error",
                    "param": None,
                    "code": None,
                }
            },
        )
    if kind == "json_object" and with_schema and mode == "json_schema":
        return _invalid("Unrecognized field 'response_format.schema'", status or 400)
    return _invalid(
        f"Field 'response_format' of type '{kind}' is not supported by this server",
        status or 400,
    )


def _prompt_schema(messages: list[dict[str, Any]]) -> Any:
    """The schema a system message ends with (its last line), if any."""
    for message in messages:
        if message.get("role") != "system":
            continue
        last = message["content"].rsplit("\n", 1)[-1]
        if last.startswith("{") and '"properties"' in last:
            try:
                schema = orjson.loads(last)
            except orjson.JSONDecodeError:
                continue
            if isinstance(schema, dict) and schema.get("type") == "object":
                return schema
    return None

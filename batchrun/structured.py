"""Structured outputs: JSON Schema → typed output columns, and each completion
parsed and validated into values for them.

Mapping of a top-level property's schema to its Arrow column:

============================  =====================================================
schema                        column
============================  =====================================================
string                        string
string with ``enum``          dictionary<int32, string>
integer                       int64
number                        float64
boolean                       bool
array with typed ``items``    list<item type>
object with ``properties``    struct<those properties, each mapped the same way>
anything else                 string holding the value as JSON text
============================  =====================================================

``type: [X, "null"]`` and ``anyOf: [X, {"type": "null"}]`` map as X; every column
is nullable (an ``invalid`` row has nulls there).

:meth:`Structured.carry` writes the schema into a request in each of the
``schema_via`` dialects; :mod:`batchrun.schema_via` chooses which.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import pyarrow as pa

from batchrun.config import Job
from batchrun.errors import InvalidAnswer, JobError

_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL)
_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}


def _non_null(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """The schema without its null alternative (``[X, "null"]``, ``anyOf``/``oneOf`` with null)."""
    kind = schema.get("type")
    if isinstance(kind, list):
        rest = [k for k in kind if k != "null"]
        if len(rest) == 1:
            return {**schema, "type": rest[0]}
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            rest = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
            if len(rest) == 1 and isinstance(rest[0], Mapping):
                return rest[0]
    return schema


def arrow_type(schema: Any) -> pa.DataType:
    """The Arrow type of values fitting ``schema`` (see the module table)."""
    if not isinstance(schema, Mapping):
        return pa.string()
    schema = _non_null(schema)
    kind = schema.get("type")
    if kind == "string" and isinstance(schema.get("enum"), list):
        return pa.dictionary(pa.int32(), pa.string())
    if isinstance(kind, str) and kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array" and isinstance(schema.get("items"), Mapping):
        item = arrow_type(schema["items"])
        if not _is_json_text(schema["items"], item):
            return pa.list_(item)
    if kind == "object" and isinstance(schema.get("properties"), Mapping) and schema["properties"]:
        return pa.struct(
            [pa.field(name, arrow_type(sub)) for name, sub in schema["properties"].items()]
        )
    return pa.string()


Convert = Callable[[Any], Any]
_INT64 = (-(2**63), 2**63 - 1)


def _identity(value: Any) -> Any:
    return value


def converter(schema: Any) -> Convert:
    """A function turning a (validated) JSON value into what its column holds:
    JSON text in the fallback columns (strings included, so the text is always
    JSON), the same recursively inside lists and structs. Raises InvalidAnswer
    for an integer an int64 column cannot hold."""
    mapped = arrow_type(schema)
    if _is_json_text(schema, mapped):
        return lambda v: None if v is None else orjson.dumps(v).decode()
    if pa.types.is_int64(mapped):

        def to_int(v: Any) -> Any:
            if isinstance(v, int) and not _INT64[0] <= v <= _INT64[1]:
                raise InvalidAnswer(f"{v} does not fit a 64-bit integer column")
            return v

        return to_int
    inner = _non_null(schema) if isinstance(schema, Mapping) else {}
    if pa.types.is_list(mapped):
        item = converter(inner["items"])
        return lambda v: None if v is None else [item(x) for x in v]
    if pa.types.is_struct(mapped):
        parts = {name: converter(sub) for name, sub in inner["properties"].items()}
        return lambda v: None if v is None else {n: c(v.get(n)) for n, c in parts.items()}
    return _identity


def _is_json_text(schema: Any, mapped: pa.DataType) -> bool:
    """Whether ``mapped`` is the JSON-text fallback rather than a real string."""
    return pa.types.is_string(mapped) and not (
        isinstance(schema, Mapping) and _non_null(schema).get("type") == "string"
    )


@dataclass(frozen=True)
class Structured:
    """What a structured job asks for and how its answers become columns."""

    format: str
    schema: Mapping[str, Any] | None
    name: str
    fields: tuple[pa.Field, ...]
    validator: Any
    converters: tuple[Convert, ...] = ()
    check: Callable[[Any], Any] | None = None
    """The schema compiled by fastjsonschema (about 25 times faster than
    jsonschema): answers it accepts need nothing more; jsonschema judges the
    others and words the error. None when the schema uses what it cannot compile."""

    def body_field(self) -> dict[str, Any]:
        """The request body's ``response_format`` in the ``json_schema`` dialect
        (``{"type": "json_object"}`` for a job without a schema)."""
        if self.format == "json_object" or self.schema is None:
            return {"type": "json_object"}
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": self.schema, "strict": True},
        }

    def carry(self, body: dict[str, Any], dialect: str | None) -> None:
        """Put the schema into ``body`` (in place) the way ``dialect`` says; a
        ``json_object`` job sends ``{"type": "json_object"}`` whatever the dialect."""
        schema = self.schema
        if dialect is None or self.format != "json_schema" or dialect == "json_schema":
            body["response_format"] = self.body_field()
        elif dialect == "json_object_schema":
            body["response_format"] = {"type": "json_object", "schema": schema}
        elif dialect == "vllm":
            body["structured_outputs"] = {"json": schema}
        else:
            body["messages"] = _with_schema_prompt(body["messages"], self.instruction())

    def uncarry(self, body: dict[str, Any], dialect: str | None) -> None:
        """Take out of ``body`` (in place) what :meth:`carry` put in for ``dialect``."""
        if dialect == "vllm":
            body.pop("structured_outputs", None)
        elif dialect == "prompt":
            body["messages"] = _without_schema_prompt(body["messages"], self.instruction())
        else:
            body.pop("response_format", None)

    def instruction(self) -> str:
        """What the ``prompt`` dialect adds to the system prompt."""
        return f"{PROMPT_INSTRUCTION}\n{orjson.dumps(self.schema).decode()}"

    def parse(self, text: str | None, finish_reason: str | None, max_tokens: int) -> dict[str, Any]:
        """The values of one answer, by column. Raises InvalidAnswer saying precisely why not."""
        if finish_reason == "length":
            raise InvalidAnswer(f"cut off at max_tokens={max_tokens}: raise max_tokens")
        if text is None:
            raise InvalidAnswer("the answer has no text")
        body = text.strip()
        fenced = _FENCE.match(body)
        if fenced:
            body = fenced.group(1).strip()
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidAnswer(f"not JSON ({exc}): {body[:60]!r}") from None
        if not isinstance(value, dict):
            raise InvalidAnswer(f"JSON {type(value).__name__}, not an object")
        if self.validator is not None and not self._passes(value):
            error = _first_error(self.validator, value)
            if error is not None:
                raise InvalidAnswer(error)
        values: dict[str, Any] = {}
        for f, convert in zip(self.fields, self.converters, strict=True):
            try:
                values[f.name] = convert(value.get(f.name))
            except InvalidAnswer as exc:
                raise InvalidAnswer(f"{f.name}: {exc}") from None
        return values

    def _passes(self, value: Any) -> bool:
        if self.check is None:
            return False
        try:
            self.check(value)
        except Exception:  # fastjsonschema's JsonSchemaValueException, or a value it chokes on
            return False
        return True


def _compile(schema: Mapping[str, Any]) -> Callable[[Any], Any] | None:
    import fastjsonschema

    try:
        return fastjsonschema.compile(dict(schema))
    except Exception:  # a draft or keyword it does not support: jsonschema alone then
        return None


def _first_error(validator: Any, value: Any) -> str | None:
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    path = ".".join(str(p) for p in error.absolute_path)
    return f"{path}: {error.message}" if path else error.message


MAX_SCHEMA_BYTES = 1 << 20
"""The largest response schema file taken (1 MiB). The schema goes out with every
request and is checked against every answer; a far larger one is a mistake."""

MAX_SCHEMA_NODES = 50_000
"""The most JSON values (objects, arrays, scalars) a response schema may hold."""

MAX_SCHEMA_PROPERTIES = 5_000
"""The most properties, counted over every object of the schema."""

# Keywords whose value is one subschema, a list of them, or a map of name → subschema.
_SCHEMA_ONE = frozenset(
    {
        "additionalItems",
        "additionalProperties",
        "contains",
        "else",
        "if",
        "items",
        "not",
        "propertyNames",
        "then",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)
_SCHEMA_LIST = frozenset({"allOf", "anyOf", "items", "oneOf", "prefixItems"})
_SCHEMA_MAP = frozenset(
    {"$defs", "definitions", "dependencies", "dependentSchemas", "patternProperties", "properties"}
)
# Keywords that apply their subschemas to the same value: a loop through these
# (and references) alone never reaches a smaller part of the answer, so a
# validator following it recurses forever.
_IN_PLACE = frozenset(
    {"allOf", "anyOf", "dependencies", "dependentSchemas", "else", "if", "not", "oneOf", "then"}
)
_REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")
Pointer = tuple[str, ...]


def _pointer_text(pointer: Pointer) -> str:
    return "#" + "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in pointer)


def _subschemas(node: Mapping[str, Any]) -> Iterator[tuple[Pointer, Any, bool]]:
    """(pointer tokens below ``node``, subschema, applies in place) for each subschema."""
    for key, value in node.items():
        in_place = key in _IN_PLACE
        if key in _SCHEMA_MAP and isinstance(value, Mapping):
            for name, sub in value.items():
                yield (key, str(name)), sub, in_place
        elif key in _SCHEMA_LIST and isinstance(value, list):
            for i, sub in enumerate(value):
                yield (key, str(i)), sub, in_place
        elif key in _SCHEMA_ONE and isinstance(value, Mapping):
            yield (key,), value, in_place


def _count_nodes(schema: Any, path: Path) -> None:
    """JobError when the schema holds more than MAX_SCHEMA_NODES JSON values."""
    count = 0
    stack = [schema]
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_SCHEMA_NODES:
            raise JobError(
                f"Schema file {path} holds more than {MAX_SCHEMA_NODES:,} JSON values; batchrun takes "
                "schemas up to that size, since the schema goes out with every request and is checked "
                "against every answer. Trim the schema (or split the job into several with smaller ones)."
            )
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


class _SchemaGraph:
    """The subschemas of one schema file, its references resolved within the file.

    Only references inside the file (``#/$defs/name``, ``#anchor``) are taken:
    one to a URL, a ``file:`` path or another file would make every check of an
    answer depend on what lies elsewhere (or fetch it), so it is refused. A loop
    of references that never descends into the answer is refused too; one that
    does (a tree of nodes, through ``properties`` or ``items``) is fine.
    """

    def __init__(self, schema: dict[str, Any], path: Path) -> None:
        self.root = schema
        self.path = path
        root_id = schema.get("$id")
        self.root_id = root_id.split("#", 1)[0] if isinstance(root_id, str) else None
        self.nodes: dict[Pointer, Mapping[str, Any]] = {}
        self.in_place: dict[Pointer, list[Pointer]] = {}
        self.anchors: dict[str, Pointer] = {}
        self.refs: list[tuple[Pointer, str, str]] = []
        self.nested_ids: list[Pointer] = []
        self.properties = 0

    def check(self) -> None:
        """JobError naming the reference (and where it is) that cannot be resolved
        within the file, the loop of references, or too many properties."""
        self._walk(())
        done = 0
        while done < len(self.refs):
            where, keyword, ref = self.refs[done]
            done += 1
            target = self._resolve(where, keyword, ref)
            self.in_place.setdefault(where, []).append(target)
            if target not in self.nodes:
                self._walk(target)
        if self.refs and self.nested_ids:
            raise JobError(
                f"Schema {self.path} sets `$id` inside the schema at {_pointer_text(self.nested_ids[0])}, "
                "which changes what its references point at. batchrun resolves references within the "
                "one file only: remove the inner `$id` (keep `$defs` and refer to them as #/$defs/NAME)."
            )
        self._check_loops()

    def _walk(self, start: Pointer) -> None:
        stack: list[tuple[Pointer, Any]] = [(start, self._at(start))]
        while stack:
            where, node = stack.pop()
            if where in self.nodes or not isinstance(node, Mapping):
                continue
            self.nodes[where] = node
            properties = node.get("properties")
            if isinstance(properties, Mapping):
                self.properties += len(properties)
                if self.properties > MAX_SCHEMA_PROPERTIES:
                    raise JobError(
                        f"Schema {self.path} has more than {MAX_SCHEMA_PROPERTIES:,} properties (counted over "
                        "every object in it); batchrun takes schemas up to that size, since the schema goes "
                        "out with every request and is checked against every answer. Trim the schema."
                    )
            for name in ("$anchor", "$dynamicAnchor"):
                if isinstance(node.get(name), str):
                    self.anchors.setdefault(node[name], where)
            node_id = node.get("$id")
            if where and isinstance(node_id, str):
                if node_id.startswith("#"):
                    self.anchors.setdefault(node_id[1:], where)  # draft 6/7 style anchor
                else:
                    self.nested_ids.append(where)
            for keyword in _REF_KEYWORDS:
                if keyword in node:
                    ref = node[keyword]
                    if not isinstance(ref, str):
                        raise JobError(
                            f"Schema {self.path}: `{keyword}` at {_pointer_text(where)} is {ref!r}, not a "
                            'reference. Write it as a string, e.g. "#/$defs/NAME".'
                        )
                    self.refs.append((where, keyword, ref))
            for tokens, sub, in_place in _subschemas(node):
                below = where + tokens
                if in_place:
                    self.in_place.setdefault(where, []).append(below)
                stack.append((below, sub))

    def _at(self, pointer: Pointer) -> Any:
        node: Any = self.root
        for token in pointer:
            if isinstance(node, Mapping) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise KeyError(token)
        return node

    def _resolve(self, where: Pointer, keyword: str, ref: str) -> Pointer:
        at = f"`{keyword}` {ref!r} at {_pointer_text(where)}"
        if self.root_id and ref.split("#", 1)[0] == self.root_id:
            ref = ref[len(self.root_id) :] or "#"  # the file's own $id: a local reference
        if not ref.startswith("#"):
            raise JobError(
                f"Schema {self.path}: {at} refers outside the schema file. batchrun does not fetch "
                "remote, file: or other-file references: copy the definition into this file's `$defs` "
                "and refer to it as #/$defs/NAME."
            )
        fragment = unquote(ref[1:])
        if not fragment:
            return ()
        if not fragment.startswith("/"):
            if fragment in self.anchors:
                return self.anchors[fragment]
            raise JobError(
                f"Schema {self.path}: {at} names the anchor {fragment!r}, which no `$anchor` in the file "
                "defines. Fix the reference (e.g. #/$defs/NAME)."
            )
        pointer = tuple(t.replace("~1", "/").replace("~0", "~") for t in fragment[1:].split("/"))
        try:
            target = self._at(pointer)
        except KeyError:
            raise JobError(
                f"Schema {self.path}: {at} points at nothing in the file. Fix the reference "
                "(a JSON pointer such as #/$defs/NAME) or add the definition it names."
            ) from None
        if not isinstance(target, Mapping | bool):
            raise JobError(
                f"Schema {self.path}: {at} points at a {type(target).__name__}, not a schema. "
                "Fix the reference."
            )
        return pointer

    def _check_loops(self) -> None:
        """JobError naming a loop of references and in-place keywords (allOf, anyOf,
        …): validating an answer would follow it forever."""
        state: dict[Pointer, int] = {}  # 1: on the current path, 2: done
        for start in self.in_place:
            if state.get(start):
                continue
            path: list[Pointer] = [start]
            todo: list[Iterator[Pointer]] = [iter(self.in_place.get(start, ()))]
            state[start] = 1
            while todo:
                nxt = next(todo[-1], None)
                if nxt is None:
                    state[path.pop()] = 2
                    todo.pop()
                elif state.get(nxt) == 1:
                    loop = path[path.index(nxt) :]
                    first = loop.index(min(loop, key=_pointer_text))  # the same text every time
                    loop = [*loop[first:], *loop[:first], loop[first]]
                    raise JobError(
                        f"Schema {self.path} has a loop of references that never descends into the "
                        f"answer: {' → '.join(_pointer_text(p) for p in loop)}. Validating an answer would "
                        "follow it forever. A schema may refer back to itself only below `properties` or "
                        "`items` (a tree of nodes); fix the reference."
                    )
                elif not state.get(nxt):
                    state[nxt] = 1
                    path.append(nxt)
                    todo.append(iter(self.in_place.get(nxt, ())))


def load_structured(job: Job, taken: set[str]) -> Structured | None:
    """The job's structured-output settings, checked; None for plain text jobs.

    ``taken`` holds the output's other column names: a schema property may not
    reuse one. The schema's size is bounded and its references must resolve
    within the file (no remote or file: reference is fetched). Raises JobError
    naming the schema file and the fix.
    """
    if job.schema_via != "auto" and job.response_format != "json_schema":
        raise JobError(
            f"`schema_via` is {job.schema_via!r}, but the job sends no schema "
            f'(response_format is "{job.response_format}"): set response_schema, or leave schema_via out.'
        )
    if job.response_format == "text":
        return None
    if job.response_format == "json_object" and job.response_schema is None:
        return Structured("json_object", None, "json_object", (), None)
    path = job.response_schema
    assert path is not None  # load_job requires it for json_schema
    schema = _read_schema(path)
    _count_nodes(schema, path)
    _SchemaGraph(schema, path).check()
    from jsonschema import validators
    from jsonschema.exceptions import SchemaError

    cls = validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise JobError(
            f"Schema {path} is not a valid JSON Schema: {exc.message}. Fix the schema file."
        ) from None
    properties = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(properties, Mapping) or not properties:
        raise JobError(
            f'Schema {path} must describe an object with properties ("type": "object", "properties": {{...}}): '
            "each top-level property becomes an output column."
        )
    clash = sorted(name for name in properties if name in taken)
    if clash:
        raise JobError(
            f"Schema {path} has properties named like output columns batchrun already writes: "
            f"{', '.join(clash)}. Rename them in the schema (or leave them out of keep_columns)."
        )
    fields = tuple(pa.field(name, arrow_type(sub)) for name, sub in properties.items())
    converters = tuple(converter(sub) for sub in properties.values())
    name = str(schema.get("title") or path.stem)
    name = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]
    return Structured(
        job.response_format, schema, name, fields, cls(schema), converters, _compile(schema)
    )


def _read_schema(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_SCHEMA_BYTES + 1)
    except FileNotFoundError:
        raise JobError(
            f"Schema file {path} does not exist. Check `response_schema` (relative to the job file's folder)."
        ) from None
    except OSError as exc:
        raise JobError(f"Schema file {path} cannot be read: {exc.strerror}.") from None
    if len(raw) > MAX_SCHEMA_BYTES:
        raise JobError(
            f"Schema file {path} is larger than {MAX_SCHEMA_BYTES // 1024:,} KiB; batchrun takes schemas "
            "up to that size, since the schema goes out with every request and is checked against every "
            "answer. Trim the schema."
        )
    try:
        schema = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise JobError(f"Schema file {path} is not valid JSON: {exc}. Fix the file.") from None
    if not isinstance(schema, dict):
        raise JobError(
            f"Schema file {path} must hold a JSON object (a JSON Schema), not a {type(schema).__name__}."
        )
    return schema


PROMPT_INSTRUCTION = (
    "Answer with one JSON object that fits this JSON Schema, and nothing else "
    "(no prose, no code fence):"
)
"""The ``prompt`` dialect's words before the schema, at the end of the system prompt."""


def _with_schema_prompt(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """``messages`` with ``instruction`` ending the system prompt (one is added first if none)."""
    first = messages[0] if messages else None
    if (
        first is not None
        and first.get("role") == "system"
        and isinstance(first.get("content"), str)
    ):
        return [{**first, "content": f"{first['content']}\n\n{instruction}"}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def _without_schema_prompt(
    messages: list[dict[str, Any]], instruction: str
) -> list[dict[str, Any]]:
    """Undo :func:`_with_schema_prompt`."""
    first = messages[0] if messages else None
    if first is None or first.get("role") != "system":
        return messages
    content = first.get("content")
    if content == instruction and not set(first) - {"role", "content"}:
        return messages[1:]
    if isinstance(content, str) and content.endswith(f"\n\n{instruction}"):
        return [{**first, "content": content[: -len(instruction) - 2]}, *messages[1:]]
    return messages

"""Response schemas at the edges: references that cannot be resolved within the
file (a loop, a remote URL, a ``file:`` path), and schemas too large to be sane,
are refused by ``plan`` and ``run`` alike (exit 2) before any request is sent.

Every run talks to a real aiohttp server on 127.0.0.1 that counts what it gets.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from batchrun import structured
from batchrun.cli import main
from batchrun.errors import BatchrunError, InvalidAnswer
from tests.conftest import assert_exit, invoke, run_app, tickets, write_jsonl

pytestmark = pytest.mark.timeout(30)

TEMPLATE = "Summarize: {ticket}"


def counting_app(answer: dict[str, Any]) -> tuple[web.Application, list[bytes]]:
    """A chat endpoint answering ``answer`` as the completion; it keeps every body."""
    received: list[bytes] = []

    async def chat(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response(
            {
                "id": "cmpl-1",
                "model": "m",
                "choices": [
                    {"message": {"content": orjson.dumps(answer).decode()}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app, received


def job_args(tmp_path: Path, base_url: str, schema: Path) -> list[str]:
    write_jsonl(tmp_path / "in.jsonl", tickets(3))
    return [
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "out.parquet"),
        "--model",
        "m",
        "--prompt-template",
        TEMPLATE,
        "--base-url",
        base_url,
        "--api-key-env",
        "",
        "--response-schema",
        str(schema),
        "--max-attempts",
        "1",
        "-q",
    ]


def plan(*args: str) -> Result:
    return CliRunner().invoke(main, ["plan", *args], catch_exceptions=True)


def obj(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


BAD_SCHEMAS: list[tuple[str, dict[str, Any], str]] = [
    (
        "self",
        {**obj(a={"type": "string"}), "$ref": "#"},
        r"loop of references that never descends into the answer: # → #",
    ),
    (
        "cycle",
        {
            **obj(a={"$ref": "#/$defs/x"}),
            "$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"allOf": [{"$ref": "#/$defs/x"}]}},
        },
        r"never descends into the answer: #/\$defs/x → #/\$defs/y → #/\$defs/y/allOf/0 → #/\$defs/x\.",
    ),
    (
        "remote",
        obj(a={"$ref": "https://example.invalid/schemas/a.json"}),
        r"`\$ref` 'https://example.invalid/schemas/a.json' at #/properties/a refers outside "
        r"the schema file\. batchrun does not fetch remote, file: or other-file references",
    ),
    (
        "file",
        obj(a={"$ref": "file:///etc/passwd"}),
        r"`\$ref` 'file:///etc/passwd' at #/properties/a refers outside the schema file",
    ),
    (
        "relative",
        obj(a={"$ref": "other.json#/$defs/a"}),
        r"'other.json#/\$defs/a' at #/properties/a refers outside the schema file",
    ),
    (
        "dangling",
        {**obj(a={"$ref": "#/$defs/missing"}), "$defs": {}},
        r"`\$ref` '#/\$defs/missing' at #/properties/a points at nothing in the file",
    ),
    (
        "anchor",
        obj(a={"$ref": "#nowhere"}),
        r"names the anchor 'nowhere', which no `\$anchor` in the file defines",
    ),
    (
        "not-a-string",
        obj(a={"$ref": 5}),
        r"`\$ref` at #/properties/a is 5, not a reference",
    ),
]


@pytest.mark.parametrize(
    ("schema", "message"),
    [pytest.param(s, m, id=name) for name, s, m in BAD_SCHEMAS],
)
def test_bad_references_stop_plan_and_run_before_sending(
    tmp_path: Path,
    threaded: Callable[[Callable[[], Any]], Any],
    schema: dict[str, Any],
    message: str,
) -> None:
    path = tmp_path / "schema.json"
    path.write_bytes(orjson.dumps(schema))
    app, received = counting_app({"a": "x"})
    base_url = threaded(lambda: run_app(app))
    args = job_args(tmp_path, base_url, path)
    for result in (plan(*args[:-1]), invoke(*args)):
        assert_exit(result, 2)
        assert result.stderr.startswith(f"batchrun: Schema {path}"), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr  # one paragraph, no traceback
        assert re.search(message, result.stderr), result.stderr
    assert received == []
    assert not (tmp_path / "out.parquet").exists()
    assert not (tmp_path / "out.parquet.partial").exists()


def test_local_references_resolve_and_a_tree_may_refer_to_itself(
    tmp_path: Path, threaded: Callable[[Callable[[], Any]], Any]
) -> None:
    schema = {
        "$id": "https://example.invalid/tree.json",
        **obj(
            tree={"$ref": "#/$defs/node"},
            label={"$ref": "https://example.invalid/tree.json#/$defs/a%20label"},
            kind={"$ref": "#kind"},
        ),
        "required": ["tree", "label", "kind"],
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["name", "children"],
            },
            "a label": {"type": "string"},
            "kind": {"$anchor": "kind", "enum": ["leaf", "branch"]},
        },
    }
    path = tmp_path / "schema.json"
    path.write_bytes(orjson.dumps(schema))
    tree = {"name": "a", "children": [{"name": "b", "children": []}]}
    app, received = counting_app({"tree": tree, "label": "L", "kind": "leaf"})
    base_url = threaded(lambda: run_app(app))
    args = job_args(tmp_path, base_url, path)
    assert_exit(plan(*args[:-1]), 0)
    assert_exit(invoke(*args), 0)
    assert len(received) == 3
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    assert orjson.loads(rows[0]["tree"]) == tree


def test_a_reference_outside_the_tree_is_still_checked(
    tmp_path: Path, threaded: Callable[[Callable[[], Any]], Any]
) -> None:
    """An answer that does not fit a referenced definition is invalid, not ok."""
    schema = {
        **obj(a={"$ref": "#/$defs/n"}),
        "required": ["a"],
        "$defs": {"n": {"type": "integer"}},
    }
    path = tmp_path / "schema.json"
    path.write_bytes(orjson.dumps(schema))
    app, _ = counting_app({"a": "not a number"})
    base_url = threaded(lambda: run_app(app))
    result = invoke(*job_args(tmp_path, base_url, path), "--max-parse-attempts", "1")
    assert_exit(result, 1)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"invalid"}
    assert "is not of type 'integer'" in rows[0]["error"]


# ---- size ------------------------------------------------------------------------------


def big_schema(properties: int, enum: int = 0) -> dict[str, Any]:
    props: dict[str, Any] = {f"p{i}": {"type": "string"} for i in range(properties)}
    if enum:
        props["e"] = {"type": "string", "enum": [f"v{i}" for i in range(enum)]}
    return obj(**props)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        pytest.param(
            big_schema(structured.MAX_SCHEMA_PROPERTIES + 1),
            r"more than 5,000 properties",
            id="properties",
        ),
        pytest.param(
            {**obj(a={"type": "string"}), "$defs": {"x": big_schema(3000), "y": big_schema(3000)}},
            r"more than 5,000 properties \(counted over every object in it\)",
            id="nested-properties",
        ),
        pytest.param(
            big_schema(1, enum=structured.MAX_SCHEMA_NODES),
            r"more than 50,000 JSON values",
            id="nodes",
        ),
        pytest.param(
            {**obj(a={"type": "string"}), "description": "x" * structured.MAX_SCHEMA_BYTES},
            r"is larger than 1,024 KiB",
            id="bytes",
        ),
    ],
)
def test_oversized_schemas_are_refused_fast(
    tmp_path: Path, schema: dict[str, Any], message: str
) -> None:
    path = tmp_path / "schema.json"
    path.write_bytes(orjson.dumps(schema))
    args = job_args(tmp_path, "http://127.0.0.1:9/v1", path)
    started = time.monotonic()
    result = plan(*args[:-1])
    assert time.monotonic() - started < 5
    assert_exit(result, 2)
    assert re.search(message, result.stderr), result.stderr
    assert result.stderr.count("\n") == 1


def test_a_schema_at_the_property_bound_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_bytes(orjson.dumps(big_schema(structured.MAX_SCHEMA_PROPERTIES)))
    result = plan(*job_args(tmp_path, "http://127.0.0.1:9/v1", path)[:-1])
    assert_exit(result, 0)


# ---- the error tree --------------------------------------------------------------------


def test_invalid_answer_is_a_batchrun_error() -> None:
    assert issubclass(InvalidAnswer, BatchrunError)
    assert structured.InvalidAnswer is InvalidAnswer
    with pytest.raises(InvalidAnswer, match="cut off at max_tokens=5"):
        structured.Structured("json_object", None, "x", (), None).parse("{}", "length", 5)

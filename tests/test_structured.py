"""Structured outputs, request parameters and extra headers, end to end.

``response_format`` / ``response_schema``: JSON Schema → typed Arrow columns, the
``response_format`` sent, ```json fences tolerated, re-asks up to
``max_parse_attempts``, ``invalid`` rows that keep the raw answer and the usage they
cost. ``[params]`` merged into every body, ``[headers]`` sent on every request with
``${VAR}`` from the environment, never written anywhere.

Every job runs against a real aiohttp server on 127.0.0.1: the embedded endpoint
(``batchrun.mock``) or a small scripted app that answers exactly what a test needs.
CLI tests run their server in a background thread (the CLI runs its own loop).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrun import journal, outputs
from batchrun.config import Job, load_job
from batchrun.engines.local import run_job as run_engine
from batchrun.errors import JobError, KeyRejected
from batchrun.lifecycle import RunOptions, RunResult
from batchrun.mock import MockConfig, serve
from batchrun.outputs import FIXED_COLUMNS
from batchrun.structured import InvalidAnswer, Structured, arrow_type, load_structured
from tests.conftest import (
    REPO,
    FakeSleep,
    assert_exit,
    invoke,
    make_job,
    run_app,
    tickets,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(30)

MODEL = "test-org/test-model-7b"
TEMPLATE = "Summarize: {ticket}"
TRIAGE_JOB = REPO / "jobs" / "triage_tickets.toml"
TRIAGE_SCHEMA = REPO / "jobs" / "triage_schema.json"
CATEGORIES = ["billing", "login", "bug", "feature_request", "data_export", "integrations", "other"]
SECRET = "hdr-secret-7f3a9c1e5b2d"
# Tests of re-asks whose server answers prose under json_schema: with schema_via
# "auto" such a first answer would send the search down the list instead
# (tests/test_schema_via.py), so they say the server takes json_schema.
HONOURED = {"schema_via": "json_schema"}
DICT = pa.dictionary(pa.int32(), pa.string())

# What this file's jobs lay over make_job's defaults.
JOB_KEYS: dict[str, Any] = {
    "model": MODEL,
    "prompt_template": TEMPLATE,
    "concurrency": 4,
    "max_attempts": 3,
}


# ---- helpers ---------------------------------------------------------------------


async def run_job(job: Job, **options: Any) -> RunResult:
    return await run_engine(job, RunOptions(progress=False, **options), sleep=FakeSleep())


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def write_schema(path: Path, schema: dict[str, Any]) -> Path:
    path.write_bytes(orjson.dumps(schema))
    return path


def triage_schema() -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads(TRIAGE_SCHEMA.read_bytes())
    return schema


def ticket_number(body: dict[str, Any]) -> int:
    content = body["messages"][-1]["content"]
    match = re.search(r"Ticket number (\d+)", content)
    assert match, content
    return int(match.group(1))


def chat(
    content: str | None,
    finish_reason: str = "stop",
    prompt: int = 10,
    completion: int = 5,
    model: str = MODEL,
) -> web.Response:
    return web.json_response(
        {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


def js(value: Any) -> str:
    return orjson.dumps(value).decode()


VALID = {"summary": "It broke.", "category": "bug", "urgency": 3, "needs_human": False}

# answer(body, n, headers): n counts the requests with this body's last user message (1 first).
Answer = Callable[[dict[str, Any], int, Any], web.Response]


@dataclass
class Scripted:
    """A scripted OpenAI-compatible endpoint and what it received."""

    base_url: str
    raw: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [orjson.loads(r) for r in self.raw]

    @property
    def requests(self) -> int:
        return len(self.raw)


@contextlib.asynccontextmanager
async def serve_scripted(answer: Answer) -> AsyncIterator[Scripted]:
    state = Scripted("")

    async def handler(request: web.Request) -> web.Response:
        raw = await request.read()
        state.raw.append(raw)
        state.headers.append(dict(request.headers))
        body = orjson.loads(raw)
        content = body["messages"][-1]["content"]
        n = state.seen[content] = state.seen.get(content, 0) + 1
        return answer(body, n, request.headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with run_app(app) as base_url:
        state.base_url = base_url
        yield state


# ---- 1. JSON Schema → Arrow type ---------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "string"}, pa.string()),
        ({"type": "string", "enum": ["a", "b"]}, DICT),
        ({"type": "integer"}, pa.int64()),
        ({"type": "number"}, pa.float64()),
        ({"type": "boolean"}, pa.bool_()),
        ({"type": ["integer", "null"]}, pa.int64()),
        ({"type": ["null", "boolean"]}, pa.bool_()),
        ({"type": ["string", "null"], "enum": ["a", "b", None]}, DICT),
        ({"anyOf": [{"type": "number"}, {"type": "null"}]}, pa.float64()),
        ({"oneOf": [{"type": "null"}, {"type": "string", "enum": ["x"]}]}, DICT),
        ({"type": "array", "items": {"type": "integer"}}, pa.list_(pa.int64())),
        ({"type": "array", "items": {"type": "string", "enum": ["a"]}}, pa.list_(DICT)),
        (
            {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            pa.list_(pa.list_(pa.float64())),
        ),
        (
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "level": {"type": ["integer", "null"]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
            },
            pa.struct(
                [
                    pa.field("name", pa.string()),
                    pa.field("level", pa.int64()),
                    pa.field("tags", pa.list_(pa.string())),
                ]
            ),
        ),
        (
            {
                "type": "array",
                "items": {"type": "object", "properties": {"x": {"type": "boolean"}}},
            },
            pa.list_(pa.struct([pa.field("x", pa.bool_())])),
        ),
        # anything else: a string holding the value as JSON text
        ({}, pa.string()),
        (True, pa.string()),
        ({"type": ["string", "integer"]}, pa.string()),
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, pa.string()),
        ({"enum": ["a", "b"]}, pa.string()),
        ({"type": "array"}, pa.string()),
        ({"type": "array", "items": {}}, pa.string()),
        ({"type": "array", "items": {"type": ["string", "number"]}}, pa.string()),
        ({"type": "object"}, pa.string()),
        ({"type": "object", "properties": {}}, pa.string()),
        ({"type": "null"}, pa.string()),
    ],
    ids=repr,
)
def test_arrow_type(schema: Any, expected: pa.DataType) -> None:
    assert arrow_type(schema) == expected


# ---- 2. parsing one answer ----------------------------------------------------------


def triage_structured(tmp_path: Path, **overrides: Any) -> Structured:
    src = write_jsonl(tmp_path / "parse-in.jsonl", tickets(1))
    job = make_job(
        "http://127.0.0.1:9/v1",
        src,
        tmp_path / "parse-out.parquet",
        **(JOB_KEYS | overrides),
        response_schema=str(TRIAGE_SCHEMA),
    )
    structured = load_structured(job, set(FIXED_COLUMNS))
    assert structured is not None
    return structured


@pytest.mark.parametrize(
    "text",
    [
        js(VALID),
        f"  {js(VALID)}\n",
        f"```json\n{js(VALID)}\n```",
        f"\n```json\n{js(VALID)}\n```\n",
        f"```\n{js(VALID)}\n```",
        f"```JSON {js(VALID)}```",
        f"```json\n{json.dumps(VALID, indent=2)}\n  ```",
    ],
    ids=[
        "bare",
        "spaces",
        "fence",
        "fence-newlines",
        "fence-no-lang",
        "fence-one-line",
        "indented",
    ],
)
def test_parse_accepts_fenced_json(tmp_path: Path, text: str) -> None:
    s = triage_structured(tmp_path)
    assert s.parse(text, "stop", 300) == VALID


@pytest.mark.parametrize(
    ("text", "finish", "message"),
    [
        (js({**VALID, "urgency": "high"}), "stop", "urgency: 'high' is not of type 'integer'"),
        (
            js({k: v for k, v in VALID.items() if k != "needs_human"}),
            "stop",
            "'needs_human' is a required property",
        ),
        (js({**VALID, "urgency": 9}), "stop", "urgency: 9 is greater than the maximum of 5"),
        (js({**VALID, "category": "sales"}), "stop", "category: 'sales' is not one of"),
        (js(VALID)[:30], "length", "cut off at max_tokens=64: raise max_tokens"),
        (js(VALID), "length", "cut off at max_tokens=64: raise max_tokens"),
        ("Sure! Here is the triage: it is a bug.", "stop", "not JSON ("),
        (js([VALID]), "stop", "JSON list, not an object"),
        (None, "stop", "the answer has no text"),
    ],
    ids=[
        "wrong-type",
        "missing",
        "maximum",
        "enum",
        "cut-off",
        "length",
        "not-json",
        "list",
        "none",
    ],
)
def test_parse_errors_say_precisely_why(
    tmp_path: Path, text: str | None, finish: str, message: str
) -> None:
    s = triage_structured(tmp_path, max_tokens=64)
    with pytest.raises(InvalidAnswer) as info:
        s.parse(text, finish, 64)
    assert str(info.value).startswith(message), str(info.value)


def test_body_field_forms(tmp_path: Path) -> None:
    s = triage_structured(tmp_path)
    assert s.body_field() == {
        "type": "json_schema",
        "json_schema": {"name": "ticket_triage", "schema": triage_schema(), "strict": True},
    }
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    job = make_job(
        "http://127.0.0.1:9/v1",
        src,
        tmp_path / "o.parquet",
        **JOB_KEYS,
        response_format="json_object",
    )
    plain = load_structured(job, set(FIXED_COLUMNS))
    assert plain is not None and plain.fields == ()
    assert plain.body_field() == {"type": "json_object"}
    text_job = make_job("http://127.0.0.1:9/v1", src, tmp_path / "o.parquet", **JOB_KEYS)
    assert load_structured(text_job, set(FIXED_COLUMNS)) is None


# ---- 3. typed columns end to end -----------------------------------------------------

ALL_TYPES: dict[str, Any] = {
    "type": "object",
    "required": ["title", "category", "urgency", "score", "vip"],
    "properties": {
        "title": {"type": "string"},
        "category": {"type": "string", "enum": ["bug", "billing", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "score": {"type": "number"},
        "vip": {"type": "boolean"},
        "due": {"type": ["integer", "null"]},
        "ratio": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "level": {"type": "integer"}},
        },
        "extra": {},
        "mixed": {"type": ["integer", "boolean"]},
    },
}
ALL_TYPES_ARROW = [
    pa.field("title", pa.string()),
    pa.field("category", DICT),
    pa.field("urgency", pa.int64()),
    pa.field("score", pa.float64()),
    pa.field("vip", pa.bool_()),
    pa.field("due", pa.int64()),
    pa.field("ratio", pa.float64()),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("owner", pa.struct([pa.field("name", pa.string()), pa.field("level", pa.int64())])),
    pa.field("extra", pa.string()),
    pa.field("mixed", pa.string()),
]
ALL_TYPES_ANSWERS: list[dict[str, Any]] = [
    {
        "title": "Login fails",
        "category": "bug",
        "urgency": 4,
        "score": 0.25,
        "vip": True,
        "due": 3,
        "ratio": 0.5,
        "tags": ["login", "sso"],
        "owner": {"name": "Ann", "level": 2},
        "extra": {"a": [1, 2]},
        "mixed": 7,
    },
    {
        "title": "Invoice",
        "category": "billing",
        "urgency": 1,
        "score": 2,  # an integer where a number is asked: float64 2.0
        "vip": False,
        "due": None,
        "ratio": None,
        "tags": [],
        "owner": {"name": "Bo", "level": None},
        "extra": [1, "x", None],
        "mixed": True,
    },
    # optional properties left out: nulls
    {"title": "Other", "category": "other", "urgency": 5, "score": -1.5, "vip": False},
]


async def test_typed_columns_types_and_values(tmp_path: Path) -> None:
    schema = orjson.loads(orjson.dumps(ALL_TYPES))  # a deep copy
    schema["properties"]["owner"]["properties"]["level"] = {"type": ["integer", "null"]}
    path = write_schema(tmp_path / "all.json", schema)
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    out = tmp_path / "out.parquet"

    def answer(body: dict[str, Any], n: int, headers: Any) -> web.Response:
        return chat(js(ALL_TYPES_ANSWERS[ticket_number(body)]))

    async with serve_scripted(answer) as server:
        result = await run_job(
            make_job(server.base_url, src, out, **JOB_KEYS, response_schema=str(path))
        )
    assert (result.ok, result.invalid, result.failed, result.exit_code) == (3, 0, 0, 0)

    table = pq.read_table(out)
    typed = table.schema.names[-len(ALL_TYPES_ARROW) :]
    assert typed == [f.name for f in ALL_TYPES_ARROW]
    assert table.schema.names[: -len(ALL_TYPES_ARROW)] == [
        f.name for f in [*outputs.HEAD_FIELDS, *outputs.RESULT_FIELDS]
    ]
    for f in ALL_TYPES_ARROW:
        assert table.schema.field(f.name).type == f.type, f.name
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3
    r0, r1, r2 = rows
    assert {k: r0[k] for k in ALL_TYPES["properties"]} == {
        **ALL_TYPES_ANSWERS[0],
        "extra": '{"a":[1,2]}',
        "mixed": "7",
    }
    assert r1["score"] == 2.0 and isinstance(r1["score"], float)
    assert (r1["due"], r1["ratio"], r1["tags"]) == (None, None, [])
    assert r1["owner"] == {"name": "Bo", "level": None}
    assert json.loads(r1["extra"]) == [1, "x", None]
    assert json.loads(r1["mixed"]) is True
    assert (r2["due"], r2["ratio"], r2["tags"], r2["owner"], r2["extra"], r2["mixed"]) == (
        None,
        None,
        None,
        None,
        None,
        None,
    )
    # the raw answer is kept as it came
    assert json.loads(r0["completion"]) == ALL_TYPES_ANSWERS[0]

    df = pd.read_parquet(out)
    assert isinstance(df["category"].dtype, pd.CategoricalDtype)
    assert list(df["category"].astype(str)) == ["bug", "billing", "other"]
    assert df["urgency"].dtype == "int64" and list(df["urgency"]) == [4, 1, 5]
    assert df["score"].dtype == "float64" and list(df["score"]) == [0.25, 2.0, -1.5]
    assert df["vip"].dtype == "bool" and list(df["vip"]) == [True, False, False]
    assert df["due"].iloc[0] == 3 and pd.isna(df["due"].iloc[1])
    assert list(df["tags"].iloc[0]) == ["login", "sso"]
    assert df["owner"].iloc[0] == {"name": "Ann", "level": 2}
    assert df["extra"].iloc[0] == '{"a":[1,2]}'


async def test_mock_answers_fill_every_column_type(tmp_path: Path) -> None:
    path = write_schema(tmp_path / "all.json", ALL_TYPES)
    src = write_jsonl(tmp_path / "in.jsonl", tickets(20))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig()) as server:
        result = await run_job(
            make_job(server.base_url, src, out, **JOB_KEYS, response_schema=str(path))
        )
    assert result.ok == 20 and result.exit_code == 0
    table = pq.read_table(out)
    for f in ALL_TYPES_ARROW:
        assert table.schema.field(f.name).type == f.type, f.name
    for r in table.to_pylist():
        assert r["status"] == "ok"
        assert r["category"] in ("bug", "billing", "other")
        assert 1 <= r["urgency"] <= 5
        assert isinstance(r["vip"], bool) and isinstance(r["score"], float)
        assert all(isinstance(t, str) for t in r["tags"])


async def test_fallback_column_holds_json_text_for_strings_too(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"mixed": {"type": ["string", "integer"]}, "extra": {}},
    }
    path = write_schema(tmp_path / "s.json", schema)
    src = write_jsonl(tmp_path / "in.jsonl", tickets(2))
    out = tmp_path / "out.parquet"
    answers = [{"mixed": 5, "extra": {"k": 1}}, {"mixed": "5", "extra": "text"}]

    def answer(body: dict[str, Any], n: int, headers: Any) -> web.Response:
        return chat(js(answers[ticket_number(body)]))

    async with serve_scripted(answer) as server:
        await run_job(make_job(server.base_url, src, out, **JOB_KEYS, response_schema=str(path)))
    rows = read_rows(out)
    # Every cell of a JSON-text column reads back to the value the model gave.
    assert [json.loads(r["mixed"]) for r in rows] == [5, "5"]
    assert [json.loads(r["extra"]) for r in rows] == [{"k": 1}, "text"]


async def test_untyped_field_inside_an_object_is_json_text(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "meta": {"type": "object", "properties": {"x": {}, "n": {"type": "integer"}}}
        },
    }
    path = write_schema(tmp_path / "s.json", schema)
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    out = tmp_path / "out.parquet"
    async with serve_scripted(lambda b, n, h: chat(js({"meta": {"x": [1, 2], "n": 1}}))) as server:
        result = await run_job(
            make_job(server.base_url, src, out, **JOB_KEYS, response_schema=str(path))
        )
    assert result.ok == 1
    assert read_rows(out)[0]["meta"] == {"x": "[1,2]", "n": 1}


async def test_integer_too_large_for_int64_makes_the_row_invalid(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(2))
    out = tmp_path / "out.parquet"
    schema = {"type": "object", "properties": {"count": {"type": "integer"}}}
    path = write_schema(tmp_path / "s.json", schema)

    def answer(body: dict[str, Any], n: int, headers: Any) -> web.Response:
        big = ticket_number(body) == 0
        return web.Response(
            text='{"id":"c","choices":[{"message":{"content":"{\\"count\\": '
            + ("18446744073709551615" if big else "3")
            + '}"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}',
            content_type="application/json",
        )

    async with serve_scripted(answer) as server:
        result = await run_job(
            make_job(
                server.base_url,
                src,
                out,
                **JOB_KEYS,
                response_schema=str(path),
                max_parse_attempts=1,
            )
        )
    assert (result.ok, result.invalid) == (1, 1)
    rows = read_rows(out)
    assert rows[0]["status"] == "invalid" and "count" in rows[0]["error"]
    assert rows[1]["count"] == 3


# ---- 4. schema errors: before any request --------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"Schema file .*nope\.json does not exist\. Check `response_schema`"),
        ("not-json", r"Schema file .*schema\.json is not valid JSON"),
        ("not-object-json", r"must hold a JSON object \(a JSON Schema\), not a list"),
        ("array-schema", r'must describe an object with properties \("type": "object"'),
        ("no-properties", r"must describe an object with properties"),
        ("bad-json-schema", r"is not a valid JSON Schema: .*Fix the schema file\."),
        (
            "fixed-column",
            r"properties named like output columns batchrun already writes: status, total_tokens\.",
        ),
        (
            "keep-column",
            r"properties named like output columns batchrun already writes: customer\.",
        ),
        ("ttft", r"already writes: ttft_ms\."),
    ],
)
async def test_schema_errors_stop_before_any_request(
    tmp_path: Path, case: str, message: str
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    out = tmp_path / "out.parquet"
    schema_path = tmp_path / "schema.json"
    good = triage_schema()
    overrides: dict[str, Any] = {"response_schema": str(schema_path)}
    if case == "missing":
        overrides["response_schema"] = str(tmp_path / "nope.json")
    elif case == "not-json":
        schema_path.write_text('{"type": "object", "properties": {')
    elif case == "not-object-json":
        schema_path.write_text('[{"type": "object"}]')
    elif case == "array-schema":
        write_schema(schema_path, {"type": "array", "items": {"type": "string"}})
    elif case == "no-properties":
        write_schema(schema_path, {"type": "object"})
    elif case == "bad-json-schema":
        write_schema(schema_path, {"type": "object", "properties": {"a": {"type": 5}}})
    elif case == "fixed-column":
        good["properties"]["status"] = {"type": "string"}
        good["properties"]["total_tokens"] = {"type": "integer"}
        write_schema(schema_path, good)
    elif case == "keep-column":
        good["properties"]["customer"] = {"type": "string"}
        write_schema(schema_path, good)
        overrides["keep_columns"] = ["customer"]
    elif case == "ttft":
        good["properties"]["ttft_ms"] = {"type": "number"}
        write_schema(schema_path, good)
    async with serve(MockConfig()) as server:
        job = make_job(server.base_url, src, out, **(JOB_KEYS | overrides))
        with pytest.raises(JobError, match=message):
            await run_job(job)
        assert server.stats.requests == 0
    assert not out.exists()


def test_json_schema_without_schema_is_refused(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    with pytest.raises(
        JobError, match=r'`response_format` is "json_schema" .*no `response_schema`'
    ):
        make_job(
            "http://127.0.0.1:9/v1",
            src,
            tmp_path / "o.parquet",
            **JOB_KEYS,
            response_format="json_schema",
        )
    with pytest.raises(
        JobError, match=r"response_format.* must be one of: text, json_object, json_schema"
    ):
        make_job(
            "http://127.0.0.1:9/v1", src, tmp_path / "o.parquet", **JOB_KEYS, response_format="yaml"
        )


def test_cli_schema_errors_exit_2(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", tickets(3))
    (tmp_path / "bad.json").write_text("not json at all")
    (tmp_path / "job.toml").write_text(
        f'input = "in.jsonl"\nmodel = "m"\nprompt_template = "{TEMPLATE}"\n'
        'response_format = "json_schema"\n'
    )
    base = ["--mock", "--output", "out.parquet", "-q"]
    result = invoke("job.toml", *base)
    assert_exit(result, 2)
    assert (
        '`response_format` is "json_schema" in job.toml but no `response_schema`' in result.stderr
    )
    result = invoke("job.toml", "--response-schema", "bad.json", *base)
    assert_exit(result, 2)
    assert result.stderr.startswith("batchrun: Schema file bad.json is not valid JSON")
    assert result.stderr.count("\n") == 1
    result = invoke("job.toml", "--response-schema", "missing.json", *base)
    assert_exit(result, 2)
    assert "Schema file missing.json does not exist" in result.stderr
    assert not (tmp_path / "out.parquet").exists()
    assert not (tmp_path / "out.parquet.partial").exists()


def test_response_schema_is_relative_to_the_job_file(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "data").mkdir()
    write_jsonl(jobs / "data" / "in.jsonl", tickets(4))
    write_schema(jobs / "schema.json", triage_schema())
    (jobs / "job.toml").write_text(
        'input = "data/in.jsonl"\nmodel = "m"\n'
        f'prompt_template = "{TEMPLATE}"\nresponse_schema = "schema.json"\n'
    )
    job = load_job(jobs / "job.toml")
    assert job.response_schema == jobs / "schema.json"
    assert job.response_format == "json_schema"
    # run from another folder: the schema is still found beside the job file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_schema(tmp_path / "schema.json", {"type": "object"})  # a decoy in the cwd's parent
    result = invoke(
        str(jobs / "job.toml"), "--mock", "--output", str(elsewhere / "o.parquet"), "-q"
    )
    assert_exit(result, 0)
    table = pq.read_table(elsewhere / "o.parquet")
    assert table.schema.field("category").type == DICT
    assert table.schema.field("urgency").type == pa.int64()


def test_cli_response_schema_flag_implies_json_schema(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", tickets(5))
    write_schema(tmp_path / "schema.json", triage_schema())
    result = invoke(
        "--input",
        "in.jsonl",
        "--prompt-template",
        TEMPLATE,
        "--model",
        "m",
        "--response-schema",
        "schema.json",  # relative to the working directory, as flags are
        "--mock",
        "--output",
        "out.parquet",
        "-q",
    )
    assert_exit(result, 0)
    table = pq.read_table(tmp_path / "out.parquet")
    meta = orjson.loads(table.schema.metadata[b"batchrun"])
    assert meta["job"]["response_format"] == "json_schema"
    assert meta["job"]["response_schema"] == "schema.json"
    assert table.schema.names[-4:] == ["summary", "category", "urgency", "needs_human"]
    assert {r["status"] for r in table.to_pylist()} == {"ok"}


# ---- 5. what is sent ----------------------------------------------------------------


async def test_request_body_carries_response_format(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    schema = triage_schema()
    del schema["title"]
    path = write_schema(tmp_path / "my schema.v2.json", schema)
    async with serve_scripted(lambda b, n, h: chat(js(VALID))) as server:
        out = tmp_path / "a.parquet"
        await run_job(make_job(server.base_url, src, out, **JOB_KEYS, response_schema=str(path)))
        assert server.requests == 3
        for body in server.bodies:
            assert body["response_format"] == {
                "type": "json_schema",
                # no title: the file's stem, made a valid name
                "json_schema": {"name": "my_schema_v2", "schema": schema, "strict": True},
            }
        # request_hash is the hash of the exact bytes sent
        hashes = {hashlib.sha256(r).hexdigest()[:32] for r in server.raw}
        assert {r["request_hash"] for r in read_rows(out)} == hashes


async def test_json_object_format(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    out = tmp_path / "out.parquet"

    def answer(body: dict[str, Any], n: int, headers: Any) -> web.Response:
        i = ticket_number(body)
        return chat(js({"summary": f"s{i}"}) if i != 2 else js(["a", "list"]))

    async with serve_scripted(answer) as server:
        result = await run_job(
            make_job(
                server.base_url,
                src,
                out,
                **JOB_KEYS,
                response_format="json_object",
                max_parse_attempts=1,
            )
        )
        assert [b["response_format"] for b in server.bodies] == [{"type": "json_object"}] * 3
    assert (result.ok, result.invalid) == (2, 1)
    table = pq.read_table(out)
    assert table.schema.names == [f.name for f in [*outputs.HEAD_FIELDS, *outputs.RESULT_FIELDS]]
    rows = table.to_pylist()
    assert rows[2]["status"] == "invalid" and rows[2]["error"] == "JSON list, not an object"
    assert rows[0]["completion"] == '{"summary":"s0"}'


async def test_text_job_sends_no_response_format(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(2))
    async with serve_scripted(lambda b, n, h: chat("not json, and fine")) as server:
        result = await run_job(make_job(server.base_url, src, tmp_path / "o.parquet", **JOB_KEYS))
        assert all("response_format" not in b for b in server.bodies)
    assert result.ok == 2


async def test_schema_is_part_of_the_request_hash(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(4))
    a = write_schema(tmp_path / "a.json", triage_schema())
    same = write_schema(tmp_path / "same.json", triage_schema())
    changed = triage_schema()
    changed["properties"]["urgency"]["maximum"] = 10
    b = write_schema(tmp_path / "b.json", changed)

    async def hashes(out: str, **overrides: Any) -> list[str]:
        async with serve(MockConfig()) as server:
            await run_job(make_job(server.base_url, src, tmp_path / out, **(JOB_KEYS | overrides)))
        return [r["request_hash"] for r in read_rows(tmp_path / out)]

    h_a = await hashes("a.parquet", response_schema=str(a))
    h_same = await hashes("same.parquet", response_schema=str(same))
    h_b = await hashes("b.parquet", response_schema=str(b))
    h_text = await hashes("t.parquet")
    h_obj = await hashes("o.parquet", response_format="json_object")
    assert h_a == h_same  # the title names the schema, not the file
    for other in (h_b, h_text, h_obj):
        assert all(x != y for x, y in zip(h_a, other, strict=True))
    assert len(set(h_a)) == 4


# ---- 6. fences, re-asks, invalid rows -----------------------------------------------------


async def test_fenced_answers_parse_ok(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(12))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(fence_rate=1.0)) as server:
        result = await run_job(
            make_job(server.base_url, src, out, **JOB_KEYS, response_schema=str(TRIAGE_SCHEMA))
        )
        assert server.stats.by_outcome.get("fenced") == 12
        assert server.stats.requests == 12
    assert (result.ok, result.invalid, result.requests) == (12, 0, 12)
    for r in read_rows(out):
        assert r["status"] == "ok" and r["attempts"] == 1
        assert "```json" in r["completion"]  # the raw answer is kept as it came
        assert r["category"] in CATEGORIES and 1 <= r["urgency"] <= 5


async def test_reask_after_not_json_then_ok(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    out = tmp_path / "out.parquet"

    def answer(body: dict[str, Any], n: int, headers: Any) -> web.Response:
        if n == 1:
            return chat("Sure! It is a bug, urgency 3.", prompt=10, completion=7)
        return chat(js(VALID), prompt=11, completion=9)

    async with serve_scripted(answer) as server:
        result = await run_job(
            make_job(
                server.base_url,
                src,
                out,
                **(JOB_KEYS | HONOURED),
                response_schema=str(TRIAGE_SCHEMA),
            )
        )
        assert server.requests == 6
        # each row's re-ask is the same request as its first ask
        assert sorted(Counter(server.raw).values()) == [2, 2, 2]
    assert (result.ok, result.invalid, result.failed, result.requests) == (3, 0, 0, 6)
    assert (result.prompt_tokens, result.completion_tokens) == (63, 48)
    for r in read_rows(out):
        assert r["status"] == "ok" and r["error"] is None
        assert r["attempts"] == 2
        assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (21, 16, 37)
        assert r["completion"] == js(VALID)
        assert (r["category"], r["urgency"], r["needs_human"]) == ("bug", 3, False)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({**VALID, "urgency": "high"}, "urgency: 'high' is not of type 'integer'"),
        ({k: v for k, v in VALID.items() if k != "category"}, "'category' is a required property"),
    ],
    ids=["wrong-type", "missing-required"],
)
async def test_always_invalid_row(tmp_path: Path, bad: dict[str, Any], message: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(4))
    out = tmp_path / "out.parquet"

    def answer(body: dict[str, Any], n: int, headers: Any) -> web.Response:
        if ticket_number(body) == 0:
            return chat(js(VALID), prompt=10, completion=4)
        return chat(js(bad), prompt=10 + n, completion=5)

    async with serve_scripted(answer) as server:
        job = make_job(
            server.base_url,
            src,
            out,
            **JOB_KEYS,
            response_schema=str(TRIAGE_SCHEMA),
            max_parse_attempts=2,
        )
        result = await run_job(job)
        assert server.requests == 1 + 3 * 2
    assert (result.ok, result.invalid, result.failed) == (1, 3, 0)
    assert result.exit_code == 1
    assert result.prompt_tokens == 10 + 3 * (11 + 12)
    rows = read_rows(out)
    assert rows[0]["status"] == "ok"
    for r in rows[1:]:
        assert r["status"] == "invalid"
        assert r["error"] == message
        assert r["completion"] == js(bad)  # the raw answer is kept
        assert r["finish_reason"] == "stop" and r["http_status"] == 200
        assert r["attempts"] == 2
        assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (23, 10, 33)
        assert (r["summary"], r["category"], r["urgency"], r["needs_human"]) == (None,) * 4
    df = pd.read_parquet(out)
    assert df["urgency"].isna().sum() == 3


async def test_mock_invalid_kinds_give_precise_errors(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(6))
    schema = str(TRIAGE_SCHEMA)
    for kind, check in [
        ("wrong-type", lambda e: e == "urgency: 'high' is not of type 'integer'"),
        (
            "missing-required",
            lambda e: re.fullmatch(
                r"'(summary|category|urgency|needs_human)' is a required property", e
            ),
        ),
        ("cut-off", lambda e: e == "cut off at max_tokens=300: raise max_tokens"),
        ("not-json", lambda e: e.startswith("not JSON (") and "Sure! Here is what I found" in e),
    ]:
        out = tmp_path / f"{kind}.parquet"
        config = MockConfig(invalid_rate=1.0, invalid_kinds=(kind,))
        async with serve(config) as server:
            job = make_job(
                server.base_url,
                src,
                out,
                **(JOB_KEYS | HONOURED),
                response_schema=schema,
                max_tokens=300,
            )
            result = await run_job(job)
            assert server.stats.requests == 12  # max_parse_attempts defaults to 2
            assert server.stats.by_outcome == {f"invalid:{kind}": 12}
        assert result.invalid == 6 and result.exit_code == 1
        for r in read_rows(out):
            assert r["status"] == "invalid" and check(r["error"]), (kind, r["error"])
            assert r["completion"] and r["prompt_tokens"] and r["completion_tokens"]


async def test_cut_off_answer(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(2))
    out = tmp_path / "out.parquet"
    half = js(VALID)[:20]
    async with serve_scripted(
        lambda b, n, h: chat(half, finish_reason="length", completion=64)
    ) as server:
        job = make_job(
            server.base_url,
            src,
            out,
            **JOB_KEYS,
            response_schema=str(TRIAGE_SCHEMA),
            max_tokens=64,
            max_parse_attempts=1,
        )
        result = await run_job(job)
        assert server.requests == 2
        assert {b["max_tokens"] for b in server.bodies} == {64}
    assert result.invalid == 2
    for r in read_rows(out):
        assert r["status"] == "invalid"
        assert r["error"] == "cut off at max_tokens=64: raise max_tokens"
        assert r["finish_reason"] == "length" and r["completion"] == half
        assert r["attempts"] == 1 and r["completion_tokens"] == 64


async def test_last_invalid_reason_is_kept(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    out = tmp_path / "out.parquet"
    answers = [
        "no json here",
        js({**VALID, "urgency": "high"}),
        js({**VALID, "needs_human": "yes"}),
    ]
    async with serve_scripted(lambda b, n, h: chat(answers[n - 1])) as server:
        job = make_job(
            server.base_url,
            src,
            out,
            **(JOB_KEYS | HONOURED),
            response_schema=str(TRIAGE_SCHEMA),
            max_parse_attempts=3,
        )
        await run_job(job)
        assert server.requests == 3
    (r,) = read_rows(out)
    assert r["status"] == "invalid" and r["attempts"] == 3
    assert r["error"] == "needs_human: 'yes' is not of type 'boolean'"
    assert r["completion"] == answers[2]
    assert r["prompt_tokens"] == 30


async def test_usage_of_an_invalid_answer_is_kept_when_the_reask_fails(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    out = tmp_path / "out.parquet"

    def answer(body: dict[str, Any], n: int, headers: Any) -> web.Response:
        if n == 1:
            return chat("not json", prompt=12, completion=3)
        return web.json_response({"error": {"code": "bad_request", "message": "no"}}, status=400)

    async with serve_scripted(answer) as server:
        job = make_job(
            server.base_url, src, out, **(JOB_KEYS | HONOURED), response_schema=str(TRIAGE_SCHEMA)
        )
        result = await run_job(job)
    assert (result.failed, result.invalid, result.exit_code) == (1, 0, 1)
    (r,) = read_rows(out)
    assert r["status"] == "error" and r["http_status"] == 400
    assert r["error"] == "HTTP 400: bad_request: no"
    assert r["attempts"] == 2
    assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (12, 3, 15)
    assert r["urgency"] is None


async def test_max_parse_attempts_one_asks_once(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    async with serve_scripted(lambda b, n, h: chat("nope")) as server:
        job = make_job(
            server.base_url,
            src,
            tmp_path / "o.parquet",
            **JOB_KEYS,
            response_schema=str(TRIAGE_SCHEMA),
            max_parse_attempts=1,
            **HONOURED,
        )
        result = await run_job(job)
        assert server.requests == 3
    assert result.invalid == 3 and result.requests == 3
    with pytest.raises(JobError, match=r"max_parse_attempts.* must be at least 1"):
        make_job(
            "http://127.0.0.1:9/v1", src, tmp_path / "o.parquet", **JOB_KEYS, max_parse_attempts=0
        )


def test_cli_invalid_rows_exit_1(tmp_path: Path, threaded: Any) -> None:
    def answer(body: dict[str, Any], n: int, headers: Any) -> web.Response:
        if ticket_number(body) % 2:
            return chat(js({**VALID, "urgency": "high"}))
        return chat(js(VALID))

    server = threaded(lambda: serve_scripted(answer))
    write_jsonl(tmp_path / "in.jsonl", tickets(4))
    result = invoke(
        "--input",
        "in.jsonl",
        "--prompt-template",
        TEMPLATE,
        "--model",
        MODEL,
        "--base-url",
        server.base_url,
        "--api-key-env",
        "",
        "--response-schema",
        str(TRIAGE_SCHEMA),
        "--max-parse-attempts",
        "2",
        "--output",
        "out.parquet",
    )
    assert_exit(result, 1)
    assert "rows        4  (ok 2, failed 0, invalid 2)" in result.stderr
    assert server.requests == 2 + 2 * 2
    rows = read_rows(tmp_path / "out.parquet")
    assert [r["status"] for r in rows] == ["ok", "invalid", "ok", "invalid"]
    assert rows[1]["error"] == "urgency: 'high' is not of type 'integer'"


# ---- 7. the triage job from the repo --------------------------------------------------


def test_triage_job_with_mock(tmp_path: Path) -> None:
    out = tmp_path / "triage.parquet"
    result = invoke(str(TRIAGE_JOB), "--mock", "--output", str(out))
    assert_exit(result, 0)
    assert "rows        200  (ok 200, failed 0)" in result.stderr
    samples = [
        orjson.loads(line)
        for line in (REPO / "sample_data" / "tickets.jsonl").read_bytes().splitlines()
    ]

    table = pq.read_table(out)
    assert table.num_rows == len(samples) == 200
    assert table.schema.names[-4:] == ["summary", "category", "urgency", "needs_human"]
    assert table.schema.field("summary").type == pa.string()
    assert table.schema.field("category").type == DICT
    assert table.schema.field("urgency").type == pa.int64()
    assert table.schema.field("needs_human").type == pa.bool_()
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [s["id"] for s in samples]
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None
        assert r["category"] in CATEGORIES
        assert 1 <= r["urgency"] <= 5
        assert isinstance(r["needs_human"], bool)
        assert r["summary"] and len(r["summary"]) <= 300

    df = pd.read_parquet(out)
    assert isinstance(df["category"].dtype, pd.CategoricalDtype)
    assert set(df["category"].cat.categories) <= set(CATEGORIES)
    assert df["urgency"].dtype == "int64" and df["urgency"].between(1, 5).all()
    assert df["needs_human"].dtype == "bool"
    assert df["needs_human"].any() and not df["needs_human"].all()
    assert df["urgency"].nunique() > 1 and df["category"].nunique() > 1
    meta = orjson.loads(table.schema.metadata[b"batchrun"])
    assert meta["job"]["params"] == {"seed": 7}


async def test_triage_job_with_invalid_answers_loses_no_row(tmp_path: Path) -> None:
    out = tmp_path / "triage.parquet"
    async with serve(MockConfig(invalid_rate=0.3, seed=3)) as server:
        job = load_job(
            TRIAGE_JOB,
            {
                "output": str(out),
                "base_url": server.base_url,
                "api_key_env": "",
                "max_parse_attempts": 1,
            },
        )
        assert job.response_format == "json_schema"
        result = await run_job(job)
        stats = server.stats.to_dict()
    spoiled = {k: v for k, v in stats["by_outcome"].items() if k.startswith("invalid:")}
    assert stats["requests"] == 200
    assert 30 <= sum(spoiled.values()) <= 90  # about 30%
    assert result.rows == 200 and result.failed == 0
    assert result.invalid == sum(spoiled.values()) and result.ok == 200 - result.invalid
    assert result.exit_code == 1

    samples = [
        orjson.loads(line)
        for line in (REPO / "sample_data" / "tickets.jsonl").read_bytes().splitlines()
    ]
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [s["id"] for s in samples]  # each once, in order
    assert [r["row"] for r in rows] == list(range(200))
    kinds: set[str] = set()
    for r, s in zip(rows, samples, strict=True):
        assert r["customer"] == s["customer"]
        assert r["status"] in ("ok", "invalid")
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0  # paid either way
        assert r["attempts"] == 1
        if r["status"] == "ok":
            assert r["error"] is None and r["category"] in CATEGORIES
            continue
        assert r["completion"]
        assert (r["summary"], r["category"], r["urgency"], r["needs_human"]) == (None,) * 4
        err = r["error"]
        if err == "urgency: 'high' is not of type 'integer'":
            kinds.add("wrong-type")
        elif re.fullmatch(r"'\w+' is a required property", err):
            kinds.add("missing-required")
        elif err == "cut off at max_tokens=300: raise max_tokens":
            kinds.add("cut-off")
        elif err.startswith("not JSON ("):
            kinds.add("not-json")
        else:
            pytest.fail(f"unexpected error {err!r}")
    assert kinds == {k.split(":")[1] for k in spoiled}
    df = pd.read_parquet(out)
    assert len(df) == 200 and df["status"].isin(["ok", "invalid"]).all()


# ---- 8. params ------------------------------------------------------------------------


async def test_params_are_merged_into_every_body(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    params = {"top_p": 0.9, "stop": ["\n\n", "END"], "seed": 7, "top_k": 40, "n": 1}
    async with serve_scripted(lambda b, n, h: chat("ok")) as server:
        job = make_job(
            server.base_url,
            src,
            tmp_path / "o.parquet",
            **JOB_KEYS,
            params=params,
            temperature=0.2,
            max_tokens=33,
        )
        result = await run_job(job)
        bodies = server.bodies
    assert result.ok == 3
    for body in bodies:
        for k, v in params.items():
            assert body[k] == v
        assert body["model"] == MODEL and body["temperature"] == 0.2 and body["max_tokens"] == 33
        assert list(body)[: len(params)] == list(params)  # params first, batchrun's fields after


@pytest.mark.parametrize(
    ("name", "pointer"),
    [
        ("model", "model"),
        ("messages", "prompt_template or messages_column"),
        ("stream", "stream"),
        ("stream_options", "stream"),
        ("max_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("response_format", "response_format"),
        ("metadata", "metadata"),
    ],
)
def test_owned_params_are_refused(tmp_path: Path, name: str, pointer: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    with pytest.raises(JobError) as info:
        make_job("http://127.0.0.1:9/v1", src, tmp_path / "o.parquet", **JOB_KEYS, params={name: 1})
    assert str(info.value) == (
        f"`params` in the flags sets `{name}`, which batchrun sends itself: use the `{pointer}` key instead."
    )
    (tmp_path / "job.toml").write_text(
        f'input = "in.jsonl"\nmodel = "m"\nprompt_template = "{{ticket}}"\n[params]\n{name} = 1\n'
    )
    with pytest.raises(
        JobError, match=rf"`params` in job\.toml sets `{name}`.*use the `{re.escape(pointer)}` key"
    ):
        load_job(Path("job.toml"))


def test_n_other_than_one_is_refused(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    with pytest.raises(JobError, match=r"sets n = 2: batchrun keeps one completion per row"):
        make_job("http://127.0.0.1:9/v1", src, tmp_path / "o.parquet", **JOB_KEYS, params={"n": 2})
    job = make_job(
        "http://127.0.0.1:9/v1", src, tmp_path / "o.parquet", **JOB_KEYS, params={"n": 1}
    )
    assert job.params == {"n": 1}
    with pytest.raises(JobError, match=r"`params` .* must be a table"):
        make_job("http://127.0.0.1:9/v1", src, tmp_path / "o.parquet", **JOB_KEYS, params="top_k=3")


def test_cli_param_flag_is_repeatable(tmp_path: Path, threaded: Any) -> None:
    server = threaded(lambda: serve_scripted(lambda b, n, h: chat("ok")))
    write_jsonl(tmp_path / "in.jsonl", tickets(2))
    args = [
        "--input",
        "in.jsonl",
        "--prompt-template",
        TEMPLATE,
        "--model",
        MODEL,
        "--base-url",
        server.base_url,
        "--api-key-env",
        "",
        "--output",
        "out.parquet",
        "-q",
    ]
    result = invoke(
        *args,
        "--param",
        "top_k=40",
        "--param",
        'stop=["\\n\\n","END"]',
        "--params",  # the key's own flag name works too, mixed with the alias
        "seed=7",
        "--param",
        "top_p=0.5",
        "--param",
        "mode=fast",  # not JSON: kept as a string
    )
    assert_exit(result, 0)
    assert server.requests == 2
    for body in server.bodies:
        assert body["top_k"] == 40 and body["stop"] == ["\n\n", "END"]
        assert body["seed"] == 7 and body["top_p"] == 0.5 and body["mode"] == "fast"
    # an owned key from the flag is refused with its pointer, before sending
    result = invoke(*args, "--params", "max_tokens=5", "--restart")
    assert_exit(result, 2)
    assert "use the `max_tokens` key instead" in result.stderr
    result = invoke(*args, "--param", "n=2", "--restart")
    assert_exit(result, 2)
    assert "sets n = 2" in result.stderr
    result = invoke(*args, "--param", "nokey", "--restart")
    assert_exit(result, 2)
    assert "is not KEY=VALUE" in result.output
    assert server.requests == 2


async def test_params_are_part_of_the_request_hash(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))

    async def hashes(out: str, params: dict[str, Any]) -> list[str]:
        async with serve(MockConfig()) as server:
            await run_job(make_job(server.base_url, src, tmp_path / out, **JOB_KEYS, params=params))
        return [r["request_hash"] for r in read_rows(tmp_path / out)]

    h7 = await hashes("a.parquet", {"seed": 7})
    h7b = await hashes("b.parquet", {"seed": 7})
    h8 = await hashes("c.parquet", {"seed": 8})
    none = await hashes("d.parquet", {})
    assert h7 == h7b
    assert all(x != y for x, y in zip(h7, h8, strict=True))
    assert all(x != y for x, y in zip(h7, none, strict=True))


# ---- 9. headers -----------------------------------------------------------------------


async def test_headers_are_sent_on_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_TOKEN", SECRET)
    monkeypatch.setenv("MY_ORG", "acme")
    src = write_jsonl(tmp_path / "in.jsonl", tickets(5))
    headers = {
        "X-Token": "${MY_TOKEN}",
        "X-Org": "org-${MY_ORG}-${MY_ORG}",
        "X-Plain": "literal $HOME ${ not a var",
    }

    def answer(body: dict[str, Any], n: int, h: Any) -> web.Response:
        if n == 1 and ticket_number(body) == 2:
            return web.Response(status=503, text="busy")  # retried: the retry carries them too
        return chat("ok")

    async with serve_scripted(answer) as server:
        result = await run_job(
            make_job(server.base_url, src, tmp_path / "o.parquet", **JOB_KEYS, headers=headers)
        )
        seen = server.headers
    assert result.ok == 5 and result.retries == 1
    assert len(seen) == 6
    for h in seen:
        assert h["X-Token"] == SECRET
        assert h["X-Org"] == "org-acme-acme"
        assert h["X-Plain"] == "literal $HOME ${ not a var"
        assert "Authorization" not in h  # api_key_env = ""
        assert h["Content-Type"] == "application/json"


async def test_missing_header_variable_stops_before_sending(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(2))
    out = tmp_path / "o.parquet"
    async with serve(MockConfig()) as server:
        job = make_job(
            server.base_url, src, out, **JOB_KEYS, headers={"X-Token": "${NOT_SET_ANYWHERE}"}
        )
        with pytest.raises(JobError) as info:
            await run_job(job)
        assert server.stats.requests == 0
    assert "Header `X-Token` uses ${NOT_SET_ANYWHERE}" in str(info.value)
    assert "NOT_SET_ANYWHERE is not set" in str(info.value)
    assert not out.exists() and not (tmp_path / "o.parquet.partial").exists()


async def test_header_secret_echoed_in_a_key_rejection_is_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_TOKEN", SECRET)
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))

    def answer(body: dict[str, Any], n: int, h: Any) -> web.Response:
        return web.json_response(
            {"error": "invalid_api_key", "message": f"token {h.get('X-Token')} is not valid"},
            status=401,
        )

    async with serve_scripted(answer) as server:
        job = make_job(
            server.base_url,
            src,
            tmp_path / "o.parquet",
            **JOB_KEYS,
            headers={"X-Token": "${MY_TOKEN}"},
        )
        with pytest.raises(KeyRejected) as info:
            await run_job(job)
    assert "token [redacted] is not valid" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("name", ["Authorization", "authorization", "AUTHORIZATION"])
def test_authorization_header_is_refused(tmp_path: Path, name: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    with pytest.raises(
        JobError, match="sets Authorization: batchrun sends the key from `api_key_env` itself"
    ):
        make_job(
            "http://127.0.0.1:9/v1",
            src,
            tmp_path / "o.parquet",
            **JOB_KEYS,
            headers={name: "Bearer x"},
        )


def test_header_values_must_be_strings(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(1))
    with pytest.raises(JobError, match=r"Header `X-N` in the flags must be a string, not 5"):
        make_job(
            "http://127.0.0.1:9/v1", src, tmp_path / "o.parquet", **JOB_KEYS, headers={"X-N": 5}
        )


def test_cli_header_secret_never_written_anywhere(
    tmp_path: Path, threaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_TOKEN", SECRET)
    captured: list[bytes] = []
    real_finish = journal.Journal.finish

    def finish(self: journal.Journal, *args: Any, **kwargs: Any) -> Path:
        for p in sorted(self.folder.iterdir()):
            captured.append(p.read_bytes())
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(journal.Journal, "finish", finish)

    def answer(body: dict[str, Any], n: int, h: Any) -> web.Response:
        token = h.get("X-Token", "")
        i = ticket_number(body)
        if i % 3 == 0:
            return web.json_response(
                {"error": {"code": "bad_header", "message": f"header X-Token={token} refused"}},
                status=400,
            )
        if i % 3 == 1 and n == 1:
            return web.Response(status=500, text=f"upstream choked on {token}")
        return chat("fine")

    server = threaded(lambda: serve_scripted(answer))
    write_jsonl(tmp_path / "in.jsonl", tickets(9))
    (tmp_path / "job.toml").write_text(
        f'input = "in.jsonl"\nmodel = "m"\nprompt_template = "{TEMPLATE}"\n'
        f'base_url = "{server.base_url}"\napi_key_env = ""\nconcurrency = 2\n'
        '[headers]\nX-Token = "${MY_TOKEN}"\n'
    )
    for fmt in ("text", "json"):
        server.seen.clear()  # each run gets its first-time 500s
        out = tmp_path / f"out-{fmt}.parquet"
        log = tmp_path / f"log-{fmt}.txt"
        # the json run gives the headers as repeatable flags (they replace the file's table)
        flags = (
            ["--header", "X-Token=${MY_TOKEN}", "--header", "X-Org=acme"] if fmt == "json" else []
        )
        result = invoke(
            "job.toml",
            *flags,
            "--output",
            str(out),
            "--log-file",
            str(log),
            "--log-format",
            fmt,
            "-v",
        )
        assert_exit(result, 1)
        rows = read_rows(out)
        errors = [r["error"] for r in rows if r["status"] == "error"]
        assert len(errors) == 3
        assert all(
            e == "HTTP 400: bad_header: header X-Token=[redacted] refused" for e in errors
        ), errors
        assert SECRET.encode() not in out.read_bytes()
        assert SECRET not in repr(rows)
        metadata = repr(pq.read_schema(out).metadata)
        assert SECRET not in metadata and "${MY_TOKEN}" in metadata
        assert captured and all(SECRET.encode() not in c for c in captured)
        assert any(b"[redacted]" in c for c in captured)
        log_text = log.read_text()
        assert SECRET not in log_text
        assert "upstream choked on [redacted]" in log_text  # the retry is logged, redacted
        assert SECRET not in result.output
    assert all(h["X-Token"] == SECRET for h in server.headers)
    assert sum(h.get("X-Org") == "acme" for h in server.headers) == 12  # 9 rows + 3 retries

"""``schema_via``: the ways a request carries the response schema, and ``auto``'s
search for the one the server takes.

Every job runs against the embedded endpoint on 127.0.0.1, set to take one way
only (``MockConfig.schema_via``) as OpenAI, llama.cpp, vLLM or a server with no
structured outputs does, and to refuse the others the way each of those does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from batchrun.checks import check_job
from batchrun.config import SCHEMA_DIALECTS, Job, load_job
from batchrun.errors import JobError
from batchrun.lifecycle import RunOptions
from batchrun.mock import MockConfig, serve
from batchrun.payload import Prepared
from batchrun.schema_via import STATE_FILE, SchemaVia
from batchrun.structured import PROMPT_INSTRUCTION
from tests.conftest import REPO, assert_exit, invoke, port_of, tickets, write_jsonl
from tests.conftest import make_job as base_job
from tests.test_structured import JOB_KEYS as STRUCTURED_KEYS
from tests.test_structured import MODEL, read_rows, run_job

pytestmark = pytest.mark.timeout(60)

TRIAGE_SCHEMA = REPO / "jobs" / "triage_schema.json"
CATEGORIES = {"billing", "login", "bug", "feature_request", "data_export", "integrations", "other"}
OFFLINE = "http://127.0.0.1:9/v1"  # nothing is sent there: these jobs are only prepared


def make_job(base_url: str, src: Path, out: Path, **overrides: Any) -> Job:
    """test_structured's job, asking for the triage schema with a system prompt."""
    values: dict[str, Any] = {
        **STRUCTURED_KEYS,
        "prompt_template": "Triage: {ticket}",
        "system_prompt": "You triage support tickets.",
        "response_schema": str(TRIAGE_SCHEMA),
        **overrides,
    }
    return base_job(base_url, src, out, **values)


def offline_job(tmp_path: Path, **overrides: Any) -> Job:
    return make_job(
        OFFLINE, write_jsonl(tmp_path / "in.jsonl", tickets(1)), tmp_path / "o.parquet", **overrides
    )


def assert_typed(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["category"] in CATEGORIES and 1 <= r["urgency"] <= 5
        assert isinstance(r["needs_human"], bool) and r["summary"]


def expected_hashes(job: Job, dialect: str) -> list[str]:
    """The request hash of every row, prepared ``dialect``'s way from the start."""
    checked = check_job(job, RunOptions(progress=False))
    assert checked.structured is not None
    shape = SchemaVia(checked.structured, dialect).shape
    return [p.request_hash for p in checked.rows(shape=shape)]


def schema_via_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "schema_via"]


# ---- each way's body ------------------------------------------------------------------


@pytest.mark.parametrize("dialect", SCHEMA_DIALECTS)
async def test_each_way_fills_the_typed_columns(tmp_path: Path, dialect: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(4))
    out = tmp_path / "out.parquet"
    # The endpoint takes only this way (a strict one: any other field is a 400).
    mode = "none" if dialect == "prompt" else dialect
    async with serve(MockConfig(schema_via=mode, strict=True)) as server:
        job = make_job(server.base_url, src, out, schema_via=dialect, stream=True)
        result = await run_job(job)
        assert server.stats.requests == 4
        assert server.stats.by_outcome == {"ok": 4}
    assert (result.ok, result.schema_via, result.schema_via_refused) == (4, dialect, ())
    rows = read_rows(out)
    assert_typed(rows)
    assert [r["request_hash"] for r in rows] == expected_hashes(job, dialect)
    assert "schema via" not in result.summary()


async def test_the_body_each_way_sends(tmp_path: Path) -> None:
    schema = orjson.loads(TRIAGE_SCHEMA.read_bytes())
    bodies: dict[str, dict[str, Any]] = {}
    for dialect in SCHEMA_DIALECTS:
        job = offline_job(tmp_path, schema_via=dialect)
        checked = check_job(job, RunOptions(progress=False))
        (p,) = checked.rows()
        assert p.schema_via == dialect
        bodies[dialect] = orjson.loads(p.body)
    assert bodies["json_schema"]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "ticket_triage", "schema": schema, "strict": True},
    }
    assert bodies["json_object_schema"]["response_format"] == {
        "type": "json_object",
        "schema": schema,
    }
    assert bodies["vllm"]["structured_outputs"] == {"json": schema}
    assert "response_format" not in bodies["vllm"]
    prompt = bodies["prompt"]
    assert "response_format" not in prompt and "structured_outputs" not in prompt
    system = prompt["messages"][0]
    assert system["role"] == "system"
    assert system["content"] == (
        f"You triage support tickets.\n\n{PROMPT_INSTRUCTION}\n{orjson.dumps(schema).decode()}"
    )
    # Without a system prompt, the instruction is one.
    job = offline_job(tmp_path, schema_via="prompt", system_prompt=None)
    (p,) = check_job(job, RunOptions(progress=False)).rows()
    first, user = orjson.loads(p.body)["messages"]
    assert first["role"] == "system" and first["content"].startswith(PROMPT_INSTRUCTION)
    assert user["role"] == "user"


@pytest.mark.parametrize("source", SCHEMA_DIALECTS)
@pytest.mark.parametrize("target", SCHEMA_DIALECTS)
def test_a_re_rendered_request_is_the_one_prepared_that_way(
    tmp_path: Path, source: str, target: str
) -> None:
    """A row prepared one way and then sent another carries exactly the bytes (and
    hash) it would have had prepared that other way: a resume sends the same."""
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    for extra in ({}, {"stream": True, "metadata": {"job": "t"}, "system_prompt": None}):
        job = make_job(OFFLINE, src, tmp_path / "o.parquet", tpm=100000, **extra)
        checked = check_job(job, RunOptions(progress=False))
        assert checked.structured is not None
        via = SchemaVia(checked.structured, "auto")
        via.current = source
        prepared = list(checked.rows(shape=via.shape))
        via.current = target
        fresh = list(checked.rows(shape=via.shape))
        for p, q in zip(prepared, fresh, strict=True):
            via.render(p)
            assert (p.body, p.request_hash, p.schema_via) == (q.body, q.request_hash, target)
            assert (p.prompt_tokens, p.prompt_bound) == (q.prompt_tokens, q.prompt_bound)


def test_schema_via_needs_a_schema(tmp_path: Path) -> None:
    job = offline_job(tmp_path, response_schema=None, schema_via="vllm")
    with pytest.raises(JobError, match=r"`schema_via` is 'vllm', but the job sends no schema"):
        check_job(job, RunOptions(progress=False))
    with pytest.raises(JobError, match=r"`schema_via`.*must be one of: auto, json_schema"):
        offline_job(tmp_path, schema_via="grammar")
    # A json_object job has no way to choose: {"type": "json_object"} as ever.
    job = offline_job(tmp_path, response_schema=None, response_format="json_object")
    (p,) = check_job(job, RunOptions(progress=False)).rows()
    assert isinstance(p, Prepared) and p.schema_via is None
    assert orjson.loads(p.body)["response_format"] == {"type": "json_object"}


# ---- auto ---------------------------------------------------------------------------


async def test_auto_moves_to_json_object_schema_on_llama_cpps_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="batchrun")
    n = 8
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(schema_via="json_object_schema")) as server:
        job = make_job(server.base_url, src, out, concurrency=8, max_attempts=5)
        result = await run_job(job)
        # One refused request (not retried: a 500 naming the format), then one per row.
        assert server.stats.requests == n + 1
        assert server.stats.by_outcome == {"refused:500": 1, "ok": n}
    assert (result.ok, result.failed, result.invalid, result.requests) == (n, 0, 0, n + 1)
    assert result.retries == 0
    assert result.schema_via == "json_object_schema"
    assert result.schema_via_refused == ("json_schema",)
    assert (
        "schema via  json_object_schema (auto: the server does not take json_schema)"
        in result.summary()
    )
    rows = read_rows(out)
    assert_typed(rows)
    assert sorted(r["attempts"] for r in rows) == [1] * (n - 1) + [2]
    assert [r["request_hash"] for r in rows] == expected_hashes(job, "json_object_schema")
    events = schema_via_events(caplog)
    assert events[0].startswith(
        "structured outputs: the server does not take the schema via json_schema (HTTP 500: "
    )
    assert "'response_format'" in events[0] and events[0].endswith(
        "sending it via json_object_schema"
    )
    assert events[1:] == ["structured outputs: the server takes the schema via json_object_schema"]
    meta = orjson.loads(pq.read_schema(out).metadata[b"batchrun"])
    assert meta["schema_via"]["schema_via"] == "json_object_schema"
    assert meta["schema_via"]["tried"] == ["json_schema", "json_object_schema"]
    assert meta["schema_via"]["settled"] is True


@pytest.mark.parametrize("status", [400, 422, 500])
async def test_auto_moves_on_any_refusal_naming_the_format(tmp_path: Path, status: int) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(5))
    out = tmp_path / "out.parquet"
    config = MockConfig(schema_via="vllm", strict=True, format_error_status=status)
    async with serve(config) as server:
        result = await run_job(make_job(server.base_url, src, out))
        # json_schema and json_object_schema refused once each, then vllm for every row.
        assert server.stats.by_outcome == {f"refused:{status}": 2, "ok": 5}
    assert (result.ok, result.requests, result.schema_via) == (5, 7, "vllm")
    assert result.schema_via_refused == ("json_schema", "json_object_schema")
    rows = read_rows(out)
    assert_typed(rows)
    assert sorted(r["attempts"] for r in rows) == [1, 1, 1, 1, 3]


async def test_auto_falls_back_to_the_prompt_when_the_format_is_ignored(tmp_path: Path) -> None:
    """No structured outputs at all: response_format refused, structured_outputs
    silently ignored (a prose answer), then the schema goes in the prompt."""
    n = 6
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(schema_via="none")) as server:
        result = await run_job(make_job(server.base_url, src, out))
        assert server.stats.requests == n + 3
        assert server.stats.by_outcome == {"refused:400": 2, "ok": n + 1}
    assert (result.ok, result.failed, result.invalid) == (n, 0, 0)
    assert result.schema_via == "prompt"
    assert result.schema_via_refused == ("json_schema", "json_object_schema", "vllm")
    rows = read_rows(out)
    assert_typed(rows)
    (first,) = [r for r in rows if r["attempts"] == 4]
    others = [r for r in rows if r is not first]
    assert all(r["attempts"] == 1 for r in others)
    # The ignored prose answer was paid: its tokens are in the row's usage.
    assert first["prompt_tokens"] > max(r["prompt_tokens"] for r in others)
    assert first["completion_tokens"] > max(r["completion_tokens"] for r in others)
    assert result.requests == n + 3
    assert [r["request_hash"] for r in rows] == expected_hashes(
        make_job(server.base_url, src, out), "prompt"
    )


async def test_a_strict_server_refusing_the_vllm_field_is_a_refusal_too(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(3))
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(schema_via="none", strict=True)) as server:
        result = await run_job(make_job(server.base_url, src, out))
        assert server.stats.by_outcome == {"refused:400": 2, "400": 1, "ok": 3}
    assert (result.ok, result.requests, result.schema_via) == (3, 6, "prompt")


async def test_other_errors_are_not_taken_for_the_format(tmp_path: Path) -> None:
    """A 500 that does not name the format is retried as ever, and a 400 that
    does not is the row's error: json_schema stays."""
    src = write_jsonl(tmp_path / "in.jsonl", [*tickets(4), {"id": "big", "ticket": "word " * 300}])
    out = tmp_path / "out.parquet"
    config = MockConfig(fail_first=2, fail_first_kind="500", context_tokens=200)
    async with serve(config) as server:
        result = await run_job(make_job(server.base_url, src, out, max_attempts=3))
        assert server.stats.by_outcome == {"500": 2, "ok": 4, "400": 1}
    assert (result.ok, result.failed, result.schema_via, result.schema_via_refused) == (
        4,
        1,
        "json_schema",
        (),
    )
    rows = read_rows(out)
    assert rows[4]["status"] == "error" and "context_length_exceeded" in rows[4]["error"]
    assert rows[0]["attempts"] == 3 and result.retries == 2


async def test_invalid_answers_still_re_ask_after_the_way_is_settled(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(12))
    out = tmp_path / "out.parquet"
    config = MockConfig(
        schema_via="json_object_schema",
        invalid_rate=0.5,
        invalid_kinds=("wrong-type", "missing-required"),
        seed=5,
    )
    async with serve(config) as server:
        result = await run_job(make_job(server.base_url, src, out, max_parse_attempts=2))
        stats = server.stats.to_dict()
    assert result.schema_via == "json_object_schema" and result.failed == 0
    assert result.ok + result.invalid == 12 and result.invalid > 0
    spoiled = sum(v for k, v in stats["by_outcome"].items() if k.startswith("invalid:"))
    # every request but the refused one answered; each spoiled answer but the last of a row was re-asked
    assert stats["requests"] == 1 + 12 + spoiled - result.invalid
    for r in read_rows(out):
        assert r["status"] in ("ok", "invalid")
        if r["status"] == "invalid":
            assert r["completion"] and r["urgency"] is None and r["attempts"] >= 2


# ---- what is kept: resume, --retry-failed, --reuse -----------------------------------------


async def test_a_resume_sends_the_bodies_the_search_settled_on(tmp_path: Path) -> None:
    n = 30
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    out = tmp_path / "out.parquet"
    partial = out.with_name(out.name + ".partial")
    async with serve(MockConfig(schema_via="json_object_schema", latency_s=0.02)) as server:
        job = make_job(server.base_url, src, out, concurrency=2)
        task = asyncio.create_task(run_job(job))
        journal = partial / "journal.jsonl"
        deadline = time.monotonic() + 10
        while not (journal.exists() and journal.read_bytes().count(b"\n") >= 6):
            assert not task.done() and time.monotonic() < deadline
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        first = server.stats.requests
    kept = orjson.loads((partial / STATE_FILE).read_bytes())
    assert kept == {
        "schema_via": "json_object_schema",
        "tried": ["json_schema", "json_object_schema"],
        "settled": True,
        "refused": kept["refused"],
    }
    assert list(kept["refused"]) == ["json_schema"]
    done = {orjson.loads(line)["row"] for line in journal.read_bytes().splitlines()}

    async with serve(
        MockConfig(schema_via="json_object_schema"), port=port_of(server.base_url)
    ) as again:
        result = await run_job(make_job(again.base_url, src, out, concurrency=2))
        sent = {h[:32] for h in again.stats.bodies}
        # No new search: every request of the resume is one of the remaining rows, the settled way.
        assert again.stats.by_outcome == {"ok": n - len(done)}
    assert first >= len(done) + 1
    assert result.ok == n and result.resumed == len(done)
    assert result.schema_via_refused == ("json_schema",)
    rows = read_rows(out)
    expected = expected_hashes(job, "json_object_schema")
    assert [r["request_hash"] for r in rows] == expected
    assert sent == {expected[i] for i in range(n) if i not in done}


async def test_rows_finished_before_the_move_still_resume(tmp_path: Path) -> None:
    """The first row fails for its own reason (too long) while json_schema is still
    tried; a rerun with --retry-failed takes the finished output back without a
    conflict and sends that row the settled way."""
    rows_in = [{"id": "big", "ticket": "word " * 300}, *tickets(4)]
    src = write_jsonl(tmp_path / "in.jsonl", rows_in)
    out = tmp_path / "out.parquet"
    config = MockConfig(schema_via="json_object_schema", context_tokens=200)
    async with serve(config) as server:
        job = make_job(server.base_url, src, out, concurrency=1)
        result = await run_job(job)
        assert server.stats.by_outcome == {"400": 1, "refused:500": 1, "ok": 4}
    assert (result.ok, result.failed, result.schema_via) == (4, 1, "json_object_schema")
    big = read_rows(out)[0]
    assert big["status"] == "error"
    assert big["request_hash"] == expected_hashes(job, "json_schema")[0]

    async with serve(config, port=port_of(server.base_url)) as again:
        rerun = await run_job(make_job(again.base_url, src, out, concurrency=1), retry_failed=True)
        assert again.stats.by_outcome == {"400": 1}  # only the failed row, the settled way
    assert (rerun.ok, rerun.failed, rerun.schema_via) == (4, 1, "json_object_schema")
    assert read_rows(out)[0]["request_hash"] == expected_hashes(job, "json_object_schema")[0]


async def test_reuse_starts_from_the_way_the_earlier_output_recorded(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(5))
    last_night = tmp_path / "last.parquet"
    async with serve(MockConfig(schema_via="vllm")) as server:
        await run_job(make_job(server.base_url, src, last_night))
    async with serve(MockConfig(schema_via="vllm")) as server:
        out = tmp_path / "tonight.parquet"
        result = await run_job(make_job(server.base_url, src, out), reuse=(last_night,))
        assert server.stats.requests == 0
    assert (result.reused, result.ok, result.schema_via) == (5, 5, "vllm")


def test_cli_summary_and_flag(tmp_path: Path, threaded: Any) -> None:
    server = threaded(lambda: serve(MockConfig(schema_via="json_object_schema")))
    write_jsonl(tmp_path / "in.jsonl", tickets(3))
    flags = {
        "--input": "in.jsonl",
        "--prompt-template": "Triage: {ticket}",
        "--model": MODEL,
        "--base-url": server.base_url,
        "--api-key-env": "",
        "--response-schema": str(TRIAGE_SCHEMA),
    }
    common = [part for flag in flags.items() for part in flag]
    result = invoke(*common, "--output", "a.parquet")
    assert_exit(result, 0)
    assert (
        "schema via  json_object_schema (auto: the server does not take json_schema)"
        in result.stderr
    )
    assert "does not take the schema via json_schema (HTTP 500" in result.stderr
    before = server.stats.requests
    result = invoke(*common, "--schema-via", "json_object_schema", "--output", "b.parquet")
    assert_exit(result, 0)
    assert "schema via" not in result.stderr
    assert server.stats.requests - before == 3
    a = [r["request_hash"] for r in read_rows(tmp_path / "a.parquet")]
    b = [r["request_hash"] for r in read_rows(tmp_path / "b.parquet")]
    assert a == b  # auto's bodies are the fixed way's, byte for byte


async def test_openai_batch_bodies_are_sent_as_they_are(tmp_path: Path) -> None:
    """A batch request line's body carries its own response_format: no way to
    change, so a refusal is what it always was (retried, then the row's error)."""
    schema = orjson.loads(TRIAGE_SCHEMA.read_bytes())
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "My invoice is wrong."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
    }
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": body}
    src = write_jsonl(tmp_path / "batch.jsonl", [line])
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(schema_via="json_object_schema")) as server:
        job = load_job(
            None,
            {
                "input": str(src),
                "output": str(out),
                "base_url": server.base_url,
                "api_key_env": "",
                "response_schema": str(TRIAGE_SCHEMA),
                "max_attempts": 2,
            },
        )
        result = await run_job(job)
        assert server.stats.by_outcome == {"refused:500": 2}
    assert (result.failed, result.schema_via_refused) == (1, ())

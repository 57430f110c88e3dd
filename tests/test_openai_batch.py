"""The OpenAI Batch API file format: request lines in, output lines beside the Parquet."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun.cli import main
from batchrun.config import load_job
from batchrun.engines.local import run_job
from batchrun.errors import InputError, JobError
from batchrun.lifecycle import RunOptions
from batchrun.mock import MockConfig, serve
from tests.conftest import REPO, write_jsonl

SAMPLE = REPO / "sample_data" / "openai_batch_requests.jsonl"


def request(custom_id: str, text: str, model: str = "m-1", **body: object) -> dict[str, object]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_sample_file_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--input",
            str(SAMPLE),
            "--output",
            str(out),
            "--mock",
            "-q",
            "--output-format",
            "openai-batch",
        ],
    )
    assert result.exit_code == 0, result.output
    requests = lines(SAMPLE)
    answers = lines(out.with_suffix(".jsonl"))
    assert [a["custom_id"] for a in answers] == [r["custom_id"] for r in requests]
    table = pq.read_table(out).to_pylist()
    for req, ans, row in zip(requests, answers, table, strict=True):
        assert ans["error"] is None
        response = ans["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == req["body"]["model"]
        assert body["choices"][0]["message"]["content"] == row["completion"]
        assert body["usage"]["total_tokens"] == row["total_tokens"]
        assert row["id"] == req["custom_id"] and row["model"] == req["body"]["model"]


async def test_body_is_sent_as_it_is(tmp_path: Path) -> None:
    reqs = [
        request("a", "First one. Done.", seed=3, top_p=0.5),
        request("b", "Second. Yes.", model="m-2"),
    ]
    src = write_jsonl(tmp_path / "batch.jsonl", reqs)
    async with serve(MockConfig()) as server:
        job = load_job(
            None,
            {
                "input": str(src),
                "output": str(tmp_path / "o.parquet"),
                "base_url": server.base_url,
                "api_key_env": "",
            },
        )
        assert job.input_format == "openai-batch"
        result = await run_job(job, RunOptions(progress=False))
        sent = set(server.stats.bodies)
    assert result.ok == 2
    import hashlib

    assert {hashlib.sha256(orjson.dumps(r["body"])).hexdigest() for r in reqs} == sent
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [(r["id"], r["model"]) for r in rows] == [("a", "m-1"), ("b", "m-2")]


async def test_failed_requests_in_the_output_lines(tmp_path: Path) -> None:
    reqs = [request("ok", "Fine. Thanks."), request("long", "word " * 200)]
    src = write_jsonl(tmp_path / "batch.jsonl", reqs)
    out = tmp_path / "o.parquet"
    async with serve(MockConfig(context_tokens=100)) as server:
        job = load_job(
            None,
            {"input": str(src), "output": str(out), "base_url": server.base_url, "api_key_env": ""},
        )
        result = await run_job(job, RunOptions(progress=False, output_format="openai-batch"))
    assert result.exit_code == 1
    ok, long = lines(out.with_suffix(".jsonl"))
    assert ok["response"]["status_code"] == 200
    assert long["response"]["status_code"] == 400
    assert "context_length_exceeded" in long["response"]["body"]["error"]["message"]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ({"custom_id": "", "body": {"messages": []}}, "custom_id"),
        ({"custom_id": "x", "body": {"model": "m"}}, "messages"),
        ({"custom_id": "x", "url": "/v1/embeddings", "body": {"messages": []}}, "embeddings"),
    ],
)
def test_bad_request_lines_name_the_line(
    tmp_path: Path, line: dict[str, object], needle: str
) -> None:
    src = write_jsonl(tmp_path / "batch.jsonl", [request("first", "Hello."), line])
    job = load_job(
        None, {"input": str(src), "output": str(tmp_path / "o.parquet"), "api_key_env": ""}
    )
    from batchrun.checks import check_job

    with pytest.raises(InputError) as err:
        check_job(job, RunOptions())
    assert "line 2" in str(err.value) and needle in str(err.value)


def test_prompt_keys_refused_with_batch_requests(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "batch.jsonl", [request("a", "Hello.")])
    with pytest.raises(JobError, match="sent as they are"):
        load_job(None, {"input": str(src), "prompt_template": "{x}", "model": "m"})
    with pytest.raises(JobError, match='endpoint = "chat"'):
        load_job(None, {"input": str(src), "endpoint": "inference"})


def test_duplicate_custom_ids_are_an_error(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "batch.jsonl", [request("a", "One."), request("a", "Two.")])
    out = tmp_path / "o.parquet"
    result = CliRunner().invoke(
        main, ["run", "--input", str(src), "--output", str(out), "--mock", "-q"]
    )
    assert result.exit_code == 2 and "duplicate ids" in result.output and "'a'" in result.output


def test_plan_counts_the_prompt_and_the_cap_of_each_batch_request(tmp_path: Path) -> None:
    """Batch bodies carry their own max_tokens: plan's prompt tokens are the
    prompts' own (never negative) and the completion cap sums each request's."""
    from batchrun.plan import plan_job

    text = "x" * 400  # 100 estimated prompt tokens
    path = write_jsonl(
        tmp_path / "requests.jsonl",
        [
            request("a", text, max_tokens=16),
            request("b", text, max_tokens=16),
            request("c", text),  # no max_tokens of its own: the job's
        ],
    )
    job = load_job(
        None,
        {"input": path, "output": tmp_path / "out.parquet", "model": "m-1", "max_tokens": 300},
    )
    plan = plan_job(job, RunOptions(mock=True))
    assert plan.to_send == 3
    assert plan.prompt_tokens == 300
    assert plan.max_completion_tokens == 16 + 16 + 300
    text_out = plan.text()
    assert "prompt tokens ~300 " in text_out
    assert "max completion 332 tokens" in text_out


def test_refusals_and_tool_calls_go_back_into_the_message() -> None:
    from batchrun.openai_batch import output_line

    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    row = {
        "id": "a",
        "status": "ok",
        "completion": None,
        "tool_calls": orjson.dumps(calls).decode(),
    }
    assert output_line(row)["response"]["body"]["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": calls,
    }
    row = {"id": "b", "status": "invalid", "completion": None, "refusal": "No."}
    message = output_line(row)["response"]["body"]["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "refusal": "No."}

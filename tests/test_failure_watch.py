"""A job that cannot succeed stops in seconds with its cause (exit 3), and a job
with failed rows says why they failed and how to send them again. Each job
runs through the CLI against servers on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
from aiohttp import web

from tests.conftest import assert_exit, invoke, run_app, tickets, write_jsonl

ROWS = 200


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def counting_app(
    answer: Callable[[dict[str, Any]], web.Response],
) -> tuple[web.Application, list[int]]:
    seen = [0]

    async def chat(request: web.Request) -> web.Response:
        seen[0] += 1
        return answer(orjson.loads(await request.read()))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app, seen


def ok(body: dict[str, Any]) -> web.Response:
    return web.json_response(
        {
            "id": "r",
            "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
    )


def run_cli(base_url: str, tmp_path: Path, *extra: str) -> Any:
    src = write_jsonl(tmp_path / "in.jsonl", tickets(ROWS))
    return invoke(
        "--input", str(src), "--output", str(tmp_path / "out.parquet"), "--model", "m-1",
        "--prompt-template", "{ticket}", "--base-url", base_url, "--api-key-env", "",
        "--concurrency", "8", *extra,
    )  # fmt: skip


def journal_lines(tmp_path: Path) -> int:
    journal = tmp_path / "out.parquet.partial" / "journal.jsonl"
    return journal.read_bytes().count(b"\n") if journal.exists() else 0


def test_an_unreachable_api_stops_the_job_in_seconds(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_cli(f"http://127.0.0.1:{free_port()}/v1", tmp_path)
    took = time.monotonic() - started
    assert_exit(result, 3)
    assert took < 20, took
    assert "cannot connect" in result.output and "Check base_url" in result.output
    assert journal_lines(tmp_path) == 0  # nothing recorded: a rerun sends every row


def test_a_wrong_path_stops_the_job_with_the_path_and_model_to_check(
    tmp_path: Path, threaded: Any
) -> None:
    app = web.Application()  # no route: every POST is a 404
    base_url = threaded(lambda: run_app(app))
    started = time.monotonic()
    result = run_cli(base_url, tmp_path)
    took = time.monotonic() - started
    assert_exit(result, 3)
    assert took < 10, took
    assert "HTTP 404" in result.output and "model id (m-1)" in result.output
    assert journal_lines(tmp_path) == 0


def test_a_refused_field_stops_the_job_and_the_rerun_sends_every_row(
    tmp_path: Path, threaded: Any
) -> None:
    refuse = True

    def answer(body: dict[str, Any]) -> web.Response:
        if refuse:
            return web.json_response(
                {"error": {"message": "Unrecognized request argument supplied: seed"}}, status=400
            )
        return ok(body)

    app, seen = counting_app(answer)
    base_url = threaded(lambda: run_app(app))
    result = run_cli(base_url, tmp_path, "--param", "seed=7")
    assert_exit(result, 3)
    assert "Unrecognized request argument supplied: seed" in result.output
    assert "check the field its message names" in result.output
    assert seen[0] < 20  # not one request per row
    refuse = False
    again = run_cli(base_url, tmp_path, "--param", "seed=7")
    assert_exit(again, 0)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(rows) == ROWS and all(r["status"] == "ok" for r in rows)


def test_after_answers_a_long_run_of_one_failure_stops_the_job(
    tmp_path: Path, threaded: Any
) -> None:
    """The server answers the first rows, then refuses every request the same way."""

    def answer(body: dict[str, Any]) -> web.Response:
        number = int(body["messages"][-1]["content"].split()[2])
        if number < 20:
            return ok(body)
        return web.json_response({"error": {"message": "model unloaded"}}, status=500)

    app, seen = counting_app(answer)
    base_url = threaded(lambda: run_app(app))
    result = run_cli(base_url, tmp_path, "--max-attempts", "1", "--concurrency", "4")
    assert_exit(result, 3)
    assert "the last 50 rows all failed the same way" in result.output
    assert "--retry-failed" in result.output
    assert seen[0] < ROWS


def test_mixed_failures_run_to_the_end_and_the_summary_names_the_causes(
    tmp_path: Path, threaded: Any
) -> None:
    def answer(body: dict[str, Any]) -> web.Response:
        number = int(body["messages"][-1]["content"].split()[2])
        if number % 4 == 1:
            return web.json_response(
                {"error": {"message": f"prompt is {1000 + number} tokens, over the limit"}},
                status=400,
            )
        if number % 4 == 2:
            return web.json_response({"error": {"message": "content filtered"}}, status=422)
        return ok(body)

    app, seen = counting_app(answer)
    base_url = threaded(lambda: run_app(app))
    result = run_cli(base_url, tmp_path)
    assert_exit(result, 1)
    assert seen[0] == ROWS
    assert "failed      50 x HTTP 400" in result.output
    assert "failed      50 x HTTP 422" in result.output
    assert "add --retry-failed to send them again" in result.output

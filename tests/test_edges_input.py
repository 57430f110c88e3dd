"""Inputs and templates at the edges, each refused (exit 2) or kept exact before
anything is sent: Parquet parts that disagree on a keep column's type, ids
beyond 64 bits, templates whose conversion or format spec cannot format text.

Every run talks to a real aiohttp server on 127.0.0.1 that counts what it gets.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from batchrun.cli import main
from tests.conftest import assert_exit, invoke, run_app

pytestmark = pytest.mark.timeout(30)

Threaded = Callable[[Callable[[], Any]], Any]


def echo_app() -> tuple[web.Application, list[dict[str, Any]]]:
    """A chat endpoint answering each prompt with itself; it keeps every body."""
    received: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        received.append(body)
        return web.json_response(
            {
                "id": "cmpl-1",
                "model": "m",
                "choices": [
                    {
                        "message": {"content": body["messages"][-1]["content"]},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app, received


def args_for(src: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    return [
        "--input",
        str(src),
        "--output",
        str(out),
        "--model",
        "m",
        "--base-url",
        base_url,
        "--api-key-env",
        "",
        "--max-attempts",
        "1",
        *extra,
    ]


def plan(*args: str) -> Result:
    return CliRunner().invoke(main, ["plan", *args], catch_exceptions=True)


def one_paragraph(result: Result) -> str:
    assert result.stderr.startswith("batchrun: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return str(result.stderr)


# ---- Parquet parts that disagree on a keep column's type ---------------------------------


def write_parts(folder: Path, *tables: pa.Table) -> list[Path]:
    folder.mkdir()
    paths = []
    for i, table in enumerate(tables):
        paths.append(folder / f"part-{i}.parquet")
        pq.write_table(table, paths[-1])
    return paths


def test_parts_with_two_types_for_a_keep_column_stop_plan_and_run(
    tmp_path: Path, threaded: Threaded
) -> None:
    first, second = write_parts(
        tmp_path / "in",
        pa.table({"id": ["a", "b"], "text": ["x", "y"], "team": pa.array([1, 2], pa.int64())}),
        pa.table({"id": ["c", "d"], "text": ["z", "w"], "team": ["ops", "dev"]}),
    )
    app, received = echo_app()
    base_url = threaded(lambda: run_app(app))
    args = args_for(
        tmp_path / "in",
        tmp_path / "out.parquet",
        base_url,
        "--prompt-template",
        "{text}",
        "--keep-columns",
        "team",
    )
    for result in (plan(*args), invoke(*args, "-q")):
        assert_exit(result, 2)
        message = one_paragraph(result)
        assert (
            f"Input parts disagree on the type of keep column `team`: {first} has int64, "
            f"{second} has string." in message
        )
    assert received == []
    assert not (tmp_path / "out.parquet").exists()


def test_parts_whose_types_widen_without_loss_are_joined(
    tmp_path: Path, threaded: Threaded
) -> None:
    write_parts(
        tmp_path / "in",
        pa.table(
            {
                "id": ["a", "b"],
                "text": ["x", "y"],
                "n": pa.array([1, 2], pa.int32()),
                "label": pa.array(["p", "q"]).dictionary_encode(),
            }
        ),
        pa.table(
            {
                "id": ["c"],
                "text": ["z"],
                "n": pa.array([2**40], pa.int64()),
                "label": pa.array(["r"], pa.string()),
            }
        ),
    )
    app, received = echo_app()
    base_url = threaded(lambda: run_app(app))
    out = tmp_path / "out.parquet"
    args = args_for(
        tmp_path / "in", out, base_url, "--prompt-template", "{text}", "--keep-columns", "n,label"
    )
    assert_exit(invoke(*args, "-q"), 0)
    assert len(received) == 3
    table = pq.read_table(out)
    assert table.schema.field("n").type == pa.int64()
    assert table.schema.field("label").type == pa.string()
    assert table.column("n").to_pylist() == [1, 2, 2**40]
    assert table.column("label").to_pylist() == ["p", "q", "r"]


def test_int64_and_float_parts_are_not_joined(tmp_path: Path) -> None:
    """int64 → float64 would change ids and counts past 2**53: refused, not rounded."""
    write_parts(
        tmp_path / "in",
        pa.table({"text": ["x"], "n": pa.array([2**53 + 1], pa.int64())}),
        pa.table({"text": ["y"], "n": pa.array([0.5], pa.float64())}),
    )
    args = args_for(
        tmp_path / "in",
        tmp_path / "o.parquet",
        "http://127.0.0.1:9/v1",
        "--prompt-template",
        "{text}",
        "--keep-columns",
        "n",
    )
    result = plan(*args)
    assert_exit(result, 2)
    assert "has int64" in result.stderr and "has double" in result.stderr

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


# ---- templates whose conversion or format spec cannot format text ------------------------


def write_texts(path: Path, n: int = 2) -> Path:
    rows = [{"id": f"r{i}", "text": f"row {i}", "n": [7, 2.5][i % 2]} for i in range(n)]
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "Say {text!x}",
            "`prompt_template` has {text!x}, an unknown conversion: the only ones are !s, !r and "
            "!a. Write {text} to put the value in as it is.",
        ),
        (
            "Say {text:d}",
            "`prompt_template` has {text:d}, a format spec that fits none of the values of `text` "
            "in the input's first 2 rows (they hold text: Unknown format code 'd' for object of "
            "type 'str'), so every row would fail. Drop :d, or use a spec made for text",
        ),
        (
            "Say {n:s}",
            "`prompt_template` has {n:s}, a format spec that fits none of the values of `n` in "
            "the input's first 2 rows (they hold numbers and whole numbers: Unknown format code "
            "'s' for object of type 'int'), so every row would fail.",
        ),
        (
            "Say {text!s:.2f}",
            "`prompt_template` has {text!s:.2f}: !s makes the value text, and :.2f cannot format "
            "text (Unknown format code 'f' for object of type 'str').",
        ),
    ],
)
def test_templates_that_cannot_format_text_stop_plan_and_run(
    tmp_path: Path, threaded: Threaded, template: str, message: str
) -> None:
    src = write_texts(tmp_path / "in.jsonl")
    app, received = echo_app()
    base_url = threaded(lambda: run_app(app))
    args = args_for(src, tmp_path / "out.parquet", base_url, "--prompt-template", template)
    for result in (plan(*args), invoke(*args, "-q")):
        assert_exit(result, 2)
        assert message in one_paragraph(result)
    assert received == []


def test_conversions_and_text_format_specs_still_work(tmp_path: Path, threaded: Threaded) -> None:
    src = write_texts(tmp_path / "in.jsonl")
    app, _ = echo_app()
    base_url = threaded(lambda: run_app(app))
    out = tmp_path / "out.parquet"
    template = "{text!r:>9}|{text:.3}|{text!a}|{n:.2f}"
    args = args_for(src, out, base_url, "--prompt-template", template)
    assert_exit(invoke(*args, "-q"), 0)
    assert pq.read_table(out).column("completion").to_pylist() == [
        "  'row 0'|row|'row 0'|7.00",
        "  'row 1'|row|'row 1'|2.50",
    ]


def test_a_numeric_spec_over_a_column_of_numbers_with_one_odd_value_passes(
    tmp_path: Path, threaded: Threaded
) -> None:
    """Only a spec that fits none of the first rows stops the job; one odd value
    is that row's error, as before."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"score": 0.25}\n{"score": "high"}\n')
    app, received = echo_app()
    base_url = threaded(lambda: run_app(app))
    out = tmp_path / "out.parquet"
    assert_exit(invoke(*args_for(src, out, base_url, "--prompt-template", "{score:.1f}"), "-q"), 1)
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert len(received) == 1


# ---- ids beyond 64 bits ----------------------------------------------------------------

BIG_A, BIG_B = 123456789012345678901, 123456789012345678902  # the same as floats
BELOW_INT64 = -(2**63) - 1


def test_ids_beyond_64_bits_stay_exact_and_distinct(tmp_path: Path, threaded: Threaded) -> None:
    assert float(BIG_A) == float(BIG_B)
    src = tmp_path / "in.jsonl"
    src.write_text(
        f'{{"id": {BIG_A}, "text": "a", "ref": {BIG_B}}}\n'
        f'{{"id": {BIG_B}, "text": "b", "ref": 1}}\n'
        f'{{"id": {BELOW_INT64}, "text": "c", "ref": {2**64 - 1}}}\n'
        f'{{"id": 9, "text": "d {BIG_A}", "ref": null}}\n'
    )
    app, received = echo_app()
    base_url = threaded(lambda: run_app(app))
    out = tmp_path / "out.parquet"
    args = args_for(
        src, out, base_url, "--prompt-template", "{id}: {text}", "--keep-columns", "ref"
    )
    assert_exit(plan(*args), 0)
    assert_exit(invoke(*args, "-q"), 0)
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == [str(BIG_A), str(BIG_B), str(BELOW_INT64), "9"]
    assert [r["completion"] for r in rows] == [
        f"{BIG_A}: a",
        f"{BIG_B}: b",
        f"{BELOW_INT64}: c",
        f"9: d {BIG_A}",
    ]
    assert [r["ref"] for r in rows] == [str(BIG_B), "1", str(2**64 - 1), None]
    assert len(received) == 4

"""The Python API: ``batchrun.run`` / ``await batchrun.arun`` → a pandas DataFrame.

Inputs as a path (JSONL, Parquet), a DataFrame, a pyarrow Table or dicts; the fixed
output schema in input order (plus typed columns for a structured job); ``output=``
and resume; running from inside an event loop (notebooks); errors as
``batchrun.BatchrunError`` subclasses carrying the CLI's message; a failed row is a
row; ``DataFrame.attrs["batchrun"]``.

Jobs run against the embedded endpoint (``mock=True``, in-process) or a real aiohttp
server on 127.0.0.1 in the test's own loop (``base_url=...``, ``api_key_env=""``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from click.testing import CliRunner

import batchrun
from batchrun import errors
from batchrun.cli import main
from batchrun.errors import BatchrunError, InputError, JobError
from batchrun.mock import MockConfig, serve
from batchrun.outputs import HEAD_FIELDS, RESULT_FIELDS
from tests.conftest import REPO, run_app, tickets, write_jsonl

pytestmark = pytest.mark.timeout(30)

MODEL = "test-org/test-model-7b"
TEMPLATE = "Summarize: {ticket}"
TRIAGE_SCHEMA = REPO / "jobs" / "triage_schema.json"
FIXED = [f.name for f in [*HEAD_FIELDS, *RESULT_FIELDS]]
TRIAGE_COLUMNS = ["summary", "category", "urgency", "needs_human"]
CATEGORIES = {"billing", "login", "bug", "feature_request", "data_export", "integrations", "other"}
JOB = {"prompt_template": TEMPLATE, "model": MODEL, "progress": False}


def expected_completion(i: int) -> str:
    """What the mock answers to ``TEMPLATE`` over ``tickets(n)[i]``."""
    return f"Summary: Summarize: Ticket number {i} is broken. Please fix it soon."


def expected(n: int) -> list[str]:
    return [expected_completion(i) for i in range(n)]


def ticket_number(body: dict[str, Any]) -> int:
    match = re.search(r"Ticket number (\d+)", body["messages"][-1]["content"])
    assert match
    return int(match.group(1))


def chat(content: str, prompt: int = 10, completion: int = 5) -> web.Response:
    return web.json_response(
        {
            "id": "cmpl-1",
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        }
    )


@contextlib.asynccontextmanager
async def serve_scripted(
    answer: Callable[[dict[str, Any]], web.Response],
) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A scripted endpoint in the current loop: yields (base_url, bodies received)."""
    bodies: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        bodies.append(body)
        return answer(body)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with run_app(app) as base_url:
        yield base_url, bodies


# ---- 1. the package surface --------------------------------------------------------


def test_import_is_lazy_and_exports_the_api() -> None:
    code = (
        "import sys, batchrun\n"
        "assert 'batchrun.api' not in sys.modules and 'pandas' not in sys.modules, sorted(sys.modules)\n"
        "from batchrun import api, errors\n"
        "assert batchrun.run is api.run and batchrun.arun is api.arun\n"
        "assert batchrun.BatchrunError is errors.BatchrunError\n"
        "assert set(batchrun.__all__) >= {'run', 'arun', 'BatchrunError'}\n"
        "try:\n"
        "    batchrun.nope\n"
        "except AttributeError as exc:\n"
        "    assert 'nope' in str(exc)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr


def test_every_job_error_is_a_batchrun_error() -> None:
    for name in ("JobError", "InputError", "OutputError", "ResumeConflict", "JobStopped"):
        cls = getattr(errors, name)
        assert issubclass(cls, batchrun.BatchrunError), name


# ---- 2. inputs and the returned DataFrame --------------------------------------------


def test_run_dataframe_returns_rows_in_input_order(tmp_path: Path) -> None:
    rows = tickets(24)
    frame = pd.DataFrame(rows).iloc[::-1]  # reversed, with a non-default index
    df = batchrun.run(input=frame, mock=True, concurrency=8, **JOB)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == FIXED
    assert list(df["id"]) == [r["id"] for r in reversed(rows)]
    assert list(df["row"]) == list(range(24))
    assert list(df.index) == list(range(24))
    assert (df["status"] == "ok").all() and df["error"].isna().all()
    assert list(df["completion"]) == list(reversed(expected(24)))
    assert (df["model"] == MODEL).all()
    assert (df["prompt_tokens"] > 0).all() and (df["total_tokens"] > df["prompt_tokens"]).all()
    assert str(df["started_at"].dtype) == "datetime64[us, UTC]"
    assert df.attrs["batchrun"]["ok"] == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left in the cwd


def test_keep_columns_from_a_dataframe(tmp_path: Path) -> None:
    frame = pd.DataFrame(tickets(5)).assign(priority=[1, 2, None, 4, 5])
    df = batchrun.run(input=frame, mock=True, keep_columns=["customer", "priority"], **JOB)
    assert list(df.columns) == ["id", "row", "customer", "priority", *FIXED[2:]]
    assert list(df["customer"]) == [f"Customer {i}" for i in range(5)]
    assert df["priority"].iloc[0] == 1 and pd.isna(df["priority"].iloc[2])


def _as_input(kind: str, tmp_path: Path, rows: list[dict[str, Any]]) -> Any:
    if kind == "jsonl-str":
        write_jsonl(tmp_path / "in.jsonl", rows)
        return "in.jsonl"  # keyword paths are relative to the working directory
    if kind == "jsonl-path":
        return write_jsonl(tmp_path / "sub.jsonl", rows)
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
        return tmp_path / "in.parquet"
    if kind == "parquet-folder":
        (tmp_path / "parts").mkdir()
        pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "parts" / "part-0.parquet")
        pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "parts" / "part-1.parquet")
        return str(tmp_path / "parts")
    if kind == "table":
        return pa.Table.from_pylist(rows)
    if kind == "list":
        return rows
    if kind == "generator":
        return (dict(r) for r in rows)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["jsonl-str", "jsonl-path", "parquet", "parquet-folder", "table", "list", "generator"]
)
def test_input_forms(tmp_path: Path, kind: str) -> None:
    rows = tickets(7)
    df = batchrun.run(input=_as_input(kind, tmp_path, rows), mock=True, **JOB)
    assert list(df.columns) == FIXED
    assert list(df["id"]) == [r["id"] for r in rows]
    assert list(df["completion"]) == expected(7)
    assert df.attrs["batchrun"]["rows"] == 7


def test_input_as_list_of_dicts_without_ids_numbers_the_rows() -> None:
    rows = [{"ticket": r["ticket"]} for r in tickets(3)]
    df = batchrun.run(input=rows, mock=True, **JOB)
    assert list(df["id"]) == ["0", "1", "2"]
    assert list(df["completion"]) == expected(3)


@pytest.mark.parametrize("bad", [[1, 2, 3], [{"ticket": "Ticket number 0 is broken."}, "oops"]])
def test_input_of_non_dicts_is_a_job_error(bad: list[Any]) -> None:
    with pytest.raises(JobError, match="`input` must be a path, a pandas DataFrame"):
        batchrun.run(input=bad, mock=True, **JOB)


def test_input_that_is_not_a_table_is_a_job_error() -> None:
    with pytest.raises(JobError, match="`input` must be a path, a pandas DataFrame") as info:
        batchrun.run(input=5, mock=True, **JOB)
    assert isinstance(info.value, batchrun.BatchrunError)


def test_structured_job_returns_typed_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame(tickets(10))
    df = batchrun.run(input=frame, mock=True, response_schema=str(TRIAGE_SCHEMA), **JOB)
    assert list(df.columns) == [*FIXED, *TRIAGE_COLUMNS]
    assert (df["status"] == "ok").all()
    assert isinstance(df["category"].dtype, pd.CategoricalDtype)
    assert set(df["category"]) <= CATEGORIES
    assert df["urgency"].dtype == "int64" and df["urgency"].between(1, 5).all()
    assert df["needs_human"].dtype == "bool"
    assert df["summary"].str.len().gt(0).all()


# ---- 3. output= and resume -------------------------------------------------------------


async def test_output_is_written_and_a_second_call_resumes(tmp_path: Path) -> None:
    rows = tickets(12)
    out = tmp_path / "out.parquet"
    async with serve(MockConfig()) as server:
        keys = {"base_url": server.base_url, "api_key_env": "", **JOB}
        first = await batchrun.arun(input=pd.DataFrame(rows), output=out, **keys)
        assert server.stats.requests == 12
        assert out.exists()
        on_disk = pd.read_parquet(out)
        pd.testing.assert_frame_equal(first, on_disk)
        assert first.attrs["batchrun"]["output"] == str(out)
        assert first.attrs["batchrun"]["requests"] == 12

        second = await batchrun.arun(input=pd.DataFrame(rows), output=str(out), **keys)
        assert server.stats.requests == 12  # nothing sent again
    assert second.attrs["batchrun"]["requests"] == 0
    assert second.attrs["batchrun"]["resumed"] == 12 and second.attrs["batchrun"]["ok"] == 12
    assert list(second["completion"]) == list(first["completion"]) == expected(12)
    assert list(second["request_hash"]) == list(first["request_hash"])


def test_sync_run_resumes_a_structured_output(tmp_path: Path) -> None:
    rows = tickets(6)
    keys = {
        "input": rows,
        "output": "out.parquet",
        "mock": True,
        "response_schema": str(TRIAGE_SCHEMA),
        **JOB,
    }
    first = batchrun.run(**keys)
    second = batchrun.run(**keys)
    assert (tmp_path / "out.parquet").exists()
    assert second.attrs["batchrun"]["requests"] == 0 and second.attrs["batchrun"]["resumed"] == 6
    for column in TRIAGE_COLUMNS:
        assert list(second[column]) == list(first[column]), column
    assert isinstance(second["category"].dtype, pd.CategoricalDtype)


def test_changed_job_on_an_existing_output_is_a_resume_conflict(tmp_path: Path) -> None:
    rows = tickets(3)
    batchrun.run(input=rows, output="out.parquet", mock=True, **JOB)
    with pytest.raises(errors.ResumeConflict, match=r"written by a different job .*`max_tokens`"):
        batchrun.run(input=rows, output="out.parquet", mock=True, max_tokens=7, **JOB)
    again = batchrun.run(
        input=rows, output="out.parquet", mock=True, max_tokens=7, restart=True, **JOB
    )
    assert again.attrs["batchrun"]["requests"] == 3


def test_without_output_nothing_is_left_behind(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", tickets(2))
    df = batchrun.run(input="in.jsonl", mock=True, **JOB)
    assert len(df) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    assert df.attrs["batchrun"]["output"] is None  # it lived in a temporary folder, now gone


def test_job_file_with_keyword_overrides(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    write_jsonl(jobs / "in.jsonl", tickets(4))
    (jobs / "job.toml").write_text(
        f'input = "in.jsonl"\noutput = "result.parquet"\nmodel = "{MODEL}"\n'
        f'prompt_template = "{TEMPLATE}"\nmax_tokens = 512\n'
    )
    df = batchrun.run("jobs/job.toml", mock=True, progress=False, max_tokens=4)
    assert (jobs / "result.parquet").exists()  # the file's output, relative to the job file
    assert Path(df.attrs["batchrun"]["output"]).resolve() == jobs / "result.parquet"
    assert (df["finish_reason"] == "length").all()  # the keyword max_tokens won
    assert (df["completion_tokens"] == 4).all()
    meta = orjson.loads(pq.read_schema(jobs / "result.parquet").metadata[b"batchrun"])
    assert meta["job"]["max_tokens"] == 4


# ---- 4. event loops --------------------------------------------------------------------


async def test_run_inside_a_running_event_loop() -> None:
    asyncio.get_running_loop()  # as in a notebook cell
    df = batchrun.run(input=tickets(5), mock=True, **JOB)
    assert list(df["completion"]) == expected(5)
    with pytest.raises(JobError, match="Unknown key `temprature`"):
        batchrun.run(input=tickets(1), mock=True, temprature=0.1, **JOB)


async def test_arun_is_awaited() -> None:
    df = await batchrun.arun(input=tickets(4), mock=True, **JOB)
    assert list(df["completion"]) == expected(4)
    assert df.attrs["batchrun"]["ok"] == 4


async def test_two_aruns_at_once(tmp_path: Path) -> None:
    a, b = await asyncio.gather(
        batchrun.arun(input=tickets(6), output="a.parquet", mock=True, **JOB),
        batchrun.arun(input=tickets(3), output="b.parquet", mock=True, max_tokens=3, **JOB),
    )
    assert len(a) == 6 and (a["status"] == "ok").all()
    assert len(b) == 3 and (b["finish_reason"] == "length").all()
    assert a.attrs["batchrun"]["run_id"] != b.attrs["batchrun"]["run_id"]


# ---- 5. rows that fail, and attrs ---------------------------------------------------------


async def test_a_failed_row_is_a_row_not_an_exception() -> None:
    def answer(body: dict[str, Any]) -> web.Response:
        i = ticket_number(body)
        if i == 1:
            return web.json_response(
                {"error": {"code": "bad_request", "message": "too odd"}}, status=400
            )
        if i == 2:
            return chat('{"summary": 5}')
        return chat('{"summary": "fine"}', prompt=7, completion=3)

    async with serve_scripted(answer) as (base_url, bodies):
        df = await batchrun.arun(
            input=tickets(4),
            base_url=base_url,
            api_key_env="",
            response_format="json_object",
            max_parse_attempts=1,
            **JOB,
        )
    assert len(bodies) == 4
    assert list(df["status"]) == ["ok", "error", "ok", "ok"]
    assert df["error"].iloc[1] == "HTTP 400: bad_request: too odd"
    assert df["http_status"].iloc[1] == 400 and pd.isna(df["completion"].iloc[1])
    info = df.attrs["batchrun"]
    assert (info["ok"], info["failed"], info["invalid"], info["rows"]) == (3, 1, 0, 4)
    assert info["requests"] == 4 and info["exit_code"] == 1
    assert info["prompt_tokens"] == int(df["prompt_tokens"].sum())


async def test_an_invalid_row_keeps_its_answer_with_null_typed_columns() -> None:
    def answer(body: dict[str, Any]) -> web.Response:
        if ticket_number(body) == 0:
            return chat(
                '{"summary": "s", "category": "bug", "urgency": "high", "needs_human": true}'
            )
        return chat('{"summary": "s", "category": "login", "urgency": 2, "needs_human": false}')

    async with serve_scripted(answer) as (base_url, bodies):
        df = await batchrun.arun(
            input=tickets(3),
            base_url=base_url,
            api_key_env="",
            response_schema=str(TRIAGE_SCHEMA),
            **JOB,
        )
    assert len(bodies) == 2 + 2  # the invalid row was asked twice (max_parse_attempts = 2)
    assert list(df["status"]) == ["invalid", "ok", "ok"]
    assert df["error"].iloc[0] == "urgency: 'high' is not of type 'integer'"
    assert '"urgency": "high"' in df["completion"].iloc[0]
    assert df["attempts"].iloc[0] == 2 and df["prompt_tokens"].iloc[0] == 20
    assert df[TRIAGE_COLUMNS].iloc[0].isna().all()
    assert list(df["category"].iloc[1:]) == ["login", "login"]
    assert list(df["urgency"].iloc[1:]) == [2, 2]
    info = df.attrs["batchrun"]
    assert (info["ok"], info["invalid"], info["failed"], info["exit_code"]) == (2, 1, 0, 1)


def test_attrs_summarise_the_run() -> None:
    df = batchrun.run(input=tickets(5), mock=True, **JOB)
    info = df.attrs["batchrun"]
    assert {"ok", "failed", "invalid", "requests", "rows", "run_id", "output", "exit_code"} <= set(
        info
    )
    assert (info["rows"], info["ok"], info["failed"], info["requests"], info["exit_code"]) == (
        5,
        5,
        0,
        5,
        0,
    )
    assert info["prompt_tokens"] == int(df["prompt_tokens"].sum())
    assert info["completion_tokens"] == int(df["completion_tokens"].sum())
    assert re.fullmatch(r"[0-9a-f]{12}", info["run_id"])
    orjson.dumps(info)  # plain values


# ---- 6. bad jobs: BatchrunError with the CLI's message -----------------------------------


def _cli_message(*args: str) -> str:
    result = CliRunner().invoke(main, ["run", *args], catch_exceptions=True)
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert err.startswith("batchrun: ") and err.endswith("\n")
    return err[len("batchrun: ") : -1]


@pytest.mark.parametrize(
    ("case", "error", "fragment"),
    [
        ("missing-schema", JobError, "Schema file nope.json does not exist"),
        ("bad-schema", JobError, "must describe an object with properties"),
        ("clashing-schema", JobError, "already writes: status"),
        (
            "json-schema-without-schema",
            JobError,
            'is "json_schema" in job.toml but no `response_schema`',
        ),
        (
            "unknown-key",
            JobError,
            "Unknown key `max_token` in job.toml. Did you mean `max_tokens`?",
        ),
        ("owned-param", JobError, "`params` in job.toml sets `model`"),
        ("authorization-header", JobError, "sets Authorization"),
        ("missing-input", InputError, "missing.jsonl"),
        ("unknown-column", InputError, "uses column `nope`"),
    ],
)
def test_bad_job_raises_the_cli_message(
    tmp_path: Path, case: str, error: type[BatchrunError], fragment: str
) -> None:
    write_jsonl(tmp_path / "in.jsonl", tickets(3))
    (tmp_path / "schema.json").write_text('{"type": "array"}')
    lines = [
        'input = "in.jsonl"',
        'model = "m"',
        f'prompt_template = "{TEMPLATE}"',
        'output = "out.parquet"',
    ]
    if case == "missing-schema":
        lines.append('response_schema = "nope.json"')
    elif case == "bad-schema":
        lines.append('response_schema = "schema.json"')
    elif case == "clashing-schema":
        (tmp_path / "clash.json").write_text(
            '{"type": "object", "properties": {"status": {"type": "string"}}}'
        )
        lines.append('response_schema = "clash.json"')
    elif case == "json-schema-without-schema":
        lines.append('response_format = "json_schema"')
    elif case == "unknown-key":
        lines.append("max_token = 5")
    elif case == "owned-param":
        lines.append('[params]\nmodel = "other"')
    elif case == "authorization-header":
        lines.append('[headers]\nAuthorization = "Bearer x"')
    elif case == "missing-input":
        lines[0] = 'input = "missing.jsonl"'
    elif case == "unknown-column":
        lines[2] = 'prompt_template = "Summarize: {nope}"'
    (tmp_path / "job.toml").write_text("\n".join(lines) + "\n")

    with pytest.raises(error) as info:
        batchrun.run("job.toml", mock=True, progress=False)
    exc = info.value
    assert isinstance(exc, batchrun.BatchrunError) and exc.exit_code == 2
    assert fragment in str(exc)
    assert str(exc) == _cli_message("job.toml", "--mock", "-q")
    assert not (tmp_path / "out.parquet").exists()
    assert not (tmp_path / "out.parquet.partial").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("temperature", "hot", "must be a number, not str ('hot')."),
        ("temperature", 5, "is 5.0; it must be at most 2."),
        ("max_tokens", 0, "is 0; it must be at least 1."),
        ("max_tokens", 1.5, "must be a whole number, not 1.5."),
        ("max_parse_attempts", 0, "is 0; it must be at least 1."),
        ("stream", "yes", "must be true or false, not 'yes'."),
        ("response_format", "xml", "is 'xml'; it must be one of: text, json_object, json_schema."),
        ("concurrency", "lots", "must be a whole number or \"auto\", not 'lots'."),
        ("keep_columns", 5, "must be a list of column names"),
        ("params", "top_k=3", "must be a table"),
    ],
)
def test_keyword_keys_get_the_toml_checks(
    tmp_path: Path, key: str, value: Any, message: str
) -> None:
    write_jsonl(tmp_path / "in.jsonl", tickets(1))
    with pytest.raises(JobError) as from_keyword:
        batchrun.run(input="in.jsonl", mock=True, **{**JOB, key: value})
    assert str(from_keyword.value).startswith(f"`{key}` (keyword argument) ")
    assert message in str(from_keyword.value)
    toml_value = orjson.dumps(value).decode()
    body = 'input = "in.jsonl"\nmodel = "m"\nprompt_template = "x {ticket}"\n'
    if key == "params":
        toml_value = '"top_k=3"'
    (tmp_path / "job.toml").write_text(body + f"{key} = {toml_value}\n")
    with pytest.raises(JobError) as from_file:
        batchrun.run("job.toml", mock=True, progress=False)
    assert str(from_file.value).startswith(f"`{key}` in job.toml ")
    # the same words after the source
    assert (
        str(from_keyword.value).split(") ", 1)[1] == str(from_file.value).split("job.toml ", 1)[1]
    )


def test_unknown_keyword_suggests_the_key() -> None:
    with pytest.raises(JobError) as info:
        batchrun.run(input=tickets(1), mock=True, temprature=0.2, **JOB)
    message = str(info.value)
    assert message.startswith(
        "Unknown key `temprature` in keyword argument. Did you mean `temperature`?"
    )
    assert "Known keys: input, " in message and ", temperature, " in message
    with pytest.raises(
        JobError, match=r"Unknown key `respons_schema` .*Did you mean `response_schema`\?"
    ):
        batchrun.run(input=tickets(1), mock=True, respons_schema="s.json", **JOB)


def test_run_error_traceback_is_only_the_batchrun_error() -> None:
    import traceback

    with pytest.raises(JobError) as info:
        batchrun.run(input=tickets(1), mock=True, temprature=0.2, **JOB)
    shown = "".join(traceback.format_exception(info.value))
    assert "no running event loop" not in shown
    assert "During handling of the above exception" not in shown


def test_missing_required_keywords() -> None:
    with pytest.raises(JobError, match=r"No `model` given"):
        batchrun.run(input=tickets(1), prompt_template=TEMPLATE, mock=True, progress=False)
    with pytest.raises(JobError, match=r"Set exactly one of `prompt_template`"):
        batchrun.run(input=tickets(1), model=MODEL, mock=True, progress=False)


def test_header_variable_missing_from_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(JobError, match=r"Header `X-Token` uses \$\{NOT_SET_ANYWHERE\}"):
        batchrun.run(input=tickets(1), mock=True, headers={"X-Token": "${NOT_SET_ANYWHERE}"}, **JOB)


async def test_headers_and_params_from_keywords_are_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORG_TOKEN", "tok-123456789")
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append({"headers": dict(request.headers), "body": await request.json()})
        return chat("ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with run_app(app) as base_url:
        df = await batchrun.arun(
            input=tickets(2),
            base_url=base_url,
            api_key_env="",
            headers={"X-Org-Token": "${ORG_TOKEN}"},
            params={"top_k": 5, "seed": 1},
            **JOB,
        )
    assert (df["status"] == "ok").all()
    assert len(seen) == 2
    for s in seen:
        assert s["headers"]["X-Org-Token"] == "tok-123456789"
        assert s["body"]["top_k"] == 5 and s["body"]["seed"] == 1

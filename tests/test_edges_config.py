"""Keys, header values and base URLs that aiohttp cannot send: a key mounted from
a file (trailing newline) is stripped with a warning; a control character
inside the key or a header value, and a URL with a bad port, no host or a bad
scheme, stop ``plan`` and ``run`` alike (exit 2, one paragraph, no traceback)
before anything is sent. Runs talk to a real aiohttp server on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from batchrun.cli import main
from tests.conftest import REPO, TEST_KEY, assert_exit, invoke, run_app, tickets, write_jsonl

pytestmark = pytest.mark.timeout(30)

Threaded = Callable[[Callable[[], Any]], Any]


def recording_app() -> tuple[web.Application, list[dict[str, str]]]:
    received: list[dict[str, str]] = []

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        received.append(dict(request.headers))
        return web.json_response(
            {
                "id": "cmpl-1",
                "model": "m",
                "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app, received


def job_args(tmp_path: Path, base_url: str, *extra: str) -> list[str]:
    write_jsonl(tmp_path / "in.jsonl", tickets(2))
    return [
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "out.parquet"),
        "--model",
        "m",
        "--prompt-template",
        "Summarize: {ticket}",
        "--base-url",
        base_url,
        *extra,
    ]


def plan(*args: str) -> Result:
    return CliRunner().invoke(main, ["plan", *args], catch_exceptions=True)


def assert_refused(result: Result, message: str) -> None:
    assert_exit(result, 2)
    assert result.stderr.startswith("batchrun: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one paragraph, no traceback
    assert message in result.stderr, result.stderr


# ---- the key ---------------------------------------------------------------------------


WARNING = (
    "The API key in $LLMTUNE_API_KEY has surrounding whitespace (a trailing newline?); "
    "batchrun strips it."
)


@pytest.mark.parametrize("mounted", [f"{TEST_KEY}\n", f"  {TEST_KEY}\r\n", f"\t{TEST_KEY} "])
def test_whitespace_around_the_key_is_stripped_with_a_warning(
    tmp_path: Path, threaded: Threaded, monkeypatch: pytest.MonkeyPatch, mounted: str
) -> None:
    monkeypatch.setenv("LLMTUNE_API_KEY", mounted)
    app, received = recording_app()
    base_url = threaded(lambda: run_app(app))
    result = invoke(*job_args(tmp_path, base_url), "-q")
    assert_exit(result, 0)
    assert WARNING in result.stderr
    assert TEST_KEY not in result.output + result.stderr
    assert [r["Authorization"] for r in received] == [f"Bearer {TEST_KEY}"] * 2


def test_plan_warns_of_a_stripped_key_too(tmp_path: Path) -> None:
    """As a real process: plan sets up no log handler of its own."""
    env = {**os.environ, "LLMTUNE_API_KEY": TEST_KEY + "\n", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "batchrun", "plan", *job_args(tmp_path, "http://127.0.0.1:9/v1")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert WARNING in done.stderr
    assert TEST_KEY not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (f"{TEST_KEY}\nsk-second-key", r"'\n' at position 31"),
        (f"sk-\r{TEST_KEY}", r"'\r' at position 3"),
        (f"{TEST_KEY}\x1b[0m", r"'\x1b' at position 31"),
    ],
)
def test_a_control_character_inside_the_key_stops_plan_and_run(
    tmp_path: Path, threaded: Threaded, monkeypatch: pytest.MonkeyPatch, value: str, shown: str
) -> None:
    monkeypatch.setenv("LLMTUNE_API_KEY", value)
    app, received = recording_app()
    base_url = threaded(lambda: run_app(app))
    args = job_args(tmp_path, base_url)
    for result in (plan(*args), invoke(*args, "-q")):
        assert_refused(
            result, f"The API key in $LLMTUNE_API_KEY holds a control character ({shown})"
        )
        assert TEST_KEY not in result.stderr
    assert received == []
    assert not (tmp_path / "out.parquet.partial").exists()


def test_a_key_of_only_whitespace_is_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMTUNE_API_KEY", "\n")
    result = plan(*job_args(tmp_path, "http://127.0.0.1:9/v1"))
    assert_refused(
        result, "No API key: the environment variable LLMTUNE_API_KEY holds only whitespace"
    )


# ---- header values ---------------------------------------------------------------------


def test_whitespace_around_a_header_secret_is_stripped_and_still_redacted(
    tmp_path: Path, threaded: Threaded, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANT_TOKEN", "tok-5e6f7a8b\n")
    app, received = recording_app()
    base_url = threaded(lambda: run_app(app))
    args = job_args(tmp_path, base_url, "--header", "X-Tenant=${TENANT_TOKEN}")
    result = invoke(*args, "-q")
    assert_exit(result, 0)
    assert (
        "The value of $TENANT_TOKEN (header `X-Tenant`) has surrounding whitespace" in result.stderr
    )
    assert [r["X-Tenant"] for r in received] == ["tok-5e6f7a8b"] * 2
    assert "5e6f7a8b" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--header", "X-Tenant=${TENANT_TOKEN}"],
            "tok\r\nX-Injected: 1",
            "Header `X-Tenant` in `headers` (${VAR} filled in) holds a control character ('\\r' at position 3)",
        ),
        (
            ["--header", "X-Tenant=a\nb"],
            None,
            "Header `X-Tenant` in the flags holds a control character ('\\n' at position 1)",
        ),
        (
            ["--header", "X Tenant=a"],
            None,
            "Header name 'X Tenant' in the flags is not a valid HTTP header name",
        ),
    ],
)
def test_headers_http_cannot_carry_stop_plan_and_run(
    tmp_path: Path,
    threaded: Threaded,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: str | None,
    message: str,
) -> None:
    if env is not None:
        monkeypatch.setenv("TENANT_TOKEN", env)
    app, received = recording_app()
    base_url = threaded(lambda: run_app(app))
    full = job_args(tmp_path, base_url, *args)
    for result in (plan(*full), invoke(*full, "-q")):
        assert_refused(result, message)
        assert "X-Injected" not in result.stderr
    assert received == []


def test_a_header_value_in_the_job_file_is_checked_too(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", tickets(1))
    (tmp_path / "job.toml").write_text(
        'input = "in.jsonl"\noutput = "out.parquet"\nmodel = "m"\n'
        'prompt_template = "{ticket}"\napi_key_env = ""\n'
        'base_url = "http://127.0.0.1:9/v1"\n[headers]\nX-Team = "ops\\r\\n"\n'
    )
    assert_refused(
        plan(str(tmp_path / "job.toml")),
        f"Header `X-Team` in {tmp_path / 'job.toml'} holds a control character ('\\r' at position 3)",
    )


# ---- base_url --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:99999/v1", "is not a valid URL (Port out of range 0-65535)"),
        ("http://127.0.0.1:abc/v1", "is not a valid URL (Port could not be cast"),
        ("http://127.0.0.1:0/v1", "has port 0; a port is a number from 1 to 65535"),
        ("http:///v1", "is not an http(s) URL with a host"),
        ("ftp://127.0.0.1/v1", "is not an http(s) URL with a host"),
        ("127.0.0.1:8000/v1", "is not an http(s) URL with a host"),
        ("http://[::1/v1", "is not a valid URL (Invalid IPv6 URL)"),
        ("http://127.0.0.1:8000/v1\n", "holds a space or control character"),
        ("http://exa mple/v1", "holds a space or control character"),
    ],
)
def test_bad_base_urls_stop_plan_and_run(
    tmp_path: Path, api_key: str, url: str, message: str
) -> None:
    args = job_args(tmp_path, url)
    for result in (plan(*args), invoke(*args, "-q")):
        assert_refused(result, message)
        assert result.stderr.startswith(f"batchrun: `base_url` {url!r}")
    assert not (tmp_path / "out.parquet.partial").exists()


def test_a_good_ipv6_loopback_url_is_taken(tmp_path: Path, api_key: str) -> None:
    assert_exit(plan(*job_args(tmp_path, "http://[::1]:8000/v1")), 0)


def test_the_run_still_records_rows_after_a_stripped_key(
    tmp_path: Path, threaded: Threaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMTUNE_API_KEY", TEST_KEY + "\n")
    app, _ = recording_app()
    base_url = threaded(lambda: run_app(app))
    log = tmp_path / "run.log"
    assert_exit(invoke(*job_args(tmp_path, base_url), "-q", "--log-file", str(log)), 0)
    assert [r["status"] for r in pq.read_table(tmp_path / "out.parquet").to_pylist()] == ["ok"] * 2
    assert "has surrounding whitespace" in log.read_text()
    assert TEST_KEY not in log.read_text()

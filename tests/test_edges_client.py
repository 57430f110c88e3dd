"""The HTTP client at the edges, each against real aiohttp servers on 127.0.0.1:
servers that echo the secrets back (escaped or not), redirects to another
origin, answers too large to hold, and keys or headers or URLs aiohttp cannot
send. Nothing here touches the internet.
"""

from __future__ import annotations

import json
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrun.client import ApiClient
from batchrun.config import load_job
from batchrun.errors import AnswerTooLarge, JobError
from tests.conftest import TEST_KEY, assert_exit, invoke, run_app, tickets, write_jsonl

pytestmark = pytest.mark.timeout(60)

Threaded = Callable[[Callable[[], Any]], Any]
HEADER_SECRET = 'tt-"q7Zx"/w9Kp-secret'
# Parts of the secrets with no character an encoder would escape: if any form
# of a secret got through, one of these is in the text.
TELLTALES = ("0123456789abcdef", "q7Zx", "w9Kp")


def base_args(tmp_path: Path, base_url: str, name: str, *extra: str) -> list[str]:
    src = tmp_path / "in.jsonl"
    if not src.exists():
        write_jsonl(src, tickets(2))
    return [
        "--input",
        str(src),
        "--output",
        str(tmp_path / f"{name}.parquet"),
        "--model",
        "m",
        "--prompt-template",
        "Summarize: {ticket}",
        "--base-url",
        base_url,
        "--concurrency",
        "2",
        "--request-timeout-s",
        "10",
        *extra,
    ]


def output_text(path: Path) -> str:
    """Every value and the metadata of an output file, as text."""
    table = pq.read_table(path)
    return repr(table.to_pylist()) + repr(table.schema.metadata)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for telltale in TELLTALES:
            assert telltale not in text, f"{telltale!r} leaked into:\n{text}"


# ---- 7. every text from a server is redacted -------------------------------------------


def echoes(request: web.Request) -> str:
    """What a careless server might send back: the request's secret headers as
    they are, JSON-escaped by several encoders, and escaped twice."""
    headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
    auth, token = headers["Authorization"], headers["X-Tenant-Token"]
    return " | ".join(
        [
            f"Authorization: {auth}",
            f"X-Tenant-Token: {token}",
            json.dumps(headers),  # json: \" escaped
            json.dumps(headers, ensure_ascii=True).replace("-", "\\u002d"),  # Go-like
            json.dumps(token).replace("/", "\\/"),  # PHP-like
            json.dumps(json.dumps(headers)),  # JSON inside a JSON string
            repr(token.encode()),  # a Python repr
        ]
    )


def echo_app() -> tuple[web.Application, list[dict[str, str]]]:
    """Streamed requests get a 200 SSE stream whose chunk is not JSON, the others
    a 500 whose body is not JSON; both echo the request's secrets."""
    received: list[dict[str, str]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        received.append(dict(request.headers))
        echo = echoes(request)
        if body.get("stream"):
            # The escaped key first, so a cut to the first characters would still show it.
            escaped = request.headers["Authorization"].replace("-", "\\u002d")
            chunk = f'data: {{"auth": "{escaped}", "echo": "{echo}'
            return web.Response(
                body=(chunk + "\n\ndata: [DONE]\n\n").encode(), content_type="text/event-stream"
            )
        return web.Response(
            status=500, text=f"upstream failed for {echo}", headers={"Retry-After": "0"}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app, received


@pytest.mark.parametrize(("stream", "log_format"), [(True, "json"), (False, "text")])
def test_server_echoes_of_the_key_and_header_secrets_are_redacted_everywhere(
    tmp_path: Path,
    threaded: Threaded,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
    stream: bool,
    log_format: str,
) -> None:
    monkeypatch.setenv("TENANT_TOKEN", HEADER_SECRET)
    app, received = echo_app()
    base_url = threaded(lambda: run_app(app))
    log = tmp_path / "run.log"
    args = base_args(
        tmp_path,
        base_url,
        "out",
        "--header",
        "X-Tenant-Token=${TENANT_TOKEN}",
        "--max-attempts",
        "2",
        "--log-file",
        str(log),
        "--log-format",
        log_format,
        "-v",
        *(["--stream"] if stream else []),
    )
    result = invoke(*args)
    assert_exit(result, 1)
    # The server did get both secrets: what it echoed held them.
    assert received[0]["Authorization"] == f"Bearer {TEST_KEY}"
    assert received[0]["X-Tenant-Token"] == HEADER_SECRET
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["error", "error"]
    for row in rows:
        expected = "stream chunk is not JSON" if stream else "HTTP 500: upstream failed for"
        assert expected in row["error"] and "[redacted]" in row["error"], row["error"]
    assert_no_secret(output_text(tmp_path / "out.parquet"), log.read_text(), result.stderr)
    assert "[redacted]" in log.read_text() and "[redacted]" in result.stderr


# ---- 8. redirects ----------------------------------------------------------------------


def recording_app(
    redirect: Callable[[web.Request], tuple[int, str] | None] | None = None,
) -> tuple[web.Application, list[dict[str, str]]]:
    """A chat endpoint that keeps every request's headers (path included as
    ``:path``) and answers ok, or with ``redirect(request)`` = (status, Location)."""
    received: list[dict[str, str]] = []

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        received.append({**request.headers, ":path": request.path})
        target = redirect(request) if redirect else None
        if target is not None:
            return web.Response(status=target[0], headers={"Location": target[1]})
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
    app.router.add_post("/v2/chat/completions", chat)
    return app, received


@pytest.mark.parametrize(
    ("status", "where"),
    [(307, "other-port"), (308, "other-port"), (307, "localhost-other-port"), (308, "localhost")],
)
def test_redirect_to_another_origin_is_a_row_error_and_sends_nothing_there(
    tmp_path: Path,
    threaded: Threaded,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    where: str,
) -> None:
    monkeypatch.setenv("TENANT_TOKEN", HEADER_SECRET)
    other_app, other_received = recording_app()
    other_url = threaded(lambda: run_app(other_app))
    other_port = other_url.split(":")[2].split("/")[0]
    targets: dict[str, str] = {}

    def redirect(request: web.Request) -> tuple[int, str]:
        return status, targets[where]

    app, received = recording_app(redirect)
    base_url = threaded(lambda: run_app(app))
    port = base_url.split(":")[2].split("/")[0]
    targets.update(
        {
            "other-port": f"{other_url}/chat/completions",
            "localhost-other-port": f"http://localhost:{other_port}/v1/chat/completions",
            "localhost": f"http://localhost:{port}/v1/chat/completions",
        }
    )
    args = base_args(tmp_path, base_url, "out", "--header", "X-Tenant-Token=${TENANT_TOKEN}", "-q")
    result = invoke(*args)
    assert_exit(result, 1)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    for row in rows:
        assert row["status"] == "error"
        assert row["http_status"] == status
        assert row["attempts"] == 1  # not retried
        assert row["error"].startswith(
            f"HTTP {status}: redirected to {targets[where]}, which is not http://127.0.0.1:{port} "
            "(the origin of base_url). batchrun does not follow redirects to another origin"
        ), row["error"]
    assert other_received == []
    assert len(received) == 2  # one request per row, none of them followed
    assert all(r[":path"] == "/v1/chat/completions" for r in received)


def test_redirect_within_the_origin_is_followed_with_the_key_and_headers(
    tmp_path: Path, threaded: Threaded, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANT_TOKEN", HEADER_SECRET)

    def redirect(request: web.Request) -> tuple[int, str] | None:
        return (307, "/v2/chat/completions") if request.path.startswith("/v1/") else None

    app, received = recording_app(redirect)
    base_url = threaded(lambda: run_app(app))
    args = base_args(tmp_path, base_url, "out", "--header", "X-Tenant-Token=${TENANT_TOKEN}", "-q")
    assert_exit(invoke(*args), 0)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["attempts"] for r in rows] == [1, 1]
    followed = [r for r in received if r[":path"] == "/v2/chat/completions"]
    assert len(followed) == 2
    assert {r["Authorization"] for r in followed} == {f"Bearer {TEST_KEY}"}
    assert {r["X-Tenant-Token"] for r in followed} == {HEADER_SECRET}


@pytest.mark.parametrize("status", [301, 302, 303])
def test_redirect_that_would_turn_the_post_into_a_get_is_not_followed(
    tmp_path: Path, threaded: Threaded, status: int
) -> None:
    def redirect(request: web.Request) -> tuple[int, str] | None:
        return (status, "/v2/chat/completions") if request.path.startswith("/v1/") else None

    app, received = recording_app(redirect)
    base_url = threaded(lambda: run_app(app))
    result = invoke(*base_args(tmp_path, base_url, "out", "--api-key-env", "", "-q"))
    assert_exit(result, 1)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["error"] for r in rows} == {
        f"HTTP {status}: redirected to {base_url.removesuffix('/v1')}/v2/chat/completions; only a "
        "307 or 308 redirect keeps the request a POST, so batchrun does not follow it. Set "
        "base_url to where the API answers."
    }
    assert len(received) == 2


def test_a_redirect_loop_within_the_origin_ends(tmp_path: Path, threaded: Threaded) -> None:
    app, received = recording_app(lambda request: (307, "/v1/chat/completions"))
    base_url = threaded(lambda: run_app(app))
    result = invoke(*base_args(tmp_path, base_url, "out", "--api-key-env", "", "-q"))
    assert_exit(result, 1)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["error"].split(";")[0] for r in rows} == {
        f"HTTP 307: more than 5 redirects within {base_url.removesuffix('/v1')}"
    }
    assert len(received) == 2 * 6


# ---- 10. max_response_bytes ------------------------------------------------------------

LIMIT = 64 * 1024
ANSWER = {
    "id": "cmpl-1",
    "model": "m",
    "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def gzip_bomb(megabytes: int) -> bytes:
    """``megabytes`` MiB of zeros, gzipped (about 1 KiB per MiB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join([*(packer.compress(zeros) for _ in range(megabytes)), packer.flush()])


def big_answer(size: int) -> bytes:
    return orjson.dumps({**ANSWER, "choices": [{"message": {"content": "x" * size}}]})


def sized_app(kind: str) -> tuple[web.Application, list[int]]:
    """A chat endpoint whose answer is too large in the way ``kind`` says."""
    calls: list[int] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        calls.append(1)
        if kind == "body":
            return web.Response(body=big_answer(4 * LIMIT), content_type="application/json")
        if kind == "chunked":  # no Content-Length: counted as it comes
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b" " * 8192)
            await resp.write(orjson.dumps(ANSWER))
            return resp
        if kind == "gzip":
            return web.Response(
                body=gzip_bomb(100),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        if kind == "error-body":  # an error body is cut, not refused: the status decides
            return web.Response(status=400, text="bad request: " + "y" * (4 * LIMIT))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if kind == "stream":  # endless chunks
            event = b"data: " + orjson.dumps({"choices": [{"delta": {"content": "z" * 500}}]})
            for _ in range(1000):
                await resp.write(event + b"\n\n")
        else:  # "stream-line": one endless line
            await resp.write(b"data: ")
            for _ in range(2000):
                await resp.write(b"z" * 1000)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app, calls


@pytest.mark.parametrize("kind", ["body", "chunked", "gzip", "stream", "stream-line"])
def test_an_answer_over_max_response_bytes_is_a_row_error(
    tmp_path: Path, threaded: Threaded, kind: str
) -> None:
    app, calls = sized_app(kind)
    base_url = threaded(lambda: run_app(app))
    args = base_args(
        tmp_path,
        base_url,
        "out",
        "--api-key-env",
        "",
        "--max-response-bytes",
        str(LIMIT),
        "-q",
        *(["--stream"] if kind.startswith("stream") else []),
    )
    assert_exit(invoke(*args), 1)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    for row in rows:
        assert row["status"] == "error"
        assert row["attempts"] == 1  # not retried
        assert row["error"] == (
            "HTTP 200: the answer is larger than max_response_bytes=65536 (0.0625 MiB, "
            "decompressed); batchrun stopped reading it. Raise max_response_bytes if answers "
            "this large are expected."
        )
    assert len(calls) == 2


def test_an_error_body_over_max_response_bytes_is_cut_not_refused(
    tmp_path: Path, threaded: Threaded
) -> None:
    app, _ = sized_app("error-body")
    base_url = threaded(lambda: run_app(app))
    args = base_args(
        tmp_path, base_url, "out", "--api-key-env", "", "--max-response-bytes", str(LIMIT), "-q"
    )
    assert_exit(invoke(*args), 1)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {r["error"][:30] for r in rows} == {"HTTP 400: bad request: yyyyyyy"}


def test_answers_within_max_response_bytes_are_read(tmp_path: Path, threaded: Threaded) -> None:
    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=zlib.compress(big_answer(LIMIT - 1024), wbits=31),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    base_url = threaded(lambda: run_app(app))
    args = base_args(
        tmp_path, base_url, "out", "--api-key-env", "", "--max-response-bytes", str(LIMIT), "-q"
    )
    assert_exit(invoke(*args), 0)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [len(r["completion"]) for r in rows] == [LIMIT - 1024] * 2


@pytest.mark.parametrize("kind", ["gzip", "stream-line"])
async def test_reading_stops_at_the_bound_so_memory_stays_small(kind: str) -> None:
    """A 100 MiB gzip bomb (100 KiB on the wire) or an endless line costs about
    max_response_bytes of memory, not the whole answer."""
    app, _ = sized_app(kind)
    async with run_app(app) as base_url:
        job = load_job(
            None,
            {
                "input": "in.jsonl",
                "model": "m",
                "prompt_template": "{t}",
                "base_url": base_url,
                "stream": kind.startswith("stream"),
                "max_response_bytes": 1 << 20,
            },
        )
        async with ApiClient(job, None) as client:
            tracemalloc.start()
            try:
                with pytest.raises(AnswerTooLarge):
                    await client.complete(b"{}")
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_max_response_bytes_is_a_job_key_with_a_generous_default() -> None:
    job = load_job(None, {"input": "in.jsonl", "model": "m", "prompt_template": "{t}"})
    assert job.max_response_bytes == 32 * 2**20
    with pytest.raises(JobError, match=r"`max_response_bytes` \(flag\) is 10; it must be at least"):
        load_job(
            None,
            {"input": "in.jsonl", "model": "m", "prompt_template": "{t}", "max_response_bytes": 10},
        )


# ---- the model id in the inference path --------------------------------------------------


@pytest.mark.parametrize(
    ("model", "raw_path"),
    [
        ("x?y", "/v1/models/x%3Fy/inference"),
        ("team/a b#1%", "/v1/models/team/a%20b%231%25/inference"),
        (
            "meta-llama/Llama-3.3-70B-Instruct",
            "/v1/models/meta-llama/Llama-3.3-70B-Instruct/inference",
        ),
    ],
    ids=["query", "space-hash-percent", "slashes-kept"],
)
async def test_the_model_id_is_percent_encoded_in_the_inference_path(
    tmp_path: Path, model: str, raw_path: str
) -> None:
    """A `?`, `#`, `%` or space in the model id would cut or bend the path (`x?y`
    became /v1/models/x with a query): each is encoded, `/` is kept. The server
    records the raw path it got and decodes it back to the model id."""
    from batchrun.engines.local import run_job
    from batchrun.lifecycle import RunOptions
    from tests.conftest import make_job

    seen: list[tuple[str, str]] = []

    async def inference(request: web.Request) -> web.Response:
        seen.append((request.raw_path, request.match_info["model"]))
        answer = {
            "id": "r",
            "model": request.match_info["model"],
            "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/models/{model:.+}/inference", inference)
    write_jsonl(tmp_path / "in.jsonl", tickets(1))
    async with run_app(app) as base_url:
        job = make_job(base_url, output=tmp_path / "o.parquet", model=model, endpoint="inference")
        result = await run_job(job, RunOptions(progress=False))
    assert result.ok == 1
    assert seen == [(raw_path, model)]
    assert pq.read_table(tmp_path / "o.parquet").column("response_model").to_pylist() == [model]

"""Promises of a local run that the Ray engine keeps for the whole job, on a
local Ray with two row senders: the failure watch over every sender's rows,
the 429s that show the rate limit is spent counted over every sender,
``pii`` with the mapping kept on the driver, and the ways a server takes
(``schema_via = "auto"``'s search, a refused ``stream_options``) found once
for the job.

Marked ``ray`` (``make test-ray``). Each server is an aiohttp app on 127.0.0.1,
served from a thread of this process; each job runs through the CLI.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrun.engines.local import run_job
from batchrun.lifecycle import RunOptions
from batchrun.mock import MockConfig
from tests import test_pii
from tests.conftest import assert_exit, invoke, make_job, run_app, tickets, write_jsonl
from tests.test_failure_watch import counting_app, ok
from tests.test_ray_engine import assert_same_output, run_both
from tests.test_ray_guarantees import Arrivals, rate_limited
from tests.test_schema_via import TRIAGE_SCHEMA
from tests.test_structured import JOB_KEYS as STRUCTURED_KEYS

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

ROWS = 200


def run_ray(base_url: str, tmp_path: Path, *extra: str, rows: int = ROWS) -> Any:
    """``batchrun run --engine ray`` of ``rows`` tickets (one Ray, two senders)."""
    src = tmp_path / "in.jsonl"
    if not src.exists():
        write_jsonl(src, tickets(rows))
    return invoke(
        "--engine", "ray", "--input", str(src), "--output", str(tmp_path / "out.parquet"),
        "--model", "m-1", "--prompt-template", "{ticket}", "--base-url", base_url,
        "--api-key-env", "", "-q", *extra,
    )  # fmt: skip


def journal(tmp_path: Path) -> list[bytes]:
    path = tmp_path / "out.parquet.partial" / "journal.jsonl"
    return path.read_bytes().splitlines() if path.exists() else []


# ---- the failure watch, over every sender's rows ------------------------------------


def test_the_first_rows_failing_one_way_stop_the_ray_job_and_the_rerun_sends_them(
    local_ray: Any, tmp_path: Path, threaded: Any
) -> None:
    """Every request refused the same way (after 0.2 s) before any answer, one
    place per sender: the job stops after the first 5 failed rows of the job (a
    watch per sender would wait for 5 in one of them: 9 or more), exit 3,
    nothing recorded; the rerun, the cause fixed, sends every row."""
    refuse = True
    seen = [0]

    async def chat(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        seen[0] += 1
        if not refuse:
            return ok(body)
        await asyncio.sleep(0.2)
        return web.json_response(
            {"error": {"message": "Unrecognized request argument supplied: seed"}}, status=400
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    base_url = threaded(lambda: run_app(app))
    result = run_ray(base_url, tmp_path, "--param", "seed=7", "--concurrency", "2")
    assert_exit(result, 3)
    assert "the first 5 rows all failed the same way, before any answer" in result.output
    assert "Unrecognized request argument supplied: seed" in result.output
    assert "check the field its message names" in result.output
    assert "Nothing was recorded for the rows that failed this way" in result.output
    # 5, what the other sender had under way, and a row each might start before the stop reached it
    assert 5 <= seen[0] <= 8, seen[0]
    assert journal(tmp_path) == []
    refuse, before = False, seen[0]
    again = run_ray(base_url, tmp_path, "--param", "seed=7", "--concurrency", "2")
    assert_exit(again, 0)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(rows) == ROWS and all(r["status"] == "ok" for r in rows)
    assert seen[0] - before == ROWS  # each row once: none was recorded by the stopped run


def test_after_answers_the_last_rows_failing_one_way_stop_the_ray_job(
    local_ray: Any, tmp_path: Path, threaded: Any
) -> None:
    """The first 20 rows answered, then every request fails the same way: the
    job stops once the last 50 rows of the job failed (a watch per sender would
    wait for 50 in one of them: about 100), exit 3, their error rows kept;
    --retry-failed sends them again."""
    unloaded = True

    def answer(body: dict[str, Any]) -> web.Response:
        number = int(body["messages"][-1]["content"].split()[2])
        if number < 20 or not unloaded:
            return ok(body)
        return web.json_response({"error": {"message": "model unloaded"}}, status=500)

    app, seen = counting_app(answer)
    base_url = threaded(lambda: run_app(app))
    keys = ("--max-attempts", "1", "--concurrency", "4")
    result = run_ray(base_url, tmp_path, *keys)
    assert_exit(result, 3)
    assert "the last 50 rows all failed the same way" in result.output
    assert "--retry-failed" in result.output
    lines = journal(tmp_path)
    errors = sum(1 for line in lines if b'"status":"error"' in line)
    # 50, what the senders had under way (4), and a row each might start before the stop reached it
    assert 50 <= errors <= 50 + 4 + 2, errors
    assert len(lines) <= seen[0] <= len(lines) + 6
    unloaded = False
    again = run_ray(base_url, tmp_path, *keys, "--retry-failed")
    assert_exit(again, 0)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(rows) == ROWS and all(r["status"] == "ok" for r in rows)


def test_429s_in_a_row_over_both_senders_pause_the_ray_job(
    local_ray: Any, tmp_path: Path, threaded: Any
) -> None:
    """For 1.5 s the server answers every request with a 429 that does not say
    the budget is spent: the coordinator counts them over both senders, and
    the job pauses (said in the log as judged over every Ray actor); every row
    is answered. (That four in a row over two senders pause where neither
    saw four is tests/test_ray_coordinator.py's.)"""
    window: list[float] = []

    def decide(n: int, now: float) -> web.Response | None:
        if n == 40:
            window.append(now)
        if window and now - window[0] < 1.5:
            return rate_limited("1")
        return None

    server = Arrivals(decide, latency_s=0.01)
    url = threaded(lambda: run_app(server.app()))
    log_file = tmp_path / "run.log"
    result = run_ray(
        url, tmp_path, "--concurrency", "8", "--max-attempts", "10", "--log-file", str(log_file),
        "--log-format", "json", rows=120,
    )  # fmt: skip
    assert_exit(result, 0)
    events = [orjson.loads(line) for line in log_file.read_text().splitlines()]
    pauses = [e for e in events if e["event"] == "rate_limit_pause"]
    assert pauses, "no pause"
    assert all("over every Ray actor" in e["message"] for e in pauses)
    assert server.statuses.count(429) >= 4


# ---- pii: the mapping stays on the driver -------------------------------------------


def test_pii_on_ray_sends_placeholders_only_and_writes_a_local_runs_output(
    local_ray: Any, tmp_path: Path, threaded: Any
) -> None:
    """40 tickets full of personal data, a structured job with typed columns,
    two rows refused by a server quoting their text: run by each engine against
    its own recording server, the servers received the same bodies, none with a
    value in it, and the outputs are the same (restored completions and typed
    values, pii counts, request hashes, the error rows with placeholders)."""
    from batchrun.engines.ray import run_on_ray

    schema = tmp_path / "schema.json"
    schema.write_bytes(orjson.dumps(test_pii.TYPED_SCHEMA))
    rows = [
        {"id": f"{t['id']}-{k}", "ticket": f"{t['ticket']} (copy {k})"}
        for k in range(10)
        for t in test_pii.pii_tickets()
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    servers = {}
    results = {}
    for engine in ("local", "ray"):
        server = test_pii.Recorder(
            structured=True, fail=lambda text: "<CUSTOMER_NUMBER_1>" in text and "(copy 0)" in text
        )
        url = threaded(lambda s=server: run_app(s.app()))
        job = make_job(
            url, inp, tmp_path / f"{engine}.parquet", **test_pii.PII_KEYS,
            response_schema=str(schema), schema_via="json_schema", concurrency=4, max_attempts=1,
        )  # fmt: skip
        options = RunOptions(progress=False)
        results[engine] = (
            asyncio.run(run_job(job, options)) if engine == "local" else run_on_ray(job, options)
        )
        servers[engine] = server
    assert (results["ray"].ok, results["ray"].failed) == (38, 2)
    sent = servers["ray"].sent()
    for value in test_pii.VALUES:
        assert value not in sent, value
        assert value.replace(" ", "") not in sent.replace(" ", ""), value
    assert sorted(servers["ray"].bodies) == sorted(servers["local"].bodies)
    assert_same_output(tmp_path / "local.parquet", tmp_path / "ray.parquet")
    out = {r["id"]: r for r in pq.read_table(tmp_path / "ray.parquet").to_pylist()}
    first = out["T-1-3"]  # rows[12]
    assert first["summary"] == test_pii.expected(rows[12])
    pii = test_pii
    assert first["contacts"] == [pii.CARDS[0], pii.EMAILS[0], pii.EMAILS[0], pii.PHONES[0]]
    assert first["pii_found"] == 4 and first["pii_unrestored"] == 1  # <EMAIL_99>
    assert out["T-2-0"]["status"] == "error" and "<CUSTOMER_NUMBER_1>" in out["T-2-0"]["error"]


# ---- the ways a server takes: schema_via = "auto", stream_options --------------------


def test_schema_via_auto_searches_on_ray_as_locally(local_ray: Any, tmp_path: Path) -> None:
    """A server with no structured outputs: response_format refused twice,
    structured_outputs ignored (a prose answer), then the schema goes in the
    prompt. On Ray one sender searches while the other waits, then both send
    the prompt way: the same requests as a local run (not a search per
    sender), the same output, the way kept in its metadata."""
    n = 40
    src = write_jsonl(tmp_path / "in.jsonl", tickets(n))
    keys = STRUCTURED_KEYS | {"response_schema": str(TRIAGE_SCHEMA), "concurrency": 4}
    local, on_ray, local_stats, ray_stats = run_both(
        src, tmp_path, MockConfig(schema_via="none"), **keys
    )
    assert ray_stats.by_outcome == local_stats.by_outcome == {"refused:400": 2, "ok": n + 1}
    assert ray_stats.bodies == local_stats.bodies  # the same bytes, as often
    assert (on_ray.ok, on_ray.requests) == (local.ok, local.requests) == (n, n + 3)
    assert on_ray.schema_via == local.schema_via == "prompt"
    assert on_ray.schema_via_refused == ("json_schema", "json_object_schema", "vllm")
    assert_same_output(tmp_path / "local.parquet", tmp_path / "ray.parquet")
    meta = orjson.loads(pq.read_schema(tmp_path / "ray.parquet").metadata[b"batchrun"])
    assert meta["schema_via"]["schema_via"] == "prompt" and meta["schema_via"]["settled"]


def test_a_refused_stream_options_and_the_search_on_ray_with_pii(
    local_ray: Any, tmp_path: Path
) -> None:
    """A strict llama.cpp-like server refusing stream_options and json_schema,
    a streamed structured pii job: the searching sender drops the field and
    moves to json_object_schema, every sender then sends that way, and the
    request hashes of the rows whose bodies changed in the sender are made on
    the driver with their values: the same requests and output as a local
    run, the choices kept beside the journal and in the metadata."""
    n = 40
    rows = [
        {"id": f"T-{i:04d}", "customer": f"C{i}", "ticket": f"Ticket {i}: mail {email}"}
        for i, email in enumerate(test_pii.EMAILS * (n // 3 + 1))
    ][:n]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    keys = STRUCTURED_KEYS | {
        "response_schema": str(TRIAGE_SCHEMA),
        "concurrency": 4,
        "stream": True,
        "pii": ["email"],
    }
    config = MockConfig(
        schema_via="json_object_schema", strict=True, unknown_fields=("stream_options",)
    )
    local, on_ray, local_stats, ray_stats = run_both(src, tmp_path, config, **keys)
    assert ray_stats.by_outcome == local_stats.by_outcome
    assert ray_stats.by_outcome == {"400": 1, "refused:500": 1, "ok": n}
    assert ray_stats.bodies == local_stats.bodies  # the same bytes, as often
    assert on_ray.stream_options_refused == local.stream_options_refused is not None
    assert on_ray.schema_via == "json_object_schema"
    assert_same_output(tmp_path / "local.parquet", tmp_path / "ray.parquet")
    out = pq.read_table(tmp_path / "ray.parquet").to_pylist()
    assert {r["status"] for r in out} == {"ok"}
    meta = orjson.loads(pq.read_schema(tmp_path / "ray.parquet").metadata[b"batchrun"])
    assert meta["stream_options"]["sent"] is False
    assert meta["schema_via"]["tried"] == ["json_schema", "json_object_schema"]

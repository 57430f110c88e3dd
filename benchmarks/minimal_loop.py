"""The baseline batchrun is measured against: the smallest honest aiohttp loop.

Reads the same JSONL, starts one task per row under an ``asyncio.Semaphore``,
POSTs the same body shape batchrun sends (``model``, one user message built from
the same template, ``temperature``, ``max_tokens``), JSON-decodes each answer,
keeps the completion and usage, and at the end writes the same output columns
as batchrun to Parquet (zstd) with pyarrow. No retries, no journal, no resume,
no input check, no progress: everything batchrun adds is absent, so the gap
between the two is the price of those features.

It runs on uvloop when importable (as batchrun does), so the comparison is
between the two programs, not between event loops (``--no-uvloop`` to compare).

    python benchmarks/minimal_loop.py --input X.jsonl --base-url URL --concurrency 64 --output O.parquet

Prints one JSON object on stdout: rows, ok, and the seconds spent reading,
sending and writing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

TIMESTAMP = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("response_model", pa.string()),
        pa.field("completion", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("total_tokens", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("attempts", pa.int32()),
        pa.field("latency_ms", pa.float64()),
        pa.field("response_id", pa.string()),
        pa.field("request_hash", pa.string()),
        pa.field("started_at", TIMESTAMP),
        pa.field("finished_at", TIMESTAMP),
    ]
)
"""batchrun's output columns (no keep_columns, no streaming)."""


def read_rows(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]


def build_body(row: dict[str, Any], template: str, model: str) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": template.format_map(row)}],
            "temperature": 0.7,
            "max_tokens": 512,
        }
    )


def ok_record(
    i: int, row_id: str, model: str, data: Any, body: bytes, started: int, t0: float
) -> dict[str, Any]:
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    return {
        "id": row_id,
        "row": i,
        "model": model,
        "response_model": data.get("model"),
        "completion": (choice.get("message") or {}).get("content"),
        "finish_reason": choice.get("finish_reason"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"),
        "status": "ok",
        "error": None,
        "http_status": 200,
        "attempts": 1,
        "latency_ms": (time.perf_counter() - t0) * 1000,
        "response_id": data.get("id"),
        "request_hash": hashlib.sha256(body).hexdigest()[:32],
        "started_at": started,
        "finished_at": time.time_ns() // 1000,
    }


def error_record(
    i: int, row_id: str, model: str, error: str, status: int | None, started: int, t0: float
) -> dict[str, Any]:
    return {
        "id": row_id,
        "row": i,
        "model": model,
        "status": "error",
        "error": error,
        "http_status": status,
        "attempts": 1,
        "latency_ms": (time.perf_counter() - t0) * 1000,
        "started_at": started,
        "finished_at": time.time_ns() // 1000,
    }


def write_parquet(records: list[dict[str, Any]], path: Path) -> None:
    columns = {f.name: [r.get(f.name) for r in records] for f in SCHEMA}
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    pq.write_table(table, path, compression="zstd")


async def send_all(
    rows: list[dict[str, Any]], url: str, model: str, template: str, concurrency: int
) -> list[dict[str, Any]]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any]] = [{} for _ in rows]
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(i: int, row: dict[str, Any]) -> None:
            async with sem:
                row_id = str(row.get("id", i))
                body = build_body(row, template, model)
                started = time.time_ns() // 1000
                t0 = time.perf_counter()
                status = None
                try:
                    async with session.post(url, data=body) as resp:
                        status = resp.status
                        raw = await resp.read()
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}: {raw[:200]!r}")
                    results[i] = ok_record(i, row_id, model, orjson.loads(raw), body, started, t0)
                except Exception as exc:
                    results[i] = error_record(i, row_id, model, repr(exc), status, started, t0)

        await asyncio.gather(*(one(i, row) for i, row in enumerate(rows)))
    return results


def run_loop(coro: Any, use_uvloop: bool) -> Any:
    factory = None
    if use_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:PORT/v1")
    parser.add_argument("--model", default="m")
    parser.add_argument("--prompt-template", default="Summarize this ticket: {ticket}")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    rows = read_rows(args.input)
    t1 = time.perf_counter()
    url = args.base_url.rstrip("/") + "/chat/completions"
    records = run_loop(
        send_all(rows, url, args.model, args.prompt_template, args.concurrency),
        not args.no_uvloop,
    )
    t2 = time.perf_counter()
    write_parquet(records, args.output)
    t3 = time.perf_counter()
    ok = sum(1 for r in records if r.get("status") == "ok")
    stats = {
        "rows": len(records),
        "ok": ok,
        "read_s": t1 - t0,
        "send_s": t2 - t1,
        "write_s": t3 - t2,
        "run_s": t3 - t0,
    }
    sys.stdout.write(orjson.dumps(stats).decode() + "\n")
    return 0 if ok == len(records) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The loop most people write first: the ``openai`` SDK's AsyncOpenAI under a semaphore.

Same input, same body shape and same output columns as ``minimal_loop.py``, but
each request goes through ``client.chat.completions.create`` (SDK defaults:
its own HTTP client and connection pool, pydantic-parsed responses; retries
left at the SDK default, though none happen against the embedded endpoint).

    python benchmarks/sdk_loop.py --input X.jsonl --base-url URL --concurrency 64 --output O.parquet

Exits 3 when ``openai`` is not importable (the runner then skips it).
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
from minimal_loop import build_body, error_record, read_rows, run_loop, write_parquet


async def send_all(
    rows: list[dict[str, Any]], base_url: str, model: str, template: str, concurrency: int
) -> list[dict[str, Any]]:
    from openai import AsyncOpenAI

    sem = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any]] = [{} for _ in rows]
    client = AsyncOpenAI(base_url=base_url, api_key="unused")

    async def one(i: int, row: dict[str, Any]) -> None:
        async with sem:
            row_id = str(row.get("id", i))
            content = template.format_map(row)
            # The body the SDK sends has the same fields; hash what batchrun would send.
            body = build_body(row, template, model)
            started = time.time_ns() // 1000
            t0 = time.perf_counter()
            try:
                resp = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": content}],
                    temperature=0.7,
                    max_tokens=512,
                )
                choice = resp.choices[0]
                usage = resp.usage
                results[i] = {
                    "id": row_id,
                    "row": i,
                    "model": model,
                    "response_model": resp.model,
                    "completion": choice.message.content,
                    "finish_reason": choice.finish_reason,
                    "prompt_tokens": usage.prompt_tokens if usage else None,
                    "completion_tokens": usage.completion_tokens if usage else None,
                    "total_tokens": usage.total_tokens if usage else None,
                    "status": "ok",
                    "error": None,
                    "http_status": 200,
                    "attempts": 1,
                    "latency_ms": (time.perf_counter() - t0) * 1000,
                    "response_id": resp.id,
                    "request_hash": hashlib.sha256(body).hexdigest()[:32],
                    "started_at": started,
                    "finished_at": time.time_ns() // 1000,
                }
            except Exception as exc:
                results[i] = error_record(i, row_id, model, repr(exc), None, started, t0)

    try:
        await asyncio.gather(*(one(i, row) for i, row in enumerate(rows)))
    finally:
        await client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="m")
    parser.add_argument("--prompt-template", default="Summarize this ticket: {ticket}")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rows", type=int, default=None, help="use only the first N rows")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    try:
        import openai
    except ImportError:
        print("openai is not installed", file=sys.stderr)
        return 3

    t0 = time.perf_counter()
    rows = read_rows(args.input)
    if args.rows is not None:
        rows = rows[: args.rows]
    t1 = time.perf_counter()
    records = run_loop(
        send_all(rows, args.base_url, args.model, args.prompt_template, args.concurrency),
        not args.no_uvloop,
    )
    t2 = time.perf_counter()
    write_parquet(records, args.output)
    t3 = time.perf_counter()
    ok = sum(1 for r in records if r.get("status") == "ok")
    errors = [r["error"] for r in records if r.get("status") != "ok"][:3]
    stats = {
        "rows": len(records),
        "ok": ok,
        "read_s": t1 - t0,
        "send_s": t2 - t1,
        "write_s": t3 - t2,
        "run_s": t3 - t0,
        "openai_version": openai.__version__,
        "errors": errors,
    }
    sys.stdout.write(orjson.dumps(stats).decode() + "\n")
    return 0 if ok == len(records) else 1


if __name__ == "__main__":
    raise SystemExit(main())

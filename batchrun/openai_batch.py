"""The OpenAI Batch API file format, for teams moving from that API (or from
vLLM's offline batch runner) who want to keep their files.

Input lines are ``{"custom_id", "method", "url", "body"}``: ``custom_id`` becomes
the row id and ``body`` is sent as it is (see ``inputs`` and ``scheduler``). With
``--output-format openai-batch`` the output is also written as the matching
output lines, beside the Parquet file (same name, ``.jsonl``)::

    {"id": "batch_req_…", "custom_id": "…",
     "response": {"status_code": 200, "request_id": "…", "body": {chat.completion}},
     "error": null}

A row the API refused has its status code and the error in ``response``; a row
that got no answer at all (timeouts, dropped connections) has ``response: null``
and ``error: {"code", "message"}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from batchrun.errors import write_failed
from batchrun.files import atomic_write

BATCH_ROWS = 8192


def input_line(custom_id: str, body: bytes) -> bytes:
    """One request line of a batch's input file, around a request body as encoded
    (the very bytes an online request sends, so the same ``request_hash``)."""
    head = b'{"custom_id":' + orjson.dumps(custom_id)
    return head + b',"method":"POST","url":"/v1/chat/completions","body":' + body + b"}\n"


def output_line(row: dict[str, Any]) -> dict[str, Any]:
    """One output row of ours as an OpenAI batch output line."""
    line: dict[str, Any] = {
        "id": f"batch_req_{row.get('request_hash') or row['id']}",
        "custom_id": row["id"],
        "response": None,
        "error": None,
    }
    status = row.get("http_status")
    if row["status"] in ("ok", "invalid"):
        usage = None
        if row.get("total_tokens") is not None:
            usage = {
                "prompt_tokens": row.get("prompt_tokens"),
                "completion_tokens": row.get("completion_tokens"),
                "total_tokens": row.get("total_tokens"),
            }
        message: dict[str, Any] = {"role": "assistant", "content": row.get("completion")}
        if row.get("refusal") is not None:
            message["refusal"] = row["refusal"]
        if row.get("tool_calls") is not None:
            message["tool_calls"] = orjson.loads(row["tool_calls"])
        finished = row.get("finished_at")
        body: dict[str, Any] = {
            "id": row.get("response_id"),
            "object": "chat.completion",
            "created": int(finished.timestamp()) if finished is not None else None,
            "model": row.get("response_model") or row.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": row.get("finish_reason"),
                }
            ],
        }
        if usage is not None:
            body["usage"] = usage
        line["response"] = {
            "status_code": status or 200,
            "request_id": row.get("response_id"),
            "body": body,
        }
    elif status is not None:
        line["response"] = {
            "status_code": status,
            "request_id": None,
            "body": {"error": {"message": row.get("error"), "type": "api_error"}},
        }
    else:
        line["error"] = {"code": "request_failed", "message": row.get("error")}
    return line


def batch_output_path(output: Path) -> Path:
    return output.with_suffix(".jsonl")


def write_batch_output(parquet: Path, target: Path | None = None) -> Path:
    """Write ``parquet`` (a batchrun output) as OpenAI batch output lines,
    atomically (temporary name, fsync, rename). Returns the path written."""
    target = target or batch_output_path(parquet)
    try:
        with atomic_write(target) as tmp, tmp.open("wb") as fh:
            for batch in pq.ParquetFile(parquet).iter_batches(batch_size=BATCH_ROWS):
                fh.write(
                    b"".join(orjson.dumps(output_line(row)) + b"\n" for row in batch.to_pylist())
                )
    except OSError as exc:
        raise write_failed(
            exc,
            f"Cannot write {target}: {exc.strerror}. {parquet} is complete: free space (or fix "
            f"the folder) and run the same command again to write {target.name} (no row is sent again).",
        ) from None
    return target

"""batchrun outputs made without sending anything, for the merge and rerun benchmarks.

``shard_outputs(folder, rows, shards, tickets)`` writes what ``batchrun run
--shard K/N`` leaves for a job over ``rows`` input rows: N Parquet files with
batchrun's schema and metadata (the job's settings and identity, made by
batchrun's own functions), rows in input order, 8,192 rows a row group as
``batchrun run`` writes them. Shard K holds the rows whose number is K modulo N
(merge does not care how rows were dealt out).

``finished_output(input, output, base_url, template)`` writes what a finished
run of a job over ``input`` leaves: every row's request hash made by batchrun's
own request building, the metadata (identity, fingerprint) by its own
functions, so a rerun takes it for its own finished output either way it looks.

Completions are the first 300 characters of the generated tickets, cycled; one
row in a hundred failed. Needs batchrun importable (the benchmarks run it from
the repo). ``run.py`` runs it as a program (``python make_outputs.py shards
FOLDER ROWS SHARDS TICKETS TEMPLATE`` or ``finished INPUT OUTPUT ROWS BASE_URL
TEMPLATE``): a process forked from a large one starts with the larger's peak RSS
as its own, so the runner must stay small for the merge and the rerun it measures.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun._version import __version__
from batchrun.checks import settled_job
from batchrun.config import load_job
from batchrun.lifecycle import RunOptions, run_identity
from batchrun.outputs import output_schema

BATCH_ROWS = 8192
COMPLETION_CHARS = 300


def shard_outputs(
    folder: Path, rows: int, shards: int, tickets: Path, template: str = "Summarize: {ticket}"
) -> list[Path]:
    """The ``shards`` outputs of one job over ``rows`` rows, in ``folder``."""
    texts = _texts(tickets)
    job = load_job(
        None,
        {"input": str(tickets), "model": "m", "prompt_template": template, "output": "out.parquet"},
    )
    paths = []
    for k in range(shards):
        numbers = np.arange(k, rows, shards, dtype=np.int64)
        identity = run_identity(job, RunOptions(shard=(k, shards)), rows)
        metadata = {
            "batchrun_version": "bench",
            "run_id": f"bench{k:07d}",
            "job": job.settings(),
            "identity": identity,
            "answered_by": identity["answered_by"],
            "rows": len(numbers),
        }
        path = folder / f"part-{k}.parquet"
        rng = np.random.default_rng(k)
        batches = (
            (rows, [f"T-{r:09d}" for r in rows.tolist()], rng.bytes(16 * len(rows)).hex())
            for rows in np.split(numbers, range(BATCH_ROWS, len(numbers), BATCH_ROWS))
        )
        _write(path, batches, texts, output_schema(pa.schema([]), metadata), seed=k)
        paths.append(path)
    return paths


def finished_output(input: Path, output: Path, rows: int, base_url: str, template: str) -> None:
    """What a finished run over ``input`` (``rows`` JSONL rows with an ``id``) of
    the job ``--model m --prompt-template TEMPLATE --base-url BASE_URL
    --api-key-env ''`` leaves at ``output``."""
    from batchrun.finished import fingerprint
    from batchrun.inputs import InputTable
    from batchrun.payload import prepare_rows, prompt_columns

    job = settled_job(
        load_job(
            None,
            {
                "input": str(input),
                "output": str(output),
                "model": "m",
                "prompt_template": template,
                "base_url": base_url,
                "api_key_env": "",
            },
        )
    )
    options = RunOptions()
    identity = run_identity(job, options, rows)
    metadata = {
        "batchrun_version": __version__,
        "run_id": "bench0finished",
        "job": job.settings(),
        "identity": identity,
        "answered_by": identity["answered_by"],
        "rows": rows,
        "fingerprint": fingerprint(job, options),
    }
    prepared = prepare_rows(job, InputTable(input).batches(prompt_columns(job), "id"))

    def batches() -> Iterator[tuple[np.ndarray, list[str], str]]:
        while chunk := list(itertools.islice(prepared, BATCH_ROWS)):
            numbers = np.fromiter((p.row for p in chunk), np.int64, len(chunk))
            yield numbers, [p.id for p in chunk], "".join(p.request_hash for p in chunk)

    _write(output, batches(), _texts(input), output_schema(pa.schema([]), metadata), seed=0)


def _texts(tickets: Path) -> pa.Array:
    """Answer texts: the first tickets of ``tickets``, cut short."""
    with tickets.open("rb") as fh:
        lines = itertools.islice(fh, 20_000)
        return pa.array([orjson.loads(line)["ticket"][:COMPLETION_CHARS] for line in lines])


def _write(
    path: Path,
    batches: Iterable[tuple[np.ndarray, list[str], str]],
    texts: pa.Array,
    schema: pa.Schema,
    seed: int,
) -> None:
    """``batches`` of (row numbers, ids, their request hashes (hex digits) end to
    end) as one output."""
    rng = np.random.default_rng(seed)
    stamp = pa.timestamp("us", tz="UTC")
    start_us = 1_790_000_000_000_000
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for rows, ids, hashes in batches:
            n = len(rows)
            width = len(hashes) // n
            failed = rng.random(n) < 0.01
            prompt = rng.integers(60, 400, n)
            completion = rng.integers(20, 120, n)
            started = start_us + rows * 1000
            latency = rng.uniform(200, 3000, n)
            columns = {
                "id": pa.array(ids),
                "row": pa.array(rows),
                "model": pa.array(["m"] * n),
                "response_model": pa.array(["m"] * n),
                "completion": pc_if_else(failed, texts.take(pa.array(rows % len(texts)))),
                "finish_reason": pa.array(np.where(failed, None, "stop").tolist()),
                "prompt_tokens": pa.array(prompt),
                "completion_tokens": pa.array(np.where(failed, 0, completion)),
                "total_tokens": pa.array(prompt + np.where(failed, 0, completion)),
                "status": pa.array(np.where(failed, "error", "ok").tolist()),
                "error": pa.array(
                    np.where(failed, "HTTP 503: service_unavailable: overloaded", None).tolist()
                ),
                "http_status": pa.array(np.where(failed, 503, 200).astype(np.int32)),
                "attempts": pa.array(np.where(failed, 5, 1).astype(np.int32)),
                "latency_ms": pa.array(latency),
                "queued_ms": pa.array(np.zeros(n)),
                "response_id": pa.array([f"cmpl-{r}" for r in rows.tolist()]),
                "request_hash": pa.array([hashes[i * width : (i + 1) * width] for i in range(n)]),
                "started_at": pa.array(started).view(stamp),
                "finished_at": pa.array(started + (latency * 1000).astype(np.int64)).view(stamp),
                "tier": pa.array(["online"] * n),
            }
            # Columns a run leaves empty here (refusal, tool_calls, cached tokens...): nulls.
            table = pa.Table.from_arrays(
                [
                    columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
                    for f in schema
                ],
                schema=schema,
            )
            writer.write_table(table, row_group_size=BATCH_ROWS)


def pc_if_else(failed: np.ndarray, values: pa.Array) -> pa.Array:
    """``values`` with a null where ``failed``."""
    import pyarrow.compute as pc

    return pc.if_else(pa.array(failed), pa.nulls(len(values), values.type), values)


def main(argv: list[str]) -> None:
    kind, *args = argv
    if kind == "shards":
        folder, rows, shards, tickets, template = args
        shard_outputs(Path(folder), int(rows), int(shards), Path(tickets), template)
    elif kind == "finished":
        source, output, rows, base_url, template = args
        finished_output(Path(source), Path(output), int(rows), base_url, template)
    else:
        raise SystemExit(f"make_outputs.py: unknown kind {kind!r} (shards, finished)")


if __name__ == "__main__":
    main(sys.argv[1:])

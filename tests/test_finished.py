"""A rerun of a finished job answers from its output (``batchrun/finished.py``)
without reading the input, opening a journal or writing anything, and says what
the whole way says; it goes the whole way — the input read and checked, every
request compared, the output written again — whenever the output alone cannot
tell that nothing is left to send or that the output would stay as it is.

Every job talks to a real endpoint on 127.0.0.1: a counting one (requests per
row id, some ids answered 400) or the embedded endpoint set up for the case.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from aiohttp import web

import batchrun.journal
from batchrun.config import Job
from batchrun.engines.local import run_job
from batchrun.errors import OutputBusy, ResumeConflict
from batchrun.inputs import InputTable
from batchrun.journal import Journal
from batchrun.lifecycle import RunOptions, RunResult
from batchrun.lock import OutputLock
from batchrun.merge import merge_outputs
from batchrun.mock import MockConfig, serve
from batchrun.outputs import journal_value
from batchrun.plan import plan_job
from tests.conftest import assert_exit, invoke, make_job, run_app, tickets, write_jsonl
from tests.test_edges_journal import CountingEndpoint

pytestmark = pytest.mark.timeout(60)

TEMPLATE = "Row {id}: {ticket}"
_ROW_ID = re.compile(r"Row (\S+):")
PRICES = '[models."test-model"]\nprompt_per_million = 1.5\ncompletion_per_million = 4\n'


class Endpoint(CountingEndpoint):
    """Counts requests per row id; answers 400 for the ids in ``failing``."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()

    async def _answer(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        match = _ROW_ID.match(body["messages"][-1]["content"])
        if match and match.group(1) in self.failing:
            self.counts[match.group(1)] += 1
            return web.json_response({"error": {"message": "no such ticket"}}, status=400)
        return await super()._answer(request)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Endpoint, str]]:
    endpoint = Endpoint()
    async with run_app(endpoint.app()) as base_url:
        yield endpoint, base_url


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """The inputs scanned and the journals opened: the whole way does both, a rerun
    answered from the output neither."""
    seen: list[Path] = []
    real_scan, real_open = InputTable.scan, Journal.__init__

    def scan(self: InputTable, *args: Any, **kwargs: Any) -> Any:
        seen.append(self.path)
        return real_scan(self, *args, **kwargs)

    def open_journal(self: Journal, output: Path, *args: Any, **kwargs: Any) -> None:
        seen.append(batchrun.journal.partial_dir(output))
        real_open(self, output, *args, **kwargs)

    monkeypatch.setattr(InputTable, "scan", scan)
    monkeypatch.setattr(Journal, "__init__", open_journal)
    yield seen


def job_for(base_url: str, tmp_path: Path, output: str = "out.parquet", **keys: Any) -> Job:
    keys = {"prompt_template": TEMPLATE, "concurrency": 4, **keys}
    return make_job(base_url, tmp_path / "in.jsonl", tmp_path / output, **keys)


async def run(job: Job, **options: Any) -> RunResult:
    return await run_job(job, RunOptions(progress=False, **options))


def stamp(path: Path) -> tuple[int, int]:
    """The file's inode and modification time: both change when it is written again."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def touch(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def metadata(path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = orjson.loads(pq.read_schema(path).metadata[b"batchrun"])
    return meta


def said(result: RunResult) -> tuple[dict[str, Any], list[str]]:
    """What a run says, but for its wall time and the time left to a deadline."""
    values = {k: v for k, v in result.as_dict().items() if k not in ("wall_s", "deadline")}
    lines = result.summary().splitlines()
    return values, [line for line in lines if not line.startswith(("wall time", "deadline"))]


# ---- the rerun answered from the output ----------------------------------------------


async def test_a_rerun_answers_from_the_output(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(40))
    endpoint.failing = {"T-0003"}
    job = job_for(base_url, tmp_path)
    first = await run(job)
    assert (first.ok, first.failed, endpoint.requests) == (39, 1, 40)
    out, before, scans[:] = tmp_path / "out.parquet", stamp(tmp_path / "out.parquet"), []
    assert metadata(out)["fingerprint"]["files"][0][0] == str((tmp_path / "in.jsonl").resolve())

    again = await run(job)
    assert endpoint.requests == 40
    assert scans == [], "the input was read again, or a journal opened"
    assert stamp(out) == before, "the finished output was written again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.parquet"]
    assert (again.rows, again.ok, again.failed, again.resumed) == (40, 39, 1, 40)
    assert (again.requests, again.prompt_tokens, again.run_id) == (0, 0, first.run_id)
    assert again.exit_code == 1 and again.causes == first.causes


@pytest.mark.parametrize(
    ("failing", "priced"), [((), False), (("T-0002", "T-0007"), True)], ids=["ok", "failed+cost"]
)
def test_the_rerun_says_what_the_whole_way_says(
    threaded: Any,
    tmp_path: Path,
    scans: list[Path],
    failing: tuple[str, ...],
    priced: bool,
) -> None:
    """Its result and summary are those of the whole way on the same finished
    output (the input touched, so the output alone cannot tell), and so are the
    CLI's summary and exit code."""
    endpoint = Endpoint()
    base_url = threaded(lambda: run_app(endpoint.app()))
    write_jsonl(tmp_path / "in.jsonl", tickets(25))
    endpoint.failing = set(failing)
    keys: dict[str, Any] = {}
    if priced:
        (tmp_path / "prices.toml").write_text(PRICES)
        keys["prices"] = str(tmp_path / "prices.toml")
    job = job_for(base_url, tmp_path, **keys)
    asyncio.run(run(job))
    touch(tmp_path / "in.jsonl")
    scans[:] = []
    whole = asyncio.run(run(job))
    assert len(scans) == 2, "the whole way reads the input and opens a journal"
    scans[:] = []
    answered = asyncio.run(run(job))
    assert scans == [] and endpoint.requests == 25
    assert said(answered) == said(whole)
    assert answered.exit_code == (1 if failing else 0)
    if priced:
        assert answered.cost is not None and answered.cost > 0 and answered.currency == "USD"

    args = ["--input", "in.jsonl", "--output", "out.parquet", "--model", "test-model"]
    args += ["--prompt-template", TEMPLATE, "--base-url", base_url, "--api-key-env", ""]
    args += [*(["--prices", "prices.toml"] if priced else []), "--concurrency", "4"]
    touch(tmp_path / "in.jsonl")
    cli_whole = invoke(*args)
    cli_answered = invoke(*args)
    assert_exit(cli_whole, 1 if failing else 0)
    assert_exit(cli_answered, 1 if failing else 0)
    shown = [line for line in said(answered)[1] if not line.startswith("output")]
    for line in shown:
        assert line in cli_whole.output and line in cli_answered.output
    assert endpoint.requests == 25


async def test_only_the_keys_of_the_sending_may_differ(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    """Another concurrency, rpm or retry policy still answers from the output (its
    metadata keeps the settings of the run that wrote it)."""
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(10))
    await run(job_for(base_url, tmp_path))
    before, scans[:] = stamp(tmp_path / "out.parquet"), []
    again = await run(job_for(base_url, tmp_path, concurrency=1, rpm=600, max_attempts=2))
    assert (again.ok, endpoint.requests, scans) == (10, 10, [])
    assert stamp(tmp_path / "out.parquet") == before


async def test_the_openai_batch_lines_are_written_as_the_whole_way_writes_them(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(8))
    job = job_for(base_url, tmp_path)
    await run(job, output_format="openai-batch")
    lines = sorted(p for p in tmp_path.iterdir() if p.suffix == ".jsonl" and p.name != "in.jsonl")
    assert len(lines) == 1
    written = lines[0].read_bytes()
    lines[0].unlink()
    scans[:] = []
    await run(job, output_format="openai-batch")
    assert scans == [] and endpoint.requests == 8
    assert lines[0].read_bytes() == written


async def test_leftovers_are_removed_and_the_lock_is_held(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(10))
    job = job_for(base_url, tmp_path)
    await run(job)
    scans[:] = []
    leftover = tmp_path / ".out.parquet.0123456789ab.tmp"
    leftover.write_bytes(b"half a file")
    await run(job)
    assert not leftover.exists()

    lock = OutputLock(tmp_path / "out.parquet")
    try:
        with pytest.raises(OutputBusy) as busy:
            await run(job)
        assert busy.value.exit_code == 3
    finally:
        lock.release()
    assert scans == [] and endpoint.requests == 10


async def test_schema_via_and_stream_options_kept_by_the_first_run_are_kept(
    tmp_path: Path, scans: list[Path]
) -> None:
    """``schema_via = "auto"`` settled on another way and ``stream_options`` refused:
    the rerun reports both as the whole way does, and the metadata keeps them."""
    from tests.test_schema_via import make_job as structured_job

    write_jsonl(tmp_path / "in.jsonl", tickets(6))
    config = MockConfig(
        schema_via="json_object_schema", strict=True, unknown_fields=("stream_options",)
    )
    async with serve(config) as server:
        job = structured_job(
            server.base_url, tmp_path / "in.jsonl", tmp_path / "out.parquet", stream=True
        )
        first = await run(job)
        assert first.schema_via == "json_object_schema" and first.stream_options_refused
        kept = {k: metadata(first.output)[k] for k in ("schema_via", "stream_options")}
        sent = server.stats.requests
        touch(tmp_path / "in.jsonl")
        whole = await run(job)
        scans[:] = []
        answered = await run(job)
        assert server.stats.requests == sent
    assert scans == []
    assert said(answered) == said(whole)
    assert answered.schema_via_refused == ("json_schema",)
    assert "schema via  json_object_schema (auto: the server does not take json_schema)" in (
        answered.summary()
    )
    assert "stream_options not sent: the server refused it" in answered.summary()
    assert {k: metadata(answered.output)[k] for k in kept} == kept


async def test_a_batch_job_submits_nothing_and_says_its_tiers(
    tmp_path: Path, scans: list[Path]
) -> None:
    from tests.test_batch_api import FAST, batch_stats

    write_jsonl(tmp_path / "in.jsonl", tickets(20))
    async with serve(MockConfig(**FAST)) as server:
        for mode, keys in (("batch", {}), ("hybrid", {"deadline": "10m"})):
            out = f"{mode}.parquet"
            job = make_job(server.base_url, tmp_path / "in.jsonl", tmp_path / out, **keys)
            job = replace(job, mode=mode, batch_poll_s=1.0)
            first = await run(job)
            batches = (await batch_stats(server))["batches"]
            touch(tmp_path / "in.jsonl")
            whole = await run(job)
            assert (await batch_stats(server))["batches"] == batches, "an empty batch submitted"
            scans[:] = []
            answered = await run(job)
            assert scans == []
            assert (await batch_stats(server))["batches"] == batches
            assert answered.tiers == first.tiers == whole.tiers
            assert said(answered) == said(whole)
            assert bool(answered.deadline) == (mode == "hybrid")
            assert not (tmp_path / f"{out}.partial").exists()


@pytest.mark.ray
def test_the_ray_engine_answers_from_the_output_too(tmp_path: Path, scans: list[Path]) -> None:
    from batchrun.engines.ray import run_on_ray

    write_jsonl(tmp_path / "in.jsonl", tickets(12))

    async def first_run() -> tuple[Job, RunResult, int]:
        async with serve(MockConfig()) as server:
            job = make_job(server.base_url, tmp_path / "in.jsonl", tmp_path / "out.parquet")
            return job, await run(job), server.stats.requests

    job, first, sent = asyncio.run(first_run())
    assert sent == 12
    before, scans[:] = stamp(first.output), []
    # Nothing listens there now: nothing is sent, and no Ray session is started.
    again = run_on_ray(job, RunOptions(progress=False))
    assert scans == [] and stamp(first.output) == before
    assert (again.ok, again.resumed, again.requests) == (12, 12, 0)


# ---- the whole way, whenever the output cannot tell -----------------------------------


async def test_an_input_touched_since_goes_the_whole_way_once(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(30))
    job = job_for(base_url, tmp_path)
    await run(job)
    touch(tmp_path / "in.jsonl")
    before, scans[:] = stamp(tmp_path / "out.parquet"), []

    again = await run(job)
    assert (again.ok, again.resumed, endpoint.requests) == (30, 30, 30)
    assert len(scans) == 2, "the input was not checked"
    assert stamp(tmp_path / "out.parquet") != before, "the fingerprint was not renewed"
    scans[:] = []
    await run(job)
    assert scans == [] and endpoint.requests == 30


async def test_a_changed_input_is_refused_as_before(
    served: tuple[Endpoint, str], tmp_path: Path
) -> None:
    endpoint, base_url = served
    rows = tickets(20)
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = job_for(base_url, tmp_path)
    await run(job)
    rows[7]["ticket"] = "Another ticket altogether."
    write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(ResumeConflict, match="differs from what this job sends now"):
        await run(job)
    assert endpoint.requests == 20


async def test_a_changed_job_is_refused_as_before(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(10))
    await run(job_for(base_url, tmp_path))
    before, scans[:] = stamp(tmp_path / "out.parquet"), []
    with pytest.raises(ResumeConflict, match=r"written by a different job .*`temperature`"):
        await run(job_for(base_url, tmp_path, temperature=0.9))
    assert len(scans) == 2 and endpoint.requests == 10
    assert stamp(tmp_path / "out.parquet") == before


async def test_changed_prices_price_the_rows_again(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    """The cost column is priced when the output is written: other prices (or the
    same file changed in place, same path) go the whole way and write it again."""
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(12))
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    job = job_for(base_url, tmp_path, prices=str(prices))
    first = await run(job)
    printed = metadata(first.output)["fingerprint"]["prices"]
    answered = await run(job)
    assert answered.cost == first.cost and answered.cost is not None and answered.cost > 0

    prices.write_text(PRICES.replace("completion_per_million = 4", "completion_per_million = 8"))
    scans[:] = []
    repriced = await run(job)
    assert len(scans) == 2 and endpoint.requests == 12
    assert repriced.cost is not None and repriced.cost > first.cost
    column = pc.sum(pq.read_table(first.output, columns=["cost"]).column(0)).as_py()
    assert abs(column - float(repriced.cost)) < 1e-9
    assert metadata(first.output)["fingerprint"]["prices"] not in (printed, None)
    scans[:] = []
    again = await run(job)
    assert scans == [] and again.cost == repriced.cost

    unpriced = await run(job_for(base_url, tmp_path))
    assert unpriced.cost is None
    assert "cost" not in pq.read_schema(first.output).names


async def test_other_keep_columns_write_the_output_again(
    served: tuple[Endpoint, str], tmp_path: Path
) -> None:
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(10))
    await run(job_for(base_url, tmp_path))
    await run(job_for(base_url, tmp_path, keep_columns=["customer"]))
    assert "customer" in pq.read_schema(tmp_path / "out.parquet").names
    assert endpoint.requests == 10


async def test_retry_failed_goes_the_whole_way_while_a_row_failed(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(20))
    endpoint.failing = {"T-0004", "T-0009"}
    job = job_for(base_url, tmp_path)
    await run(job)
    endpoint.failing = set()
    scans[:] = []
    fixed = await run(job, retry_failed=True)
    assert (fixed.ok, fixed.failed, endpoint.requests, len(scans)) == (20, 0, 22, 2)
    scans[:] = []
    again = await run(job, retry_failed=True)
    assert (again.ok, endpoint.requests, scans) == (20, 22, [])


async def test_restart_and_reuse_go_the_whole_way(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(10))
    job = job_for(base_url, tmp_path)
    await run(job)
    await run(job_for(base_url, tmp_path, "earlier.parquet"))
    assert endpoint.requests == 20

    scans[:] = []
    reused = await run(job, reuse=(tmp_path / "earlier.parquet",))
    assert len(scans) == 2 and endpoint.requests == 20
    assert (reused.ok, reused.resumed, reused.reused) == (10, 10, 0)

    scans[:] = []
    restarted = await run(job, restart=True)
    assert len(scans) == 2 and endpoint.requests == 30
    assert (restarted.ok, restarted.resumed) == (10, 0)


async def test_an_unfinished_run_beside_the_output_goes_the_whole_way(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    """A journal beside the finished output (of the run that wrote it, cut short) is
    resumed: completed from the output, nothing sent."""
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(15))
    job = job_for(base_url, tmp_path)
    await run(job)
    out = tmp_path / "out.parquet"
    partial = batchrun.journal.partial_dir(out)
    partial.mkdir()
    meta = metadata(out)
    (partial / "job.json").write_bytes(orjson.dumps({**meta["identity"], "run_id": meta["run_id"]}))
    lines = [
        orjson.dumps({k: journal_value(v) for k, v in row.items()}) + b"\n"
        for row in pq.read_table(out).to_pylist()[:5]
    ]
    (partial / "journal.jsonl").write_bytes(b"".join(lines))
    before, scans[:] = stamp(out), []
    again = await run(job)
    assert len(scans) == 2 and endpoint.requests == 15
    assert again.ok == 15 and not partial.exists() and stamp(out) != before


async def test_an_output_without_a_fingerprint_goes_the_whole_way(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    """An output an older batchrun wrote (no fingerprint) is read the whole way once,
    and written again with one."""
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(10))
    job = job_for(base_url, tmp_path)
    await run(job)
    out = tmp_path / "out.parquet"
    table = pq.read_table(out)
    meta = metadata(out)
    del meta["fingerprint"]
    pq.write_table(table.replace_schema_metadata({b"batchrun": orjson.dumps(meta)}), out)
    scans[:] = []
    again = await run(job)
    assert len(scans) == 2 and endpoint.requests == 10 and again.ok == 10
    assert "fingerprint" in metadata(out)
    scans[:] = []
    await run(job)
    assert scans == []


async def test_a_merged_output_without_every_row_is_not_finished(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(30))
    shards = []
    for k in range(2):
        part = tmp_path / f"part-{k}.parquet"
        await run(job_for(base_url, tmp_path, part.name), shard=(k, 2))
        shards.append(part)
    merged = tmp_path / "out.parquet"
    merge_outputs(shards, merged)
    scans[:] = []
    whole = await run(job_for(base_url, tmp_path))
    assert (whole.ok, endpoint.requests, scans) == (30, 30, [])

    merge_outputs(shards[:1], merged, allow_missing=True)
    assert "fingerprint" not in metadata(merged)
    lacking = 30 - pq.read_metadata(merged).num_rows
    again = await run(job_for(base_url, tmp_path))
    assert again.ok == 30 and endpoint.requests == 30 + lacking and len(scans) == 2


# ---- plan ------------------------------------------------------------------------------


async def test_plan_of_a_finished_job_agrees_with_the_run(
    served: tuple[Endpoint, str], tmp_path: Path, scans: list[Path]
) -> None:
    endpoint, base_url = served
    write_jsonl(tmp_path / "in.jsonl", tickets(16))
    endpoint.failing = {"T-0001", "T-0005", "T-0011"}
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    job = job_for(base_url, tmp_path, prices=str(prices))
    first = await run(job)
    scans[:] = []
    planned = plan_job(job, RunOptions(progress=False))
    assert scans == []
    assert (planned.rows, planned.to_send, planned.done, planned.failed) == (16, 0, 16, 3)
    assert planned.currency == "USD" and planned.cost_low == 0
    assert "16 with a result from an earlier run" in planned.text()
    assert "3 of them failed: --retry-failed sends them again" in planned.text()

    touch(tmp_path / "in.jsonl")
    whole = plan_job(job, RunOptions(progress=False))
    assert len(scans) == 1  # the whole way reads the input (no journal: a plan writes nothing)
    assert whole == planned

    retried = plan_job(job, RunOptions(progress=False, retry_failed=True))
    assert (retried.to_send, retried.done, retried.failed) == (3, 16, 3)
    again = await run(job, retry_failed=True)
    assert again.requests == 3 and first.failed == 3 and endpoint.requests == 16 + 3

"""Promises that hold at the edges: never pay twice.

Each test talks to a real aiohttp endpoint on 127.0.0.1 that counts requests per
row id (the prompt starts with ``Row {id}:``) and asserts that no row whose answer
is on disk is sent again:

- a rerun of a finished job killed (kill -9, SIGTERM) while it reads the finished
  output or takes it back into a journal;
- two runs on one output at once (the lock);
- a damaged line in the middle of the journal (garbage, NUL bytes);
- a full disk while journaling, while writing the Parquet file and while writing
  the OpenAI batch lines (exit 6, no temporary file left);
- an unreadable ``job.json``;
- Ctrl-C / SIGTERM before sending starts and during the final write.

Subprocesses run ``python -m batchrun`` (or the same CLI behind a small hook that
slows a step down or signals itself at a chosen point: deterministic, no sleeps
to guess), always with a timeout and killed in a finally.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web

import batchrun.journal
import batchrun.outputs
from batchrun.config import Job
from batchrun.engines.local import run_job
from batchrun.errors import DiskFull, ResumeConflict
from batchrun.lifecycle import RunOptions
from tests.conftest import REPO, assert_exit, invoke, make_job, run_app, tickets, write_jsonl
from tests.procs import Done, Proc, Procs, procs_in

pytestmark = pytest.mark.timeout(120)

PY = sys.executable
TEMPLATE = "Row {id}: {ticket}"
JOB_KEYS: dict[str, Any] = {"model": "m", "prompt_template": TEMPLATE, "concurrency": 8}
_ROW_ID = re.compile(r"Row (\S+):")


# ---------------------------------------------------------------- the counting endpoint


class CountingEndpoint:
    """A chat-completions endpoint that counts the requests it gets per row id."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.counts: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        return app

    async def _answer(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        match = _ROW_ID.match(body["messages"][-1]["content"])
        assert match, body
        row_id = match.group(1)
        self.counts[row_id] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return web.json_response(
            {
                "id": f"cmpl-{row_id}",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"answer to {row_id}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            }
        )

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    def sent_again(self, answered: set[str] | list[str]) -> list[str]:
        """The ``answered`` rows (answer on disk) that were requested more than once."""
        return sorted(i for i in answered if self.counts[i] > 1)


@pytest.fixture
def endpoint(threaded: Any) -> Iterator[tuple[CountingEndpoint, str]]:
    """A counting endpoint served from a thread (the CLI runs its own loop)."""
    counting = CountingEndpoint()
    yield counting, threaded(lambda: run_app(counting.app()))


@pytest.fixture
def slow_endpoint(threaded: Any) -> Iterator[tuple[CountingEndpoint, str]]:
    counting = CountingEndpoint(latency_s=0.05)
    yield counting, threaded(lambda: run_app(counting.app()))


# ---------------------------------------------------------------- subprocesses

# The CLI behind a hook chosen by EDGE_HOOK; EDGE_MARKER gets a line per step it
# reaches, so a test can act at that step instead of guessing a delay.
HOOKED_CLI = r"""
import os, signal, sys, time

hook = os.environ.get("EDGE_HOOK", "")
marker = os.environ["EDGE_MARKER"]


def mark(text):
    with open(marker, "a") as fh:
        fh.write(text + "\n")


if hook == "slow-take-back":
    # Reading the finished output back in small, slow batches: a kill lands mid-copy.
    import pyarrow.parquet as pq

    iter_batches = pq.ParquetFile.iter_batches

    def slow(self, *args, **kwargs):
        kwargs["batch_size"] = 200
        for n, batch in enumerate(iter_batches(self, *args, **kwargs)):
            mark(f"batch {n}")
            yield batch
            time.sleep(0.05)

    pq.ParquetFile.iter_batches = slow
elif hook in ("sigterm-final-write", "sigint-final-write"):
    import pyarrow.parquet as pq

    signum = signal.SIGTERM if hook.startswith("sigterm") else signal.SIGINT
    write_batch = pq.ParquetWriter.write_batch

    def signalled(self, *args, **kwargs):
        mark("final write")
        os.kill(os.getpid(), signum)
        time.sleep(0.3)
        return write_batch(self, *args, **kwargs)

    pq.ParquetWriter.write_batch = signalled
elif hook in ("sigterm-at-start", "sigint-at-start"):
    import batchrun.logs

    signum = signal.SIGTERM if hook.startswith("sigterm") else signal.SIGINT
    setup_logging = batchrun.logs.setup_logging

    def signalled(*args, **kwargs):
        mark("start")
        os.kill(os.getpid(), signum)
        time.sleep(0.3)
        return setup_logging(*args, **kwargs)

    batchrun.logs.setup_logging = signalled

from batchrun.cli import main

main(args=sys.argv[1:], prog_name="batchrun")
"""


class HookedProcs(Procs):
    """``batchrun`` subprocesses, each run through HOOKED_CLI when given a hook;
    the hook writes a line to ``marker`` each time it fires."""

    @property
    def marker(self) -> Path:
        return self.folder / "marker"

    def marks(self) -> list[str]:
        try:
            return self.marker.read_text().splitlines()
        except FileNotFoundError:
            return []

    def batchrun(self, args: list[str], hook: str = "") -> Proc:
        """``batchrun ARGS`` with no API key in its environment."""
        self.marker.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env["EDGE_HOOK"] = hook
        env["EDGE_MARKER"] = str(self.marker)
        head = [PY, "-c", HOOKED_CLI] if hook else [PY, "-m", "batchrun"]
        return self.start([*head, *args], env)

    def run_batchrun(self, args: list[str], hook: str = "", timeout: float = 60.0) -> Done:
        return self.wait(self.batchrun(args, hook), timeout)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[HookedProcs]:
    with procs_in(tmp_path / "procs", HookedProcs) as p:
        yield p


def wait_until(predicate: Any, timeout: float, what: str, popen: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if popen is not None and popen.poll() is not None:
            pytest.fail(f"the run ended (rc {popen.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


# ---------------------------------------------------------------- job helpers


def run_args(inp: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    """``batchrun run`` arguments: a job of flags alone, no key."""
    return [
        "run",
        "--input",
        str(inp),
        "--prompt-template",
        TEMPLATE,
        "--model",
        "m",
        "--output",
        str(out),
        "--base-url",
        base_url,
        "--api-key-env",
        "",
        "-q",
        *extra,
    ]


def journal_path(out: Path) -> Path:
    return batchrun.journal.partial_dir(out) / "journal.jsonl"


def journal_lines(out: Path) -> int:
    try:
        return journal_path(out).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def journaled_ids(out: Path) -> set[str]:
    """The row ids with a readable record in the journal (a record after a run of
    NUL bytes counts: the zeros are damage before it, the record is whole)."""
    ids = set()
    with contextlib.suppress(FileNotFoundError):
        for line in journal_path(out).read_bytes().split(b"\n"):
            with contextlib.suppress(orjson.JSONDecodeError):
                ids.add(orjson.loads(line.rpartition(b"\0")[2])["id"])
    return ids


def assert_finished(out: Path, ids: list[str]) -> None:
    """One ok row per input id, in order; no journal, lock or temporary file left."""
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == ids
    assert all(r["status"] == "ok" for r in rows)
    assert_no_leftovers(out.parent)


def assert_no_leftovers(folder: Path) -> None:
    left = sorted(
        p.name
        for p in folder.iterdir()
        if p.name.endswith((".tmp", ".partial", ".lock")) or ".tmp" in p.name
    )
    assert left == [], f"left behind: {left}"


async def run_in_loop_until(job: Job, out: Path, lines: int) -> None:
    """Start ``job`` in this loop and cancel it once the journal holds ``lines`` lines."""
    task = asyncio.create_task(run_job(job, RunOptions(progress=False)))
    deadline = time.monotonic() + 20
    while journal_lines(out) < lines:
        assert not task.done(), task
        assert time.monotonic() < deadline, "the journal did not grow"
        await asyncio.sleep(0.002)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------- 1. the take-back


@pytest.mark.parametrize("touched", [False, True], ids=["answered", "taken-back"])
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_rerun_killed_during_the_take_back_sends_nothing(
    tmp_path: Path,
    procs: HookedProcs,
    endpoint: tuple[CountingEndpoint, str],
    signum: int,
    touched: bool,
) -> None:
    """A rerun of a finished job reads the finished output: its footer and a few
    columns when the output shows nothing is left to send, every row, copied back
    into a journal, when it cannot tell (the input touched since). Killed midway,
    the next run must still see a finished job and send nothing."""
    counting, base_url = endpoint
    rows = tickets(3000)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    args = run_args(inp, out, base_url, "--concurrency", "32")
    first = procs.run_batchrun(args)
    assert first.rc == 0, first.text
    assert counting.requests == len(rows)
    if touched:
        os.utime(inp, ns=(inp.stat().st_atime_ns, inp.stat().st_mtime_ns + 10**9))

    rerun = procs.batchrun(args, hook="slow-take-back")
    # 15 batches of 200 rows, 50 ms each: stop it a third of the way through.
    wait_until(lambda: len(procs.marks()) >= 5, 30, "the take-back under way", rerun)
    os.kill(rerun.pid, signum)
    stopped = procs.wait(rerun, timeout=20)
    assert stopped.rc == (-signal.SIGKILL if signum == signal.SIGKILL else 143), stopped.text
    assert "Traceback" not in stopped.text
    assert out.exists(), "the finished output must stay until its copy is complete"

    again = procs.run_batchrun(args)
    resent = counting.requests - len(rows)
    print(f"\ntake-back stopped by signal {signum}: rerun sent {resent} of {len(rows)} rows")
    assert again.rc == 0, again.text
    assert resent == 0, f"{resent} answered rows sent again"
    assert_finished(out, ids)


async def test_an_interrupted_take_back_left_by_an_older_version_is_completed(
    tmp_path: Path,
) -> None:
    """A journal that holds only part of the finished output it was taken back from
    (what an interrupted take-back left before it was made atomic, or a finish
    stopped while removing its journal) is completed from that output."""
    counting = CountingEndpoint()
    rows = tickets(300)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with run_app(counting.app()) as base_url:
        job = make_job(base_url, inp, out, **JOB_KEYS)
        await run_job(job, RunOptions(progress=False))
        run_id = orjson.loads(pq.read_schema(out).metadata[b"batchrun"])["run_id"]
        for kept in (120, 0):
            # The state an interrupted take-back left: the first `kept` rows journaled.
            partial = batchrun.journal.partial_dir(out)
            partial.mkdir()
            settings = orjson.loads(pq.read_schema(out).metadata[b"batchrun"])["identity"]
            (partial / "job.json").write_bytes(orjson.dumps({**settings, "run_id": run_id}))
            lines = []
            for row in pq.read_table(out).to_pylist()[:kept]:
                rec = {k: batchrun.outputs.journal_value(v) for k, v in row.items()}
                lines.append(orjson.dumps(rec) + b"\n")
            journal_path(out).write_bytes(b"".join(lines))
            result = await run_job(job, RunOptions(progress=False))
            assert result.exit_code == 0
            assert counting.requests == len(rows), f"{counting.requests - len(rows)} sent again"
            assert_finished(out, ids)


# ---------------------------------------------------------------- 2. the lock


def test_a_second_run_on_the_same_output_exits_3_at_once(
    tmp_path: Path, procs: HookedProcs, slow_endpoint: tuple[CountingEndpoint, str]
) -> None:
    counting, base_url = slow_endpoint
    rows = tickets(300)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    args = run_args(inp, out, base_url, "--concurrency", "4")
    first = procs.batchrun(args)
    wait_until(lambda: journal_lines(out) >= 10, 30, "the first run sending", first)

    t0 = time.monotonic()
    second = procs.run_batchrun(args, timeout=30)
    second_s = time.monotonic() - t0
    print(
        f"\nsecond run: exit {second.rc} after {second_s:.2f}s, {counting.requests} requests "
        f"for {len(rows)} rows so far: {second.err.strip()[-300:]}"
    )
    assert first.poll() is None, "the first run must still be sending"
    assert second.rc == 3, second.text
    assert "Traceback" not in second.text
    assert f"PID {first.pid}" in second.err
    assert str(out) in second.err

    # plan writes nothing, so it takes no lock: it works while the run goes on.
    planned = procs.run_batchrun(["plan", *[a for a in args[1:] if a != "-q"]])
    assert planned.rc == 0, planned.text

    done = procs.wait(first, timeout=60)
    assert done.rc == 0, done.text
    assert counting.requests == len(rows), f"{counting.requests} requests for {len(rows)} rows"
    assert_finished(out, ids)


def test_a_lock_left_by_a_killed_run_does_not_block(
    tmp_path: Path, procs: HookedProcs, slow_endpoint: tuple[CountingEndpoint, str]
) -> None:
    counting, base_url = slow_endpoint
    rows = tickets(200)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    args = run_args(inp, out, base_url, "--concurrency", "8")
    first = procs.batchrun(args)
    wait_until(lambda: journal_lines(out) >= 10, 30, "the first run sending", first)
    os.kill(first.pid, signal.SIGKILL)
    first.popen.wait(timeout=10)
    answered = journaled_ids(out)
    assert answered

    again = procs.run_batchrun(args)
    assert again.rc == 0, again.text
    assert counting.sent_again(answered) == []
    assert_finished(out, ids)


async def test_the_lock_holds_in_one_process_too(tmp_path: Path) -> None:
    """Two Python API runs on one output (two notebooks cells, two threads) do not mix."""
    counting = CountingEndpoint(latency_s=0.02)
    rows = tickets(100)
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with run_app(counting.app()) as base_url:
        job = make_job(base_url, inp, out, **(JOB_KEYS | {"concurrency": 4}))
        first = asyncio.create_task(run_job(job, RunOptions(progress=False)))
        while journal_lines(out) < 5:
            await asyncio.sleep(0.005)
        from batchrun.errors import OutputBusy

        with pytest.raises(OutputBusy) as info:
            await run_job(job, RunOptions(progress=False))
        assert info.value.exit_code == 3
        assert f"PID {os.getpid()}" in str(info.value)
        result = await first
        assert result.exit_code == 0
        # Released at the end: the next run takes it back and sends nothing.
        await run_job(job, RunOptions(progress=False))
    assert counting.requests == len(rows)
    assert_finished(out, [str(r["id"]) for r in rows])


async def test_a_file_system_without_locks_runs_unlocked_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    counting = CountingEndpoint()
    rows = tickets(20)
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    monkeypatch.setattr(fcntl, "flock", no_locks)
    async with run_app(counting.app()) as base_url:
        with caplog.at_level(logging.WARNING, logger="batchrun"):
            result = await run_job(
                make_job(base_url, inp, out, **JOB_KEYS), RunOptions(progress=False)
            )
    assert result.exit_code == 0 and counting.requests == len(rows)
    assert any("cannot lock" in r.getMessage() for r in caplog.records)
    assert_finished(out, [str(r["id"]) for r in rows])


# ---------------------------------------------------------------- 3. damaged journal lines


def _garbage(lines: list[bytes]) -> tuple[list[bytes], int]:
    return [*lines[:5], b"}{ this is not a record\n", *lines[5:]], 0


def _nul_line(lines: list[bytes]) -> tuple[list[bytes], int]:
    # A power cut left zeros where one record was: that record is lost, the rest kept.
    return [*lines[:5], b"\0" * (len(lines[5]) - 1) + b"\n", *lines[6:]], 1


def _nul_block(lines: list[bytes]) -> tuple[list[bytes], int]:
    # Zeros before a record, without a newline: the record after them is whole.
    return [*lines[:5], b"\0" * 4096 + lines[5], *lines[6:]], 0


@pytest.mark.parametrize("damage", [_garbage, _nul_line, _nul_block], ids=lambda f: f.__name__)
async def test_a_damaged_line_mid_journal_loses_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    counting = CountingEndpoint(latency_s=0.002)
    rows = tickets(60)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with run_app(counting.app()) as base_url:
        job = make_job(base_url, inp, out, **(JOB_KEYS | {"concurrency": 2}))
        await run_in_loop_until(job, out, 30)
        lines = journal_path(out).read_bytes().splitlines(keepends=True)
        damaged, lost = damage(lines)
        journal_path(out).write_bytes(b"".join(damaged))
        readable = journaled_ids(out)
        assert len(readable) == len(lines) - lost
        before = counting.requests
        with caplog.at_level(logging.WARNING, logger="batchrun"):
            result = await run_job(job, RunOptions(progress=False))
        sent = counting.requests - before
    print(
        f"\n{damage.__name__}: {sent} requests on resume, {len(rows) - len(readable)} rows unsaved"
    )
    assert result.exit_code == 0
    assert counting.sent_again(readable) == [], "a row with a readable record was sent again"
    assert sent == len(rows) - len(readable)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if damage is _nul_block:
        assert not any("unreadable" in w for w in warnings), warnings
    else:
        assert any("1 unreadable line" in w and str(journal_path(out)) in w for w in warnings), (
            warnings
        )
    assert_finished(out, ids)


async def test_damage_mid_journal_and_a_torn_tail(tmp_path: Path) -> None:
    """A garbage line is skipped and kept; only a torn last line is cut off, and the
    records appended next start on a clean line."""
    counting = CountingEndpoint(latency_s=0.002)
    rows = tickets(40)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with run_app(counting.app()) as base_url:
        job = make_job(base_url, inp, out, **(JOB_KEYS | {"concurrency": 2}))
        await run_in_loop_until(job, out, 20)
        lines = journal_path(out).read_bytes().splitlines(keepends=True)
        torn = lines[-1][: len(lines[-1]) // 2]
        journal_path(out).write_bytes(b"".join([*lines[:3], b"garbage\n", *lines[3:-1], torn]))
        readable = journaled_ids(out)
        assert len(readable) == len(lines) - 1
        before = counting.requests
        await run_job(job, RunOptions(progress=False))
    assert counting.sent_again(readable) == []
    assert counting.requests - before == len(rows) - len(readable)  # the torn row among them
    assert_finished(out, ids)


# ---------------------------------------------------------------- 12. a full disk


class _FullDiskOs:
    """``os`` as batchrun.journal sees it, whose ``write`` fails with ENOSPC after ``keep`` writes."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        if self.writes >= self.keep:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.writes += 1
        return os.write(fd, data)


def _enospc(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


async def test_disk_full_while_journaling_exits_6_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = CountingEndpoint(latency_s=0.002)
    rows = tickets(120)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with run_app(counting.app()) as base_url:
        job = make_job(base_url, inp, out, **JOB_KEYS)
        monkeypatch.setattr(batchrun.journal, "os", _FullDiskOs(keep=40))
        with pytest.raises(DiskFull) as info:
            await run_job(job, RunOptions(progress=False))
        monkeypatch.undo()
        assert info.value.exit_code == 6
        message = str(info.value)
        assert str(journal_path(out)) in message and "free space" in message.lower()
        assert "run the same command again" in message
        answered = journaled_ids(out)
        assert len(answered) == 40
        result = await run_job(job, RunOptions(progress=False))
    assert result.exit_code == 0
    assert counting.sent_again(answered) == []
    assert_finished(out, ids)


async def test_disk_full_during_the_final_write_keeps_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = CountingEndpoint()
    rows = tickets(50)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with run_app(counting.app()) as base_url:
        job = make_job(base_url, inp, out, **JOB_KEYS)
        monkeypatch.setattr(pq.ParquetWriter, "write_batch", _enospc)
        with pytest.raises(DiskFull) as info:
            await run_job(job, RunOptions(progress=False))
        monkeypatch.undo()
        assert info.value.exit_code == 6
        assert str(out) in str(info.value) and "run the same command again" in str(info.value)
        assert not out.exists()
        assert journaled_ids(out) == set(ids), "the journal must be whole"
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        await run_job(job, RunOptions(progress=False))
    assert counting.requests == len(rows)
    assert_finished(out, ids)


class _FullFile:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, real: IO[bytes], room: int) -> None:
        self.real = real
        self.room = room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.real.write(data)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()


def test_disk_full_on_the_openai_batch_lines_exits_6_via_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: tuple[CountingEndpoint, str]
) -> None:
    counting, base_url = endpoint
    rows = tickets(30)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    args = run_args(inp, out, base_url, "--output-format", "openai-batch")[1:]
    path_open = Path.open

    def open_full(self: Path, *a: Any, **k: Any) -> Any:
        handle = path_open(self, *a, **k)
        return _FullFile(handle, room=100) if self.name.startswith(".out.jsonl.") else handle

    monkeypatch.setattr(Path, "open", open_full)
    result = invoke(*args)
    monkeypatch.undo()
    assert_exit(result, 6)
    assert "out.jsonl" in result.stderr and "Traceback" not in result.output
    assert "run the same command again" in result.stderr
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], list(tmp_path.iterdir())
    assert counting.requests == len(rows)

    again = invoke(*args)
    assert_exit(again, 0)
    assert counting.requests == len(rows), "the rerun sent rows again"
    assert len((tmp_path / "out.jsonl").read_bytes().splitlines()) == len(rows)
    assert_finished(out, ids)


def test_disk_full_mid_run_exits_6_via_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: tuple[CountingEndpoint, str]
) -> None:
    counting, base_url = endpoint
    rows = tickets(60)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    args = run_args(inp, out, base_url)[1:]
    monkeypatch.setattr(batchrun.journal, "os", _FullDiskOs(keep=20))
    result = invoke(*args)
    monkeypatch.undo()
    assert_exit(result, 6)
    assert "No space left on device" in result.stderr and str(journal_path(out)) in result.stderr
    answered = journaled_ids(out)
    assert len(answered) == 20
    again = invoke(*args)
    assert_exit(again, 0)
    assert counting.sent_again(answered) == []
    assert_finished(out, ids)


# ---------------------------------------------------------------- an unreadable job.json


async def test_an_unreadable_job_json_is_named_not_taken_for_a_changed_job(
    tmp_path: Path,
) -> None:
    counting = CountingEndpoint(latency_s=0.002)
    rows = tickets(40)
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with run_app(counting.app()) as base_url:
        job = make_job(base_url, inp, out, **(JOB_KEYS | {"concurrency": 2}))
        await run_in_loop_until(job, out, 10)
        job_json = batchrun.journal.partial_dir(out) / "job.json"
        job_json.write_bytes(b'{"model": "m", "temper')
        with pytest.raises(ResumeConflict) as info:
            await run_job(job, RunOptions(progress=False))
    message = str(info.value)
    assert info.value.exit_code == 2
    assert str(job_json) in message and "unreadable" in message
    assert "--restart" in message and "restore" in message.lower()
    assert "changed" not in message


# ---------------------------------------------------------------- signals outside sending


@pytest.mark.parametrize(
    ("hook", "code", "name"),
    [
        ("sigterm-final-write", 143, "SIGTERM"),
        ("sigint-final-write", 130, "Ctrl-C"),
        ("sigterm-at-start", 143, "SIGTERM"),
        ("sigint-at-start", 130, "Ctrl-C"),
    ],
)
def test_a_signal_before_or_after_sending_ends_with_our_message(
    tmp_path: Path,
    procs: HookedProcs,
    endpoint: tuple[CountingEndpoint, str],
    hook: str,
    code: int,
    name: str,
) -> None:
    counting, base_url = endpoint
    rows = tickets(100)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    args = run_args(inp, out, base_url)
    stopped = procs.run_batchrun(args, hook=hook)
    print(f"\n{hook}: exit {stopped.rc}, stderr {stopped.err.strip()!r}")
    assert procs.marks(), "the hook never ran"
    assert stopped.rc == code, stopped.text
    assert "Traceback" not in stopped.text and "Aborted!" not in stopped.text
    assert f"batchrun: Stopped by {name}" in stopped.err
    assert "run the same command again" in stopped.err
    assert len(stopped.err.strip().splitlines()) == 1, stopped.err
    sent = counting.requests
    if hook.endswith("final-write"):
        assert sent == len(rows)
        assert out.exists() or journaled_ids(out) == set(ids), "the journal must be whole"
    else:
        assert sent == 0
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]

    again = procs.run_batchrun(args)
    assert again.rc == 0, again.text
    assert counting.sent_again(ids) == []
    assert counting.requests == len(rows)
    assert_finished(out, ids)


# ---------------------------------------------------------------- the index: no lengths kept


def test_lines_are_read_to_their_newline_whatever_their_length(tmp_path: Path) -> None:
    """The index keeps a line's offset only: a batch's lines, together or scattered,
    short or far longer than the typical line, come back whole and alone."""
    from batchrun.journal_io import read_line, read_lines

    sizes = [10, 300, 200_000, 5, 70_000, 1, 4096, 4097, 8191, 40]
    lines = [(b"%d:" % i) + b"x" * n for i, n in enumerate(sizes)]
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    offsets = np.cumsum([0, *(len(line) + 1 for line in lines[:-1])]).astype(np.int64)
    fd = os.open(path, os.O_RDONLY)
    try:
        for typical in (1, 64, 4096):
            for rows in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 2, 0], [4], [8, 7, 6, 5]):
                assert read_lines(fd, offsets, rows, typical) == [lines[r] for r in rows]
        assert [read_line(fd, int(o), 16) for o in offsets] == lines
    finally:
        os.close(fd)


async def test_a_resumed_run_with_answers_of_every_length_sends_each_row_once(
    tmp_path: Path,
) -> None:
    """Answers from one byte to 100 KB, the run cancelled part way: the resume sends
    none of the rows with a result, and the output holds every answer whole."""

    class Lengthy(CountingEndpoint):
        async def _answer(self, request: web.Request) -> web.Response:
            response = await super()._answer(request)
            body = orjson.loads(response.body)
            row = int(body["id"].rsplit("-", 1)[1])
            body["choices"][0]["message"]["content"] = "y" * length_of(row)
            return web.json_response(body)

    def length_of(row: int) -> int:
        return 1 + 37 * row**2 % 100_000

    counting = Lengthy(latency_s=0.002)
    rows = tickets(120)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with run_app(counting.app()) as base_url:
        job = make_job(base_url, inp, out, **JOB_KEYS)
        await run_in_loop_until(job, out, 50)
        answered = journaled_ids(out)
        await run_job(job, RunOptions(progress=False))
    assert len(answered) >= 50 and counting.sent_again(answered) == []
    assert set(counting.counts) == set(ids)
    answers = pq.read_table(out, columns=["id", "completion"]).to_pylist()
    assert [len(a["completion"]) for a in answers] == [
        length_of(int(i.rsplit("-", 1)[1])) for i in ids
    ]
    assert_finished(out, ids)


# ---------------------------------------------------------------- the documented codes


def test_every_exit_code_is_in_the_readme_and_the_help() -> None:
    from click.testing import CliRunner

    from batchrun import errors
    from batchrun.cli import main

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.BatchrunError)
    }
    assert {2, 3, 4, 6} <= codes
    for code in codes:
        assert f"| {code} |" in table, f"README's exit-code table lacks {code}"
        assert re.search(rf"^\s+{code}\s", help_text, flags=re.M), f"run --help lacks {code}"
    assert "| 6 |" in table and "resum" in table.split("| 6 |", 1)[1].split("\n", 1)[0]

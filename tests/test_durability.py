"""Durability tests: kill -9, signals, faults, disk full, resume, reuse and bad input.

Every request goes to the embedded endpoint on 127.0.0.1: in this process
(``serve(MockConfig(...))``) or as a ``batchrun mock-server`` subprocess. Every
subprocess runs with a timeout and is killed in a finally (the ``procs`` fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

import batchrun.journal
import batchrun.outputs
from batchrun.engines.local import run_job
from batchrun.errors import ApiDown, JobError, OutputError, TooManyFailures
from batchrun.lifecycle import RunOptions
from batchrun.mock import FAULT_KINDS_DEFAULT, MockConfig, serve
from tests.conftest import make_job, port_of, tickets, write_jsonl
from tests.procs import Proc, Procs, procs_in

pytestmark = pytest.mark.timeout(90)

PY = sys.executable
TEMPLATE = "Summarize: {ticket}"
SECRET = "sk-durability-SECRET-7f3a9c2e51d04b8b"
# No proxy: every request of these tests goes to 127.0.0.1 directly.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# What this file's jobs lay over make_job's defaults (None: the Job's default stays);
# each call gives its concurrency.
JOB_KEYS: dict[str, Any] = {"model": "m", "prompt_template": TEMPLATE, "request_timeout_s": None}


# ---------------------------------------------------------------- helpers


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    with procs_in(tmp_path / "procs", Procs) as p:
        yield p


def get_json(url: str) -> Any:
    assert url.startswith("http://127.0.0.1:"), url
    with _OPENER.open(url, timeout=5) as resp:
        return orjson.loads(resp.read())


@dataclass
class MockProc:
    proc: Proc
    base_url: str

    def stats(self) -> dict[str, Any]:
        root = self.base_url.removesuffix("/v1")
        stats: dict[str, Any] = get_json(root + "/_stats")
        return stats

    def requests(self) -> int:
        return int(self.stats()["requests"])


def start_mock(procs: Procs, *args: str, env: dict[str, str] | None = None) -> MockProc:
    """``batchrun mock-server --port 0`` as a subprocess; returns once it listens."""
    ready = procs.folder / f"mock-ready-{len(procs.started)}"
    proc = procs.start(
        [PY, "-m", "batchrun", "mock-server", "--port", "0", "--ready-file", str(ready), *args],
        env=env,
    )
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.popen.poll() is not None:
            pytest.fail(f"mock server exited early: {proc.output()}")
        if time.monotonic() > deadline:
            pytest.fail("mock server did not get ready within 20s")
        time.sleep(0.02)
    base_url = ready.read_text()
    assert base_url.startswith("http://127.0.0.1:"), base_url
    return MockProc(proc, base_url)


def run_cmd(inp: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    """``batchrun run`` as a job of flags alone, sending no key unless ``extra`` says so."""
    return [
        PY,
        "-m",
        "batchrun",
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
        *extra,
    ]


def ids_of(rows: list[dict[str, object]]) -> list[str]:
    return [str(r["id"]) for r in rows]


def read_output(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def assert_complete(out: Path, ids: list[str], status: str | None = "ok") -> list[dict[str, Any]]:
    """The output exists, has exactly one row per input id (input order) and no .partial."""
    assert out.exists(), f"{out} was not written"
    rows = read_output(out)
    assert ids_of(rows) == ids
    assert [r["row"] for r in rows] == list(range(len(ids)))
    if status is not None:
        bad = [(r["id"], r["status"], r["error"]) for r in rows if r["status"] != status]
        assert not bad, bad[:5]
    assert not batchrun.journal.partial_dir(out).exists()
    return rows


def journal_path(out: Path) -> Path:
    return batchrun.journal.partial_dir(out) / "journal.jsonl"


def journal_lines(out: Path) -> int:
    try:
        return journal_path(out).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def journal_records(out: Path, ids: list[str]) -> list[dict[str, Any]]:
    """Every journal line complete JSON for a row of the input, no torn tail, no duplicate."""
    data = journal_path(out).read_bytes()
    assert not data or data.endswith(b"\n"), f"torn last journal line: {data[-200:]!r}"
    records = []
    for n, line in enumerate(data.split(b"\n")[:-1], 1):
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            pytest.fail(f"journal line {n} is not JSON ({exc}): {line[:200]!r}")
        assert isinstance(rec, dict), line
        assert ids[rec["row"]] == rec["id"], rec
        assert rec["status"] in ("ok", "error", "invalid"), rec
        records.append(rec)
    dups = sorted(row for row, n in Counter(r["row"] for r in records).items() if n > 1)
    assert not dups, f"rows journaled twice: {dups[:10]}"
    return records


def wait_for(predicate: Any, timeout: float, what: str, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.popen.poll() is not None:
            pytest.fail(
                f"process ended (rc {proc.popen.returncode}) before {what}: {proc.output()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def server_counts_by_hash(bodies: dict[str, int]) -> dict[str, int]:
    """The mock's per-body counts (full SHA-256 of the body) by the output's
    ``request_hash`` (a prefix of that digest)."""
    return {digest[:32]: count for digest, count in bodies.items()}


async def fast_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


async def small_sleep(seconds: float) -> None:
    """A real wait, capped at 20 ms."""
    await asyncio.sleep(min(seconds, 0.02))


# ---------------------------------------------------------------- 1. kill -9


def test_kill9_at_three_points_then_resume(tmp_path: Path, procs: Procs) -> None:
    server = start_mock(procs, "--latency-ms", "50")
    rows = tickets(400)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    cmd = run_cmd(inp, out, server.base_url, "--concurrency", "16", "-q")
    resent = []
    kills = 0
    for threshold in (40, 150, 260):
        before = journal_lines(out)
        assert before < threshold
        proc = procs.start(cmd)
        wait_for(
            lambda t=threshold: journal_lines(out) >= t, 20, f"{threshold} journal lines", proc
        )
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.popen.wait(timeout=10) == -signal.SIGKILL
        kills += 1
        # Resume reads this journal: it must be whole lines, each row once.
        records = journal_records(out, ids)
        assert all(r["status"] == "ok" for r in records)
        resent.append(server.requests() - len(records) - sum(resent))
    assert not out.exists()
    done = procs.run(cmd, timeout=30)
    assert done.rc == 0, done.text
    assert "Traceback" not in done.text
    out_rows = assert_complete(out, ids)
    assert all(r["attempts"] == 1 for r in out_rows)
    total = server.requests()
    # A kill loses at most the requests in flight: each of them is sent again once.
    assert total <= len(rows) + 16 * kills, (total, resent)
    # Every body the server saw more than once is one that was in flight at a kill.
    assert sum(c - 1 for c in server.stats()["bodies"].values()) == total - len(rows)
    print(
        f"\nkill -9: requests {total} for {len(rows)} rows; requests lost in flight at each kill: {resent}"
    )


async def test_resume_drops_a_torn_journal_tail(tmp_path: Path) -> None:
    """What a crash mid-write (or a power cut before the fsync) leaves at the end of
    the journal is cut off on resume: its row counts as unsent, and the records
    appended next start on a clean line."""
    rows = tickets(30)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(latency_s=0.02)) as server:
        job = make_job(server.base_url, inp, out, **JOB_KEYS, concurrency=2)
        task = asyncio.create_task(run_job(job, RunOptions(progress=False)))
        deadline = time.monotonic() + 10
        while journal_lines(out) < 6:
            assert not task.done() and time.monotonic() < deadline
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        records = journal_records(out, ids)
        done_rows = {r["row"] for r in records}
        torn_row = next(r for r in range(len(rows)) if r not in done_rows)
        whole = orjson.dumps({**records[0], "row": torn_row, "id": ids[torn_row]})
        with journal_path(out).open("ab") as fh:
            fh.write(whole[: len(whole) // 2])  # no newline: a torn write
        before = server.stats.requests
        result = await run_job(job, RunOptions(progress=False))
        sent = server.stats.requests - before
    assert result.exit_code == 0 and result.resumed == len(records)
    assert sent == len(rows) - len(records)
    out_rows = assert_complete(out, ids)
    assert out_rows[torn_row]["attempts"] == 1


# ---------------------------------------------------------------- 2. SIGTERM / SIGINT


@pytest.mark.parametrize(
    ("signum", "code", "name"),
    [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")],
    ids=["sigterm", "sigint"],
)
def test_signal_stops_after_requests_in_flight(
    tmp_path: Path, procs: Procs, signum: int, code: int, name: str
) -> None:
    server = start_mock(procs, "--latency-ms", "50")
    rows = tickets(200)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    cmd = run_cmd(inp, out, server.base_url, "--concurrency", "16", "-q")
    proc = procs.start(cmd)
    wait_for(lambda: journal_lines(out) >= 20, 20, "20 journal lines", proc)
    os.kill(proc.pid, signum)
    done = procs.wait(proc, timeout=15)
    assert done.rc == code, done.text
    assert done.wall_s < 5, f"took {done.wall_s:.1f}s to stop"
    assert "Traceback" not in done.text
    assert name in done.err
    assert "run the same command again" in done.err
    assert f"{out}.partial" in done.err
    records = journal_records(out, ids)
    assert 20 <= len(records) < len(rows)
    # The requests in flight were let finish: every request sent has its result on disk.
    assert server.requests() == len(records)
    assert not out.exists()

    again = procs.run(cmd, timeout=30)
    assert again.rc == 0, again.text
    assert_complete(out, ids)
    assert server.requests() == len(rows), "a row was sent twice"


def test_sigterm_sends_no_retry_after_the_signal(tmp_path: Path, procs: Procs) -> None:
    """Rows waiting out a retry backoff when SIGTERM comes have no request in flight:
    the job stops at once and sends them no retry (the README: "stop sending, let
    requests in flight finish")."""
    # 16 workers; the first two attempts of each of the first 16 rows get 503, so
    # every worker then waits its second backoff (1.0 to 1.5 s).
    server = start_mock(procs, "--fail-first", "32", "--fail-first-kind", "503")
    rows = tickets(100)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    cmd = run_cmd(inp, out, server.base_url, "--concurrency", "16", "-q")
    proc = procs.start(cmd)
    wait_for(lambda: server.requests() >= 32, 20, "32 answers 503", proc)
    time.sleep(0.05)
    at_signal = server.requests()
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    done = procs.wait(proc, timeout=20)
    stopped_s = time.monotonic() - t0
    after = server.requests()
    print(
        f"\nSIGTERM in backoff: {after - at_signal} requests after it, stopped in {stopped_s:.2f}s"
    )
    assert done.rc == 143, done.text
    assert at_signal == 32
    assert after == at_signal, f"{after - at_signal} requests sent after SIGTERM"
    assert stopped_s < 0.8, stopped_s
    assert journal_lines(out) == 0

    again = procs.run(cmd, timeout=30)
    assert again.rc == 0, again.text
    assert_complete(out, ids)
    assert server.requests() == 32 + len(rows)


def test_sigint_during_the_input_scan_exits_130(tmp_path: Path, procs: Procs) -> None:
    """The scan runs before batchrun installs its signal handlers. A Ctrl-C then must
    still mean exit 130 with nothing sent, not exit 1 (the code for finished rows)."""
    server = start_mock(procs)
    rows = tickets(200)
    ids = [str(r["id"]) for r in rows]
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    inp = tmp_path / "t.jsonl"
    os.mkfifo(inp)  # the scan's first read blocks until the test writes
    regular = tmp_path / "t.jsonl.regular"
    regular.write_bytes(data)
    out = tmp_path / "out.parquet"
    cmd = run_cmd(inp, out, server.base_url, "-q")
    proc = procs.start(cmd)
    fd = -1
    deadline = time.monotonic() + 20
    while fd < 0:  # opening the write end succeeds once the scan opened the read end
        try:
            fd = os.open(inp, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == errno.ENXIO, exc
            assert proc.popen.poll() is None, proc.output()
            assert time.monotonic() < deadline, "the scan never opened the input"
            time.sleep(0.005)
    try:
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.3)
        os.replace(regular, inp)  # later passes over the input open a plain file
        os.set_blocking(fd, True)
        # The run may have stopped reading at once (and closed its end): fine too.
        with contextlib.suppress(BrokenPipeError):
            os.write(fd, data)
    finally:
        os.close(fd)
    done = procs.wait(proc, timeout=30)
    sent = server.requests()
    print(f"\nCtrl-C during the scan: rc {done.rc}, {sent} requests sent, stderr {done.err!r}")
    assert "Traceback" not in done.text and "Aborted!" not in done.text
    assert done.rc == 130, done.text
    assert "run the same command again" in done.err
    assert sent == 0, "requests were sent after Ctrl-C"

    again = procs.run(cmd, timeout=30)
    assert again.rc == 0, again.text
    assert_complete(out, ids)
    assert server.requests() == len(rows)


def test_second_sigint_stops_at_once(tmp_path: Path, procs: Procs) -> None:
    slow = start_mock(procs, "--latency-ms", "2000")
    rows = tickets(32)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    cmd = run_cmd(inp, out, slow.base_url, "--concurrency", "16", "-q")
    proc = procs.start(cmd)
    # 16 requests in flight (sent, no result yet); each has up to 2 s to go.
    wait_for(lambda: slow.requests() - journal_lines(out) >= 16, 20, "16 in flight", proc)
    lines = journal_lines(out)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    assert proc.popen.poll() is None, "the first Ctrl-C must wait for the requests in flight"
    os.kill(proc.pid, signal.SIGINT)
    done = procs.wait(proc, timeout=15)
    stopped_s = time.monotonic() - t0
    assert done.rc == 130, done.text
    # The requests in flight had >1.5 s left; a second Ctrl-C does not wait for them.
    assert stopped_s < 1.2, f"stopped {stopped_s:.2f}s after the first Ctrl-C"
    assert "Traceback" not in done.text
    assert "run the same command again" in done.err
    assert journal_lines(out) == lines, "an abandoned request was journaled"
    journal_records(out, ids)
    assert batchrun.journal.partial_dir(out).is_dir() and not out.exists()

    # The rerun, sent to a fast server on the same address (the base URL is part
    # of a run's identity: another one would be refused).
    slow.proc.popen.kill()
    slow.proc.popen.wait(timeout=10)
    fast = start_mock(procs, "--port", str(port_of(slow.base_url)))
    again = procs.run(run_cmd(inp, out, fast.base_url, "--concurrency", "16", "-q"), timeout=30)
    assert again.rc == 0, again.text
    assert_complete(out, ids)
    assert fast.requests() == len(rows) - lines
    print(f"\ndouble Ctrl-C: stopped {stopped_s:.2f}s after the first one")


# ---------------------------------------------------------------- 3. fault mix


async def test_fault_mix_every_row_ok_and_attempts_match_server(tmp_path: Path) -> None:
    n = 10_000
    rows = tickets(n)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    config = MockConfig(
        fault_rate=0.10, faults=FAULT_KINDS_DEFAULT, hang_s=1.0, retry_after_s=0.01, seed=20261129
    )
    assert "hang" in config.faults and "no-usage" in config.faults
    async with serve(config) as server:
        # 0.5 s, not less: the client and the server share this event loop, and on a
        # busy machine a shorter timeout can fire before the server has even counted
        # the request, which would break the exact attempts == requests check.
        job = make_job(
            server.base_url,
            inp,
            out,
            **(JOB_KEYS | {"request_timeout_s": 0.5}),
            concurrency=64,
            max_attempts=10,
        )
        t0 = time.monotonic()
        result = await run_job(job, RunOptions(progress=False), sleep=fast_sleep)
        wall = time.monotonic() - t0
        stats = server.stats.to_dict()
    out_rows = assert_complete(out, ids)
    assert (result.exit_code, result.ok, result.failed) == (0, n, 0), result
    by_outcome = stats["by_outcome"]
    # Every kind was drawn, so every kind was survived.
    assert set(by_outcome) == {"ok", *FAULT_KINDS_DEFAULT}, by_outcome
    attempts = [r["attempts"] for r in out_rows]
    assert sum(attempts) == stats["requests"] == result.requests
    assert result.retries == stats["requests"] - n
    seen = server_counts_by_hash(stats["bodies"])
    assert len(seen) == n and {r["request_hash"] for r in out_rows} == set(seen)
    repeated = 0
    for r in out_rows:
        count = seen[r["request_hash"]]
        assert r["attempts"] == count, (r["id"], r["attempts"], count)
        if count > 1:
            repeated += 1
            assert r["attempts"] > 1
    assert repeated > 0
    # A no-usage answer is a good answer: an ok row with the completion and null usage.
    no_usage = [r for r in out_rows if r["total_tokens"] is None]
    assert len(no_usage) == by_outcome["no-usage"] > 0
    for r in no_usage:
        assert r["status"] == "ok" and r["completion"].startswith(
            "Summary: Summarize: Ticket number"
        )
        assert r["prompt_tokens"] is None and r["completion_tokens"] is None
    assert all(r["completion"] for r in out_rows)
    print(
        f"\nfault mix: {n} rows, {stats['requests']} requests, {repeated} rows retried, "
        f"{wall:.1f}s; outcomes {by_outcome}"
    )


# ---------------------------------------------------------------- 4. max_attempts


async def test_too_few_attempts_record_the_last_cause(tmp_path: Path, procs: Procs) -> None:
    rows = tickets(10)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    # One request at a time: the first 6 requests get 503. A row waiting for its
    # retry lends its place, so the next row's first attempt may come between a
    # row's two: which rows fail depends on that order, not how they fail.
    async with serve(MockConfig(fail_first=6, fail_first_kind="503")) as server:
        job = make_job(server.base_url, inp, out, **JOB_KEYS, concurrency=1, max_attempts=2)
        result = await run_job(job, RunOptions(progress=False), sleep=fast_sleep)
        assert server.stats.requests == 6 + result.ok
    out_rows = assert_complete(out, ids, status=None)
    failed = [r for r in out_rows if r["status"] == "error"]
    assert result.exit_code == 1 and result.failed == len(failed) >= 1
    assert result.ok == 10 - len(failed)
    for r in failed:
        assert r["error"].startswith("HTTP 503"), r["error"]
        assert "Service unavailable" in r["error"]
        assert r["http_status"] == 503 and r["attempts"] == 2
        assert r["completion"] is None and r["total_tokens"] is None
    for r in out_rows:
        if r["status"] != "error":
            assert r["status"] == "ok" and r["attempts"] in (1, 2) and r["error"] is None
    # Every 503 is a failed row's (two each) or a retried ok row's (one each).
    retried_ok = sum(1 for r in out_rows if r["status"] == "ok" and r["attempts"] == 2)
    assert 2 * len(failed) + retried_ok == 6

    # The CLI says the same with exit code 1 (a real backoff wait between the two
    # attempts), for a job smaller than failures.FIRST_ROWS: more rows all failing
    # alike would stop the job instead.
    few = rows[:4]
    inp2 = write_jsonl(tmp_path / "few.jsonl", few)
    out2 = tmp_path / "cli.parquet"
    async with serve(MockConfig(fail_first=10**9, fail_first_kind="503")) as server:
        cmd = run_cmd(inp2, out2, server.base_url, "--max-attempts", "2", "-q")
        done = await asyncio.to_thread(procs.run, cmd, 30)
        assert server.stats.requests == 2 * len(few)
    assert done.rc == 1, done.text
    cli_rows = assert_complete(out2, [str(r["id"]) for r in few], status="error")
    assert all(r["attempts"] == 2 and r["error"].startswith("HTTP 503") for r in cli_rows)


# ---------------------------------------------------------------- 5. circuit breaker


async def test_api_down_stops_the_job_and_a_rerun_completes(tmp_path: Path) -> None:
    rows = tickets(300)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(fail_first=10**9, fail_first_kind="503")) as down:
        job = make_job(
            down.base_url,
            inp,
            out,
            **JOB_KEYS,
            concurrency=8,
            # Rows keep retrying past the breaker's second: no row ends failed
            # (which would let the failure watch stop the job first).
            max_attempts=1000,
            api_down_after_s=1.0,
        )
        t0 = time.monotonic()
        with pytest.raises(ApiDown) as info:
            await run_job(job, RunOptions(progress=False), sleep=small_sleep)
        stopped_s = time.monotonic() - t0
        sent = down.stats.requests
    assert info.value.exit_code == 3
    assert 1.0 <= stopped_s < 4.0, stopped_s
    assert "run the same command again" in str(info.value)
    assert "HTTP 503" in str(info.value)
    assert batchrun.journal.partial_dir(out).is_dir()
    assert not out.exists()
    records = journal_records(out, ids)
    assert len(records) < len(rows)
    assert all(r["status"] == "error" and r["http_status"] == 503 for r in records)

    async with serve(MockConfig(), port=port_of(down.base_url)) as healthy:
        job = make_job(healthy.base_url, inp, out, **JOB_KEYS, concurrency=8, api_down_after_s=1.0)
        result = await run_job(job, RunOptions(progress=False, retry_failed=True))
        assert healthy.stats.requests == len(rows)
    assert result.exit_code == 0 and result.ok == len(rows)
    assert_complete(out, ids)
    print(
        f"\napi down: stopped after {stopped_s:.2f}s, {sent} requests, {len(records)} rows failed"
    )


# ---------------------------------------------------------------- 6. max_failures


async def test_max_failures_count_and_fraction(tmp_path: Path) -> None:
    rows = tickets(20)
    for r in rows[1::2]:
        r["ticket"] = "Too long. " + "word " * 100  # over the 50-token context below
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    async with serve(MockConfig(context_tokens=50)) as server:
        out = tmp_path / "count.parquet"
        job = make_job(server.base_url, inp, out, **JOB_KEYS, concurrency=2, max_failures=3)
        with pytest.raises(TooManyFailures) as info:
            await run_job(job, RunOptions(progress=False), sleep=fast_sleep)
        assert info.value.exit_code == 3
        assert "max_failures=3" in str(info.value)
        assert "context_length_exceeded" in str(info.value)
        assert not out.exists()
        records = journal_records(out, ids)
        failed = [r for r in records if r["status"] == "error"]
        assert len(failed) == 4
        # A 400 is never retried; the other worker may have had one more in flight.
        assert all(r["attempts"] == 1 and r["http_status"] == 400 for r in failed)
        assert server.stats.by_outcome.get("400") in (4, 5)

        out = tmp_path / "fraction.parquet"
        job = make_job(server.base_url, inp, out, **JOB_KEYS, concurrency=2, max_failures=0.9)
        result = await run_job(job, RunOptions(progress=False), sleep=fast_sleep)
    assert result.exit_code == 1 and result.failed == 10 and result.ok == 10
    out_rows = assert_complete(out, ids, status=None)
    for r in out_rows[1::2]:
        assert r["status"] == "error" and r["attempts"] == 1 and r["http_status"] == 400
        assert "context_length_exceeded" in r["error"]
    assert all(r["status"] == "ok" for r in out_rows[0::2])


# ---------------------------------------------------------------- 7. disk full


class _DiskFullOs:
    """``os`` as batchrun.journal sees it, whose ``write`` fails after ``keep`` writes:
    with ENOSPC (``short=False``) or by writing half the bytes (``short=True``)."""

    def __init__(self, keep: int, short: bool) -> None:
        self.keep = keep
        self.short = short
        self.writes = 0
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        if self.writes < self.keep:
            self.writes += 1
            return os.write(fd, data)
        self.failures += 1
        if self.short:
            return os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("short", [False, True], ids=["enospc", "short-write"])
async def test_disk_full_keeps_whole_lines_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short: bool
) -> None:
    k = 25
    rows = tickets(200)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    fake = _DiskFullOs(k, short)
    async with serve(MockConfig(latency_s=0.005)) as server:
        job = make_job(server.base_url, inp, out, **JOB_KEYS, concurrency=8)
        monkeypatch.setattr(batchrun.journal, "os", fake)
        with pytest.raises(OutputError) as info:
            await run_job(job, RunOptions(progress=False))
        monkeypatch.undo()
        message = str(info.value)
        assert str(journal_path(out)) in message
        assert "free space" in message and "run the same command again" in message
        assert fake.failures >= 1
        records = journal_records(out, ids)
        assert len(records) == k, "the journal must hold exactly the lines written whole"
        assert all(r["status"] == "ok" for r in records)
        journaled = {r["request_hash"] for r in records}
        first = server.stats.requests

        result = await run_job(job, RunOptions(progress=False))
        seen = server_counts_by_hash(server.stats.bodies)
        resent = server.stats.requests - first
    assert result.exit_code == 0 and result.resumed == k
    out_rows = assert_complete(out, ids)
    assert resent == len(rows) - k
    assert all(seen[h] == 1 for h in journaled), "a journaled row was sent again"
    assert {r["request_hash"] for r in out_rows} >= journaled


# ---------------------------------------------------------------- 8. --reuse


async def test_reuse_sends_only_changed_and_new_rows(tmp_path: Path, procs: Procs) -> None:
    n = 20
    night1 = tickets(n)
    night2 = [dict(r) for r in night1]
    night2[3]["ticket"] = "Ticket 3 changed overnight. It is worse now."
    night2[7]["ticket"] = "Ticket 7 changed overnight. Still broken."
    night2.append(tickets(n + 1)[-1])
    ids2 = [str(r["id"]) for r in night2]
    inp1 = write_jsonl(tmp_path / "night1.jsonl", night1)
    inp2 = write_jsonl(tmp_path / "night2.jsonl", night2)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    out1 = earlier / "night1.parquet"
    async with serve(MockConfig()) as server:
        await run_job(
            make_job(server.base_url, inp1, out1, **JOB_KEYS, concurrency=16),
            RunOptions(progress=False),
        )
        assert server.stats.requests == n
        first = {r["id"]: r for r in read_output(out1)}
        changed = {"T-0003", "T-0007", f"T-{n:04d}"}
        for source in (out1, earlier):
            out2 = tmp_path / f"night2-{source.name}.parquet"
            before = server.stats.requests
            result = await run_job(
                make_job(server.base_url, inp2, out2, **JOB_KEYS, concurrency=16),
                RunOptions(progress=False, reuse=(source,)),
            )
            assert server.stats.requests - before == 3, f"--reuse {source}"
            rows2 = assert_complete(out2, ids2)
            reused = [r for r in rows2 if r["id"] not in changed]
            assert len(reused) == n - 2
            for r in reused:
                old = first[r["id"]]
                assert r["attempts"] == 0
                assert r["completion"] == old["completion"]
                assert r["total_tokens"] == old["total_tokens"]
                assert r["request_hash"] == old["request_hash"]
            for r in rows2:
                if r["id"] in changed:
                    assert r["attempts"] == 1
                    assert r["request_hash"] not in {o["request_hash"] for o in first.values()}
            assert result.reused == n - 2 and result.requests == 3 and result.resumed == 0
            assert result.reused_tokens == sum(r["total_tokens"] for r in reused)
            assert result.exit_code == 0

    # The CLI summary says what was reused (embedded endpoint, so no server to count).
    cmd = run_cmd(inp2, tmp_path / "cli.parquet", "http://127.0.0.1:9/v1")
    done = await asyncio.to_thread(procs.run, [*cmd, "--mock", "--reuse", str(earlier)], 30)
    assert done.rc == 0, done.text
    tokens = sum(r["total_tokens"] for r in first.values() if r["id"] not in changed)
    assert (
        f"reused      {n - 2} rows from earlier outputs (--reuse), saving {tokens:,} tokens"
        in done.err
    ), done.err
    assert "requests    3  (retries 0)" in done.err


# ---------------------------------------------------------------- 9. duplicate ids


def test_duplicate_ids_refused_or_deduped(tmp_path: Path, procs: Procs) -> None:
    rows = tickets(8)
    rows[5] = {**rows[5], "id": "T-0002", "ticket": "Duplicate of two. Different text."}
    rows[6] = {**rows[6], "id": "T-0003", "ticket": "Duplicate of three. Different text."}
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    cmd = run_cmd(inp, out, "http://127.0.0.1:9/v1", "--mock", "-q")
    done = procs.run(cmd)
    assert done.rc == 2, done.text
    assert "'T-0002' at rows 2, 5" in done.err and "'T-0003' at rows 3, 6" in done.err
    assert "--dedupe" in done.err and "Traceback" not in done.text
    assert not batchrun.journal.partial_dir(out).exists()

    done = procs.run([*cmd, "--dedupe"])
    assert done.rc == 0, done.text
    out_rows = read_output(out)
    assert ids_of(out_rows) == ["T-0000", "T-0001", "T-0002", "T-0003", "T-0004", "T-0007"]
    assert [r["row"] for r in out_rows] == [0, 1, 2, 3, 4, 7]
    assert all(r["status"] == "ok" for r in out_rows)
    assert out_rows[2]["completion"].startswith("Summary: Summarize: Ticket number 2 is broken.")
    assert out_rows[3]["completion"].startswith("Summary: Summarize: Ticket number 3 is broken.")


# ---------------------------------------------------------------- 10. bad input


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockProc]:
    """One plain mock-server subprocess for the bad-input tests."""
    with procs_in(tmp_path_factory.mktemp("shared-server"), Procs) as p:
        yield start_mock(p)


def _bad_input(tmp_path: Path, case: str) -> tuple[Path, list[str], list[str]]:
    """(input path, extra flags, fragments the error must hold) for one bad-input case."""
    good = [orjson.dumps(r) for r in tickets(3)]
    path = tmp_path / "in.jsonl"
    extra: list[str] = []
    if case == "empty":
        path.write_bytes(b"")
        want = ["has no rows"]
    elif case == "malformed-line":
        path.write_bytes(b"\n".join([good[0], good[1], b'{"id": "T-9", "ticket": ', good[2]]))
        want = ["line 3", "not valid JSON", "--skip-bad-lines"]
    elif case == "array-line":
        path.write_bytes(b"\n".join([good[0], b'["T-9", "a ticket"]', good[1]]))
        want = ["line 2", "not an object"]
    elif case == "not-utf8":
        path.write_bytes(b"\n".join([good[0], good[1], b'{"id": "T-9", "ticket": "caf\xe9"}']))
        want = ["line 3", "not UTF-8"]
    elif case == "not-parquet":
        path = tmp_path / "in.parquet"
        path.write_bytes(b"PAR1 this is not a parquet file at all")
        want = ["not a readable Parquet file"]
    elif case == "missing-id-column":
        path.write_bytes(b"\n".join(good))
        extra = ["--id-column", "ticket_id"]
        want = ["ticket_id", "Columns present: id, customer, ticket"]
    elif case == "missing-template-column":
        path.write_bytes(b"\n".join(good))
        extra = ["--prompt-template", "Summarize: {body}"]
        want = ["`body`", "Columns present: id, customer, ticket"]
    elif case == "missing-input":
        path = tmp_path / "nowhere.jsonl"
        want = ["does not exist"]
    elif case == "missing-output-folder":
        path.write_bytes(b"\n".join(good))
        extra = ["--output", str(tmp_path / "no-such-folder" / "out.parquet")]
        want = ["no-such-folder", "does not exist"]
    else:  # pragma: no cover
        raise AssertionError(case)
    if case != "missing-output-folder":
        want.append(str(path))
    return path, extra, want


BAD_INPUTS = [
    "empty",
    "malformed-line",
    "array-line",
    "not-utf8",
    "not-parquet",
    "missing-id-column",
    "missing-template-column",
    "missing-input",
    "missing-output-folder",
]


@pytest.fixture
def in_process_cli() -> Iterator[Any]:
    """Invoke ``batchrun`` in this process (no interpreter start-up), then put back
    the ``batchrun`` logger that the command's setup_logging rewires."""
    from click.testing import CliRunner

    import batchrun.cli

    logger = logging.getLogger("batchrun")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield lambda args: CliRunner().invoke(batchrun.cli.main, args)
    finally:
        for handler in logger.handlers:
            if handler not in saved[0]:
                handler.close()
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exit_2_nothing_sent(
    tmp_path: Path, shared_server: MockProc, in_process_cli: Any, case: str
) -> None:
    inp, extra, want = _bad_input(tmp_path, case)
    out = tmp_path / "out.parquet"
    before = shared_server.requests()
    cmd = [*run_cmd(inp, out, shared_server.base_url), *extra]
    result = in_process_cli(cmd[cmd.index("run") :])
    # A clean exit with the code, not an exception that escaped the command.
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in want:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert shared_server.requests() == before, "a request was sent"
    assert not out.exists() and not batchrun.journal.partial_dir(out).exists()


def test_skip_bad_lines_completes_and_counts(
    tmp_path: Path, procs: Procs, shared_server: MockProc
) -> None:
    good = [orjson.dumps(r) for r in tickets(4)]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join([good[0], good[1], b"{oops", good[2], b"[1, 2]", good[3]]) + b"\n")
    out = tmp_path / "out.parquet"
    before = shared_server.requests()
    done = procs.run([*run_cmd(inp, out, shared_server.base_url), "--skip-bad-lines"])
    assert done.rc == 0, done.text
    assert "skipped     2 bad input lines (--skip-bad-lines)" in done.err, done.err
    assert_complete(out, ["T-0000", "T-0001", "T-0002", "T-0003"])
    assert shared_server.requests() - before == 4


def test_null_and_oversized_prompts_fail_their_row_only(
    tmp_path: Path, procs: Procs, shared_server: MockProc
) -> None:
    rows: list[dict[str, object]] = [*tickets(5)]
    rows[1] = {**rows[1], "ticket": None}
    rows[3] = {**rows[3], "ticket": "Way too long. " + "word " * 33_000}  # > 32768 tokens
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    before = shared_server.stats()
    done = procs.run([*run_cmd(inp, out, shared_server.base_url), "-q"])
    after = shared_server.stats()
    assert done.rc == 1, done.text
    assert "Traceback" not in done.text
    out_rows = assert_complete(out, ids, status=None)
    assert [r["status"] for r in out_rows] == ["ok", "error", "ok", "error", "ok"]
    null_row, big_row = out_rows[1], out_rows[3]
    assert "ticket" in null_row["error"] and "null" in null_row["error"]
    assert null_row["attempts"] == 0 and null_row["http_status"] is None
    assert big_row["http_status"] == 400 and big_row["attempts"] == 1
    assert "context_length_exceeded" in big_row["error"]
    assert "context window of 32768 tokens" in big_row["error"]
    assert after["requests"] - before["requests"] == 4  # nothing sent for the null row
    assert after["by_outcome"].get("400", 0) - before["by_outcome"].get("400", 0) == 1


# ---------------------------------------------------------------- 11. resume conflict


async def test_resume_conflict_needs_restart(tmp_path: Path, procs: Procs) -> None:
    rows = tickets(40)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    async with serve(MockConfig(latency_s=0.05)) as server:
        job = make_job(server.base_url, inp, out, **JOB_KEYS, concurrency=4)
        task = asyncio.create_task(run_job(job, RunOptions(progress=False)))
        deadline = time.monotonic() + 10
        while journal_lines(out) < 5:
            assert not task.done() and time.monotonic() < deadline
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        left = journal_lines(out)
        assert 5 <= left < len(rows)

        cmd = run_cmd(inp, out, server.base_url, "-q")
        cmd[cmd.index("--model") + 1] = "another-model"
        before = server.stats.requests
        done = await asyncio.to_thread(procs.run, cmd, 30)
        assert done.rc == 2, done.text
        assert "--restart" in done.err and "`model`" in done.err
        assert "Traceback" not in done.text
        assert server.stats.requests == before
        assert journal_lines(out) == left, "the unfinished run must be left as it was"

        done = await asyncio.to_thread(procs.run, [*cmd, "--restart"], 30)
        assert done.rc == 0, done.text
        assert server.stats.requests - before == len(rows)
    out_rows = assert_complete(out, ids)
    assert {r["model"] for r in out_rows} == {"another-model"}


# ---------------------------------------------------------------- 12. JSON logs, no secret


def test_json_log_events_and_the_key_never_written(tmp_path: Path, procs: Procs) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["LLMTUNE_API_KEY"] = SECRET
    server = start_mock(
        procs,
        "--latency-ms",
        "20",
        "--fault-rate",
        "0.2",
        "--faults",
        "429",
        "--retry-after-s",
        "0.01",
        "--seed",
        "3",
        "--api-key-env",
        "LLMTUNE_API_KEY",
        env=env,
    )
    rows = tickets(120)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    log_file = tmp_path / "run.log"
    cmd = run_cmd(inp, out, server.base_url, "--concurrency", "8", "--max-attempts", "10")
    cmd[cmd.index("--api-key-env") + 1] = "LLMTUNE_API_KEY"
    cmd += ["--log-format", "json", "--log-file", str(log_file)]
    proc = procs.start(cmd, env=env)
    wait_for(lambda: journal_lines(out) >= 10, 20, "10 journal lines", proc)
    os.kill(proc.pid, signal.SIGTERM)
    first = procs.wait(proc, timeout=20)
    assert first.rc == 143, first.text
    partial = batchrun.journal.partial_dir(out)
    on_disk = b"".join(p.read_bytes() for p in sorted(partial.iterdir()))
    assert SECRET.encode() not in on_disk
    journal_records(out, ids)

    second = procs.run(cmd, timeout=30, env=env)
    assert second.rc == 0, second.text
    assert_complete(out, ids)
    for done in (first, second):
        assert SECRET not in done.text
        assert "Traceback" not in done.text
    assert SECRET.encode() not in out.read_bytes()
    assert SECRET.encode() not in pq.read_schema(out).metadata[b"batchrun"]

    raw = log_file.read_bytes()
    assert SECRET.encode() not in raw
    events = [orjson.loads(line) for line in raw.splitlines()]  # every line is JSON
    assert all(isinstance(e, dict) and "event" in e and "time" in e for e in events)
    names = [e["event"] for e in events]
    for name in ("start", "retry", "summary", "stopped", "resume"):
        assert name in names, (name, sorted(set(names)))
    retries = [e for e in events if e["event"] == "retry"]
    assert all(e["cause"] and e["row_id"] in ids and e["attempt"] >= 1 for e in retries)
    assert any("HTTP 429" in e["cause"] for e in retries)
    summary = [e for e in events if e["event"] == "summary"][-1]
    assert summary["rows_ok"] == len(rows) and summary["rows_failed"] == 0
    stopped = [e for e in events if e["event"] == "stopped"]
    assert stopped[0]["exit_code"] == 143


# ---------------------------------------------------------------- 13. plain http


def test_plain_http_to_another_host_is_refused(tmp_path: Path, procs: Procs) -> None:
    inp = write_jsonl(tmp_path / "t.jsonl", tickets(2))
    out = tmp_path / "out.parquet"
    insecure = "http://192.0.2.1:9/v1"  # TEST-NET-1: checked, never contacted
    # Guard first, in this process: were the refusal gone, the CLI below must not run.
    with pytest.raises(JobError, match="--allow-insecure-http"):
        make_job(insecure, inp, out, **JOB_KEYS, concurrency=16)
    done = procs.run(run_cmd(inp, out, insecure, "-q"), timeout=30)
    assert done.rc == 2, done.text
    assert "--allow-insecure-http" in done.err and "192.0.2.1" in done.err
    assert "Traceback" not in done.text
    assert not batchrun.journal.partial_dir(out).exists()

    job = make_job(insecure, inp, out, **JOB_KEYS, concurrency=16, allow_insecure_http=True)
    assert job.allow_insecure_http is True and job.base_url == insecure
    assert job.url == "http://192.0.2.1:9/v1/chat/completions"
    # Loopback needs no flag.
    assert (
        make_job("http://127.0.0.1:9/v1", inp, out, **JOB_KEYS, concurrency=16).allow_insecure_http
        is False
    )
    assert (
        make_job("http://localhost:9/v1", inp, out, **JOB_KEYS, concurrency=16).allow_insecure_http
        is False
    )

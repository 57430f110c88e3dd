"""What the Ray engine keeps of a local run's guarantees, on a local Ray with two
row senders: per-row durability (kill -9 of the driver, a lost sender), one
job-wide budget (a 429 pausing every sender, a server's rate limit held, max_cost),
max_failures over the whole job, and the senders' retries in --log-file.

Marked ``ray`` (``make test-ray``). The servers run on 127.0.0.1: the embedded
endpoint as a subprocess or in a thread, or a scripted aiohttp app in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrun.engines.local import run_job
from batchrun.errors import ApiDown, BudgetReached, KeyRejected, TooManyFailures
from batchrun.lifecycle import RunOptions
from batchrun.mock import MockConfig
from batchrun.prices import load_prices
from tests.conftest import REPO, invoke, make_job, port_of, run_app, tickets, write_jsonl
from tests.test_durability import (
    Procs,
    assert_complete,
    journal_records,
    procs,  # noqa: F401 - the fixture
    run_cmd,
    start_mock,
    wait_for,
)
from tests.test_ray_engine import JOB_KEYS, endpoint

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

OK_BODY = orjson.dumps(
    {
        "id": "x",
        "model": "m",
        "choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
)


def ray_env() -> dict[str, str]:
    """A driver's environment: a Ray of its own on this machine (never a cluster
    someone started here), importing this checkout's batchrun."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["RAY_ADDRESS"] = "local"
    return env


class Arrivals:
    """A scripted chat-completions server: when each request came, how many were
    in flight, and the answer ``decide`` picks (None: 200 after ``latency_s``)."""

    def __init__(self, decide: Callable[[int, float], web.Response | None], latency_s: float):
        self.decide = decide
        self.latency_s = latency_s
        self.times: list[float] = []
        self.statuses: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        now = time.monotonic()
        with self.lock:
            n = len(self.times)
            self.times.append(now)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            answer = self.decide(n, now)
            if answer is None:
                await asyncio.sleep(self.latency_s)
                answer = web.Response(body=OK_BODY, content_type="application/json")
            self.statuses.append(answer.status)
            return answer
        finally:
            with self.lock:
                self.in_flight -= 1


def rate_limited(retry_after: str, spent: bool = False) -> web.Response:
    """A 429; ``spent``: it says the budget is spent (the job pauses, not just the row)."""
    headers = {"Retry-After": retry_after}
    if spent:
        headers["x-ratelimit-remaining-requests"] = "0"
    return web.Response(status=429, text='{"error": "slow down"}', headers=headers)


# ---- durability --------------------------------------------------------------


def test_kill9_of_the_ray_driver_then_rerun(tmp_path: Path, procs: Procs) -> None:  # noqa: F811
    """kill -9 of the driver twice mid-job (Ray then Ray), then a local rerun:
    every row once in the output, each kill losing at most the requests in
    flight (the job's concurrency), every journal line whole."""
    server = start_mock(procs, "--latency-ms", "50")
    rows = tickets(400)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    cmd = run_cmd(inp, out, server.base_url, "--concurrency", "16", "-q")
    resent = []
    for threshold in (100, 250):
        before = server.requests()
        journaled = len(journal_records(out, ids)) if threshold > 100 else 0
        driver = subprocess.Popen(
            [*cmd, "--engine", "ray"],
            env=ray_env(),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"driver-{threshold}.err").open("wb"),
            start_new_session=True,  # its own process group: Ray's helpers are cleaned up with it
        )
        try:
            wait_for(
                lambda t=threshold: _journal_lines(out) >= t, 120, f"{threshold} rows journaled"
            )
            os.kill(driver.pid, signal.SIGKILL)
            assert driver.wait(timeout=10) == -signal.SIGKILL
            # The senders die with the driver: the server hears nothing more.
            _wait_quiet(server.requests)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
        records = journal_records(out, ids)  # whole lines, each row once
        assert all(r["status"] == "ok" for r in records)
        resent.append((server.requests() - before) - (len(records) - journaled))
    assert all(0 <= r <= 16 for r in resent), resent
    done = procs.run(cmd, timeout=60)  # the local engine resumes the Ray runs' journal
    assert done.rc == 0, done.text
    out_rows = assert_complete(out, ids)
    assert all(r["attempts"] == 1 for r in out_rows)
    assert server.requests() == len(rows) + sum(resent)
    print(f"\nRay driver kill -9: answered but not journaled at each kill: {resent} (16 in flight)")


def test_failed_rows_held_before_any_answer_do_not_stall_a_sender(
    local_ray: Any, tmp_path: Path, threaded: Any
) -> None:
    """The first 12 requests fail, each with its own cause, before any answer:
    the scheduler holds those rows back (no verdict yet), and a sender's places
    (2 here) must not wait for their results: the job goes on and ends with
    them as error rows."""
    from batchrun.engines.ray import run_on_ray

    def decide(n: int, now: float) -> web.Response | None:
        if n < 12:
            cause = "".join(chr(97 + (n * 7 + k) % 26) for k in range(6))
            return web.Response(status=500, text=f'{{"error": "broken {cause}"}}')
        return None

    server = Arrivals(decide, latency_s=0.01)
    url = threaded(lambda: run_app(server.app()))
    inp = write_jsonl(tmp_path / "in.jsonl", tickets(60))
    job = make_job(
        url, inp, tmp_path / "out.parquet", **(JOB_KEYS | {"concurrency": 4, "max_attempts": 1})
    )
    result = run_on_ray(job, RunOptions(progress=False))
    assert (result.ok, result.failed) == (48, 12)


def test_sigterm_lets_the_ray_senders_finish_what_is_in_flight(
    tmp_path: Path,
    procs: Procs,  # noqa: F811
) -> None:
    """SIGTERM to the Ray driver: no new request, the requests in flight come
    back and are journaled (nothing answered is lost), exit 143, resumable."""
    server = start_mock(procs, "--latency-ms", "50")
    rows = tickets(400)
    ids = [str(r["id"]) for r in rows]
    inp = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "out.parquet"
    cmd = run_cmd(inp, out, server.base_url, "--concurrency", "16", "-q", "--engine", "ray")
    err = tmp_path / "driver.err"
    driver = subprocess.Popen(
        cmd,
        env=ray_env(),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err.open("wb"),
        start_new_session=True,
    )
    try:
        wait_for(lambda: _journal_lines(out) >= 80, 120, "80 rows journaled")
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) == 143, err.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    records = journal_records(out, ids)
    assert len(records) < len(rows)
    assert server.requests() == len(records)  # every request answered was journaled
    assert "SIGTERM" in err.read_text()
    assert not out.exists()


def test_api_down_stops_the_ray_job(local_ray: Any, tmp_path: Path) -> None:
    """Every request fails (503, retried without end) for api_down_after_s over
    the whole job: the job stops (exit 3), nothing recorded for the rows."""
    from batchrun.engines.ray import run_on_ray

    inp = write_jsonl(tmp_path / "in.jsonl", tickets(100))
    out = tmp_path / "out.parquet"
    keys = {"max_attempts": 1000, "api_down_after_s": 1.0}
    with endpoint(MockConfig(fail_first=10**9, fail_first_kind="503")) as (url, _):
        job = make_job(url, inp, out, **(JOB_KEYS | keys))
        started = time.monotonic()
        with pytest.raises(ApiDown, match="no request has succeeded") as stopped:
            run_on_ray(job, RunOptions(progress=False))
    assert stopped.value.exit_code == 3
    assert time.monotonic() - started < 30
    assert _journal_lines(out) == 0


def test_the_key_is_probed_once_for_the_whole_ray_job(
    local_ray: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused key: one sender probes it, one request at a time, and the job
    stops after the probe's 5 requests (not 5 per sender), nothing recorded."""
    from batchrun.engines.ray import run_on_ray

    monkeypatch.setenv("PROBE_API_KEY", "sk-wrong")
    inp = write_jsonl(tmp_path / "in.jsonl", tickets(100))
    out = tmp_path / "out.parquet"
    with endpoint(MockConfig(api_key="sk-right")) as (url, stats):
        job = make_job(url, inp, out, **(JOB_KEYS | {"api_key_env": "PROBE_API_KEY"}))
        with pytest.raises(KeyRejected):
            run_on_ray(job, RunOptions(progress=False))
        assert stats.requests == 5
    assert _journal_lines(out) == 0


def _journal_lines(out: Path) -> int:
    path = out.parent / (out.name + ".partial") / "journal.jsonl"
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_quiet(count: Callable[[], int], quiet_s: float = 1.5, timeout: float = 20) -> None:
    """Until ``count`` has not changed for ``quiet_s`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "requests kept coming after the kill"
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()


def test_a_lost_sender_hands_its_rows_to_the_other(local_ray: Any, tmp_path: Path) -> None:
    """kill -9 of one row sender mid-job: the other sends its rows without a
    result; no row whose result was journaled is sent again."""
    from batchrun.engines.ray import run_on_ray

    rows = tickets(300)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    with endpoint(MockConfig(latency_s=0.03)) as (url, stats):
        job = make_job(url, inp, out, **(JOB_KEYS | {"concurrency": 8}))
        result: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: result.update(r=run_on_ray(job, RunOptions(progress=False)))
        )
        thread.start()
        try:
            wait_for(lambda: _journal_lines(out) >= 60, 60, "60 rows journaled")
            victim = _sender_pids()[0]
            journaled = _journal_lines(out)
            os.kill(victim, signal.SIGKILL)
        finally:
            thread.join(120)
        assert "r" in result, "the run did not finish"
        assert result["r"].ok == len(rows)
        counts = stats.to_dict()["bodies"]
    assert_complete(out, [str(r["id"]) for r in rows])
    resent = sum(c - 1 for c in counts.values())
    # At most the lost sender's places (4 of the 8) were in flight or unjournaled.
    assert resent <= 4, (resent, journaled)


def _sender_pids() -> list[int]:
    """The row senders of this process's Ray (children of its raylet)."""
    mine = str(os.getpid())
    raylets = set()
    senders = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if stat[1] == mine and b"raylet" in cmdline.split(b"\0")[0]:
            raylets.add(pid)
        if cmdline.startswith(b"ray::RowSender"):
            senders.append((stat[1], int(pid)))
    found = [pid for parent, pid in senders if parent in raylets]
    assert found, "no row sender of this process's Ray found"
    return found


# ---- one budget for the job -----------------------------------------------------


def test_a_spent_rate_limit_in_one_sender_pauses_both(
    local_ray: Any, tmp_path: Path, threaded: Any
) -> None:
    """The 30th request gets a 429 saying the rate limit is spent, with
    Retry-After: 1: for the next second no request reaches the server, from
    either sender (4 in flight: 2 each)."""
    from batchrun.engines.ray import run_on_ray

    hit: list[float] = []

    def decide(n: int, now: float) -> web.Response | None:
        if n == 30:
            hit.append(now)
            return rate_limited("1", spent=True)
        return None

    server = Arrivals(decide, latency_s=0.02)
    url = threaded(lambda: run_app(server.app()))
    inp = write_jsonl(tmp_path / "in.jsonl", tickets(120))
    job = make_job(url, inp, tmp_path / "out.parquet", **(JOB_KEYS | {"concurrency": 4}))
    result = run_on_ray(job, RunOptions(progress=False))
    assert (result.ok, result.retries) == (120, 1)
    assert server.most_in_flight == 4  # both senders were sending
    t429 = hit[0]
    during = [t - t429 for t in server.times if t429 + 0.1 < t < t429 + 0.95]
    assert during == []  # every sender waited out the Retry-After
    after = [t for t in server.times if t > t429]
    assert len(after) > 50


def test_a_servers_rate_limit_is_held_by_both_senders(
    local_ray: Any, tmp_path: Path, threaded: Any
) -> None:
    """A server allowing 20 requests a second (a bucket of 22) and a job with
    rpm = 1200 sent by two senders: the job-wide schedule keeps under it, with
    hardly a 429."""
    from batchrun.engines.ray import run_on_ray

    rate, capacity = 20.0, 22.0
    bucket = {"tokens": capacity, "at": time.monotonic()}
    lock = threading.Lock()

    def decide(n: int, now: float) -> web.Response | None:
        with lock:
            bucket["tokens"] = min(capacity, bucket["tokens"] + (now - bucket["at"]) * rate)
            bucket["at"] = now
            if bucket["tokens"] < 1:
                return rate_limited("1")
            bucket["tokens"] -= 1
        return None

    server = Arrivals(decide, latency_s=0.01)
    url = threaded(lambda: run_app(server.app()))
    inp = write_jsonl(tmp_path / "in.jsonl", tickets(100))
    job = make_job(url, inp, tmp_path / "out.parquet", **(JOB_KEYS | {"rpm": 1200}))
    result = run_on_ray(job, RunOptions(progress=False))
    assert result.ok == 100
    refused = server.statuses.count(429)
    assert refused <= 2, refused
    ok_times = sorted(t for t, s in zip(server.times, server.statuses, strict=True) if s == 200)
    # About a second's worth at once, then 20 a second.
    span = ok_times[-1] - ok_times[0]
    assert span >= (100 - 21) / rate * 0.9, span


def test_max_cost_stops_the_ray_job_before_the_budget_and_resumes(
    local_ray: Any, tmp_path: Path
) -> None:
    """max_cost on Ray: the job stops (exit 4) before its spend could pass the
    budget, whatever the two senders had in flight; a rerun with a larger budget
    sends only the rest."""
    from batchrun.engines.ray import run_on_ray

    prices = tmp_path / "prices.toml"
    prices.write_text(
        f'[models."{JOB_KEYS["model"]}"]\nprompt_per_million = 1000\ncompletion_per_million = 2000\n'
    )
    rows = tickets(200)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    keys = JOB_KEYS | {"prices": str(prices), "max_tokens": 20}
    with endpoint(MockConfig()) as (url, stats):
        job = make_job(url, inp, out, **(keys | {"max_cost": 3.0}))
        with pytest.raises(BudgetReached) as stopped:
            run_on_ray(job, RunOptions(progress=False))
        assert stopped.value.exit_code == 4
        paid = stats.requests
        price = load_prices(prices).price(JOB_KEYS["model"])
        assert price is not None
        journal = [
            orjson.loads(line)
            for line in (tmp_path / "out.parquet.partial" / "journal.jsonl")
            .read_bytes()
            .splitlines()
        ]
        spent = sum(
            (price.cost(r["prompt_tokens"], r["completion_tokens"]) for r in journal), Decimal(0)
        )
        assert spent <= Decimal("3.0")
        assert len(journal) == paid  # every request answered was journaled
        assert 50 < paid < 200

        job = make_job(url, inp, out, **(keys | {"max_cost": 100.0}))
        result = run_on_ray(job, RunOptions(progress=False))
    assert result.ok == 200 and result.resumed == paid
    assert stats.requests == 200
    assert pq.read_table(out).num_rows == 200


def test_max_failures_counts_over_the_whole_job(local_ray: Any, tmp_path: Path) -> None:
    """max_failures = 3 with rows failing in both senders: the fourth failure in
    the job stops it (a count per sender would have let each fail three)."""
    from batchrun.engines.ray import run_on_ray

    inp = write_jsonl(tmp_path / "in.jsonl", tickets(200))
    out = tmp_path / "out.parquet"
    keys = {"max_attempts": 1, "max_failures": 3, "concurrency": 4}
    with endpoint(MockConfig(fault_rate=0.1, faults=("500",))) as (url, stats):
        job = make_job(url, inp, out, **(JOB_KEYS | keys))
        with pytest.raises(TooManyFailures, match="4 rows failed"):
            run_on_ray(job, RunOptions(progress=False))
        sent = stats.requests
    journal = [
        orjson.loads(line)
        for line in (tmp_path / "out.parquet.partial" / "journal.jsonl").read_bytes().splitlines()
    ]
    errors = sum(1 for r in journal if r["status"] == "error")
    assert 4 <= errors <= 4 + 4  # and what the other sender had in flight
    assert sent < 120


# ---- the log ---------------------------------------------------------------------


def test_ray_senders_retries_reach_the_log_file(local_ray: Any, tmp_path: Path) -> None:
    """--log-file on Ray holds each retry (with its cause and sender) and each
    failed row, as a local run's does; concurrency = "auto" on the way."""
    inp = write_jsonl(tmp_path / "in.jsonl", tickets(60))
    log_file = tmp_path / "run.log"
    config = MockConfig(fault_rate=0.2, faults=("500", "429"), retry_after_s=0.05)
    with endpoint(config) as (url, _):
        result = invoke(
            "--engine", "ray", "--input", str(inp), "--prompt-template", "{ticket}",
            "--model", "m", "--base-url", url, "--api-key-env", "", "--concurrency", "auto",
            "--max-attempts", "2", "--output", str(tmp_path / "out.parquet"), "-q",
            "--log-file", str(log_file), "--log-format", "json",
        )  # fmt: skip
    assert result.exit_code in (0, 1), result.output
    events = [orjson.loads(line) for line in log_file.read_text().splitlines()]
    retries = [e for e in events if e["event"] == "retry"]
    failed = [e for e in events if e["event"] == "row_failed"]
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(retries) == sum(r["attempts"] - 1 for r in table) > 0
    assert {e["ray_actor"] for e in retries} <= {0, 1}
    assert all(e["cause"] and e["row_id"] for e in retries)
    assert len(failed) == sum(1 for r in table if r["status"] == "error")
    assert [e["event"] for e in events][-1] == "summary"


def test_local_rerun_after_a_ray_stop_sends_only_the_rest(local_ray: Any, tmp_path: Path) -> None:
    """A Ray run stopped by max_failures resumes with the local engine."""
    from batchrun.engines.ray import run_on_ray

    inp = write_jsonl(tmp_path / "in.jsonl", tickets(100))
    out = tmp_path / "out.parquet"
    keys = {"max_attempts": 1, "max_failures": 1, "concurrency": 4}
    with endpoint(MockConfig(fault_rate=0.2, faults=("500",))) as (url, _):
        job = make_job(url, inp, out, **(JOB_KEYS | keys))
        with pytest.raises(TooManyFailures):
            run_on_ray(job, RunOptions(progress=False))
    done = len((tmp_path / "out.parquet.partial" / "journal.jsonl").read_bytes().splitlines())
    with endpoint(MockConfig(), port=port_of(url)) as (url, stats):
        job = make_job(url, inp, out, **(JOB_KEYS | keys))
        result = asyncio.run(run_job(job, RunOptions(progress=False)))
    assert result.resumed == done and stats.requests == 100 - done

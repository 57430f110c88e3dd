"""Unit tests of the Scheduler on its own: a scripted client (no HTTP), a fake
sleep, and the engines' Recorder over an in-memory journal. What the whole run
does over HTTP is tested in test_run.py; these pin the scheduler's own rules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from batchrun.engines.shell import Recorder
from batchrun.errors import (
    FatalRequestError,
    Interrupted,
    KeyRejected,
    RateLimited,
    RequestError,
    ServerError,
    TooManyFailures,
)
from batchrun.limits import SPENT_STREAK, Limits
from batchrun.outputs import STATUS_CODES, Record
from batchrun.payload import Completion, Prepared
from batchrun.progress import Tally
from batchrun.retry import RetryPolicy
from batchrun.scheduler import Scheduler
from tests.conftest import FakeSleep, make_job

ANSWER = Completion("fine", "stop", 10, 2, 12, "resp-1", "m-1")

# What this file's jobs lay over make_job's defaults (None: the Job's default stays).
JOB_KEYS: dict[str, Any] = {
    "model": "m-1",
    "prompt_template": "{ticket}",
    "concurrency": 4,
    "request_timeout_s": None,
}


class MemoryJournal:
    """The journal's surface the Recorder uses, in memory."""

    def __init__(self, rows: int) -> None:
        self.status = np.zeros(rows, dtype=np.int8)
        self.records: list[Record] = []

    def append(self, record: Mapping[str, Any]) -> None:
        self.records.append(record)  # type: ignore[arg-type]
        self.status[record["row"]] = STATUS_CODES[record["status"]]

    def sync(self) -> None:
        pass


class ScriptedClient:
    """``complete`` answers from a script per row id: each entry is a Completion
    or an error to raise; the last entry repeats."""

    def __init__(self, script: Callable[[str, int], Completion | RequestError]) -> None:
        self.script = script
        self.calls: dict[str, int] = {}

    async def complete(self, body: bytes) -> Completion:
        row_id = body.decode()
        n = self.calls[row_id] = self.calls.get(row_id, 0) + 1
        await asyncio.sleep(0)
        outcome = self.script(row_id, n)
        if isinstance(outcome, RequestError):
            raise outcome
        return outcome


def rows(n: int) -> list[Prepared]:
    return [Prepared(i, f"r{i}", f"r{i}".encode(), f"hash{i}") for i in range(n)]


def scheduler(
    client: ScriptedClient, n: int, sleep: FakeSleep, **keys: Any
) -> tuple[Scheduler, MemoryJournal, Tally]:
    job = make_job(**(JOB_KEYS | keys))
    journal = MemoryJournal(n)
    tally = Tally(total=n)
    sched = Scheduler(
        job,
        client,  # type: ignore[arg-type]
        Recorder(journal, tally, job.max_failures),
        tally,
        RetryPolicy.for_job(job, sleep),
        Limits.build(job.concurrency, job.max_concurrency, job.rpm, job.tpm, sleep=sleep),
        grace_s=0.05,
    )
    return sched, journal, tally


async def test_every_row_gets_exactly_one_record() -> None:
    client = ScriptedClient(lambda row_id, n: ANSWER)
    sched, journal, tally = scheduler(client, 50, FakeSleep())
    await sched.run(iter(rows(50)), 50)
    assert sorted(r["row"] for r in journal.records) == list(range(50))
    assert set(client.calls.values()) == {1}
    assert (tally.ok, tally.failed, tally.requests, tally.retries) == (50, 0, 50, 0)
    assert tally.prompt_tokens == 500 and tally.completion_tokens == 100
    assert all(r["attempts"] == 1 and r["completion"] == "fine" for r in journal.records)


async def test_a_row_that_cannot_be_sent_is_recorded_without_a_request() -> None:
    client = ScriptedClient(lambda row_id, n: ANSWER)
    sched, journal, tally = scheduler(client, 2, FakeSleep())
    bad = Prepared(1, "r1", b"", "", error="Prompt column `ticket` is null or missing in this row.")
    await sched.run(iter([rows(1)[0], bad]), 1)
    (failed,) = [r for r in journal.records if r["row"] == 1]
    assert failed["status"] == "error" and failed["attempts"] == 0
    assert "r1" not in client.calls
    assert (tally.ok, tally.failed, tally.requests) == (1, 1, 1)


async def test_a_retryable_failure_is_retried_and_its_attempts_counted() -> None:
    sleep = FakeSleep()
    client = ScriptedClient(lambda row_id, n: ServerError("HTTP 503", 503) if n < 3 else ANSWER)
    sched, journal, tally = scheduler(client, 3, sleep)
    await sched.run(iter(rows(3)), 3)
    assert all(r["status"] == "ok" and r["attempts"] == 3 for r in journal.records)
    assert (tally.requests, tally.retries) == (9, 6)
    assert len(sleep.waits) == 6


async def test_a_fatal_failure_is_not_retried() -> None:
    client = ScriptedClient(lambda row_id, n: FatalRequestError("HTTP 400: bad field", 400))
    sched, journal, tally = scheduler(client, 4, FakeSleep())
    await sched.run(iter(rows(4)), 4)
    sched.finish()
    assert set(client.calls.values()) == {1}
    assert len(journal.records) == 4
    assert all(
        r["status"] == "error" and r["http_status"] == 400 and r["attempts"] == 1
        for r in journal.records
    )
    assert tally.failed == 4


async def test_a_stop_abandons_the_rows_waiting_to_retry() -> None:
    """Rows whose next attempt is still ahead get no record: the resume sends them."""
    stopped = asyncio.Event()

    class SlowSleep(FakeSleep):
        async def __call__(self, seconds: float) -> None:
            self.waits.append(seconds)
            await stopped.wait()

    client = ScriptedClient(lambda row_id, n: ServerError("HTTP 503", 503))
    sched, journal, _ = scheduler(client, 4, SlowSleep())
    stop = Interrupted("Stopped by Ctrl-C.", exit_code=130)

    async def stop_soon() -> None:
        while sum(client.calls.values()) < 4:
            await asyncio.sleep(0)
        sched.stop(stop, 0.05)

    with pytest.raises(Interrupted):
        await asyncio.gather(sched.run(iter(rows(4)), 4), stop_soon())
    assert journal.records == []
    assert set(client.calls.values()) == {1}


async def test_a_refused_key_stops_the_job_and_records_nothing() -> None:
    client = ScriptedClient(lambda row_id, n: FatalRequestError("HTTP 401: bad key", 401))
    sched, journal, _ = scheduler(client, 20, FakeSleep())
    with pytest.raises(KeyRejected):
        await sched.run(iter(rows(20)), 20)
    assert journal.records == []
    assert sum(client.calls.values()) == 5


async def test_too_many_failures_stop_the_job() -> None:
    # Every other row is answered: rows failing with one cause alone would be the
    # failure watch's to stop.
    client = ScriptedClient(
        lambda row_id, n: (
            FatalRequestError(f"HTTP 422: no {row_id}", 422) if int(row_id[1:]) % 2 else ANSWER
        )
    )
    sched, journal, tally = scheduler(client, 100, FakeSleep(), max_failures=3)
    with pytest.raises(TooManyFailures):
        await sched.run(iter(rows(100)), 100)
    assert 4 <= tally.failed < 50
    assert len([r for r in journal.records if r["status"] == "error"]) == tally.failed


async def test_a_lone_429_retries_only_its_own_row() -> None:
    client = ScriptedClient(
        lambda row_id, n: (
            RateLimited("HTTP 429", retry_after=2.0) if row_id == "r1" and n == 1 else ANSWER
        )
    )
    sleep = FakeSleep()
    sched, journal, _ = scheduler(client, 4, sleep)
    await sched.run(iter(rows(4)), 4)
    assert not sched.limits.pause_active()
    assert sleep.waits == [2.0]  # r1's own Retry-After; nobody else waited
    assert sorted(r["attempts"] for r in journal.records) == [1, 1, 1, 2]


async def test_a_429_that_says_the_budget_is_spent_pauses_every_row() -> None:
    client = ScriptedClient(
        lambda row_id, n: (
            RateLimited("HTTP 429", retry_after=2.0, remaining_tokens=0)
            if row_id == "r0" and n == 1
            else ANSWER
        )
    )
    sleep = FakeSleep()
    sched, journal, _ = scheduler(client, 4, sleep)
    await sched.run(iter(rows(4)), 4)
    assert sched.limits.pause.episodes == 1
    # r0's own wait, and every attempt (r0's retry and the three other rows)
    # waits out the pause (FakeSleep leaves the clock alone: about 2 s each).
    assert 2.0 in sleep.waits
    assert sleep.waits == [pytest.approx(2.0, abs=0.5)] * 5
    assert all(r["status"] == "ok" for r in journal.records)


@pytest.mark.parametrize(
    ("script", "episodes"),
    [
        ([429] * SPENT_STREAK + [200], 1),  # enough in a row: the budget looks spent
        ([429] * (SPENT_STREAK - 1) + [200], 0),
        ([429] * (SPENT_STREAK - 1) + [200] + [429] * (SPENT_STREAK - 1) + [200], 0),
    ],
    ids=["in-a-row", "one-short", "an-answer-between"],
)
async def test_429s_in_a_row_pause_the_job_an_answer_between_resets(
    script: list[int], episodes: int
) -> None:
    # One worker, so the answers come in the script's order (two rows, one after the other).
    outcomes = iter(script)

    def answer(row_id: str, n: int) -> Completion | RequestError:
        return ANSWER if next(outcomes) == 200 else RateLimited("HTTP 429", retry_after=0.0)

    n = script.count(200)
    sched, journal, _ = scheduler(ScriptedClient(answer), n, FakeSleep(), concurrency=1)
    await sched.run(iter(rows(n)), n)
    assert sched.limits.pause.episodes == episodes
    assert all(r["status"] == "ok" for r in journal.records)


# ---- a row waiting to retry lends its worker's place ----------------------------------


class GateSleep(FakeSleep):
    """Every wait lasts until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await self.gate.wait()


class CountingClient(ScriptedClient):
    """A ScriptedClient that counts the requests in flight at once."""

    def __init__(self, script: Callable[[str, int], Completion | RequestError]) -> None:
        super().__init__(script)
        self.in_flight = self.peak = 0

    async def complete(self, body: bytes) -> Completion:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            return await super().complete(body)
        finally:
            self.in_flight -= 1


async def settle(journal: MemoryJournal, records: int, within_s: float = 2.0) -> None:
    """Until ``records`` rows are journaled, or ``within_s`` seconds went by."""
    for _ in range(int(within_s / 0.005)):
        if len(journal.records) >= records:
            return
        await asyncio.sleep(0.005)


async def test_the_other_rows_are_sent_while_a_row_waits_to_retry() -> None:
    client = CountingClient(
        lambda row_id, n: ServerError("HTTP 503", 503) if row_id == "r0" and n == 1 else ANSWER
    )
    sleep = GateSleep()
    sched, journal, _ = scheduler(client, 12, sleep, concurrency=2)
    run = asyncio.create_task(sched.run(iter(rows(12)), 12))
    await settle(journal, 11)
    # r0 waits for its retry; its worker's place went to a stand-in, so all
    # eleven other rows were sent meanwhile, never more than 2 at once.
    assert sorted(r["row"] for r in journal.records) == list(range(1, 12))
    assert client.calls["r0"] == 1 and client.peak == 2
    sleep.gate.set()
    await asyncio.wait_for(run, 5)
    assert len(journal.records) == 12 and client.calls["r0"] == 2
    assert client.peak == 2 and not sched.workers.tasks


async def test_at_most_concurrency_rows_wait_with_their_place_lent() -> None:
    # Every row's first attempt fails; its retry waits until the gate opens.
    client = CountingClient(lambda row_id, n: ServerError("HTTP 503", 503) if n == 1 else ANSWER)
    sleep = GateSleep()
    sched, journal, _ = scheduler(client, 10, sleep, concurrency=2)
    run = asyncio.create_task(sched.run(iter(rows(10)), 10))
    await settle(journal, 1, within_s=0.3)  # none will come: every row is waiting
    # Two rows lent their places, two more wait holding theirs: four rows started, no more.
    assert sorted(client.calls) == ["r0", "r1", "r2", "r3"]
    assert journal.records == []
    sleep.gate.set()
    await asyncio.wait_for(run, 5)
    assert sorted(r["row"] for r in journal.records) == list(range(10))
    assert all(r["attempts"] == 2 for r in journal.records) and client.peak <= 2


async def test_a_stop_abandons_a_row_back_from_its_wait_without_a_place() -> None:
    client = CountingClient(
        lambda row_id, n: ServerError("HTTP 503", 503) if row_id == "r0" and n == 1 else ANSWER
    )
    sleep = GateSleep()
    sched, journal, _ = scheduler(client, 200, sleep, concurrency=1)

    run = asyncio.create_task(sched.run(iter(rows(200)), 200))
    await settle(journal, 3)
    sleep.gate.set()  # r0 is back and waits for the stand-in to finish its row...
    for _ in range(1000):
        if sched.workers.waiting:
            break
        await asyncio.sleep(0)
    assert sched.workers.waiting
    sched.stop(Interrupted("Stopped by Ctrl-C.", exit_code=130), 0.05)  # ...when the job stops
    with pytest.raises(Interrupted):
        await asyncio.wait_for(run, 5)
    assert 0 not in {r["row"] for r in journal.records}  # r0 left for the resume
    assert client.calls["r0"] == 1

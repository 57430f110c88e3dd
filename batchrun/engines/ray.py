"""The Ray engine: ``batchrun run JOB.toml --engine ray`` (extra ``batchrun[ray]``).

The driver (the process that runs ``batchrun run``) does what the local engine
does before and after sending, with the same functions: it checks the key
variable, the input, the columns and the structured schema, opens the same
journal (``OUTPUT.partial/journal.jsonl``), and when every row has a result
writes the output with ``Journal.finish`` — the same schema and metadata as a
local run, written to a temporary name and renamed. Only the sending moves to
Ray:

- The requests (batchrun's own request bodies, one per row still to send) go
  into a Ray Dataset (``ray.data.from_arrow``, in blocks). The input file is
  read in the driver with batchrun's reader rather than with Ray Data's JSON
  reader, whose type inference would change the requests (a nested object
  gains null keys, a line's bad JSON has no line number), and so the
  input need not be reachable from the workers.
- ``map_batches`` hands the batches to a pool of ``RowSender`` actors (one per
  CPU of the cluster, at most one per request in flight). Each actor owns one
  event loop, one ``ApiClient`` session and one ``Limits`` for its life, and
  sends each batch with batchrun's ``Scheduler``: the same retry policy, key
  probe, structured re-asks and records as a local run, with many requests in
  flight. The job's ``concurrency`` (or ``max_concurrency`` for "auto"),
  ``rpm`` and ``tpm`` are split evenly across the actors (concurrency rounded
  down, so the whole never exceeds the job's).
- Each batch's results stream back to the driver as JSON records, which the
  driver journals as they arrive.

What it does not do, or does differently:

- Durability is per batch, not per row: a result is journaled when its whole
  batch comes back to the driver. A crash, Ctrl-C or a failed Ray job loses
  every result not journaled yet (the batches the actors are on, and finished
  ones Ray has not yet handed to the driver), and those rows were paid for;
  every journaled row is kept, and the same command (with either engine)
  resumes from the journal, sending only the rows without a result.
- Ray retries the batch of an actor that died (a lost node): the rows of that
  batch are sent again and may be paid twice. A task that raised is not
  retried; the job stops and resumes from the journal.
- The journal lives on the driver's machine, and so does ``output``: with
  ``ray job submit`` that is the head node.
- ``max_cost`` is refused (a budget cannot be split across actors without
  stopping early or overshooting); a prices file still shows the spend.
- A 429 that shows the rate limit is spent pauses the actor that got it (its
  share of the rpm), not the others.
- ``max_failures`` is counted by the driver as batches arrive, so the job stops
  at the end of the batch that passed it. ``api_down_after_s`` and the
  401/403 key probe work within each batch (an actor probes the key again at
  the start of each batch).
- Retries are logged in the actors (Ray forwards their warnings to the driver's
  stderr), not to ``--log-file``; failed rows are logged by the driver.
- ``--mock`` serves the embedded endpoint from the driver on 127.0.0.1, which
  only actors on the same machine can reach.

The API key reaches the actors as a constructor argument wrapped so that its
repr hides it: it is never in Ray's runtime environment (which the dashboard
shows), in a dataset, task or actor name, or in a log. Like every actor
argument it is pickled into Ray's object store (shared memory, spilled to the
Ray session folder if memory runs short) while the job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from types import ModuleType
from typing import Any

import orjson
import pyarrow as pa

from batchrun import errors
from batchrun.aio import loop_factory
from batchrun.client import ApiClient
from batchrun.config import Job
from batchrun.engines.shell import (
    GRACE_S,
    Heartbeat,
    Recorder,
    embedded_endpoint_thread,
    interrupt_on_signals,
)
from batchrun.errors import Interrupted, JobError, JobStopped
from batchrun.lifecycle import OpenRun, RunOptions, RunResult
from batchrun.limits import Limits
from batchrun.outputs import STATUS_NONE
from batchrun.payload import Prepared
from batchrun.progress import Progress, Tally
from batchrun.retry import RetryPolicy
from batchrun.scheduler import Scheduler
from batchrun.structured import Structured

log = logging.getLogger("batchrun")

INSTALL_HINT = "pip install 'batchrun[ray]'"
MIN_BATCH_ROWS = 16
BATCH_PER_SLOT = 8
"""An actor's batch holds this many rows per request it may have in flight, so the
tail of a batch (fewer rows left than places) is a small part of it."""

REQUEST_SCHEMA = pa.schema([pa.field("row", pa.int64()), pa.field("prepared", pa.binary())])
"""One row to send: its number and its ``payload.Prepared``, pickled (so the
engine follows that dataclass whatever fields it gains)."""

RESULT_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),
        pa.field("record", pa.binary()),
        pa.field("requests", pa.int64()),
        pa.field("retries", pa.int64()),
        pa.field("stop_kind", pa.string()),
        pa.field("stop", pa.string()),
    ]
)
"""What an actor returns for a batch: one row per result (``record``: the journal
record as JSON), then one summary row (``row`` -1) with the requests and retries
made and, when the batch stopped the job, the stop's class and message."""


class Secret:
    """A value (the API key, header values from the environment) that must not be
    shown: its repr is a mask, so no Ray message or log can print it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret(***)"


# ---- the actor ---------------------------------------------------------------


class RowSender:
    """A Ray Data actor that sends batches of requests with batchrun's Scheduler.

    Batches arrive one at a time (a plain, synchronous ``__call__``); each one is
    run to the end on the actor's own event loop, with ``job.workers`` requests in
    flight. The client session and the limits outlive the batches, so
    connections are kept alive and the rpm/tpm budgets stay even across them.
    """

    def __init__(
        self,
        job: Job,
        api_key: Secret | None,
        headers: Secret,
        secrets: Secret,
        structured: Structured | None,
    ) -> None:
        self.job = job
        self.structured = structured
        self.runner = asyncio.Runner(loop_factory=loop_factory())
        self.client = ApiClient(
            job, api_key.value if api_key else None, headers.value, secrets.value
        )
        self.runner.run(self.client.__aenter__())
        self.limits = Limits.build(job.concurrency, job.max_concurrency, job.rpm, job.tpm)
        self.policy = RetryPolicy.for_job(job)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [pickle.loads(b) for b in batch.column("prepared").to_pylist()]
        return self.runner.run(self.send(rows))

    async def send(self, rows: list[Prepared]) -> pa.Table:
        results = _Results()
        tally = Tally(total=len(rows))
        scheduler = Scheduler(
            self.job,
            self.client,
            Recorder(results, tally, max_failures=None),
            tally,
            self.policy,
            self.limits,
            structured=self.structured,
            grace_s=GRACE_S,
        )
        stop: JobStopped | None = None
        try:
            await scheduler.run(iter(rows), sum(1 for p in rows if p.error is None))
            scheduler.finish()
        except JobStopped as exc:
            stop = exc
        return _result_table(results.records, tally, stop)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.runner.run(self.client.__aexit__(None, None, None))
            self.runner.close()


class _Results:
    """The scheduler's result sink inside an actor: every row it is given is
    unsent (the driver only sends rows without a result), and results are kept
    in order to go back to the driver."""

    def __init__(self) -> None:
        self.status = _Unsent()
        self.records: list[dict[str, Any]] = []

    def append(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))

    def sync(self) -> None:
        """Nothing to sync: the records travel back to the driver's journal."""


class _Unsent:
    def __getitem__(self, row: int) -> int:
        return STATUS_NONE


def _result_table(records: list[dict[str, Any]], tally: Tally, stop: JobStopped | None) -> pa.Table:
    n = len(records)
    return pa.Table.from_pydict(
        {
            "row": [r["row"] for r in records] + [-1],
            "record": [orjson.dumps(r) for r in records] + [None],
            "requests": [0] * n + [tally.requests],
            "retries": [0] * n + [tally.retries],
            "stop_kind": [None] * n + [type(stop).__name__ if stop else None],
            "stop": [None] * n + [str(stop) if stop else None],
        },
        schema=RESULT_SCHEMA,
    )


# ---- the driver --------------------------------------------------------------


def import_ray() -> ModuleType:
    """The ``ray`` module with Ray Data, or JobError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise JobError(
            f"--engine ray needs Ray, which is not installed ({exc}). Install it with: {INSTALL_HINT}"
        ) from None
    return ray


def run_on_ray(job: Job, options: RunOptions | None = None) -> RunResult:
    """Run a checked ``job`` with its rows sent by Ray actors, to the end (or to a
    stop, raised as JobStopped), and return what it did.

    Ray's own rule picks the cluster: the one this process already joined, else
    the one ``RAY_ADDRESS`` names, else one that ``ray start`` runs on this
    machine, else a new one started here (and shut down at the end).
    """
    options = options or RunOptions()
    if job.mode != "online":
        raise JobError(
            f'mode = "{job.mode}" sends the rows through a provider\'s Batch API, which the Ray '
            "engine does not do: leave out --engine ray (one process submits every batch)."
        )
    ray = import_ray()
    if job.max_cost is not None:
        raise JobError(
            "`max_cost` is not supported with --engine ray: a budget cannot be split across "
            "Ray actors. Leave max_cost out (a prices file still shows the spend), or run "
            "with the local engine."
        )
    if job.pii or job.pii_patterns:
        raise JobError(
            "`pii` is not supported with --engine ray: each row's mapping of placeholders to "
            "personal data would travel to the Ray workers, and it must not leave this machine. "
            "Run the job with the local engine."
        )
    # The same checks, journal, resume, reuse and output as a local run: only the sending differs.
    with OpenRun(job, options, engine="ray") as run:
        checked, journal, tally = run.checked, run.journal, run.tally
        if run.to_send:
            signals = (
                interrupt_on_signals(run.job.output)
                if options.handle_signals
                else contextlib.nullcontext()
            )
            with (
                embedded_endpoint_thread(run.job, options.mock) as sent_job,
                _ray_session(ray),
                signals,
            ):
                rows = run.rows_to_send()
                progress = Progress(tally, enabled=options.progress, mode=options.progress_mode)
                try:
                    _send_on_ray(
                        ray,
                        sent_job,
                        rows,
                        run.to_send,
                        Recorder(journal, tally, sent_job.max_failures, run.prices),
                        Heartbeat(progress, journal),
                        api_key=Secret(checked.api_key) if checked.api_key else None,
                        headers=Secret(checked.headers),
                        secrets=Secret(checked.secrets),
                        structured=checked.structured,
                    )
                finally:
                    progress.close()
            # The actors' spend is read back from the journal, as a resumed run's is.
            spend = run.spend_so_far()
            if spend is not None:
                tally.cost = spend.spent
        return run.finish()


def _request_blocks(rows: Iterator[Prepared], block_rows: int) -> Iterator[pa.Table]:
    """The rows to send in blocks of ``block_rows``: each block is one actor call."""
    chunk: list[Prepared] = []
    for p in rows:
        chunk.append(p)
        if len(chunk) >= block_rows:
            yield _request_block(chunk)
            chunk = []
    if chunk:
        yield _request_block(chunk)


def _request_block(chunk: Sequence[Prepared]) -> pa.Table:
    return pa.Table.from_pydict(
        {"row": [p.row for p in chunk], "prepared": [pickle.dumps(p) for p in chunk]},
        schema=REQUEST_SCHEMA,
    )


def actor_plan(job: Job, cpus: float, to_send: int) -> tuple[int, Job, int]:
    """How many actors, the job each one runs (its share of the concurrency,
    rpm and tpm) and the rows per batch."""
    actors = max(1, min(int(cpus), job.workers, math.ceil(to_send / MIN_BATCH_ROWS)))
    if job.concurrency == "auto":
        share = replace(job, max_concurrency=max(1, job.max_concurrency // actors))
    else:
        assert isinstance(job.concurrency, int)
        share = replace(job, concurrency=max(1, job.concurrency // actors))
    share = replace(
        share,
        rpm=job.rpm / actors if job.rpm else None,
        tpm=job.tpm / actors if job.tpm else None,
        # Counted over the whole job by the driver.
        max_failures=None,
    )
    batch_rows = max(MIN_BATCH_ROWS, BATCH_PER_SLOT * share.workers)
    batch_rows = max(1, min(batch_rows, math.ceil(to_send / actors)))
    return actors, share, batch_rows


def _send_on_ray(
    ray: ModuleType,
    job: Job,
    rows: Iterator[Prepared],
    to_send: int,
    recorder: Recorder,
    heartbeat: Heartbeat,
    *,
    api_key: Secret | None,
    headers: Secret,
    secrets: Secret,
    structured: Structured | None,
) -> None:
    """Send ``rows`` through a pool of RowSender actors and journal every result
    as its batch comes back."""
    cpus = ray.cluster_resources().get("CPU", 1)
    actors, share, batch_rows = actor_plan(job, cpus, to_send)
    log.info(
        "sending with %d Ray actors, %s requests in flight each, %d rows per batch",
        actors,
        share.concurrency,
        batch_rows,
        extra={"event": "ray_plan", "actors": actors, "batch_rows": batch_rows},
    )
    try:
        with _quiet_ray_data(ray):
            # One block per batch: Ray Data hands whole blocks to the actors, so the
            # blocks decide how the rows spread over them.
            requests = ray.data.from_arrow(list(_request_blocks(rows, batch_rows)))
            results = requests.map_batches(
                RowSender,
                batch_size=None,
                batch_format="pyarrow",
                fn_constructor_kwargs={
                    "job": share,
                    "api_key": api_key,
                    "headers": headers,
                    "secrets": secrets,
                    "structured": structured,
                },
                num_cpus=1,
                **_actor_pool(ray, actors),
            )
            for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
                stop = _journal_batch(batch, recorder)
                if stop is not None:
                    raise stop
                heartbeat.beat()
    except ray.exceptions.RayError as exc:
        raise JobStopped(
            f"The Ray job failed: {_first_line(exc)}. Every result that came back is saved in "
            f"{job.output}.partial: run the same command again to resume."
        ) from None


def _actor_pool(ray: ModuleType, actors: int) -> dict[str, Any]:
    """map_batches' argument for a pool of ``actors`` actors: ``compute`` from Ray
    2.51, ``concurrency`` before (each version deprecates the other)."""
    major, minor = (int(part) for part in ray.__version__.split(".")[:2])
    if (major, minor) >= (2, 51):
        return {"compute": ray.data.ActorPoolStrategy(size=actors)}
    return {"concurrency": actors}


def _journal_batch(batch: pa.Table, recorder: Recorder) -> JobStopped | None:
    """Journal and count the results of one batch. Returns the stop the batch
    ended with (an actor's, or too many failures), if any."""
    stop: JobStopped | None = None
    tally = recorder.tally
    for item in batch.to_pylist():
        if item["row"] < 0:
            tally.requests += item["requests"]
            tally.retries += item["retries"]
            if item["stop_kind"] is not None and stop is None:
                stop = _stop_error(item["stop_kind"], item["stop"])
            continue
        too_many = recorder.record(orjson.loads(item["record"]))
        stop = stop or too_many
    return stop


@contextlib.contextmanager
def _quiet_ray_data(ray: ModuleType) -> Iterator[None]:
    """No Ray Data progress bars or info lines meanwhile (batchrun shows its own
    progress); Ray Data's warnings still show."""
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    loggers = [logging.getLogger("ray.data"), logging.getLogger("ray.data._internal.progress")]
    levels = [logger.level for logger in loggers]
    context.enable_progress_bars = False
    loggers[0].setLevel(logging.WARNING)
    loggers[1].setLevel(logging.ERROR)  # it warns that its bars are off
    try:
        yield
    finally:
        context.enable_progress_bars = bars
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _stop_error(kind: str, message: str) -> JobStopped:
    """The JobStopped an actor raised, rebuilt from its class name and message."""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, JobStopped) and cls is not Interrupted:
        return cls(message)
    return JobStopped(message)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


@contextlib.contextmanager
def _ray_session(ray: ModuleType) -> Iterator[None]:
    """Ray as it is when already initialized; else joined (RAY_ADDRESS) or started
    here, and shut down at the end."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = os.environ.get("RAY_ADDRESS")
        what = f"join the Ray cluster at RAY_ADDRESS={where}" if where else "start Ray here"
        raise JobError(
            f"Cannot {what} ({_first_line(exc)}). Check that the cluster is up (ray status), "
            "or unset RAY_ADDRESS to run on this machine."
        ) from None
    try:
        yield
    finally:
        ray.shutdown()

"""The local engine: asyncio workers in this process send the rows
(``batchrun run``, ``batchrun.run``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import Any

from batchrun.client import ApiClient
from batchrun.config import Job
from batchrun.engines.shell import (
    GRACE_S,
    Heartbeat,
    Recorder,
    embedded_endpoint,
    stop_on_signals,
)
from batchrun.lifecycle import OpenRun, RunOptions, RunResult
from batchrun.limits import Limits
from batchrun.payload import Prepared
from batchrun.progress import Progress
from batchrun.retry import RetryPolicy
from batchrun.scheduler import Scheduler


async def run_job(job: Job, options: RunOptions | None = None, *, sleep: Any = None) -> RunResult:
    """Run a checked ``job`` to the end (or to a stop, raised as JobStopped) and
    return what it did. ``sleep`` replaces asyncio.sleep for retry and limit
    waits (tests). A job with ``mode`` batch or hybrid, or with batches an
    earlier run left open, goes to ``engines.batch``."""
    options = options or RunOptions()
    from batchrun.engines import batch

    if batch.wanted(job):
        return await batch.run_batch_job(job, options, sleep=sleep)
    with OpenRun(job, options) as run:
        if not run.to_send:
            return run.finish()  # every row has a result: nothing to start
        # Everything made so far (modules, the job, the journal's index) lives to
        # the end: keep the collector from scanning it again on every pass.
        gc.freeze()
        async with embedded_endpoint(run.job, options.mock) as sent_job:
            await send_online(run, sent_job, options, sleep=sleep)
        return run.finish()


async def send_online(
    run: OpenRun,
    sent_job: Job,
    options: RunOptions,
    *,
    sleep: Any = None,
    rows: Iterator[Prepared] | None = None,
    to_send: int | None = None,
    recorder: Recorder | None = None,
) -> None:
    """Send ``rows`` (by default every row ``run`` has no result for; ``to_send``
    of them need a request) to ``sent_job``'s endpoint, one request each, and
    journal the results through ``recorder``."""
    checked, tally = run.checked, run.tally
    async with ApiClient(sent_job, checked.api_key, checked.headers, checked.secrets) as client:
        limits = Limits.build(
            sent_job.concurrency,
            sent_job.max_concurrency,
            sent_job.rpm,
            sent_job.tpm,
            sleep=sleep or asyncio.sleep,
        )
        scheduler = Scheduler(
            sent_job,
            client,
            recorder or Recorder(run.journal, tally, sent_job.max_failures, run.prices),
            tally,
            RetryPolicy.for_job(sent_job, sleep),
            limits,
            structured=checked.structured,
            spend=run.spend,
            currency=tally.currency,
            grace_s=GRACE_S,
            via=run.via,
            stream_options=run.stream_options,
        )
        progress = Progress(tally, enabled=options.progress, mode=options.progress_mode)
        signals = (
            stop_on_signals(scheduler.stop, scheduler.stop_now, run.job.output)
            if options.handle_signals
            else contextlib.nullcontext()
        )
        with signals:
            heartbeat = asyncio.create_task(Heartbeat(progress, run.journal).run())
            try:
                await scheduler.run(
                    rows if rows is not None else run.rows_to_send(),
                    run.to_send if to_send is None else to_send,
                )
            finally:
                heartbeat.cancel()
                progress.close()
        scheduler.finish()

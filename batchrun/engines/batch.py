"""The Batch API engine: ``mode = "batch"`` and ``mode = "hybrid"``.

A job opens like any other (``lifecycle.OpenRun``: checks, journal, resume,
``--reuse``); then, instead of one request per row:

1. **Calibrate** (hybrid, first start): a few rows go online at once, to
   measure how long an online request takes (the switch-over is timed by it)
   and to find a refused key or model before a whole batch is paid for.
2. **Submit**: the other rows to send, as OpenAI batch request lines (the very
   bodies the online path would send, so the same ``request_hash``), in parts of
   at most 50,000 lines and 200 MB (``PartLimits``): each part's rows and file
   are written first, then uploaded, then made a batch; its file id and batch id
   go into ``OUTPUT.partial/batch/state.json`` (``batch_state``) the moment
   they exist.
3. **Wait**: every ``batch_poll_s`` seconds, each batch's status and
   ``request_counts`` (shown in the progress line). A batch that ends
   (``completed``, ``failed``, ``expired``, ``cancelled``) is collected: its
   output and error files are downloaded and every line is mapped back by
   ``custom_id`` into the row's journal record (``tier = "batch"``).
4. **Switch over** (hybrid): at the latest moment that still lets the online
   path send the rows the batches have not answered before ``deadline``
   (``switch_at``), the batches are cancelled, batchrun waits until they are
   ``cancelled`` and collects what they answered; then the online engine
   (``engines.local.send_online``) sends only the rows without a result. A row
   a batch answered is never sent online. If the batches finish first, nothing
   goes online. A batch job with a deadline cancels there too; its unanswered
   rows (and those of a batch that failed validation or expired) become
   ``error`` rows naming why, where a hybrid job sends them online.

Durable: after ``kill -9`` or Ctrl-C at any point, the same command re-attaches
to the batches in ``state.json``; a part whose file was uploaded but whose batch
id was not recorded is looked for by its metadata (run id and part number)
before a batch is created for it, so no row is submitted twice. ``--restart``
cancels the open batches of the run it discards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from batchrun.batch_client import BatchClient, remove_quietly
from batchrun.batch_lines import BatchRow, Collector, ended_at, why
from batchrun.batch_state import TERMINAL, BatchState, Part, state_folder
from batchrun.batch_submit import PartLimits, Submitter, cancel_earlier
from batchrun.config import Job
from batchrun.deadline import local_text, parse_deadline, resolve
from batchrun.engines.local import send_online
from batchrun.engines.shell import Heartbeat, Recorder, embedded_endpoint, stop_on_signals
from batchrun.errors import BatchrunError, JobStopped
from batchrun.lifecycle import OpenRun, RunOptions, RunResult
from batchrun.outputs import STATUS_ERROR, STATUS_NONE
from batchrun.payload import Prepared
from batchrun.prices import BATCH, ONLINE, Prices
from batchrun.progress import Progress, duration
from batchrun.retry import RetryPolicy

log = logging.getLogger("batchrun")

HYBRID = "hybrid"
CALIBRATION_ROWS = 4
"""Rows a hybrid job sends online first, to measure the online latency."""
CANCEL_POLL_S = 1.0
"""Seconds between two looks at a batch being cancelled."""

__all__ = ["PartLimits", "run_batch_job", "wanted"]


def wanted(job: Job) -> bool:
    """Whether ``job`` runs here: mode batch or hybrid, or batches an earlier run left."""
    if job.mode != ONLINE:
        return True
    return job.output is not None and (state_folder(job.output) / "state.json").exists()


async def run_batch_job(
    job: Job,
    options: RunOptions | None = None,
    *,
    sleep: Any = None,
    limits: PartLimits | None = None,
) -> RunResult:
    """Run ``job`` through the Batch API (see the module's doc) and return what it did."""
    options = options or RunOptions()
    earlier = None
    if options.restart and job.output is not None:
        try:
            earlier = BatchState.load(state_folder(job.output))
        except BatchrunError as exc:
            log.warning("%s", exc)
    with OpenRun(job, options) as run:
        if not run.to_send and earlier is None:
            state = _open_batches(run)
            if state is None or not state.live():
                # Every row has a result: no client, no batch, no empty part submitted.
                return summed_up(run.finish(), _deadline_at(run.job, state), run.prices)
        checked = run.checked
        async with (
            embedded_endpoint(run.job, options.mock) as sent_job,
            BatchClient(
                sent_job,
                checked.api_key,
                checked.headers,
                checked.secrets,
                RetryPolicy.for_job(sent_job, sleep),
            ) as api,
        ):
            if earlier is not None and not options.mock:
                await cancel_earlier(api, earlier, run.job)
            engine = BatchEngine(run, sent_job, api, options, limits or PartLimits(), sleep)
            await engine.drive()
        result = run.finish()
    return summed_up(result, engine.deadline, run.prices)


def _open_batches(run: OpenRun) -> BatchState | None:
    """The batches an unfinished run of this output recorded (None when none did,
    or the run is answered from its finished output)."""
    output = run.job.output
    if run.done is not None or output is None:
        return None
    return BatchState.load(state_folder(output))


def _deadline_at(job: Job, state: BatchState | None) -> float | None:
    """The job's deadline as ``BatchEngine`` would resolve it: the one recorded,
    unless the command gives another."""
    if job.deadline is not None and (state is None or job.deadline != state.deadline_text):
        return resolve(parse_deadline(job.deadline), time.time())
    return state.deadline_at if state is not None else None


class BatchEngine:
    """One run's batches, from submission to the last row journaled."""

    def __init__(
        self,
        run: OpenRun,
        job: Job,
        api: BatchClient,
        options: RunOptions,
        limits: PartLimits,
        sleep: Any,
    ) -> None:
        self.opened, self.job, self.api, self.options = run, job, api, options
        self.sleep = sleep
        self.journal, self.tally, self.checked = run.journal, run.tally, run.checked
        self.mode = job.mode
        self.skip = run.checked.scan.skip
        # The rows --retry-failed sends again that nothing has answered in this run.
        self.retry = (self.journal.status == STATUS_ERROR) & ~self.skip & options.retry_failed
        recorder = Recorder(self.journal, self.tally, job.max_failures, run.prices)
        self.lines = Collector(recorder, self.retry, api, job, run.checked.structured)
        self.state = self._open_state()
        self.submitter = Submitter(
            self.state, api, job, limits, self._rows, self.lines, self._check_stop, self._seen
        )
        self._stop: JobStopped | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None
        self._late: str | None = None
        """Why a batch job's unanswered rows have no answer, once the deadline came."""

    def _open_state(self) -> BatchState:
        assert self.job.output is not None  # check_job makes sure
        folder = state_folder(self.job.output)
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        state = BatchState.load(folder)
        if state is None or state.run_id != self.journal.run_id:
            state = BatchState(folder, self.journal.run_id, started_at=now)
        text = self.job.deadline
        if text is not None and text != state.deadline_text:
            # Resolved once; a rerun keeps it unless the command gives another.
            state.deadline_text, state.deadline_at = text, resolve(parse_deadline(text), now)
        state.save()
        return state

    @property
    def deadline(self) -> float | None:
        return self.state.deadline_at

    def switch_at(self) -> float | None:
        """When the live batches must be cancelled (``BatchState.switch_at``), from
        the rows without a result that they have not run yet."""
        missing = self.journal.missing_rows(self.skip) + int(self.retry.sum())
        open_rows = max(0, missing - sum(p.answered for p in self.state.live()))
        return self.state.switch_at(self.mode, open_rows, self.job)

    # ---- the run --------------------------------------------------------------------

    async def drive(self) -> None:
        """Calibrate, submit, wait, switch over, send the rest online."""
        state = self.state
        if (
            self.mode == HYBRID
            and state.latency_s is None
            and not state.parts
            and (self.deadline is None or self.deadline > time.time())
        ):
            await self._calibrate()
        signals = (
            stop_on_signals(self._request_stop, self._stop_now, self.job.output)
            if self.options.handle_signals
            else contextlib.nullcontext()
        )
        self._task = asyncio.current_task()
        progress = Progress(
            self.tally, enabled=self.options.progress, mode=self.options.progress_mode
        )
        heartbeat = asyncio.create_task(Heartbeat(progress, self.journal).run())
        try:
            with signals:
                await self._attach()
                await self._submit()
                await self._wait()
        except asyncio.CancelledError:
            if self._stop is None or self._task is None:
                raise
            self._task.uncancel()
            raise self._stop from None
        finally:
            heartbeat.cancel()
            self.tally.detail = ""
            progress.close()
        self._check_stop()
        if self.mode == BATCH:
            self._unanswered(self._late or "no batch answered this row")
        else:
            await self._send_rest()

    def _request_stop(self, error: JobStopped, grace_s: float) -> None:
        """Ctrl-C / SIGTERM: stop at the next step; the batches stay, recorded."""
        self._stop = error
        self._wake.set()

    def _stop_now(self, error: JobStopped) -> None:
        """A second Ctrl-C: stop at once (what is recorded stays recorded)."""
        self._stop = error
        if self._task is not None:
            self._task.cancel()

    def _check_stop(self) -> None:
        if self._stop is not None:
            raise self._stop

    async def _nap(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when the job is stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, seconds))
        self._check_stop()

    def _rows(self) -> Iterator[Prepared]:
        return self.opened.rows()

    def _to_send(self) -> np.ndarray:
        """Rows without a result (or to retry) that no batch holds or has held."""
        size, parts = self.journal.num_rows, self.state.parts
        held = self.state.rows_mask(size, self.state.live())
        left = self.state.rows_mask(size, [p for p in parts if p.collected])
        unanswered = self.journal.status == STATUS_NONE
        return ((unanswered | self.retry) & ~self.skip) & ~held & ~(left & unanswered)

    async def _calibrate(self) -> None:
        """Send the first few rows online; keep the median latency and tokens."""
        mask = self._to_send()
        rows: list[Prepared] = []
        for p in self._rows():
            if mask[p.row] and p.error is None:
                rows.append(p)
                if len(rows) >= CALIBRATION_ROWS:
                    break
        if not rows:
            return
        await send_online(
            self.opened,
            self.job,
            self.options,
            sleep=self.sleep,
            rows=iter(rows),
            to_send=len(rows),
        )
        latencies, tokens = [], []
        for p in rows:
            rec = self.journal.record(p.row) or {}
            self.retry[p.row] = False
            if rec.get("attempts"):
                latencies.append(float(rec.get("latency_ms") or 0.0) / 1000)
                tokens.append(float(rec.get("total_tokens") or p.est_tokens or 0))
        state = self.state
        state.latency_s = statistics.median(latencies) if latencies else None
        state.tokens_per_row = statistics.mean(tokens) if tokens else None
        state.save()
        log.info(
            "calibration: %d rows sent online, %.3fs per request",
            len(rows),
            state.latency_s or 0.0,
            extra={"event": "batch_calibration", "rows": len(rows), "latency_s": state.latency_s},
        )

    # ---- submitting --------------------------------------------------------------------

    async def _attach(self) -> None:
        """Finish the submission of parts an earlier run left half-way, and look
        at the batches it submitted."""
        create = self.mode != ONLINE and not self.state.switched
        for part in self.state.live():
            self._check_stop()
            if part.batch_id is None:
                await self.submitter.submit_part(part, part.file_id is not None, create)
            elif (info := await self.api.get(part.batch_id)) is None:
                self._lost(part)
            else:
                self._seen(part, info)
        if self.state.parts:
            log.info(
                "re-attached to %d batches of run %s",
                len(self.state.live()),
                self.state.run_id,
                extra={"event": "batch_attach", "batches": len(self.state.live())},
            )

    def _lost(self, part: Part) -> None:
        """The API does not know a batch this job submitted."""
        if not self.options.mock:
            raise JobStopped(
                f"The Batch API at {self.api.base} does not know batch {part.batch_id}, which this "
                f"job submitted (recorded in {self.state.folder / 'state.json'}). Check base_url "
                "and the key; --restart discards the job's results and starts over."
            )
        # The embedded endpoint of an earlier process is gone, and its batches with it.
        part.lost = True
        self.state.save()

    async def _submit(self) -> None:
        """Submit the rows no batch holds, unless the switch-over has come."""
        if self.mode == ONLINE or self.state.switched:
            return
        switch = self.switch_at()
        if switch is not None and switch <= time.time():
            assert self.deadline is not None
            self._late = f"the deadline ({local_text(self.deadline)}) came before it was sent"
            return
        mask = self._to_send()
        if mask.any():
            await self.submitter.submit(mask)

    # ---- waiting ----------------------------------------------------------------------

    async def _look(self, parts: list[Part]) -> None:
        """The status of each of ``parts``; collect those that ended."""
        for part in parts:
            assert part.batch_id is not None
            info = await self.api.get(part.batch_id)
            if info is None:
                self._lost(part)
                continue
            self._seen(part, info)
            if part.status in TERMINAL:
                await self._collect(part, info)

    async def _wait(self) -> None:
        """Look at the live batches every ``batch_poll_s`` until none is left;
        cancel them at the switch-over."""
        while live := self.state.live():
            await self._look(live)
            if not (live := self.state.live()):
                return
            now, switch = time.time(), self.switch_at()
            self._show(live, switch)
            if switch is not None and now >= switch:
                await self._switch(live)
                return
            wake = now + self.job.batch_poll_s
            await self._nap((wake if switch is None else min(wake, switch)) - now)

    async def _switch(self, live: list[Part]) -> None:
        """Cancel the live batches, wait until each is over, collect them."""
        state = self.state
        if self.mode != BATCH and not state.switched:
            state.switched = True
            state.save()
        rows_open = self.journal.missing_rows(self.skip) - sum(p.answered for p in live)
        log.info(
            "switching over: cancelling %d batches (about %d rows unanswered)",
            len(live),
            rows_open,
            extra={"event": "batch_switch", "batches": len(live), "rows_open": rows_open},
        )
        if self.deadline is not None:
            self._late = f"the deadline ({local_text(self.deadline)}) came before it was answered"
        for part in live:
            assert part.batch_id is not None
            info = await self.api.cancel(part.batch_id)
            if info is not None:
                self._seen(part, info)
        while live := state.live():
            await self._look(live)
            if live := state.live():
                self._show(live, None)
                await self._nap(min(CANCEL_POLL_S, self.job.batch_poll_s))

    def _seen(self, part: Part, info: dict[str, Any]) -> None:
        status = str(info.get("status") or "unknown")
        counts = info.get("request_counts")
        if isinstance(counts, dict):
            part.counts = {k: int(v) for k, v in counts.items() if isinstance(v, int)}
        if status != part.status:
            part.status = status
            self.state.save()
            log.info(
                "batch %s (part %d): %s, %d of %d rows run",
                part.batch_id,
                part.number,
                status,
                part.answered,
                part.rows,
                extra={"event": "batch_status", "batch_id": part.batch_id, "status": status},
            )

    def _show(self, live: list[Part], switch: float | None) -> None:
        """The batches' status and counts, at the end of the progress line."""
        statuses = "/".join(sorted({p.status for p in live}))
        run, total = sum(p.answered for p in live), sum(p.rows for p in live)
        text = f"batch: {len(live)} {statuses}, {run:,}/{total:,} run"
        if switch is not None and self.mode == HYBRID:
            left = switch - time.time()
            text += f", online in {duration(left)}" if left > 0 else ", switching over"
        self.tally.detail = text

    # ---- collecting -------------------------------------------------------------------

    async def _collect(self, part: Part, info: dict[str, Any]) -> None:
        """Journal what the ended batch answered (output and error files), then
        (a batch job) an error row for each row it left unanswered."""
        index = self._index(part)
        started, finished = int(part.started_at * 1_000_000), ended_at(info)
        for key in ("output_file_id", "error_file_id"):
            file_id = info.get(key)
            if not isinstance(file_id, str) or not file_id:
                continue
            self._check_stop()
            path = self.state.folder / f"part-{part.number:04d}.{key.split('_')[0]}.jsonl"
            await self.api.download(file_id, path)
            try:
                self.lines.take(path, index, started, finished)
            finally:
                remove_quietly(path)
        if self.mode == BATCH:
            self._unanswered(why(part, info, self._late), list(index.values()))
        part.collected = True
        self.state.save()
        log.info(
            "collected batch %s (part %d, %s)",
            part.batch_id,
            part.number,
            part.status,
            extra={"event": "batch_collected", "batch_id": part.batch_id, "status": part.status},
        )

    def _index(self, part: Part) -> dict[str, BatchRow]:
        """custom_id → the row, of the part's rows."""
        return {e[1]: BatchRow(*e) for e in self.state.entries(part)}

    def _unanswered(self, why: str, rows: list[BatchRow] | None = None) -> None:
        """A batch job: an error row for each row without a result (of ``rows``,
        else of the whole job), saying ``why``."""
        if rows is None:
            mask = ((self.journal.status == STATUS_NONE) | self.retry) & ~self.skip
            rows = [
                BatchRow(p.row, p.id, p.request_hash, p.model) for p in self._rows() if mask[p.row]
            ]
        self.lines.unanswered(why, rows)

    async def _send_rest(self) -> None:
        """Send online the rows still without a result (hybrid, or batches left)."""
        mask = ((self.journal.status == STATUS_NONE) | self.retry) & ~self.skip
        to_send = int(mask.sum())
        if not to_send:
            return
        self.opened.to_send = to_send
        await send_online(
            self.opened,
            self.job,
            self.options,
            sleep=self.sleep,
            rows=(p for p in self._rows() if mask[p.row]),
            to_send=to_send,
        )


def summed_up(result: RunResult, deadline_at: float | None, prices: Prices | None) -> RunResult:
    """``result`` with the rows per tier and the deadline (epoch seconds) kept."""
    import pyarrow.parquet as pq

    table = pq.read_table(result.output, columns=["tier", "attempts"]).to_pydict()
    tiers = list(zip(table["tier"], table["attempts"], strict=True))
    batch = sum(1 for t, _ in tiers if t == BATCH)
    online = sum(1 for t, a in tiers if t != BATCH and a)
    deadline, margin = "", None
    if deadline_at is not None:
        margin = deadline_at - time.time()
        deadline = f"{local_text(deadline_at)}, finished " + (
            f"{margin:,.1f}s before it" if margin >= 0 else f"{-margin:,.1f}s after it"
        )
    log.info(
        "tiers: batch %d, online %d",
        batch,
        online,
        extra={
            "event": "tiers",
            "rows_batch": batch,
            "rows_online": online,
            "deadline": deadline_at,
            "before_deadline_s": margin,
        },
    )
    saved = None
    if batch and prices is not None:
        from batchrun.report import build_report  # priced as report prices it

        saved = build_report([result.output], prices=prices).batch_saved
    return replace(
        result, tiers=((BATCH, batch), (ONLINE, online)), deadline=deadline, batch_saved=saved
    )

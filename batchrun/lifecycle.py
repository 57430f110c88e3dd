"""One job's life, whichever engine sends its rows.

``check_job`` makes every check that can be made before a request is sent (the
output, the key variable, the headers, the whole input, its columns, the shard
and the schema). ``OpenRun`` then opens the journal, takes back an earlier
run's results (refusing one whose requests differ), applies ``--reuse`` and
sets the tally; an engine sends the rows ``OpenRun.rows_to_send`` yields and
ends with ``OpenRun.finish``, which writes the output and says what the run did.

A rerun of a finished job whose output can tell alone that nothing is left to
send (``finished.py``) skips all of that: ``OpenRun`` holds the output's lock,
sets the tally from the output, has nothing to send (``done`` is set, and there
is no journal and no checked input), and ``finish`` leaves the output as it is.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batchrun._version import __version__
from batchrun.checks import CheckedJob, check_job
from batchrun.config import Job
from batchrun.errors import JobError, JobStopped, ResumeConflict
from batchrun.journal import Journal, partial_dir
from batchrun.limits import CostBudget
from batchrun.outputs import (
    EMBEDDED_ENDPOINT,
    STATUS_ERROR,
    STATUS_NONE,
)
from batchrun.payload import Prepared, Shape
from batchrun.pii import enabled as pii_enabled
from batchrun.pii import settings as pii_settings
from batchrun.prices import Prices, load_prices

if TYPE_CHECKING:
    from batchrun.finished import Finished
from batchrun.progress import Tally, missing_usage, progress_fields, status_text
from batchrun.schema_via import SchemaVia
from batchrun.stream_options import StreamOptions

log = logging.getLogger("batchrun")

IDENTITY_KEYS = (
    "model",
    "endpoint",
    "system_prompt",
    "prompt_template",
    "messages_column",
    "id_column",
    "temperature",
    "max_tokens",
    "metadata",
    "stream",
    "response_format",
    "params",
)
"""Job keys that decide what is sent: an unfinished run resumes only under the same values."""


@dataclass(frozen=True)
class RunOptions:
    """How to run a job, beside the job itself (these never change what is sent)."""

    restart: bool = False
    retry_failed: bool = False
    skip_bad_lines: bool = False
    dedupe: bool = False
    progress: bool = True
    progress_mode: str | None = None
    handle_signals: bool = False
    mock: bool = False
    reuse: tuple[Path, ...] = ()
    output_format: str = "parquet"
    """parquet, or openai-batch: the Parquet file plus OpenAI batch output lines beside it."""
    shard: tuple[int, int] | None = None
    """(K, N): send only the rows whose id hashes to shard K (0-based) of N."""


@dataclass(frozen=True)
class RunResult:
    """What a finished job did. ``exit_code``: 0 every row ok, 1 some rows failed or invalid."""

    output: Path
    rows: int
    ok: int
    failed: int
    invalid: int
    resumed: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # of the prompt tokens, those read from the server's cache
    reasoning_tokens: int  # of the completion tokens, those of hidden reasoning
    requests: int
    retries: int
    wall_s: float
    run_id: str
    skipped_lines: int = 0
    reused: int = 0
    reused_tokens: int = 0
    cost: Decimal | None = None
    currency: str = ""
    causes: tuple[tuple[str, int], ...] = ()
    """The most common errors of the failed rows (one example each) and how many
    rows failed that way."""
    schema_via: str | None = None
    """How the requests carried the response schema (structured jobs)."""
    schema_via_refused: tuple[str, ...] = ()
    """The ways ``schema_via = "auto"`` found the server does not take, in the order tried."""
    no_usage: int = 0
    """Rows answered in this run without usage: the token counts leave them out."""
    stream_options_refused: str | None = None
    """Why streamed requests went without ``stream_options`` (the server's refusal)."""
    tiers: tuple[tuple[str, int], ...] = ()
    batch_saved: Decimal | None = None
    """What the rows a provider batch answered cost less than online would have."""
    """Rows per ``tier`` (batch, online) when a Batch API answered some (``engines.batch``)."""
    deadline: str = ""
    """A batch or hybrid job's deadline and how long before it the job finished."""

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 and self.invalid == 0 else 1

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for DataFrame.attrs and JSON."""
        data = dataclasses.asdict(self)
        data["output"] = str(self.output)
        data["exit_code"] = self.exit_code
        data["cost"] = float(self.cost) if self.cost is not None else None
        return data

    def _tokens(self) -> str:
        """Tokens as the answers reported them; never 0 for rows that reported none."""
        total = self.prompt_tokens + self.completion_tokens
        counts = (
            f"prompt {self.prompt_tokens:,}"
            + (f" (cached {self.cached_tokens:,})" if self.cached_tokens else "")
            + f"  completion {self.completion_tokens:,}"
            + (f" (reasoning {self.reasoning_tokens:,})" if self.reasoning_tokens else "")
            + f"  total {total:,}"
        )
        if not self.no_usage:
            return counts
        missing = missing_usage(self.no_usage)
        return f"{counts}  (partial: {missing})" if total else missing

    def summary(self) -> str:
        lines = [
            f"rows        {self.rows:,}  (ok {self.ok:,}, failed {self.failed:,}"
            + (f", invalid {self.invalid:,}" if self.invalid else "")
            + (f", from an earlier run {self.resumed:,}" if self.resumed else "")
            + ")",
            f"tokens      {self._tokens()}",
            *(
                [f"            stream_options not sent: the server refused it ({refused})"]
                if (refused := self.stream_options_refused)
                else []
            ),
            f"requests    {self.requests:,}  (retries {self.retries:,})",
            *(
                [
                    f"cost        {self.cost:.4f} {self.currency} (this job, all runs"
                    + (
                        f"; the batch saved {self.batch_saved:.4f} against online)"
                        if self.batch_saved is not None
                        else ")"
                    )
                ]
                if self.cost is not None
                else []
            ),
            f"wall time   {self.wall_s:.1f}s",
            f"output      {self.output}",
        ]
        if self.tiers:
            lines.insert(1, "tiers       " + ", ".join(f"{t} {n:,}" for t, n in self.tiers))
        if self.deadline:
            lines.insert(-2, f"deadline    {self.deadline}")
        if self.schema_via_refused:
            lines.insert(
                1,
                f"schema via  {self.schema_via} (auto: the server does not take "
                f"{', '.join(self.schema_via_refused)})",
            )
        if self.reused:
            lines.insert(
                1,
                f"reused      {self.reused:,} rows from earlier outputs (--reuse), saving {self.reused_tokens:,} tokens",
            )
        if self.skipped_lines:
            lines.insert(
                1, f"skipped     {self.skipped_lines:,} bad input lines (--skip-bad-lines)"
            )
        if self.failed:
            lines += [f"failed      {count:,} x {cause}" for cause, count in self.causes]
            lines.append(
                "            a plain rerun keeps the failed rows: add --retry-failed to send them again"
            )
        return "\n".join(lines)


def run_identity(job: Job, options: RunOptions, rows: int) -> dict[str, Any]:
    """What must not change for a run to resume another: the keys that decide
    what is sent, the input's size, the shard, and the endpoint that answers
    (a real run never takes the embedded endpoint's answers, or another
    server's, as its own)."""
    identity = {k: job.settings()[k] for k in IDENTITY_KEYS} | {
        "rows": rows,
        "answered_by": EMBEDDED_ENDPOINT if options.mock else job.base_url.rstrip("/"),
    }
    if options.shard is not None:
        identity["shard"] = "{}/{}".format(*options.shard)
    if pii_enabled(job):
        identity |= pii_settings(job)
    return identity


def open_schema_via(checked: CheckedJob, options: RunOptions) -> SchemaVia | None:
    """How a structured job's requests carry the schema, taken up where an
    earlier run of this output (or a ``--reuse`` output) left it."""
    if checked.structured is None:
        return None
    job = checked.job
    assert job.output is not None  # check_job makes sure
    return SchemaVia.open(
        checked.structured, job, partial_dir(job.output), earlier_outputs(job, options)
    )


def earlier_outputs(job: Job, options: RunOptions) -> tuple[Path, ...]:
    """The outputs whose metadata may say what earlier runs learned about the
    server (this output when finished, unless --restart; the --reuse ones)."""
    assert job.output is not None  # check_job makes sure
    return ((job.output,) if not options.restart else ()) + options.reuse


class OpenRun:
    """A run between its checks and its output: the journal is open, an earlier
    run's results are taken back, ``--reuse`` is applied and the tally is set.
    Both engines (local and Ray) open a run with ``open_run``, send the rows it
    says, and end with ``finish``; use it as a context manager so the journal is
    closed whatever happens."""

    def __init__(self, job: Job, options: RunOptions, engine: str = "local") -> None:
        from batchrun.finished import Finished, fingerprint

        self.started = time.monotonic()
        self.options = options
        self._resent_cost = Decimal(0)
        self.fingerprint = fingerprint(job, options)  # before anything is read
        self.done: Finished | None = Finished.open(job, options, self.fingerprint)
        if self.done is not None:  # a finished output with nothing left to send
            self._answered(self.done, engine)
            return
        self.checked = check_job(job, options)
        self.job = job = self.checked.job
        scan = self.checked.scan
        self.identity = run_identity(job, options, scan.num_rows)
        self.answered_by = self.identity["answered_by"]
        assert job.output is not None  # check_job makes sure
        self.journal = journal = Journal(
            job.output,
            scan.num_rows,
            self.identity,
            restart=options.restart,
            keep_columns=job.keep_columns,
        )
        try:
            # What earlier runs learned about the server, so the same bytes are sent.
            self.via = open_schema_via(self.checked, options)
            self.stream_options = StreamOptions.open(
                job, journal.folder, earlier_outputs(job, options)
            )
            # One pass over the input serves both the resume check and --reuse.
            rows = self.rows()
            if journal.resumed is not None:
                rows = resume_checked(journal, rows, self.via)
            self.reused = self.reused_tokens = 0
            if options.reuse:
                from batchrun.reuse import reuse_answers

                self.reused, self.reused_tokens = reuse_answers(
                    journal, options.reuse, rows, job.model, embedded=options.mock
                )
            elif journal.resumed is not None:
                collections.deque(rows, maxlen=0)  # the check alone
            if journal.resumed is not None:
                log.info(
                    "resuming run %s: %d rows ok and %d failed already",
                    journal.run_id,
                    journal.resumed.rows_ok,
                    journal.resumed.rows_failed,
                    extra={"event": "resume", "run_id": journal.run_id},
                )
            self.run_id, self.skipped_lines = journal.run_id, len(scan.skipped_lines)
            tally = self._set_tally(scan.rows_kept, journal.counts())
            self.to_send = journal.missing_rows(scan.skip) + (
                tally.failed if options.retry_failed else 0
            )
        except BaseException:
            self.close()
            raise
        self._started(engine)

    def _answered(self, done: Finished, engine: str) -> None:
        """Set up the rerun a finished output answers alone."""
        self.job, self.via, self.stream_options = done.found.job, done.via, done.stream_options
        self.run_id, self.skipped_lines = done.found.run_id, done.found.skipped_lines
        self.reused = self.reused_tokens = self.to_send = 0
        try:
            self._set_tally(done.found.rows, done.found.counts)
        except BaseException:
            self.close()
            raise
        self._started(engine)

    def _set_tally(self, total: int, counts: tuple[int, int, int]) -> Tally:
        """The tally at the start: the rows done before, and the spend so far."""
        self.tally = tally = Tally(total=total)
        tally.ok, tally.failed, tally.invalid = counts
        tally.resumed = tally.done
        job = self.job
        self.prices = load_prices(job.prices) if job.prices else None
        self.spend = self.spend_so_far(reprice=True)
        if self.spend is not None:
            # The rows --retry-failed sends again get a new record, and a new cost.
            tally.cost = self.spend.spent - self._resent_cost
        tally.currency = self.prices.currency if self.prices else ""
        return tally

    def _started(self, engine: str) -> None:
        job, tally, options = self.job, self.tally, self.options
        log.info(
            "job started%s: %d rows, %d to send, model %s, %s",
            "" if engine == "local" else f" on {engine.title()}",
            tally.total,
            self.to_send,
            job.model or "named by each request",
            job.url if not options.mock else "embedded endpoint",
            extra={
                "event": "start",
                "run_id": self.run_id,
                "rows_total": tally.total,
                "rows_to_send": self.to_send,
                "model": job.model,
                "version": __version__,
                "engine": engine,
            },
        )

    def __enter__(self) -> OpenRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Also after finish: it releases the output's lock.
        (self.done if self.done is not None else self.journal).close()

    def spend_so_far(self, reprice: bool = False) -> CostBudget | None:
        """The job's spend so far (the ``cost`` of every row with a result, earlier
        runs' included) and its budget, when the prices file prices the job's
        model; read again after an engine that does not count it as it goes (Ray).
        ``reprice``: journal again every record whose ``cost`` the prices now make
        different (a run without prices, or other prices), so the column, the
        summary and ``batchrun report`` agree."""
        job, prices = self.job, self.prices
        if prices is None:
            return None
        price = prices.price(job.model)
        if price is None and job.max_cost is not None:
            raise JobError(
                f"`max_cost` is set but prices file {job.prices} has no price for model {job.model}: "
                f'add a [models."{job.model}"] table so batchrun can keep to the budget.'
            )
        spent = (
            self.done.spent(prices)
            if self.done is not None
            else self._journal_cost(prices, reprice)
        )
        if price is None:
            log.warning(
                "model %s is not in prices file %s: its spend is not shown", job.model, job.prices
            )
            return None
        max_cost = Decimal(str(job.max_cost)) if job.max_cost is not None else None
        return CostBudget(max_cost, price, job.max_tokens, spent)

    def _journal_cost(self, prices: Prices, reprice: bool) -> Decimal:
        """The cost of the journal's rows (``Prices.row_cost`` of each row's last
        record); ``_resent_cost`` the part of it --retry-failed sends again."""
        journal = self.journal
        spent = self._resent_cost = Decimal(0)
        resent = self.options.retry_failed
        for row in np.nonzero(journal.status != STATUS_NONE)[0]:
            rec = journal.record(int(row))
            if not rec:
                continue
            cost = prices.row_cost(rec)
            if reprice and rec.get("cost") != (None if cost is None else float(cost)):
                journal.append({**rec, "cost": None if cost is None else float(cost)})
            if cost is not None:
                spent += cost
                if resent and journal.status[row] == STATUS_ERROR:
                    self._resent_cost += cost
        return spent

    @property
    def shape(self) -> Shape | None:
        """How this run puts the schema into each request (the way ``via`` says when asked)."""
        return self.via.shape if self.via is not None else None

    def rows(self) -> Iterator[Prepared]:
        """Every row of this run as a request, as it is sent now."""
        return self.stream_options.rendered(self.checked.rows(shape=self.shape))

    def rows_to_send(self) -> Iterator[Prepared]:
        """The rows without a result (and, with --retry-failed, those that
        failed), as requests, in input order."""
        return rows_to_send(self.rows(), self.journal.status, self.options.retry_failed)

    def _write_output(self) -> Path:
        """Write the output from the journal (every row has a result by now, else
        JobStopped)."""
        checked, journal, tally = self.checked, self.journal, self.tally
        job, scan, structured = checked.job, checked.scan, checked.structured
        missing = journal.missing_rows(scan.skip)
        if missing:
            raise JobStopped(
                f"{missing} rows have no result yet. Run the same command again to send them."
            )
        keep_batches = checked.table.keep_batches(scan.keep_schema) if job.keep_columns else None
        metadata = {
            "batchrun_version": __version__,
            "run_id": journal.run_id,
            "job": job.settings(),
            "identity": self.identity,
            "answered_by": self.answered_by,
            "rows": tally.total,
            "fingerprint": self.fingerprint,  # a rerun that finds the same answers from the file
        }
        if scan.skipped_lines:
            metadata["skipped_lines"] = len(scan.skipped_lines)
        via = self.via
        if via is not None and via.auto:
            metadata["schema_via"] = via.state()  # a --retry-failed or --reuse run starts from it
        if self.stream_options.refused is not None:
            metadata["stream_options"] = self.stream_options.state()
        output = journal.finish(
            scan.keep_schema,
            keep_batches,
            metadata,
            skip_rows=scan.skip,
            extra_fields=checked.extra_fields,
            value_columns=frozenset(f.name for f in structured.fields)
            if structured
            else frozenset(),
        )
        if self.options.output_format == "openai-batch":
            from batchrun.openai_batch import write_batch_output

            log.info("wrote %s", write_batch_output(output), extra={"event": "batch_output"})
        return output

    def finish(self) -> RunResult:
        """Write the output (every row has a result by now, else JobStopped) and
        say what the run did. A finished output answered from stays as it is."""
        tally, via = self.tally, self.via
        if self.done is not None:
            output = self.done.answer(self.options.output_format)
        else:
            output = self._write_output()
        result = RunResult(
            output=output,
            rows=tally.total,
            ok=tally.ok,
            failed=tally.failed,
            invalid=tally.invalid,
            resumed=tally.resumed - self.reused,
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            cached_tokens=tally.cached_tokens,
            reasoning_tokens=tally.reasoning_tokens,
            requests=tally.requests,
            retries=tally.retries,
            wall_s=time.monotonic() - self.started,
            run_id=self.run_id,
            skipped_lines=self.skipped_lines,
            reused=self.reused,
            reused_tokens=self.reused_tokens,
            cost=tally.cost,
            currency=tally.currency,
            causes=tuple(_failure_causes(output)) if tally.failed else (),
            schema_via=via.current if via is not None else None,
            schema_via_refused=tuple(via.refused) if via is not None else (),
            no_usage=tally.no_usage,
            stream_options_refused=self.stream_options.refused,
        )
        log.info(
            "job finished: %s",
            status_text(tally),
            extra={"event": "summary", **progress_fields(tally), "output": str(output)},
        )
        return result


def rows_to_send(rows: Iterator[Prepared], status: Any, retry_failed: bool) -> Iterator[Prepared]:
    """The rows without a result (and, with --retry-failed, those that failed);
    ``status`` holds each row's status code."""
    for p in rows:
        done = status[p.row]
        if done == STATUS_NONE or (retry_failed and done == STATUS_ERROR):
            yield p


def resume_checked(
    journal: Journal, rows: Iterator[Prepared], via: SchemaVia | None = None
) -> Iterator[Prepared]:
    """``rows`` as they pass, refusing to resume (ResumeConflict) when a finished
    row's request differs from what this job would send now (the input or the
    job changed). A row finished while ``schema_via = "auto"`` was still
    searching may have carried the schema one of the other ways it tried."""
    for p in rows:
        if (
            journal.status[p.row] != STATUS_NONE
            and not p.error
            and not journal.hash_matches(p.row, p.request_hash)
            and not (
                via is not None and any(journal.hash_matches(p.row, h) for h in via.other_hashes(p))
            )
        ):
            raise ResumeConflict(
                f"{journal.folder} holds an unfinished run whose request for row {p.row} (id {p.id!r}) differs from "
                "what this job sends now: the input or the job changed since it started. Run again with --restart "
                "to discard its results and start over, or put back the old input to keep going."
            )
        yield p


def _failure_causes(output: Path) -> list[tuple[str, int]]:
    """The top causes among the output's failed rows (this run's and earlier ones'),
    read a batch at a time."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from batchrun.failures import top_causes

    def errors() -> Iterator[str | None]:
        file, columns = pq.ParquetFile(output, pre_buffer=False), ["status", "error"]
        for batch in file.iter_batches(batch_size=65536, columns=columns, use_threads=False):
            yield from pc.filter(batch.column(1), pc.equal(batch.column(0), "error")).to_pylist()

    return top_causes(errors())

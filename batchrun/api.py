"""The public entry points. The CLI is a thin layer over ``run_job``, and so are
``run`` and ``arun`` for Python code and notebooks.

``run_job(job)`` checks everything that can be checked before a request is sent
(the key variable, the input, the columns, the output folder, an unfinished
earlier run), then sends every row that has no result yet, journals each result
as it arrives and writes the output Parquet when every row has one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batchrun._version import __version__
from batchrun.client import ApiClient
from batchrun.config import Job, check_header_value, clean_api_key, clean_secret
from batchrun.errors import Interrupted, JobError, JobStopped
from batchrun.inputs import InputTable, Scan
from batchrun.limits import CostBudget, Limits
from batchrun.outputs import FIXED_COLUMNS, STATUS_NONE, TTFT_FIELD, Journal
from batchrun.payload import check_template_specs, prompt_columns
from batchrun.prices import load_prices
from batchrun.progress import Progress, Tally, progress_fields, status_text
from batchrun.retry import RetryPolicy
from batchrun.scheduler import Prepared, Scheduler, prepare_rows, resume_checked
from batchrun.structured import Structured, load_structured

log = logging.getLogger("batchrun")

GRACE_S = 10.0
"""Seconds the requests in flight get to finish after Ctrl-C or SIGTERM."""

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
    requests: int
    retries: int
    wall_s: float
    run_id: str
    skipped_lines: int = 0
    reused: int = 0
    reused_tokens: int = 0
    cost: Decimal | None = None
    currency: str = ""

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

    def summary(self) -> str:
        lines = [
            f"rows        {self.rows:,}  (ok {self.ok:,}, failed {self.failed:,}"
            + (f", invalid {self.invalid:,}" if self.invalid else "")
            + (f", from an earlier run {self.resumed:,}" if self.resumed else "")
            + ")",
            f"tokens      prompt {self.prompt_tokens:,}  completion {self.completion_tokens:,}  total {self.prompt_tokens + self.completion_tokens:,}",
            f"requests    {self.requests:,}  (retries {self.retries:,})",
            *(
                [f"cost        {self.cost:.4f} {self.currency} (this job, all runs)"]
                if self.cost is not None
                else []
            ),
            f"wall time   {self.wall_s:.1f}s",
            f"output      {self.output}",
        ]
        if self.reused:
            lines.insert(
                1,
                f"reused      {self.reused:,} rows from earlier outputs (--reuse), saving {self.reused_tokens:,} tokens",
            )
        if self.skipped_lines:
            lines.insert(
                1, f"skipped     {self.skipped_lines:,} bad input lines (--skip-bad-lines)"
            )
        return "\n".join(lines)


def api_key_for(job: Job) -> str | None:
    """The key from the job's environment variable; JobError when it is unset."""
    if not job.api_key_env:
        return None
    key = os.environ.get(job.api_key_env)
    if not key:
        raise JobError(
            f"No API key: the environment variable {job.api_key_env} is not set. "
            f"Export it (export {job.api_key_env}=...), set `api_key_env` to the variable that holds "
            'your key, or set api_key_env = "" for a server that needs none.'
        )
    return clean_api_key(job.api_key_env, key)


def expand_headers(job: Job) -> tuple[dict[str, str], list[str]]:
    """The job's extra headers with ${VAR} replaced from the environment, and the
    values that came from it (secrets: the client redacts them from every message)."""
    headers: dict[str, str] = {}
    secrets: list[str] = []

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        value = os.environ.get(name)
        if value is None:
            raise JobError(
                f"Header `{header}` uses ${{{name}}}, but the environment variable {name} is not set. Export it, or change `headers`."
            )
        value = clean_secret(value, f"The value of ${name} (header `{header}`)")
        if value:
            secrets.append(value)
        return value

    for header, template in job.headers.items():
        value = _ENV_REF.sub(value_of, str(template))
        headers[header] = check_header_value(header, value, "`headers` (${VAR} filled in)")
    return headers, secrets


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def check_columns(job: Job, table: InputTable, scan: Scan) -> None:
    """Every column the job names must be in the input (JobError otherwise)."""
    from batchrun.errors import InputError

    present = ", ".join(scan.columns)
    for column in prompt_columns(job):
        if column not in scan.columns:
            key = "messages_column" if job.messages_column else "prompt_template"
            raise InputError(
                f"`{key}` uses column `{column}`, which input {table.path} lacks. Columns present: {present}. "
                f"Fix the {key} or the input."
            )
    clash = [c for c in job.keep_columns if c in FIXED_COLUMNS]
    if clash:
        raise JobError(
            f"`keep_columns` names {', '.join(clash)}, which the output already has as its own column. "
            "Rename that input column or leave it out of keep_columns."
        )


@contextlib.asynccontextmanager
async def _endpoint(job: Job, mock: bool) -> AsyncIterator[Job]:
    """The job as sent: against the embedded endpoint when ``mock`` is set."""
    if not mock:
        yield job
        return
    from batchrun.mock import MockConfig, serve

    async with serve(MockConfig()) as server:
        yield replace(job, base_url=server.base_url, api_key_env="", allow_insecure_http=False)


@dataclass(frozen=True)
class CheckedJob:
    """A job with everything checked that can be checked before a request is sent."""

    job: Job
    table: InputTable
    scan: Scan
    id_column: str | None
    structured: Structured | None
    api_key: str | None
    headers: dict[str, str]
    secrets: list[str]

    @property
    def extra_fields(self) -> list[pa.Field]:
        """Output columns after the fixed ones: ttft_ms when streamed, the schema's."""
        ttft = [TTFT_FIELD] if self.job.stream else []
        return ttft + list(self.structured.fields if self.structured else ())

    def rows(self, for_job: Job | None = None, estimates: bool | None = None) -> Iterator[Prepared]:
        """The rows of this run (skipped ones left out) as requests, in input order."""
        response_format = self.structured.body_field() if self.structured is not None else None
        return prepare_rows(
            for_job or self.job,
            self.table.batches(prompt_columns(self.job), self.id_column),
            self.scan.skip,
            response_format,
            estimates,
        )


def check_job(job: Job, options: RunOptions) -> CheckedJob:
    """Every check ``run`` makes before its first request: the output, the key
    variable, the headers, the whole input, its columns, the shard and the schema.
    Raises a BatchrunError saying what to fix."""
    if job.output is None:
        raise JobError(
            'No `output` given: set output = "....parquet" in the job file or pass --output.'
        )
    api_key = None if options.mock else api_key_for(job)
    headers, secrets = expand_headers(job)
    batch_requests = job.input_format == "openai-batch"
    if batch_requests:
        job = replace(job, id_column="custom_id")
    if "id" in job.keep_columns and job.id_column == "id":
        # The id column is in the output already, as `id`.
        job = replace(job, keep_columns=tuple(c for c in job.keep_columns if c != "id"))
    table = InputTable(
        job.input, skip_bad_lines=options.skip_bad_lines, batch_requests=batch_requests
    )
    scan = table.scan(job.id_column, job.id_column != "id", job.keep_columns, dedupe=options.dedupe)
    check_columns(job, table, scan)
    check_template_specs(job, next(table.batches(prompt_columns(job), None, 256)).rows)
    id_column = job.id_column if scan.has_id_column else None
    if options.shard is not None:
        table.keep_shard(scan, id_column, *options.shard)
    structured = load_structured(job, set(FIXED_COLUMNS) | set(job.keep_columns))
    return CheckedJob(job, table, scan, id_column, structured, api_key, headers, secrets)


class OpenRun:
    """A run between its checks and its output: the journal is open, an earlier
    run's results are taken back, ``--reuse`` is applied and the tally is set.
    Both engines (local and Ray) open a run with ``open_run``, send the rows it
    says, and end with ``finish``; use it as a context manager so the journal is
    closed whatever happens."""

    def __init__(self, job: Job, options: RunOptions, engine: str = "local") -> None:
        self.started = time.monotonic()
        self.options = options
        self.checked = check_job(job, options)
        self.job = job = self.checked.job
        scan = self.checked.scan
        self.identity = {k: job.settings()[k] for k in IDENTITY_KEYS} | {"rows": scan.num_rows}
        if options.shard is not None:
            self.identity["shard"] = "{}/{}".format(*options.shard)
        assert job.output is not None  # check_job makes sure
        self.journal = journal = Journal(
            job.output,
            scan.num_rows,
            self.identity,
            restart=options.restart,
            keep_columns=job.keep_columns,
        )
        try:
            # One pass over the input serves both the resume check and --reuse.
            rows = self.checked.rows()
            if journal.resumed is not None:
                rows = resume_checked(journal, rows)
            self.reused = self.reused_tokens = 0
            if options.reuse:
                self.reused, self.reused_tokens = _reuse(journal, options.reuse, rows, job.model)
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
            self.tally = tally = Tally(total=scan.rows_kept)
            tally.ok, tally.failed, tally.invalid = journal.counts()
            tally.resumed = tally.done
            self.spend = spend_so_far(job, journal)
            if self.spend is not None:
                tally.cost, tally.currency = self.spend.spent, spend_currency(job)
            self.to_send = journal.missing_rows(scan.skip) + (
                tally.failed if options.retry_failed else 0
            )
        except BaseException:
            self.close()
            raise
        log.info(
            "job started%s: %d rows, %d to send, model %s, %s",
            "" if engine == "local" else f" on {engine.title()}",
            tally.total,
            self.to_send,
            job.model or "named by each request",
            job.url if not options.mock else "embedded endpoint",
            extra={
                "event": "start",
                "run_id": journal.run_id,
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
        if self.journal.folder.exists():
            self.journal.close()

    def finish(self) -> RunResult:
        """Write the output (every row has a result by now, else JobStopped) and
        say what the run did."""
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
            "rows": tally.total,
        }
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
        result = RunResult(
            output=output,
            rows=tally.total,
            ok=tally.ok,
            failed=tally.failed,
            invalid=tally.invalid,
            resumed=tally.resumed - self.reused,
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            requests=tally.requests,
            retries=tally.retries,
            wall_s=time.monotonic() - self.started,
            run_id=journal.run_id,
            skipped_lines=len(scan.skipped_lines),
            reused=self.reused,
            reused_tokens=self.reused_tokens,
            cost=tally.cost,
            currency=tally.currency,
        )
        log.info(
            "job finished: %s",
            status_text(tally),
            extra={"event": "summary", **progress_fields(tally), "output": str(output)},
        )
        return result


async def run_job(job: Job, options: RunOptions | None = None, *, sleep: Any = None) -> RunResult:
    """Run a checked ``job`` to the end (or to a stop, raised as JobStopped) and
    return what it did. ``sleep`` replaces asyncio.sleep for retry and limit
    waits (tests)."""
    options = options or RunOptions()
    with OpenRun(job, options) as run:
        # Everything made so far (modules, the job, the journal's index) lives to
        # the end: keep the collector from scanning it again on every pass.
        gc.freeze()
        checked, tally = run.checked, run.tally
        async with (
            _endpoint(run.job, options.mock) as sent_job,
            ApiClient(sent_job, checked.api_key, checked.headers, checked.secrets) as client,
        ):
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
                run.journal,
                tally,
                RetryPolicy.for_job(sent_job, sleep),
                limits,
                retry_failed=options.retry_failed,
                structured=checked.structured,
                spend=run.spend,
                currency=tally.currency,
                grace_s=GRACE_S,
            )
            progress = Progress(tally, enabled=options.progress, mode=options.progress_mode)
            with _signals(scheduler, options.handle_signals, run.job):
                ticker = asyncio.create_task(_tick(progress, run.journal))
                try:
                    await scheduler.run(checked.rows(sent_job), run.to_send)
                finally:
                    ticker.cancel()
                    progress.close()
            scheduler.flush_held()
        return run.finish()


def spend_currency(job: Job) -> str:
    return load_prices(job.prices).currency if job.prices else ""


def spend_so_far(job: Job, journal: Journal) -> CostBudget | None:
    """The job's spend so far (earlier runs' answers included) and its budget,
    when the job names a prices file."""
    if job.prices is None:
        return None
    prices = load_prices(job.prices)
    price = prices.price(job.model)
    if price is None:
        if job.max_cost is not None:
            raise JobError(
                f"`max_cost` is set but prices file {job.prices} has no price for model {job.model}: "
                f'add a [models."{job.model}"] table so batchrun can keep to the budget.'
            )
        log.warning(
            "model %s is not in prices file %s: its spend is not shown", job.model, job.prices
        )
        return None
    spent = Decimal(0)
    for row in np.nonzero(journal.status != STATUS_NONE)[0]:
        rec = journal.record(int(row))
        if rec and rec.get("attempts"):
            spent += price.cost(rec.get("prompt_tokens") or 0, rec.get("completion_tokens") or 0)
    max_cost = Decimal(str(job.max_cost)) if job.max_cost is not None else None
    return CostBudget(max_cost, price, job.max_tokens, spent)


def _reuse(
    journal: Journal, paths: tuple[Path, ...], rows: Iterator[Prepared], model: str
) -> tuple[int, int]:
    """Journal the rows whose exact request an earlier output answered ok.
    Returns how many rows were reused and the tokens they would have cost."""
    from batchrun.reuse import Match, ReuseIndex

    index = ReuseIndex(list(paths))
    matches = []
    for p in rows:
        if journal.status[p.row] != STATUS_NONE or p.error:
            continue
        position = index.find(p.request_hash)
        if position is not None:
            matches.append(Match(p.row, p.id, position))
    tokens = 0
    for rec in index.records(matches, model):
        journal.append(rec)
        tokens += rec.get("total_tokens") or 0
    log.info(
        "reused %d rows from %d earlier outputs (%d tokens)",
        len(matches),
        len(index.files),
        tokens,
        extra={"event": "reuse", "rows_reused": len(matches), "tokens_saved": tokens},
    )
    return len(matches), tokens


async def _tick(progress: Progress, journal: Journal) -> None:
    """Redraw progress and fsync the journal about once a second."""
    last_sync = time.monotonic()
    while True:
        await asyncio.sleep(progress.interval_s if progress.enabled else 1.0)
        progress.tick()
        if time.monotonic() - last_sync >= 1.0:
            await asyncio.get_running_loop().run_in_executor(None, journal.sync)
            last_sync = time.monotonic()


@contextlib.contextmanager
def _signals(scheduler: Scheduler, enabled: bool, job: Job) -> Any:
    """Ctrl-C / SIGTERM: stop sending, let requests in flight finish (GRACE_S), keep
    every result on disk. A second Ctrl-C stops at once."""
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    hits = {"n": 0}

    def on_signal(signum: int) -> None:
        hits["n"] += 1
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        error = Interrupted(
            f"Stopped by {name}. Every finished row is saved in {job.output}.partial; "
            "run the same command again to resume.",
            exit_code=128 + signum,
        )
        if hits["n"] == 1:
            log.warning(
                "%s: finishing the requests in flight (up to %.0fs); press Ctrl-C again to stop at once",
                name,
                GRACE_S,
            )
            scheduler.stop(error, GRACE_S)
        else:
            scheduler.stop_now(error)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


# ---- the Python API ----------------------------------------------------------

InputLike = Any
"""A path (str or Path), a pandas DataFrame, a pyarrow Table, or an iterable of dicts."""


async def arun(
    job: str | Path | None = None,
    *,
    input: InputLike = None,
    output: str | Path | None = None,
    restart: bool = False,
    retry_failed: bool = False,
    reuse: tuple[str | Path, ...] | list[str | Path] = (),
    skip_bad_lines: bool = False,
    dedupe: bool = False,
    mock: bool = False,
    progress: bool = True,
    **keys: Any,
) -> Any:
    """Run a job from Python and return its output as a pandas DataFrame.

    ``job`` is an optional TOML job file; ``keys`` are job keys with the same
    names, checks and defaults as in the file and as CLI flags (they override
    the file). ``input`` may be a path, a DataFrame, a pyarrow Table or an
    iterable of dicts. With ``output``, the Parquet file is written there and a
    rerun resumes exactly as the CLI does; without it, the output lives in a
    temporary folder only for the call. ``DataFrame.attrs["batchrun"]`` holds
    the run's summary (rows ok/failed, tokens, requests, run id).

    Bad jobs raise ``batchrun.BatchrunError`` subclasses carrying the message the
    CLI prints; a failed row is a row (``status`` error or invalid), never an
    exception.
    """
    import tempfile

    import pandas as pd

    from batchrun.config import load_job

    with tempfile.TemporaryDirectory(prefix="batchrun-") as tmp:
        overrides: dict[str, Any] = dict(keys)
        if input is not None:
            overrides["input"] = _input_path(input, Path(tmp))
        if output is not None:
            overrides["output"] = output
        elif job is None or "output" not in _file_keys(job):
            overrides["output"] = Path(tmp) / "output.parquet"
        checked = load_job(job, overrides, overrides_source="keyword argument")
        options = RunOptions(
            restart=restart,
            retry_failed=retry_failed,
            reuse=tuple(Path(p) for p in reuse),
            skip_bad_lines=skip_bad_lines,
            dedupe=dedupe,
            mock=mock,
            progress=progress,
            progress_mode="notebook" if _in_notebook() else None,
        )
        result = await run_job(checked, options)
        frame = pd.read_parquet(result.output)
    frame.attrs["batchrun"] = result.as_dict()
    if output is None and (job is None or "output" not in _file_keys(job)):
        frame.attrs["batchrun"]["output"] = None  # it lived in a temporary folder, now gone
    return frame


def run(job: str | Path | None = None, **kwargs: Any) -> Any:
    """``arun`` for code without an event loop, and for notebooks, whose loop is
    already running (the job then runs on its own loop in a worker thread)."""
    import concurrent.futures

    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:
        return asyncio.run(arun(job, **kwargs))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchrun") as pool:
        return pool.submit(asyncio.run, arun(job, **kwargs)).result()


def _file_keys(job: str | Path) -> set[str]:
    from batchrun.config import read_job_file

    return set(read_job_file(Path(job)))


def _input_path(value: InputLike, tmp: Path) -> Path | str:
    """A path as it is; anything else written once to a Parquet file in ``tmp``."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(value, pa.Table):
        table = value
    elif type(value).__module__.startswith("pandas"):
        table = pa.Table.from_pandas(value, preserve_index=False)
    else:
        try:
            rows = list(value)
        except TypeError:
            rows = None
        if rows is None or not all(isinstance(r, Mapping) for r in rows):
            raise JobError(
                "`input` must be a path, a pandas DataFrame, a pyarrow Table or an iterable of dicts "
                "(one dict per row)."
            )
        try:
            table = pa.Table.from_pylist(rows)
        except (TypeError, pa.ArrowInvalid) as exc:
            raise JobError(
                f"`input` must be a path, a pandas DataFrame, a pyarrow Table or an iterable of dicts ({exc})."
            ) from None
    path = tmp / "input.parquet"
    pq.write_table(table, path)
    return path


def _in_notebook() -> bool:
    import sys

    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"

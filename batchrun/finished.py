"""A rerun of a finished job, answered from its output as it lies.

Running a job again whose output is finished sends nothing. When the output's
own metadata shows that nothing is left to send and nothing would change in
it, the run reads only the output's footer and a few of its columns (a batch at
a time) and answers in seconds however many rows there are: the input is not
read, no request is prepared, nothing is copied back into a journal and the
finished file is not written again. That takes all of these:

- the output was written by a run (or a merge that found every row) that
  recorded a ``fingerprint`` of what it read, before it read it: each input
  file's resolved path, size and modification time (nanoseconds), the SHA-256
  of the response schema file and of the prices file (the ``cost`` column is
  priced when the output is written), and ``--dedupe`` and
  ``--skip-bad-lines``, which choose the rows; this run finds the same;
- the job's identity (model, prompts, parameters, shard, input row count, the
  endpoint that answers) is the one recorded, and so is every other job key
  that shapes the output (``keep_columns``, ``input_format``, ``schema_via``,
  the file paths, ...): only the keys that say how rows are sent
  (``SENDING_KEYS``: concurrency, limits, retries, timeouts, mode, ...) may
  differ, and the output's metadata keeps those of the run that wrote it;
- the output holds the rows that run kept, and this run asks nothing of them:
  no ``--restart``, no ``--reuse``, no ``--retry-failed`` while a row failed,
  no unfinished run (``OUTPUT.partial``) beside the output.

Anything else goes the whole way (``lifecycle.OpenRun``): the input read and
checked, each finished row's request compared with what the job sends now (a
changed job is refused), the cost column priced again, the output taken back
into a journal and written again (with a new fingerprint). An input touched
since, even unchanged, an output of an older batchrun, or a merged file that
may lack rows, take that way; an input changed in place to another of the same
size and modification time would not (what ``make`` and ``rsync`` trust too).

The answer is the one the whole way gives on a finished output: the same rows,
counts, failure causes, spend, skipped lines, and the ``schema_via`` and
``stream_options`` choices an earlier run kept in the metadata. The run makes
the checks every run makes first (the key variable, the headers, the schema and
prices files), holds the output's lock all the same (another run on it: exit
3) and removes what a killed run left beside it. ``batchrun plan`` reads the
same way, without the lock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.checks import api_key_for, expand_headers, settled_job
from batchrun.config import Job
from batchrun.errors import BatchrunError
from batchrun.journal import partial_dir
from batchrun.journal_io import remove_leftovers
from batchrun.lock import OutputLock
from batchrun.outputs import FIXED_COLUMNS
from batchrun.prices import ONLINE, Prices

if TYPE_CHECKING:
    from batchrun.lifecycle import RunOptions
    from batchrun.schema_via import SchemaVia
    from batchrun.stream_options import StreamOptions

log = logging.getLogger("batchrun")

SENDING_KEYS = frozenset(
    {
        "output",
        "job_file",
        "api_key_env",
        "headers",
        "concurrency",
        "max_concurrency",
        "rpm",
        "tpm",
        "max_attempts",
        "request_timeout_s",
        "max_response_bytes",
        "retry_deadline_s",
        "max_parse_attempts",
        "api_down_after_s",
        "max_failures",
        "max_cost",
        "allow_insecure_http",
        "mode",
        "deadline",
        "batch_poll_s",
    }
)
"""Job keys that say how rows are sent (or where the output goes), never what a
finished row holds: a rerun that changes only these still answers from the
output. Every other key must be the one recorded; a key added later is compared
until it is named here."""

BATCH_ROWS = 65_536
"""Rows read from the output at a time."""
_DAY_US = 86_400_000_000


def fingerprint(job: Job, options: RunOptions) -> dict[str, Any] | None:
    """What a run of ``job`` is about to read, as a later run can compare it
    without reading it (see the module docstring); None when a file cannot be
    found (the checks then say why)."""
    from batchrun.inputs import InputTable

    if job.input is None:
        return None
    try:
        files = []
        for part in InputTable(Path(job.input)).parts:
            stat = part.stat()
            files.append([str(part.resolve()), stat.st_size, stat.st_mtime_ns])
        schema, prices = _digest(job.response_schema), _digest(job.prices)
    except (BatchrunError, OSError):
        return None
    return {
        "files": files,
        "response_schema": schema,
        "prices": prices,
        "dedupe": options.dedupe,
        "skip_bad_lines": options.skip_bad_lines,
    }


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` as its JSON in the output's metadata reads back (tuples as lists)."""
    plain: dict[str, Any] = orjson.loads(orjson.dumps(value))
    return plain


def _digest(path: Path | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path is not None else None


@dataclass(frozen=True)
class FinishedOutput:
    """What a finished output says of itself, when it can answer a rerun alone."""

    job: Job
    """The job as a run sends it (``checks.settled_job``)."""
    output: Path
    meta: dict[str, Any]
    rows: int
    counts: tuple[int, int, int]
    """Rows ok, failed and invalid."""

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id") or "")

    @property
    def skipped_lines(self) -> int:
        return int(self.meta.get("skipped_lines") or 0)


def read_finished(
    job: Job, options: RunOptions, printed: dict[str, Any] | None
) -> FinishedOutput | None:
    """The finished output of ``job`` when it answers a rerun alone (see the module
    docstring), else None; nothing is locked or written. ``printed``: this run's
    ``fingerprint``. Makes the checks every run makes first (the key variable,
    the headers) and raises what they raise."""
    if not _may_answer(job, options, printed):
        return None
    assert job.output is not None
    output, job = job.output, settled_job(job)
    if not options.mock:
        api_key_for(job)
    expand_headers(job)
    try:
        meta = orjson.loads((pq.read_schema(output).metadata or {})[b"batchrun"])
        rows = pq.read_metadata(output).num_rows
    except (pa.ArrowInvalid, OSError, KeyError, orjson.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("fingerprint") != printed:
        return None
    from batchrun.lifecycle import run_identity

    recorded, before = meta.get("identity"), meta.get("job")
    if not isinstance(recorded, dict) or not isinstance(before, dict):
        return None
    settings = _plain(job.settings())
    if (
        meta.get("rows") != rows
        or not isinstance(recorded.get("rows"), int)
        or recorded != _plain(run_identity(job, options, recorded["rows"]))
        or any(before.get(k) != v for k, v in settings.items() if k not in SENDING_KEYS)
    ):
        return None
    try:
        counts = _status_counts(output)
    except (pa.ArrowInvalid, OSError):
        return None  # a damaged file: the whole way says what is wrong with it
    if options.retry_failed and counts[1]:
        return None
    return FinishedOutput(job, output, meta, rows, counts)


def _may_answer(job: Job, options: RunOptions, printed: dict[str, Any] | None) -> bool:
    """Whether the output may answer alone, as far as a look at the folder tells."""
    output = job.output
    if printed is None or output is None or options.restart or options.reuse:
        return False
    return output.is_file() and not partial_dir(output).exists()


class Finished:
    """A finished output this run answers from, and the lock on it."""

    def __init__(self, found: FinishedOutput, lock: OutputLock) -> None:
        from batchrun.schema_via import SchemaVia
        from batchrun.stream_options import StreamOptions
        from batchrun.structured import load_structured

        self.found, self.lock = found, lock
        job, output = found.job, found.output
        # The choices an earlier run kept, read as the whole way reads them.
        structured = load_structured(job, set(FIXED_COLUMNS) | set(job.keep_columns))
        self.via: SchemaVia | None = (
            SchemaVia.open(structured, job, partial_dir(output), (output,)) if structured else None
        )
        self.stream_options: StreamOptions = StreamOptions.open(job, partial_dir(output), (output,))

    @classmethod
    def open(cls, job: Job, options: RunOptions, printed: dict[str, Any] | None) -> Finished | None:
        """The finished output of ``job`` when it answers this run alone, its lock
        held and a killed run's leftovers removed; else None (nothing locked)."""
        if not _may_answer(job, options, printed):
            return None
        assert job.output is not None
        try:
            lock = OutputLock(job.output)
        except OSError:
            return None  # the whole way words the error
        try:
            found = read_finished(job, options, printed)
            if found is not None:
                remove_leftovers(found.output)
                finished = cls(found, lock)
                log.info(
                    "%s holds every row of this job (%d ok, %d failed, %d invalid): nothing to send",
                    found.output,
                    *found.counts,
                    extra={"event": "resume", "run_id": found.run_id, "finished": True},
                )
                return finished
        except BaseException:
            lock.release()
            raise
        lock.release()
        return None

    def spent(self, prices: Prices) -> Decimal:
        """The cost of the output's rows, as ``Prices.row_cost`` prices each one (the
        rows that sent no request cost nothing), summed by model, UTC day and tier:
        the costs are linear in the token counts, so the sums cost what the rows do."""
        import pyarrow.compute as pc

        wanted = ["attempts", "model", "finished_at", "tier", *_TOKENS]
        file = pq.ParquetFile(self.found.output, pre_buffer=False)
        present = [c for c in wanted if c in file.schema_arrow.names]
        sums: dict[tuple[Any, Any, Any], list[int]] = {}
        for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=present, use_threads=False):
            n = batch.num_rows

            def column(name: str, batch: pa.RecordBatch = batch, n: int = n) -> pa.Array:
                at = batch.schema.get_field_index(name)
                return batch.column(at) if at >= 0 else pa.nulls(n, pa.int64())

            prompt, completion = (pc.fill_null(column(c), 0) for c in _TOKENS[:2])
            cached = pc.min_element_wise(pc.fill_null(column("cached_tokens"), 0), prompt)
            reasoning = pc.min_element_wise(pc.fill_null(column("reasoning_tokens"), 0), completion)
            finished = column("finished_at")
            if pa.types.is_timestamp(finished.type):
                finished = finished.cast(pa.timestamp("us", finished.type.tz)).view(pa.int64())
            table = pa.table(
                {
                    "model": column("model"),
                    "day": pc.floor(pc.divide(finished.cast(pa.float64()), _DAY_US)),
                    "tier": column("tier"),
                    "prompt": prompt,
                    "completion": completion,
                    "cached": cached,
                    "reasoning": reasoning,
                }
            ).filter(pc.fill_null(pc.not_equal(column("attempts"), 0), True))
            grouped = table.group_by(["model", "day", "tier"], use_threads=False).aggregate(
                [(c, "sum") for c in ("prompt", "completion", "cached", "reasoning")]
            )
            for row in grouped.to_pylist():
                key = (row["model"], row["day"], row["tier"] or ONLINE)
                add = [int(row[f"{c}_sum"] or 0) for c in ("prompt", "completion", "cached")]
                add.append(int(row["reasoning_sum"] or 0))
                total = sums.setdefault(key, [0, 0, 0, 0])
                for i, value in enumerate(add):
                    total[i] += value
        spent = Decimal(0)
        for (model, day, tier), (prompt_n, completion_n, cached_n, reasoning_n) in sums.items():
            on = None if day is None else dt.date(1970, 1, 1) + dt.timedelta(days=int(day))
            cost = prices.cost(
                model, prompt_n, completion_n, cached_n, reasoning_n, on=on, tier=tier
            )
            spent += cost or 0
        return spent

    def answer(self, output_format: str) -> Path:
        """The output, as it is (and its OpenAI batch lines, when asked for)."""
        if output_format == "openai-batch":
            from batchrun.openai_batch import write_batch_output

            log.info(
                "wrote %s",
                write_batch_output(self.found.output),
                extra={"event": "batch_output"},
            )
        return self.found.output

    def close(self) -> None:
        self.lock.release()


_TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")


def _status_counts(output: Path) -> tuple[int, int, int]:
    """Rows ok, failed and invalid in ``output``, its status column read a batch at a
    time (a status that is none of these counts as failed, as in the journal)."""
    import pyarrow.compute as pc  # here: a run that sends rows does without it

    counts = {"ok": 0, "error": 0, "invalid": 0}
    for batch in pq.ParquetFile(output, pre_buffer=False).iter_batches(
        batch_size=BATCH_ROWS, columns=["status"], use_threads=False
    ):
        found = pc.value_counts(batch.column(0))
        for value, count in zip(
            found.field("values").to_pylist(), found.field("counts").to_pylist(), strict=True
        ):
            counts[value if value in counts else "error"] += count
    return counts["ok"], counts["error"], counts["invalid"]

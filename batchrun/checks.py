"""Everything checked before a request is sent: the output, the key variable,
the headers, the whole input and its columns, the shard, the template and the
schema. ``check_job`` raises a BatchrunError saying what to fix; ``run`` and
``plan`` both call it, so they refuse the same jobs."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pyarrow as pa

from batchrun.config import Job
from batchrun.errors import InputError, JobError
from batchrun.inputs import InputTable, Scan
from batchrun.outputs import (
    COST_FIELD,
    FIXED_COLUMNS,
    PII_FIELDS,
    TTFT_FIELD,
)
from batchrun.payload import Prepared, Shape, check_template_specs, prepare_rows, prompt_columns
from batchrun.pii import enabled as pii_enabled
from batchrun.schema_via import SchemaVia
from batchrun.structured import Structured, load_structured
from batchrun.wire import check_header_value, clean_api_key, clean_secret

if TYPE_CHECKING:
    from batchrun.lifecycle import RunOptions


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
        """Output columns after the fixed ones: cost with a prices file, ttft_ms
        when streamed, pii_found and pii_unrestored with pii, the schema's."""
        cost = [COST_FIELD] if self.job.prices else []
        ttft = [TTFT_FIELD] if self.job.stream else []
        pii = PII_FIELDS if pii_enabled(self.job) else []
        return cost + ttft + pii + list(self.structured.fields if self.structured else ())

    def rows(self, estimates: bool | None = None, shape: Shape | None = None) -> Iterator[Prepared]:
        """The rows of this run (skipped ones left out) as requests, in input order;
        a structured job's schema put in as ``shape`` says (by default the job's
        ``schema_via``, ``auto`` starting with ``json_schema``)."""
        if shape is None and self.structured is not None:
            shape = SchemaVia(self.structured, self.job.schema_via).shape
        return prepare_rows(
            self.job,
            self.table.batches(prompt_columns(self.job), self.id_column),
            self.scan.skip,
            shape,
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
    job = settled_job(job)
    batch_requests = job.input_format == "openai-batch"
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


def settled_job(job: Job) -> Job:
    """``job`` as a run sends it and records it: an OpenAI batch file's ids are its
    ``custom_id``; the id column is not kept twice (it is in the output already,
    as ``id``)."""
    if job.input_format == "openai-batch":
        job = replace(job, id_column="custom_id")
    if "id" in job.keep_columns and job.id_column == "id":
        job = replace(job, keep_columns=tuple(c for c in job.keep_columns if c != "id"))
    return job

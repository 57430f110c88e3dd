"""What a job's output is: the columns of a result (``Record``, the Parquet
schema), the Parquet batches built from journal records, and the output files
that ``report``, ``merge`` and ``--reuse`` read. The journal that holds the
records while a job runs is ``journal.py``."""

from __future__ import annotations

import glob
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import orjson
import pyarrow as pa
import pyarrow.json as pa_json

from batchrun.errors import (
    InputError,
)

log = logging.getLogger("batchrun")

STATUS_NONE, STATUS_OK, STATUS_ERROR, STATUS_INVALID = 0, 1, 2, 3
EMBEDDED_ENDPOINT = "the embedded endpoint (--mock)"
"""What ``answered_by`` in an output's metadata says for a ``--mock`` run
(else it holds the base URL that answered)."""
STATUS_CODES = {"ok": STATUS_OK, "error": STATUS_ERROR, "invalid": STATUS_INVALID}

TIMESTAMP = pa.timestamp("us", tz="UTC")
HEAD_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),
]
RESULT_FIELDS = [
    pa.field("model", pa.string()),
    pa.field("response_model", pa.string()),
    pa.field("completion", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("refusal", pa.string()),
    pa.field("tool_calls", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("reasoning_tokens", pa.int64()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("http_status", pa.int32()),
    pa.field("attempts", pa.int32()),
    pa.field("latency_ms", pa.float64()),
    pa.field("queued_ms", pa.float64()),
    pa.field("response_id", pa.string()),
    pa.field("request_hash", pa.string()),
    pa.field("started_at", TIMESTAMP),
    pa.field("finished_at", TIMESTAMP),
    pa.field("tier", pa.string()),
]
TTFT_FIELD = pa.field("ttft_ms", pa.float64())
PII_FIELDS = [pa.field("pii_found", pa.int32()), pa.field("pii_unrestored", pa.int32())]
"""Jobs with ``pii``: values replaced in the row's request, and placeholders in
its answer that stand for none of them."""
COST_FIELD = pa.field("cost", pa.float64())
"""The row's cost in the prices' currency (jobs with a prices file only)."""
FIXED_COLUMNS = frozenset(
    f.name for f in [*HEAD_FIELDS, *RESULT_FIELDS, TTFT_FIELD, COST_FIELD, *PII_FIELDS]
)


class Record(TypedDict):
    """One journal line: the result of one row, as the output's columns hold it
    (timestamps as epoch microseconds). Written by the scheduler (an answer or an
    error), by ``--reuse`` and when a finished output is taken back."""

    row: int
    id: str
    status: str
    """ok, error or invalid."""
    model: NotRequired[str | None]
    response_model: NotRequired[str | None]
    completion: NotRequired[str | None]
    finish_reason: NotRequired[str | None]
    refusal: NotRequired[str | None]
    tool_calls: NotRequired[str | None]
    """The answer's tool calls, as JSON text."""
    prompt_tokens: NotRequired[int | None]
    completion_tokens: NotRequired[int | None]
    total_tokens: NotRequired[int | None]
    cached_tokens: NotRequired[int | None]
    """Prompt tokens read from the server's cache (part of prompt_tokens)."""
    reasoning_tokens: NotRequired[int | None]
    """Completion tokens of hidden reasoning (part of completion_tokens)."""
    error: NotRequired[str | None]
    http_status: NotRequired[int | None]
    attempts: NotRequired[int]
    latency_ms: NotRequired[float]
    """Milliseconds the row's requests spent at the API, summed over attempts."""
    queued_ms: NotRequired[float]
    """Milliseconds the row waited for the job's own limits and budget."""
    response_id: NotRequired[str | None]
    request_hash: NotRequired[str | None]
    started_at: NotRequired[int]
    finished_at: NotRequired[int]
    tier: NotRequired[str | None]
    """How the row was answered: ``online`` (one request at a time) or ``batch``
    (a provider's Batch API, at its discount)."""
    cost: NotRequired[float | None]
    """``prices.Prices.row_cost`` of the record, set as it is journaled."""
    ttft_ms: NotRequired[float | None]
    pii_found: NotRequired[int]
    """Distinct values pseudonymized in the row's request (jobs with ``pii``)."""
    pii_unrestored: NotRequired[int]
    """Placeholders in the answer that stand for none of them."""
    values: NotRequired[dict[str, Any]]
    """The typed columns of a structured answer."""


def output_schema(
    keep_schema: pa.Schema,
    metadata: Mapping[str, Any] | None = None,
    extra_fields: Sequence[pa.Field] = (),
) -> pa.Schema:
    """id, row, the keep_columns, the result columns, then the job's extra columns
    (``ttft_ms`` for streamed jobs). ``metadata`` goes in the file's key-value
    metadata under ``batchrun``."""
    fields = [*HEAD_FIELDS, *keep_schema, *RESULT_FIELDS, *extra_fields]
    meta = {b"batchrun": orjson.dumps(dict(metadata))} if metadata else None
    return pa.schema(fields, metadata=meta)


def output_files(specs: Iterable[Path | str], leave_out: Path | None = None) -> list[Path]:
    """The Parquet files named by ``specs``: files, folders (every ``*.parquet`` below,
    hidden ones skipped, sorted) and globs (``**`` recurses), in the order given; a
    file named twice is read once. ``leave_out`` is dropped when a folder or glob
    finds it (the merged file inside the folder being merged), kept when named.
    InputError when a spec matches nothing."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            found.append(path)
            continue
        if path.is_dir():
            matches = _parquet_below(path)
        elif glob.has_magic(str(spec)):
            matches = []
            for match in sorted(Path(m) for m in glob.glob(str(spec), recursive=True)):
                matches.extend(_parquet_below(match) if match.is_dir() else [match])
        else:
            raise InputError(
                f"Output {path} does not exist. Give the files `batchrun run` wrote, folders of them, or globs."
            )
        if leave_out is not None:
            matches = [m for m in matches if m.resolve() != leave_out.resolve()]
        if not matches and not path.is_dir():
            raise InputError(
                f"No file matches {spec}. Check the pattern (and quote it, so the shell leaves it alone)."
            )
        if not matches:
            raise InputError(
                f"{spec} holds no .parquet file. Give the files `batchrun run` wrote, folders of them, or globs."
            )
        found.extend(matches)
    seen: set[Path] = set()
    unique: list[Path] = []
    for file in found:
        if file.resolve() not in seen:
            seen.add(file.resolve())
            unique.append(file)
    return unique


def _parquet_below(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*.parquet")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def journal_value(value: Any) -> Any:
    """A value read back from Parquet as the journal keeps it (timestamps as epoch µs)."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000)
    return value


def _json_type(t: pa.DataType) -> pa.DataType:
    """How the JSON reader reads a column: timestamps as the journal's int64
    microseconds, dictionaries as their values."""
    if pa.types.is_timestamp(t):
        return pa.int64()
    if pa.types.is_dictionary(t):
        return t.value_type
    if pa.types.is_list(t):
        return pa.list_(_json_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _json_type(f.type)) for f in t])
    return t


def _to_output_type(array: pa.Array, t: pa.DataType) -> pa.Array:
    if array.type == t:
        return array
    if pa.types.is_timestamp(t):
        return array.view(t)
    if pa.types.is_dictionary(t) and array.type == t.value_type:
        return array.dictionary_encode()
    return array.cast(t)  # nested dictionaries: rare, and pyarrow.compute loads only then


def result_batch(
    lines: Sequence[bytes],
    keep: pa.RecordBatch | None,
    schema: pa.Schema,
    value_columns: frozenset[str],
) -> pa.RecordBatch:
    """One output batch: keep columns from the input, the rest from the journal
    lines (a structured job's typed columns from each record's ``values``).

    The lines are parsed by pyarrow's JSON reader with an explicit schema, in C++:
    several times faster than building each column from Python objects (and it
    keeps pandas, which pyarrow loads to convert Python lists, out of the run).
    """
    from_input = set(keep.schema.names) if keep is not None else set()
    top = [f for f in schema if f.name not in from_input and f.name not in value_columns]
    read = [pa.field(f.name, _json_type(f.type)) for f in top]
    values = [f for f in schema if f.name in value_columns]
    if values:
        read.append(
            pa.field("values", pa.struct([pa.field(f.name, _json_type(f.type)) for f in values]))
        )
    buffer = b"\n".join(lines)
    try:
        table = pa_json.read_json(
            io.BytesIO(buffer),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=len(buffer) + 1),
            parse_options=pa_json.ParseOptions(
                explicit_schema=pa.schema(read), unexpected_field_behavior="ignore"
            ),
        )
    except pa.ArrowInvalid:
        return _result_batch_from_python(
            [orjson.loads(line) for line in lines], keep, schema, value_columns
        )
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    struct = columns.pop("values", None)
    arrays: list[pa.Array] = []
    for f in schema:
        if f.name in from_input:
            assert keep is not None
            arrays.append(keep.column(f.name))
        elif f.name in value_columns:
            assert struct is not None
            arrays.append(_to_output_type(struct.field(f.name), f.type))
        else:
            arrays.append(_to_output_type(columns[f.name], f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _result_batch_from_python(
    records: Sequence[Mapping[str, Any]],
    keep: pa.RecordBatch | None,
    schema: pa.Schema,
    value_columns: frozenset[str],
) -> pa.RecordBatch:
    """The same batch built from Python objects: for records the JSON reader
    cannot type (a value the API sent in an unexpected JSON type)."""
    arrays: list[pa.Array] = []
    for f in schema:
        if keep is not None and f.name in keep.schema.names:
            arrays.append(keep.column(f.name))
        elif f.name in value_columns:
            name = f.name
            arrays.append(
                pa.array([(r.get("values") or {}).get(name) for r in records], type=f.type)
            )
        else:
            arrays.append(pa.array([r.get(f.name) for r in records], type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)

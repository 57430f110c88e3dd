"""Merge the outputs of a sharded job (or of several runs of one job) into one file.

``batchrun merge OUTPUT... -o FINAL.parquet [--input INPUT]`` reads batchrun outputs
(files, folders of ``*.parquet``, globs), checks that they can be one output, and
writes one Parquet file with one row per id, in ``row`` order (the input's order:
each shard keeps the global row numbers of the input).

What is checked, and what a failed check does (InputError, exit 2, nothing written):

- Every file has the same columns with the same types (the error names the two
  files and the columns that differ).
- Every id appears once. An id in several rows (the same job run twice, a shard
  given twice) is an error listing the first ids and their files, unless
  ``prefer_ok`` (``--prefer-ok``) resolves it with one rule: keep the row whose
  status is ``ok``; among several ok rows, or when none is ok, the one that
  finished last (``finished_at``; a null counts as oldest); on a tie, the one from
  the file named later. So merging a run with its rerun of the failed rows keeps
  every success, and the newest answer when both succeeded.
- Every file comes from the same job: the same model, prompts, parameters and
  input row count (the shard aside). Files that differ are an error naming the
  keys that differ, unless ``allow_mixed`` (``--allow-mixed``), which merges them
  and notes each in the summary.
- Two ids never claim the same ``row`` (they would when the outputs come from
  different inputs, or the input changed between runs).
- No row is missing. With ``input``: every id of the input has a row, and every
  row's id is in the input. Without it: every row number below the input's row
  count (recorded in the first file's metadata) has a row — which catches a
  forgotten shard, but cannot name its ids. ``allow_missing`` writes the file
  anyway and reports what is missing (a run with ``--dedupe`` leaves the later
  duplicates of the input out on purpose: pass ``--allow-missing`` then, or
  ``--input``, which checks by id).

The merged file keeps the first file's ``batchrun`` metadata, with ``rows`` set to
the merged row count, ``shard`` taken out of ``identity`` (the file is no longer one
shard) and ``merged_from`` added: one ``{"file", "run_id", "rows", "shard"}`` per
file. It is written like every batchrun output: to a temporary name in the same
folder, zstd-compressed, fsynced, then ``os.replace``d onto the path, so a
half-written file is never taken for a merged one. The output may be one of the
files merged (everything is read before anything is written); a file that merely
turns up in a folder or glob being merged is left out when it is the output.

Memory: v1 reads every file whole with pyarrow, so it needs the merged table at
its in-memory Arrow size (about 1.4 GB for 3 million rows of 300-character
completions), plus a few bytes a row of numpy arrays (row numbers, a keep mask,
the write order) and, with ``input``, the input's ids. Nothing is copied whole:
the checks read zero-copy views of the ``id``, ``row``, ``status`` and
``finished_at`` columns, and rows are gathered in write order 65,536 at a time
(one take per file, then one reorder of the slice). Since each file is in row
order already, a streaming k-way merge could get by with a row group per file;
v1 does not. Ids are checked with pyarrow compute (``value_counts``, ``is_in``)
and numpy, never a Python loop over the rows; only the examples an error or the
summary names (at most ``MAX_LISTED``) become Python objects.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrun.errors import InputError, OutputError
from batchrun.files import atomic_write, require_folder
from batchrun.outputs import output_files

MAX_LISTED = 5
"""How many duplicate or missing ids an error or summary names."""

WRITE_ROWS = 65_536
"""Rows taken, in write order, per Parquet row group of the merged file."""

NEEDED_COLUMNS = ("id", "row", "status", "finished_at")
"""The columns a file must have to be merged (every batchrun output has them)."""


@dataclass(frozen=True)
class MergeResult:
    """What ``merge_outputs`` wrote. Counts are rows of the merged file unless named otherwise."""

    output: Path
    files: list[Path]
    rows: int
    ok: int
    failed: int
    invalid: int
    duplicate_ids: int
    """Ids that were in more than one row (resolved by ``prefer_ok``)."""
    duplicates_dropped: int
    """Rows left out because another row of their id was kept."""
    missing: int
    """Input ids (with ``input``) or input row numbers (without) that have no row."""
    missing_examples: list[str] = field(default_factory=list)
    """The first missing ids (or ``row N``), at most MAX_LISTED."""
    checked_by: str = "ids"
    """``ids`` (an input was given), ``rows`` (the row count in the metadata) or ``none``."""
    other_jobs: list[str] = field(default_factory=list)
    """``file: keys`` for each file whose job settings differ from the first file's."""
    seconds: float = 0.0

    def summary(self) -> str:
        names = ", ".join(str(f) for f in self.files[:MAX_LISTED])
        more = f", … {len(self.files) - MAX_LISTED} more" if len(self.files) > MAX_LISTED else ""
        lines = [
            f"files       {len(self.files)}  ({names}{more})",
            f"rows        {self.rows:,}  (ok {self.ok:,}, failed {self.failed:,}"
            + (f", invalid {self.invalid:,}" if self.invalid else "")
            + ")",
            f"duplicates  {self.duplicate_ids:,} ids resolved (--prefer-ok), {self.duplicates_dropped:,} rows dropped"
            if self.duplicate_ids
            else "duplicates  none",
        ]
        if self.checked_by == "none":
            lines.append("missing     not checked (no --input, no row count in the metadata)")
        elif self.missing:
            what = "input ids" if self.checked_by == "ids" else "input rows"
            lines.append(
                f"missing     {self.missing:,} {what} (--allow-missing): {', '.join(self.missing_examples)}"
                + (" and more" if self.missing > len(self.missing_examples) else "")
            )
        else:
            lines.append(
                "missing     none"
                + (
                    " (checked by row number; --input checks ids)"
                    if self.checked_by == "rows"
                    else ""
                )
            )
        lines.extend(
            f"note        {other} differs from the first file" for other in self.other_jobs
        )
        lines.append(f"wall time   {self.seconds:.1f}s")
        lines.append(f"output      {self.output}")
        return "\n".join(lines)


def merge_outputs(
    paths: Sequence[Path | str],
    output: Path,
    input: Path | None = None,
    id_column: str | None = None,
    *,
    prefer_ok: bool = False,
    allow_missing: bool = False,
    allow_mixed: bool = False,
) -> MergeResult:
    """Merge batchrun outputs ``paths`` (files, folders, globs) into ``output``.

    ``input`` (JSONL, Parquet file or folder): check that every id of the input has
    a row. ``id_column``: the input's id column (default: the job's ``id_column``
    from the outputs' metadata, else ``id``). ``prefer_ok``, ``allow_missing`` and
    ``allow_mixed``: see the module docstring. Raises InputError (exit 2, nothing written) when the
    files cannot be merged, OutputError when the output cannot be written.
    """
    started = time.monotonic()
    output = Path(output)
    files = output_files(paths, leave_out=output)
    if not files:
        raise InputError(
            "No output file given. Name the files `batchrun run` wrote, folders or globs."
        )
    read = [_read(path) for path in files]
    metas = [meta for _, meta in read]
    other_jobs = _other_jobs(files, metas)
    if other_jobs and not allow_mixed:
        listed = "; ".join(other_jobs[:MAX_LISTED])
        more = f" and {len(other_jobs) - MAX_LISTED} more" if len(other_jobs) > MAX_LISTED else ""
        raise InputError(
            f"The outputs come from different jobs: {listed}{more} "
            f"{'differs' if len(other_jobs) == 1 else 'differ'} from {files[0]} in the keys named. One "
            "merged file would mix answers to different requests. Merge each job's outputs on "
            "their own, or pass --allow-mixed to merge them anyway."
        )
    schema = _common_schema(files, [m["schema"] for m in metas])
    tables = [t.select(schema.names) for t, _ in read]
    del read
    offsets = np.cumsum([0, *(t.num_rows for t in tables)])
    # The columns the checks read, all files end to end (zero-copy: chunks of the parts).
    needed = pa.schema([schema.field(c) for c in NEEDED_COLUMNS])
    table = pa.concat_tables(t.select(list(NEEDED_COLUMNS)).cast(needed) for t in tables)

    keep, dup_ids, dropped_status = _resolve_duplicates(table, files, offsets, prefer_ok)
    rows = table.column("row").to_numpy()
    order = keep[np.argsort(rows[keep], kind="stable")]
    _check_rows(table, files, offsets, rows, order)

    first = metas[0]["batchrun"]
    if input is not None:
        ids = table.column("id").take(pa.array(order))
        missing, examples = _missing_ids(ids, input, id_column or _job_id_column(first))
        checked_by = "ids"
    else:
        total = (first.get("identity") or {}).get("rows")
        missing, examples = _missing_rows(rows[order], total)
        checked_by = "rows" if isinstance(total, int) else "none"
    if missing and not allow_missing:
        what = "ids of the input" if checked_by == "ids" else "row numbers of the input"
        raise InputError(
            f"{missing:,} {what} have no row in the outputs: {', '.join(examples)}"
            + (f" and {missing - len(examples):,} more" if missing > len(examples) else "")
            + ". Add the output that holds them (a shard left out?), run the job again for them, "
            "or pass --allow-missing to write the merged file without them."
        )

    metadata = _merged_metadata(first, files, metas, len(order))
    _write(
        tables, offsets, order, schema.with_metadata({b"batchrun": orjson.dumps(metadata)}), output
    )

    status_all = _status_counts(table.column("status"))
    ok, failed, invalid = (status_all[s] - dropped_status[s] for s in ("ok", "error", "invalid"))
    return MergeResult(
        output=output,
        files=list(files),
        rows=len(order),
        ok=ok,
        failed=failed,
        invalid=invalid,
        duplicate_ids=dup_ids,
        duplicates_dropped=table.num_rows - len(order),
        missing=missing,
        missing_examples=examples,
        checked_by=checked_by,
        other_jobs=other_jobs,
        seconds=time.monotonic() - started,
    )


# ---- reading -----------------------------------------------------------------------------


def _read(path: Path) -> tuple[pa.Table, dict[str, Any]]:
    """The whole file, and ``{"batchrun": its metadata, "schema": its Arrow schema}``
    (the schema as written: the table may hold ``large_string`` where it says string)."""
    try:
        # ParquetFile rather than pq.read_table: the latter imports pyarrow.dataset (0.5 s).
        file = pq.ParquetFile(path)
        schema = file.schema_arrow
        table = _one_chunk(file.read())
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(
            f"{path} is not a readable Parquet file ({exc}). Give the files `batchrun run` wrote."
        ) from None
    lacking = [c for c in NEEDED_COLUMNS if c not in table.column_names]
    if lacking:
        raise InputError(
            f"{path} is not a batchrun output: it has no {', '.join(f'`{c}`' for c in lacking)} column. "
            "Give the files `batchrun run` wrote."
        )
    nulls = [c for c in ("id", "row") if table.column(c).null_count]
    if nulls:
        raise InputError(
            f"{path} has rows without {' or '.join(f'`{c}`' for c in nulls)}: not a batchrun output. "
            "Give the files `batchrun run` wrote."
        )
    try:
        meta = orjson.loads((schema.metadata or {})[b"batchrun"])
    except (KeyError, orjson.JSONDecodeError):
        meta = {}
    return table.replace_schema_metadata(None), {
        "batchrun": meta if isinstance(meta, dict) else {},
        "num_rows": table.num_rows,
        "schema": schema.remove_metadata(),
    }


def _common_schema(files: Sequence[Path], schemas: Sequence[pa.Schema]) -> pa.Schema:
    """The first file's schema, once every file is shown to have the same column
    names and types (the order of the columns may differ)."""
    first = schemas[0]
    types = {f.name: f.type for f in first}
    for path, schema in zip(files[1:], schemas[1:], strict=True):
        other = {f.name: f.type for f in schema}
        if other == types:
            continue
        differ = [
            *(f"`{n}` only in {files[0]}" for n in types if n not in other),
            *(f"`{n}` only in {path}" for n in other if n not in types),
            *(
                f"`{n}` is {types[n]} vs {other[n]}"
                for n in types
                if n in other and types[n] != other[n]
            ),
        ]
        raise InputError(
            f"{files[0]} and {path} have different columns: {'; '.join(differ)}. "
            "Merge only outputs of the same job (same keep_columns, response_format and stream)."
        )
    # Nullability may differ between writers; the merged file takes the first's.
    return pa.schema([f.with_nullable(True) if f.name not in ("id", "row") else f for f in first])


def _one_chunk(table: pa.Table) -> pa.Table:
    """``table`` with each column one contiguous array.

    Taking rows from a chunked column concatenates its chunks on every call, so
    writing in slices would copy the whole column once per slice. A Parquet file
    read whole is one chunk a column already (nothing is copied then) unless a
    column holds over 2 GiB of text: that one is joined with 64-bit offsets
    (``large_string``), and ``_write`` casts each slice back to the schema's type.
    """
    if all(column.num_chunks <= 1 for column in table.columns):
        return table
    columns = []
    for f in table.schema:
        chunks = table.column(f.name).chunks
        try:
            columns.append(pa.concat_arrays(chunks))
        except (pa.ArrowInvalid, pa.ArrowCapacityError):
            large = _large(f.type)
            columns.append(pa.concat_arrays([c.cast(large) for c in chunks]))
    return pa.Table.from_arrays(columns, names=table.schema.names).replace_schema_metadata(
        table.schema.metadata
    )


def _large(type_: pa.DataType) -> pa.DataType:
    """``type_`` with 64-bit offsets wherever it has 32-bit ones."""
    if pa.types.is_string(type_):
        return pa.large_string()
    if pa.types.is_binary(type_):
        return pa.large_binary()
    if pa.types.is_list(type_):
        return pa.large_list(_large(type_.value_type))
    if pa.types.is_struct(type_):
        return pa.struct(
            [type_.field(i).with_type(_large(type_.field(i).type)) for i in range(type_.num_fields)]
        )
    return type_


# ---- checking ----------------------------------------------------------------------------


def _resolve_duplicates(
    table: pa.Table, files: Sequence[Path], offsets: np.ndarray, prefer_ok: bool
) -> tuple[np.ndarray, int, dict[str, int]]:
    """The positions (in the concatenated table) of the rows to keep, how many ids
    were doubled, and the status counts of the rows dropped."""
    n = table.num_rows
    ids = table.column("id")
    counts = pc.value_counts(ids)
    doubled = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(doubled) == 0:
        return np.arange(n), 0, {"ok": 0, "error": 0, "invalid": 0}
    positions = np.flatnonzero(_bools(pc.is_in(ids, value_set=doubled)))
    rows = table.select(["id", "status", "finished_at"]).take(pa.array(positions))
    codes = _codes(rows.column("id"))
    if not prefer_ok:
        listed = []
        for value in doubled[:MAX_LISTED].to_pylist():
            at = positions[_bools(pc.equal(rows.column("id"), value))]
            where = [str(files[i]) for i in np.searchsorted(offsets, at, side="right") - 1]
            listed.append(f"{value!r} ({', '.join(where)})")
        more = f" and {len(doubled) - MAX_LISTED:,} more" if len(doubled) > MAX_LISTED else ""
        raise InputError(
            f"{len(doubled):,} ids have more than one row: {'; '.join(listed)}{more}. "
            "Leave out the extra file (a shard given twice?), or pass --prefer-ok to keep, for "
            "each id, its ok row, else the one that finished last."
        )
    not_ok = _bools(pc.not_equal(pc.fill_null(rows.column("status"), ""), "ok")).astype(np.int8)
    finished = pc.fill_null(rows.column("finished_at").cast(pa.int64()), -(2**62)).to_numpy()
    # Best first within each id: ok, then latest finished_at, then the later file.
    order = np.lexsort((-positions, -finished, not_ok, codes))
    sorted_codes = codes[order]
    best = np.empty(len(order), dtype=bool)
    best[0] = True
    best[1:] = sorted_codes[1:] != sorted_codes[:-1]
    drop = positions[order[~best]]
    keep = np.ones(n, dtype=bool)
    keep[drop] = False
    dropped = _status_counts(rows.column("status").take(pa.array(order[~best])))
    return np.flatnonzero(keep), len(doubled), dropped


def _check_rows(
    table: pa.Table, files: Sequence[Path], offsets: np.ndarray, rows: np.ndarray, order: np.ndarray
) -> None:
    """InputError when two ids claim one row number: the outputs come from different inputs."""
    ordered = rows[order]
    clash = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(clash) == 0:
        return
    listed = []
    for i in clash[:MAX_LISTED]:
        a, b = order[i], order[i + 1]
        fa, fb = (files[j] for j in np.searchsorted(offsets, [a, b], side="right") - 1)
        ida, idb = (table.column("id")[int(p)].as_py() for p in (a, b))
        listed.append(f"row {int(ordered[i])} is {ida!r} in {fa} but {idb!r} in {fb}")
    raise InputError(
        f"{len(clash):,} row numbers belong to more than one id: {'; '.join(listed)}. These outputs come "
        "from different inputs (or the input changed between runs): merge only outputs of one input."
    )


def _missing_ids(ids: pa.ChunkedArray, input: Path, id_column: str) -> tuple[int, list[str]]:
    """Input ids with no row (count, first few in input order). InputError when a
    row's id is not in the input at all: the outputs belong to another input."""
    from batchrun.inputs import InputTable

    table = InputTable(input, skip_bad_lines=True)
    # dedupe: a run with --dedupe left later duplicates out; their id is there once.
    scan = table.scan(id_column, id_required=False, keep_columns=(), dedupe=True)
    chunks = [
        pa.array(batch.ids, pa.string())
        for batch in table.batches([], id_column if scan.has_id_column else None, 65_536)
    ]
    input_ids = pa.chunked_array(chunks, pa.string()).combine_chunks()
    merged = ids.combine_chunks()
    strangers = pc.invert(pc.is_in(merged, value_set=input_ids))
    stranger_count = pc.sum(strangers).as_py() or 0
    if stranger_count:
        examples = pc.filter(merged, strangers)[:MAX_LISTED].to_pylist()
        raise InputError(
            f"{stranger_count:,} ids of the outputs are not in input {input}: "
            f"{', '.join(map(repr, examples))}. Give the input the job ran on"
            + (
                f" (and its id column: --id-column; `{id_column}` was used)."
                if not scan.has_id_column
                else "."
            )
        )
    absent = pc.invert(pc.is_in(input_ids, value_set=merged))
    count = pc.sum(absent).as_py() or 0
    return count, [repr(i) for i in pc.filter(input_ids, absent)[:MAX_LISTED].to_pylist()]


def _missing_rows(rows: np.ndarray, total: Any) -> tuple[int, list[str]]:
    """Row numbers below ``total`` (the input's row count) with no row."""
    if not isinstance(total, int) or total <= 0:
        return 0, []
    present = np.zeros(total, dtype=bool)
    present[rows[(rows >= 0) & (rows < total)]] = True
    absent = np.flatnonzero(~present)
    return len(absent), [f"row {r}" for r in absent[:MAX_LISTED].tolist()]


def _job_id_column(meta: dict[str, Any]) -> str:
    job = meta.get("job") or {}
    value = job.get("id_column") if isinstance(job, dict) else None
    return value if isinstance(value, str) and value else "id"


def _other_jobs(files: Sequence[Path], metas: Sequence[dict[str, Any]]) -> list[str]:
    """``file (`key`, …)`` for each file whose identity (model, prompts, parameters,
    input rows; the shard aside) differs from the first file's."""
    first = {k: v for k, v in (metas[0]["batchrun"].get("identity") or {}).items() if k != "shard"}
    notes = []
    for path, meta in zip(files[1:], metas[1:], strict=True):
        other = {k: v for k, v in (meta["batchrun"].get("identity") or {}).items() if k != "shard"}
        changed = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if changed:
            notes.append(f"{path} ({', '.join(f'`{k}`' for k in changed)})")
    return notes


# ---- writing -----------------------------------------------------------------------------


def _merged_metadata(
    first: dict[str, Any], files: Sequence[Path], metas: Sequence[dict[str, Any]], rows: int
) -> dict[str, Any]:
    merged = dict(first)
    identity = first.get("identity")
    if isinstance(identity, dict):
        merged["identity"] = {k: v for k, v in identity.items() if k != "shard"}
    merged["rows"] = rows
    merged["merged_from"] = [
        {
            "file": str(path),
            "run_id": meta["batchrun"].get("run_id"),
            "rows": meta["num_rows"],
            "shard": (meta["batchrun"].get("identity") or {}).get("shard"),
        }
        for path, meta in zip(files, metas, strict=True)
    ]
    return merged


def _write(
    tables: Sequence[pa.Table],
    offsets: np.ndarray,
    order: np.ndarray,
    schema: pa.Schema,
    output: Path,
) -> None:
    """Rows ``order`` (positions in ``tables`` end to end) to ``output``: temporary
    name, fsync, os.replace."""
    require_folder(output, "-o")
    try:
        with (
            atomic_write(output) as tmp,
            pq.ParquetWriter(tmp, schema, compression="zstd") as writer,
        ):
            for start in range(0, len(order), WRITE_ROWS):
                part = _gather(tables, offsets, order[start : start + WRITE_ROWS], schema)
                writer.write_table(part, row_group_size=WRITE_ROWS)
    except OSError as exc:
        raise OutputError(
            f"Cannot write {output}: {exc.strerror or exc}. Free space (or fix the folder) and merge again."
        ) from None


def _gather(
    tables: Sequence[pa.Table], offsets: np.ndarray, positions: np.ndarray, schema: pa.Schema
) -> pa.Table:
    """The rows at ``positions`` (in ``tables`` end to end), in that order, typed by
    ``schema``: one take per file from its contiguous columns, then one reorder."""
    file_of = np.searchsorted(offsets, positions, side="right") - 1
    by_file = np.argsort(file_of, kind="stable")
    groups = np.split(by_file, np.flatnonzero(np.diff(file_of[by_file])) + 1)
    pieces = [
        tables[file_of[g[0]]].take(pa.array(positions[g] - offsets[file_of[g[0]]])).cast(schema)
        for g in groups
    ]
    if len(pieces) == 1:
        return pieces[0]
    back = np.empty_like(by_file)
    back[by_file] = np.arange(len(by_file))
    return pa.concat_tables(pieces).combine_chunks().take(pa.array(back))


# ---- small vectorized pieces -------------------------------------------------------------


def _bools(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A pyarrow boolean mask as numpy (a null counts as False)."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _codes(values: pa.ChunkedArray) -> np.ndarray:
    """An integer per distinct value (equal values, equal codes)."""
    encoded = pc.dictionary_encode(values.combine_chunks())
    return np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)


def _status_counts(status: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    counts = {"ok": 0, "error": 0, "invalid": 0}
    vc = pc.value_counts(status)
    for value, count in zip(
        vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True
    ):
        if value in counts:
            counts[value] += count
        elif value is not None:
            counts["error"] += count  # an unknown status counts as a failure, as in the journal
    return counts

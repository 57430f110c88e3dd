"""Merge the outputs of a sharded job (or of several runs of one job) into one file.

``batchrun merge OUTPUT... -o FINAL.parquet [--input INPUT]`` reads batchrun outputs
(files, folders of ``*.parquet``, globs), checks that they can be one output, and
writes one Parquet file with one row per id, in ``row`` order (the input's order:
each shard keeps the global row numbers of the input).

What is checked, and what a failed check does (InputError, exit 2, nothing written):

- Every file has the same columns with the same types (the error names the two
  files and the columns that differ), and is in row order, as batchrun writes it.
- Every id appears once. An id in several rows of one row number (the same job
  run twice, a shard given twice) is an error listing the first ids and their
  files, unless ``prefer_ok`` (``--prefer-ok``) resolves it with one rule: keep
  the row whose status is ``ok``; among several ok rows, or when none is ok, the
  one that finished last (``finished_at``; a null counts as oldest); on a tie,
  the one from the file named later. So merging a run with its rerun of the
  failed rows keeps every success, and the newest answer when both succeeded.
- Every file comes from the same job: the same model, prompts, parameters and
  input row count (the shard aside). Files that differ are an error naming the
  keys that differ, unless ``allow_mixed`` (``--allow-mixed``), which merges them
  and notes each in the summary.
- Two ids never claim the same ``row``, and one id never sits on two row numbers
  (either happens when the outputs come from different inputs, or the input
  changed between runs; ``prefer_ok`` does not choose between rows of different
  inputs).
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
files merged (it is replaced only once everything is read); a file that merely
turns up in a folder or glob being merged is left out when it is the output.

Memory does not grow with the rows: the files are read side by side in row
order, a window of rows at a time (``rowmerge.py``; ``WINDOW_ROWS`` over all the
files), in two passes. The first reads ``id``, ``row``, ``status`` and
``finished_at`` and makes the checks; the second reads every column, resolves
doubled ids the same way and writes row groups of ``WRITE_ROWS``. The checks
that span every row — an id on two row numbers, ids missing from the input or
the outputs — go through ``IdCheck`` (``idcheck.py``), which keeps the ids'
hashes on disk beside the output (16 bytes an id, removed at the end). Only the
examples an error or the summary names (at most ``MAX_LISTED``) become Python
objects beyond a window.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
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
from batchrun.idcheck import INPUT, MERGED, Findings, IdCheck, input_ids
from batchrun.outputs import output_files
from batchrun.rowmerge import (
    RowGaps,
    Window,
    gather,
    ids_at,
    kept_rows,
    null_in,
    ranked,
    unreadable,
    windows,
)

MAX_LISTED = 5
"""How many duplicate or missing ids an error or summary names."""

WRITE_ROWS = 16_384
"""Rows per Parquet row group of the merged file."""

WINDOW_ROWS = 16_384
"""Rows read at a time over all the files: each file is read this many divided by
the number of files at a time (at least MIN_BATCH_ROWS)."""

MIN_BATCH_ROWS = 1024

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
    batch_rows: int | None = None,
) -> MergeResult:
    """Merge batchrun outputs ``paths`` (files, folders, globs) into ``output``.

    ``input`` (JSONL, Parquet file or folder): check that every id of the input has
    a row. ``id_column``: the input's id column (default: the job's ``id_column``
    from the outputs' metadata, else ``id``). ``prefer_ok``, ``allow_missing`` and
    ``allow_mixed``: see the module docstring. ``batch_rows``: rows read from each
    file at a time (default: ``WINDOW_ROWS`` shared among the files); the merged
    file is the same whatever it is. Raises InputError (exit 2, nothing written)
    when the files cannot be merged, OutputError when the output cannot be written.
    """
    started = time.monotonic()
    output = Path(output)
    files = output_files(paths, leave_out=output)
    if not files:
        raise InputError(
            "No output file given. Name the files `batchrun run` wrote, folders or globs."
        )
    metas = [_read_meta(path) for path in files]
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
    require_folder(output, "-o")
    batch = batch_rows or max(MIN_BATCH_ROWS, WINDOW_ROWS // len(files))
    first = metas[0]["batchrun"]
    check = _Check(files, prefer_ok, (first.get("identity") or {}).get("rows"))
    with _scratch(output) as scratch:
        expected = sum(m["num_rows"] for m in metas) * (2 if input is not None else 1)
        missing, examples, checked_by = check.everything(
            IdCheck(scratch, expected, MAX_LISTED),
            batch,
            input,
            id_column or _job_id_column(first),
        )
    if missing and not allow_missing:
        what = "ids of the input" if checked_by == "ids" else "row numbers of the input"
        raise InputError(
            f"{missing:,} {what} have no row in the outputs: {', '.join(examples)}"
            + (f" and {missing - len(examples):,} more" if missing > len(examples) else "")
            + ". Add the output that holds them (a shard left out?), run the job again for them, "
            "or pass --allow-missing to write the merged file without them."
        )

    complete = not missing and checked_by != "none" and not other_jobs
    metadata = _merged_metadata(first, files, metas, check.rows, complete)
    meta_schema = schema.with_metadata({b"batchrun": orjson.dumps(metadata)})
    written = _write(files, meta_schema, batch, prefer_ok, output, check.rows)
    return MergeResult(
        output=output,
        files=list(files),
        rows=written,
        ok=check.status["ok"],
        failed=check.status["error"],
        invalid=check.status["invalid"],
        duplicate_ids=check.doubled,
        duplicates_dropped=check.dropped,
        missing=missing,
        missing_examples=examples,
        checked_by=checked_by,
        other_jobs=other_jobs,
        seconds=time.monotonic() - started,
    )


# ---- reading -----------------------------------------------------------------------------


def _read_meta(path: Path) -> dict[str, Any]:
    """``{"batchrun": the file's metadata, "num_rows": …, "schema": its Arrow schema}``,
    read from the footer alone."""
    try:
        schema = pq.read_schema(path)
        footer = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise unreadable(path, exc) from None
    lacking = [c for c in NEEDED_COLUMNS if c not in schema.names]
    if lacking:
        raise InputError(
            f"{path} is not a batchrun output: it has no {', '.join(f'`{c}`' for c in lacking)} column. "
            "Give the files `batchrun run` wrote."
        )
    # Null ids or rows, as far as the footer's statistics tell (the reading checks the rest).
    null_in(path, footer)
    try:
        meta = orjson.loads((schema.metadata or {})[b"batchrun"])
    except (KeyError, orjson.JSONDecodeError):
        meta = {}
    return {
        "batchrun": meta if isinstance(meta, dict) else {},
        "num_rows": footer.num_rows,
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


# ---- checking ----------------------------------------------------------------------------


class _Check:
    """What the first pass finds, a window at a time: doubled ids, clashing rows,
    the status counts and the row numbers missing; each kept row's id goes to
    ``ids`` for the checks that span every row."""

    def __init__(self, files: Sequence[Path], prefer_ok: bool, total: Any) -> None:
        self.files = files
        self.prefer_ok = prefer_ok
        self.gaps = RowGaps(total, MAX_LISTED)
        self.rows = 0
        self.doubled = 0
        """Ids in more than one row of one row number."""
        self.dropped = 0
        self.doubled_listed: list[str] = []
        self.clashes = 0
        self.clashes_listed: list[str] = []
        self.status = {"ok": 0, "error": 0, "invalid": 0}

    def everything(
        self, ids: IdCheck, batch_rows: int, input: Path | None, id_column: str
    ) -> tuple[int, list[str], str]:
        """Every check, raising the first error found, in this order: doubled ids,
        clashing rows, ids on two rows, strangers to the input, rows missing
        (unless allowed). Returns the missing rows: how many, the first few, and
        whether by id or by row number."""
        self.ids = ids
        try:
            for window in windows(self.files, NEEDED_COLUMNS, batch_rows):
                self.add(window)
            self.gaps.close()
            self.raise_doubled_or_clashing()
            by_id = self.add_input(input, id_column) if input is not None else False
            found = ids.findings(with_input=input is not None)
        finally:
            ids.close()
        self.raise_repeated(found.repeated.count, found.repeated.rows)
        if input is None:
            checked_by = "rows" if self.gaps.total is not None else "none"
            return self.gaps.count, [f"row {r}" for r in self.gaps.examples], checked_by
        examples = self.strangers_and_missing(input, id_column, found, by_id)
        return found.missing.count, examples, "ids"

    def add(self, window: Window) -> None:
        order, first, ids = ranked(window, self.prefer_ok)
        group = np.cumsum(first) - 1
        sizes = np.bincount(group)
        doubled = np.flatnonzero(sizes > 1)
        self.doubled += len(doubled)
        self.dropped += len(order) - len(sizes)
        for g in doubled[: MAX_LISTED - len(self.doubled_listed)].tolist():
            members = order[group == g]
            where = ", ".join(str(self.files[f]) for f in np.sort(window.files[members]).tolist())
            self.doubled_listed.append(f"{ids[int(members[0])].as_py()!r} ({where})")
        kept = kept_rows(window, order, first)
        rows = window.rows[kept]
        clash = np.flatnonzero(rows[1:] == rows[:-1])
        self.clashes += len(clash)
        for i in clash[: MAX_LISTED - len(self.clashes_listed)].tolist():
            a, b = int(kept[i]), int(kept[i + 1])
            fa, fb = (self.files[int(window.files[p])] for p in (a, b))
            self.clashes_listed.append(
                f"row {int(rows[i])} is {ids[a].as_py()!r} in {fa} but {ids[b].as_py()!r} in {fb}"
            )
        taken = pa.array(kept)
        for status, count in _status_counts(window.column("status").take(taken)).items():
            self.status[status] += count
        self.ids.add(MERGED, ids.take(taken).to_pylist(), rows)
        self.gaps.add(np.unique(rows))
        self.rows += len(kept)

    def raise_doubled_or_clashing(self) -> None:
        """InputError for ids doubled on one row number (unless ``prefer_ok``), then
        for row numbers of more than one id."""
        if self.doubled and not self.prefer_ok:
            more = f" and {self.doubled - MAX_LISTED:,} more" if self.doubled > MAX_LISTED else ""
            raise InputError(
                f"{self.doubled:,} ids have more than one row: {'; '.join(self.doubled_listed)}{more}. "
                "Leave out the extra file (a shard given twice?), or pass --prefer-ok to keep, for "
                "each id, its ok row, else the one that finished last."
            )
        if self.clashes:
            raise InputError(
                f"{self.clashes:,} row numbers belong to more than one id: {'; '.join(self.clashes_listed)}. "
                f"{DIFFERENT_INPUTS}"
            )

    def raise_repeated(self, count: int, rows: list[int]) -> None:
        """InputError for ids on more than one row number, once their ids are read
        (hashes alone could be two ids that share one)."""
        if not count:
            return
        at = ids_at(self.files, rows)
        by_id: dict[str, list[int]] = {}
        for row in sorted(at):
            by_id.setdefault(at[row][0], []).append(row)
        listed = [
            f"{id_!r} is " + " and ".join(f"row {r} in {self.files[at[r][1][0]]}" for r in on)
            for id_, on in by_id.items()
            if len(on) > 1
        ]
        if not listed:
            return
        more = f" and {count - len(listed):,} more" if count > len(listed) else ""
        raise InputError(
            f"{count:,} ids are on more than one row number: {'; '.join(listed)}{more}. "
            f"{DIFFERENT_INPUTS}"
        )

    def add_input(self, input: Path, id_column: str) -> bool:
        """Add the ids of ``input``; whether it has ``id_column`` (else its ids are
        row numbers)."""
        by_id = False
        for start, ids, named in input_ids(input, id_column):
            self.ids.add(INPUT, ids, np.arange(start, start + len(ids), dtype=np.int64))
            by_id = named
        return by_id

    def strangers_and_missing(
        self, input: Path, id_column: str, found: Findings, by_id: bool
    ) -> list[str]:
        """InputError for ids of the outputs that are not in the input; else the
        first few input ids without a row."""
        if found.strangers.count:
            at = ids_at(self.files, found.strangers.rows)
            examples = [at[r][0] for r in found.strangers.rows if r in at]
            raise InputError(
                f"{found.strangers.count:,} ids of the outputs are not in input {input}: "
                f"{', '.join(map(repr, examples))}. Give the input the job ran on"
                + (
                    f" (and its id column: --id-column; `{id_column}` was used)."
                    if not by_id
                    else "."
                )
            )
        wanted = set(found.missing.rows)
        named: dict[int, str] = {}
        for start, ids, _ in input_ids(input, id_column) if wanted else ():
            named.update((r, ids[r - start]) for r in wanted if start <= r < start + len(ids))
            if len(named) == len(wanted):
                break
        return [repr(named[r]) for r in sorted(named)]


DIFFERENT_INPUTS = (
    "These outputs come from different inputs (or the input changed between runs): merge only "
    "outputs of one input."
)


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
    first: dict[str, Any],
    files: Sequence[Path],
    metas: Sequence[dict[str, Any]],
    rows: int,
    complete: bool,
) -> dict[str, Any]:
    """The first file's metadata for the merged file. Its ``fingerprint`` (what a
    rerun answers from without reading the input, ``finished.py``) stays only when
    every row was found and every file read the same input the same way."""
    merged = dict(first)
    if not complete or any(
        m["batchrun"].get("fingerprint") != first.get("fingerprint") for m in metas
    ):
        merged.pop("fingerprint", None)
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
    files: Sequence[Path],
    schema: pa.Schema,
    batch_rows: int,
    prefer_ok: bool,
    output: Path,
    expected: int,
) -> int:
    """The second pass: every column of the rows the first pass kept, resolved the
    same way, to ``output`` (temporary name, fsync, os.replace). Returns the rows
    written."""
    written = 0
    try:
        with (
            atomic_write(output) as tmp,
            pq.ParquetWriter(tmp, schema, compression="zstd") as writer,
        ):
            waiting: list[pa.Table] = []
            held = 0
            for window in windows(files, schema.names, batch_rows):
                order, first, _ = ranked(window, prefer_ok)
                part = gather(window, kept_rows(window, order, first), schema)
                waiting.append(part)
                held += part.num_rows
                if held >= WRITE_ROWS:
                    table = pa.concat_tables(waiting)
                    whole = held - held % WRITE_ROWS
                    writer.write_table(table.slice(0, whole), row_group_size=WRITE_ROWS)
                    written += whole
                    waiting, held = [table.slice(whole)], held - whole
            if held:
                writer.write_table(pa.concat_tables(waiting), row_group_size=WRITE_ROWS)
                written += held
            if written != expected:
                raise InputError(
                    f"The outputs changed while they were merged ({expected:,} rows checked, "
                    f"{written:,} read to write): merge them again once no run writes them."
                )
    except OSError as exc:
        raise OutputError(
            f"Cannot write {output}: {exc.strerror or exc}. Free space (or fix the folder) and merge again."
        ) from None
    return written


@contextlib.contextmanager
def _scratch(output: Path) -> Iterator[Path]:
    """A hidden folder beside ``output`` for the ids being checked, removed at the
    end (named as a run's leftovers are: a run on ``output`` removes one a killed
    merge left)."""
    folder = output.with_name(f".{output.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        folder.mkdir()
    except OSError as exc:
        raise OutputError(f"Cannot write in {output.parent}: {exc.strerror or exc}.") from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- small vectorized pieces -------------------------------------------------------------


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

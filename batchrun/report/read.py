"""Reading outputs back for ``batchrun report``: the columns it needs, from every
file named, and each paid answer once.

A folder or glob can hold the same answers twice: shard parts beside the file
``batchrun merge`` made of them, a copy. A row of a later file (in the order
files are named; a folder's in name order) is skipped as a duplicate when an
earlier file holds the same record:

- a row that sent requests (``attempts`` not 0) and has a ``response_id``: the
  same ``response_id`` and ``finished_at`` (copies keep both; a server that
  gives every answer one id still has each finish at its own microsecond);
- any other row (reused, never sent, or no id from the server): the same run,
  ``row`` and ``finished_at``. The run is the ``run_id`` of the file's
  metadata; a merged file's rows belong to every run it was merged from
  (``merged_from``), so they match the rows of its parts.

Rows within one file are never duplicates of each other: an output has one row
per input row. A reused row (``attempts = 0``) is never taken for the paid
answer it copies: it belongs to the run that reused it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import InputError
from batchrun.prices import ONLINE

NEEDED_COLUMNS = (
    "model",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "latency_ms",
    "attempts",
    "finished_at",
)
"""The columns of a batchrun output that the report needs (plus the ``--by`` ones)."""

OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "cached_tokens": pa.int64(),
    "reasoning_tokens": pa.int64(),
    "tier": pa.string(),
    "response_id": pa.string(),
    "row": pa.int64(),
}
"""Columns the report reads where a file has them (outputs written before they
existed lack the first three: no cached or reasoning tokens reported, every row
``online``)."""

DAY = "day"
"""``--by day``: the UTC date of ``finished_at``, unless the output has a ``day`` column."""

FILE = "_file"
RUN = "_run"
"""Columns :func:`read_outputs` adds: the file's position, its run (a number)."""


@dataclass(frozen=True)
class Outputs:
    """The rows of every file, each paid answer once; ``duplicates`` rows skipped."""

    frame: pd.DataFrame
    duplicates: int


def read_outputs(files: Sequence[Path], by: Sequence[str] = ()) -> Outputs:
    """The needed, optional and ``by`` columns of every file, one frame, without
    the rows an earlier file holds already (see the module docstring).

    Integer columns come back as nullable ``Int64``/``Int32``. ``day`` (when asked
    for and absent) is derived per file: the UTC date of ``finished_at`` as
    ``YYYY-MM-DD``, None where it is null. InputError names the file and what is
    wrong: not Parquet, not a batchrun output (the columns it lacks), a ``by``
    column it does not have (with the columns it has), a nested ``by`` column."""
    if not files:
        raise InputError("No output file given. Name output files, folders or globs.")
    runs = _Runs()
    frames = []
    for position, path in enumerate(files):
        frame, run_ids = _read_output(path, by)
        frame[FILE] = position
        frame[RUN] = runs.join(run_ids or [f"file:{path.resolve()}"])
        frames.append(frame)
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    if len(frames) == 1:
        return Outputs(frame, 0)
    frame[RUN] = frame[RUN].map(runs.find)
    skip = _duplicates(frame)
    duplicates = int(skip.sum())
    if duplicates:
        frame = frame[~skip].reset_index(drop=True)
    return Outputs(frame, duplicates)


def _read_output(path: Path, by: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """One file's columns, and the runs its rows come from (from its metadata)."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(
            f"{path} is not a Parquet file ({exc}). Give the output files that `batchrun run` writes."
        ) from None
    schema = parquet.schema_arrow
    names = schema.names
    missing = [c for c in NEEDED_COLUMNS if c not in names]
    if missing:
        raise InputError(
            f"{path} is not a batchrun output: it lacks the column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}. Give the Parquet files that `batchrun run` writes."
        )
    derive_day = False
    for column in by:
        if column == DAY and DAY not in names:
            derive_day = True
        elif column not in names and column not in OPTIONAL_COLUMNS:
            raise InputError(
                f"--by {column}: {path} has no column {column}. Its columns are: {', '.join(names)} "
                "(and day: the UTC date of finished_at)."
            )
        elif column in names and pa.types.is_nested(schema.field(column).type):
            raise InputError(
                f"--by {column}: column {column} of {path} holds {schema.field(column).type} values, "
                "which cannot be grouped. Group by a column of plain values."
            )
    present = [c for c in OPTIONAL_COLUMNS if c in names]
    columns = list(dict.fromkeys([*NEEDED_COLUMNS, *present, *(c for c in by if c in names)]))
    try:
        table = parquet.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"Cannot read {path}: {exc}. Is the file complete?") from None
    for name, kind in OPTIONAL_COLUMNS.items():
        if name not in names:
            table = table.append_column(name, pa.nulls(table.num_rows, kind))
    frame = table.to_pandas(types_mapper=_NULLABLE_INTS.get)
    frame["tier"] = frame["tier"].fillna(ONLINE)
    if derive_day:
        frame[DAY] = utc_day(frame["finished_at"])
    return frame, _run_ids(schema.metadata)


def _run_ids(metadata: dict[bytes, bytes] | None) -> list[str]:
    """The run of a file's ``batchrun`` metadata, and those it was merged from."""
    try:
        meta = orjson.loads((metadata or {})[b"batchrun"])
    except (KeyError, orjson.JSONDecodeError):
        return []
    if not isinstance(meta, dict):
        return []
    ids = [meta.get("run_id")]
    merged = meta.get("merged_from")
    if isinstance(merged, list):
        ids += [part.get("run_id") for part in merged if isinstance(part, dict)]
    return [f"run:{i}" for i in ids if isinstance(i, str) and i]


class _Runs:
    """Runs as numbers, the runs of one merged file joined into one (union-find)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.number: dict[str, int] = {}

    def _root(self, run: str) -> str:
        self.parent.setdefault(run, run)
        while self.parent[run] != run:
            self.parent[run] = self.parent[self.parent[run]]
            run = self.parent[run]
        return run

    def join(self, runs: Sequence[str]) -> str:
        """Join ``runs`` into one; return one of them (resolve it with :meth:`find`)."""
        first = self._root(runs[0])
        for run in runs[1:]:
            self.parent[self._root(run)] = first
        return first

    def find(self, run: str) -> int:
        return self.number.setdefault(self._root(run), len(self.number))


def _duplicates(frame: pd.DataFrame) -> np.ndarray:
    """Rows an earlier file holds already (a bool mask)."""
    attempts = frame["attempts"].to_numpy(dtype="float64", na_value=np.nan)
    answered = (~(attempts == 0)) & frame["response_id"].notna().to_numpy()
    finished = pd.to_datetime(frame["finished_at"], utc=True).dt.tz_localize(None)
    keys = pd.DataFrame(
        {
            "answer": frame["response_id"].where(answered, None),
            "run": np.where(answered, -1, frame[RUN].to_numpy(dtype="int64")),
            "row": np.where(answered, -1, frame["row"].fillna(-1).to_numpy(dtype="int64")),
            "finished": finished.to_numpy().view("int64"),  # NaT: one value too
        }
    )
    first = frame[FILE].groupby([keys[c] for c in keys], dropna=False, sort=False).transform("min")
    return np.asarray(frame[FILE].to_numpy() > first.to_numpy())


_NULLABLE_INTS = {
    pa.int64(): pd.Int64Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int8(): pd.Int8Dtype(),
}


def utc_day(finished_at: pd.Series) -> pd.Series:
    """``YYYY-MM-DD`` (UTC) of each timestamp, None where null."""
    codes, dates = utc_dates(finished_at)
    labels = np.array([*(d.isoformat() for d in dates), None], dtype=object)
    return pd.Series(labels[codes], index=finished_at.index, dtype=object)


def utc_dates(finished_at: pd.Series) -> tuple[np.ndarray, list[dt.date]]:
    """The UTC date of each timestamp as (codes, distinct dates), code -1 for a
    null. Only the distinct dates become Python objects: a million rows' worth
    takes seconds."""
    stamps = pd.to_datetime(finished_at, utc=True).dt.tz_localize(None)
    days = stamps.to_numpy(dtype="datetime64[ns]").astype("datetime64[D]")
    codes, found = sorted_codes(days.view("int64"), present=~np.isnat(days))
    return codes, found.astype("datetime64[D]").astype(dt.date).tolist()


def sorted_codes(
    values: np.ndarray, present: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Integers as (each one's rank among the distinct values, those values in
    order): a hash table, then a sort of the few distinct values only. Where
    ``present`` is False the code is -1."""
    kept = values if present is None else values[present]
    codes, found = pd.factorize(kept)
    order = np.argsort(found)
    rank = np.empty(len(found), dtype="int64")
    rank[order] = np.arange(len(found))
    ranks = rank[codes]
    if present is None:
        return ranks, found[order]
    out = np.full(len(values), -1, dtype="int64")
    out[present] = ranks
    return out, found[order]

"""The k-way merge under ``batchrun merge``: batchrun outputs, each in row order,
read side by side a batch at a time, in windows of ascending row numbers.

A window holds, from every file, the rows up to the smallest last row number of
any file's current batch, so every row of one number (the same row in several
files) is in one window, and windows follow each other in row order. ``ranked``
sorts a window by row number and id, the row to keep of each (row, id) first;
``gather`` takes rows out of a window's pieces. Memory holds a batch per file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrun.errors import InputError


def unreadable(path: Path, exc: Exception) -> InputError:
    return InputError(
        f"{path} is not a readable Parquet file ({exc}). Give the files `batchrun run` wrote."
    )


def null_in(path: Path, footer: pq.FileMetaData) -> None:
    """InputError when the footer's statistics show a null ``id`` or ``row``."""
    leaves = [footer.schema.column(i).path for i in range(footer.num_columns)]
    nulls = []
    for name in ("id", "row"):
        column = leaves.index(name)
        for group in range(footer.num_row_groups):
            stats = footer.row_group(group).column(column).statistics
            if stats is not None and stats.has_null_count and stats.null_count:
                nulls.append(name)
                break
    _no_nulls(path, nulls)


def _no_nulls(path: Path, nulls: list[str]) -> None:
    if nulls:
        raise InputError(
            f"{path} has rows without {' or '.join(f'`{c}`' for c in nulls)}: not a batchrun "
            "output. Give the files `batchrun run` wrote."
        )


class Reader:
    """One file's batches, in row order, and the rows read but not yet taken."""

    def __init__(self, index: int, path: Path, columns: Sequence[str], batch_rows: int) -> None:
        self.index = index
        self.path = path
        try:
            # Without pre-buffering, which reads row groups ahead: a batch at a time.
            file = pq.ParquetFile(path, pre_buffer=False)
        except (pa.ArrowInvalid, OSError) as exc:
            raise unreadable(path, exc) from None
        self.batches = file.iter_batches(
            batch_size=batch_rows, columns=list(columns), use_threads=False
        )
        self.table = pa.table({})
        self.rows = np.empty(0, dtype=np.int64)
        self.last = -(2**63)

    def fill(self) -> bool:
        """Whether rows are waiting, reading the next batch when none are."""
        while not len(self.rows):
            try:
                batch = next(self.batches)
            except StopIteration:
                return False
            except (pa.ArrowInvalid, OSError) as exc:
                raise unreadable(self.path, exc) from None
            if not batch.num_rows:
                continue
            _no_nulls(self.path, [c for c in ("id", "row") if batch.column(c).null_count])
            rows = np.asarray(batch.column("row").to_numpy(), dtype=np.int64)
            if rows[0] <= self.last or bool((rows[1:] <= rows[:-1]).any()):
                raise InputError(
                    f"{self.path} is not in row order (each row number once, ascending), as "
                    "`batchrun run` and `batchrun merge` write their files. Sort it by `row` "
                    "(and keep one row per number) before merging it."
                )
            self.last = int(rows[-1])
            self.table, self.rows = pa.Table.from_batches([batch]), rows
        return True

    def take(self, bound: int) -> tuple[pa.Table, np.ndarray]:
        """The waiting rows up to row number ``bound``."""
        n = int(np.searchsorted(self.rows, bound, side="right"))
        taken = self.table.slice(0, n), self.rows[:n]
        self.table, self.rows = self.table.slice(n), self.rows[n:]
        return taken


@dataclass
class Window:
    """Rows of several files, every row of each number they hold: ``pieces`` (one
    per file, in file order) end to end, with each row's file and row number."""

    pieces: list[pa.Table]
    files: np.ndarray
    rows: np.ndarray

    def column(self, name: str) -> pa.Array:
        return pa.chunked_array(
            [c for p in self.pieces for c in p.column(name).chunks],
            self.pieces[0].schema.field(name).type,
        ).combine_chunks()


def windows(files: Sequence[Path], columns: Sequence[str], batch_rows: int) -> Iterator[Window]:
    """Every row of ``files`` (each in row order), in windows of ascending row numbers."""
    readers = [Reader(i, path, columns, batch_rows) for i, path in enumerate(files)]
    while True:
        live = [r for r in readers if r.fill()]
        if not live:
            return
        # No file holds rows at or below the smallest last row of what was read but
        # has not come yet: every row up to it is here.
        bound = min(int(r.rows[-1]) for r in live)
        pieces, sources, rows = [], [], []
        for reader in live:
            piece, taken = reader.take(bound)
            if len(taken):
                pieces.append(piece)
                sources.append(np.full(len(taken), reader.index, dtype=np.int64))
                rows.append(taken)
        yield Window(pieces, np.concatenate(sources), np.concatenate(rows))


def ranked(window: Window, prefer_ok: bool) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """The window's rows sorted by row number and id, the one to keep of each
    (row, id) first (``prefer_ok``'s rule); a mask of those first ones; the ids."""
    ids = window.column("id")
    codes = np.asarray(
        pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False), dtype=np.int64
    )
    if prefer_ok:
        status = pc.fill_null(window.column("status"), "")
        not_ok = np.asarray(pc.not_equal(status, "ok").to_numpy(zero_copy_only=False), np.int8)
        finished = window.column("finished_at").cast(pa.int64())
        latest = np.asarray(pc.fill_null(finished, -(2**62)).to_numpy(), dtype=np.int64)
        order = np.lexsort((-window.files, -latest, not_ok, codes, window.rows))
    else:
        order = np.lexsort((window.files, codes, window.rows))
    rows, codes = window.rows[order], codes[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (codes[1:] != codes[:-1])
    return order, first, ids


def kept_rows(window: Window, order: np.ndarray, first: np.ndarray) -> np.ndarray:
    """The positions of the rows kept, by row number, then file."""
    kept = order[first]
    return kept[np.lexsort((window.files[kept], window.rows[kept]))]


class RowGaps:
    """Row numbers below ``total`` (the input's row count; None: unknown) that no
    row has, counted as the rows go by in ascending order; the first ``limit``."""

    def __init__(self, total: object, limit: int) -> None:
        self.total = total if isinstance(total, int) else None
        self.limit = limit
        self.next = 0
        self.count = 0
        self.examples: list[int] = []

    def add(self, rows: np.ndarray) -> None:
        """``rows``: ascending, each above every row added before."""
        if not self.total:
            return
        rows = rows[(rows >= self.next) & (rows < self.total)]
        if len(rows):
            self._gaps(np.r_[self.next, rows[:-1] + 1], rows)
            self.next = int(rows[-1]) + 1

    def close(self) -> None:
        if self.total:
            self._gaps(np.array([self.next]), np.array([self.total]))
            self.next = self.total

    def _gaps(self, starts: np.ndarray, ends: np.ndarray) -> None:
        open_ = ends > starts
        self.count += int((ends - starts)[open_].sum())
        for start, end in zip(starts[open_].tolist(), ends[open_].tolist(), strict=True):
            room = self.limit - len(self.examples)
            if room <= 0:
                break
            self.examples.extend(range(start, min(end, start + room)))


def ids_at(files: Sequence[Path], rows: Sequence[int]) -> dict[int, tuple[str, list[int]]]:
    """The id at each of ``rows`` (a few) and the files holding it, read again."""
    wanted = np.asarray(sorted(set(rows)), dtype=np.int64)
    found: dict[int, tuple[str, list[int]]] = {}
    if not len(wanted):
        return found
    for index, path in enumerate(files):
        file = pq.ParquetFile(path, pre_buffer=False)
        for batch in file.iter_batches(columns=["id", "row"], batch_size=65_536):
            at = np.asarray(batch.column("row").to_numpy(), dtype=np.int64)
            for i in np.flatnonzero(np.isin(at, wanted)).tolist():
                found.setdefault(int(at[i]), (batch.column("id")[i].as_py(), []))[1].append(index)
            if at[-1] >= wanted[-1]:
                break
    return found


def gather(window: Window, positions: np.ndarray, schema: pa.Schema) -> pa.Table:
    """The rows at ``positions`` (the window's pieces end to end), in that order,
    typed by ``schema``. Should their text pass 2 GiB in one column (answers of
    tens of kilobytes), each half is gathered on its own."""
    try:
        return _gather_once(window, positions, schema)
    except (pa.ArrowCapacityError, pa.ArrowInvalid):
        if len(positions) < 2:
            raise
        half = len(positions) // 2
        return pa.concat_tables(
            [gather(window, positions[:half], schema), gather(window, positions[half:], schema)]
        )


def _gather_once(window: Window, positions: np.ndarray, schema: pa.Schema) -> pa.Table:
    """One take per piece, then one reorder."""
    offsets = np.cumsum([0, *(p.num_rows for p in window.pieces)])
    piece_of = np.searchsorted(offsets, positions, side="right") - 1
    by_piece = np.argsort(piece_of, kind="stable")
    groups = np.split(by_piece, np.flatnonzero(np.diff(piece_of[by_piece])) + 1)
    parts = [
        _take(
            window.pieces[piece_of[g[0]]].select(schema.names),
            positions[g] - offsets[piece_of[g[0]]],
        ).cast(schema)
        for g in groups
        if len(g)
    ]
    if len(parts) == 1:
        return parts[0]
    back = np.empty_like(by_piece)
    back[by_piece] = np.arange(len(by_piece))
    return _take(pa.concat_tables(parts), back)


def _take(table: pa.Table, indices: np.ndarray) -> pa.Table:
    return table.take(pa.array(indices, pa.int64()))

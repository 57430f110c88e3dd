"""Ids checked on disk, in memory that does not grow with their number.

``batchrun merge`` must find the ids of the merged rows that sit on more than one
row number and, given the input, the ids in the outputs but not in the input and
the other way round, for any number of rows. ``IdCheck`` takes ids a batch at a
time as 64-bit hashes tagged with their row number and whether they come from
the outputs or the input, and appends them to files partitioned by the hash's
top bits (16 bytes an id, in a folder the caller makes and removes).
``findings`` then reads one partition at a time and sorts it, so memory holds
one partition — about ``PARTITION_IDS`` ids, some 60 bytes each while sorted —
however many ids there are.

The hashes are Python's own (SipHash, salted per process: the files are read
back only by the process that wrote them). Two different ids with one hash
(odds of about n / 2**64 for each id) can only hide a stranger or a missing id,
or make two rows with different ids look like one id on two rows, which the
caller confirms by reading their ids before it names them.

``input_ids`` reads an input's ids a batch at a time, as text, the way the
outputs hold them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from batchrun.errors import InputError, OutputError

PARTITION_IDS = 1 << 18
"""Ids a partition is sized for (more partitions for more ids, at most MAX_PARTITIONS)."""
MAX_PARTITIONS = 256
"""Files open at once; beyond PARTITION_IDS x this many ids, partitions grow instead."""
MERGED, INPUT = 0, 1
"""Where an id comes from: a merged row, or a row of the input."""
_ENTRY = np.dtype([("hash", "<i8"), ("tag", "<i8")])


@dataclass
class Found:
    """How many of something were found, and the smallest row numbers among them."""

    count: int = 0
    rows: list[int] = field(default_factory=list)

    def add(self, count: int, rows: np.ndarray, limit: int) -> None:
        self.count += count
        self.rows = sorted({*self.rows, *np.sort(rows)[:limit].tolist()})[:limit]


@dataclass
class Findings:
    """What ``IdCheck.findings`` found (row numbers: of the merged rows, or of the
    input for ``missing``)."""

    repeated: Found
    """Ids of merged rows on more than one row; ``rows`` holds all the rows of the
    first few such ids (those with the smallest rows)."""
    strangers: Found
    """Merged rows whose id is not in the input."""
    missing: Found
    """Input rows whose id no merged row has."""


class IdCheck:
    """Ids spilled to ``folder`` by hash partition; see the module docstring."""

    def __init__(self, folder: Path, expected: int, limit: int = 5) -> None:
        """``expected``: about how many ids will be added (sets the partitions);
        ``limit``: how many examples each finding keeps."""
        self.folder = folder
        self.limit = limit
        bits = 0
        while (PARTITION_IDS << bits) < expected and (1 << bits) < MAX_PARTITIONS:
            bits += 1
        self.partitions = 1 << bits
        self._shift = np.uint64(64 - bits)
        self._files: dict[int, IO[bytes]] = {}

    def add(self, source: int, ids: Sequence[str], rows: np.ndarray) -> None:
        """Add ``ids`` (``MERGED`` or ``INPUT``) on ``rows``, one row number each."""
        n = len(ids)
        if not n:
            return
        hashes = np.fromiter(map(hash, ids), np.int64, n)
        entries = np.empty(n, _ENTRY)
        if self.partitions == 1:
            entries["hash"], entries["tag"] = hashes, rows * 2 + source
            self._append(0, entries)
            return
        part = hashes.view(np.uint64) >> self._shift
        order = np.argsort(part, kind="stable")
        entries["hash"], entries["tag"] = hashes[order], rows[order] * 2 + source
        bounds = np.searchsorted(part[order], np.arange(self.partitions + 1, dtype=np.uint64))
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            self._append(p, entries[bounds[p] : bounds[p + 1]])

    def _append(self, partition: int, entries: np.ndarray) -> None:
        try:
            if partition not in self._files:
                self._files[partition] = open(self.folder / f"ids-{partition}", "ab")  # noqa: SIM115
            entries.tofile(self._files[partition])
        except OSError as exc:
            self.close()
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(
            f"Cannot write in {self.folder.parent} (the ids being checked): "
            f"{exc.strerror or exc}. Free space (or fix the folder) and merge again."
        )

    def close(self) -> None:
        for fh in self._files.values():
            with contextlib.suppress(OSError):
                fh.close()

    def findings(self, with_input: bool) -> Findings:
        """Every partition read back, sorted and compared; ``with_input``: input ids
        were added (if none were, every merged id is a stranger)."""
        try:
            for fh in self._files.values():
                fh.close()
        except OSError as exc:
            raise self._error(exc) from None
        found = Findings(Found(), Found(), Found())
        groups: list[list[int]] = []
        for partition in sorted(self._files):
            entries = np.fromfile(self.folder / f"ids-{partition}", _ENTRY)
            entries = entries[np.lexsort((entries["tag"], entries["hash"]))]
            groups += self._compare(entries["hash"], entries["tag"], with_input, found)
            groups = sorted(groups)[: self.limit]
        found.repeated.rows = sorted({r for g in groups for r in g})
        return found

    def _compare(
        self, hashes: np.ndarray, tags: np.ndarray, with_input: bool, found: Findings
    ) -> list[list[int]]:
        """Add what one partition (sorted by hash, then tag) holds to ``found``;
        return the rows of its first few ids on more than one row."""
        merged = (tags & 1) == MERGED
        mine, rows = hashes[merged], tags[merged] >> 1
        groups = []
        if len(mine) > 1:
            starts = np.flatnonzero(np.r_[True, mine[1:] != mine[:-1]])
            sizes = np.diff(np.r_[starts, len(mine)])
            repeated = sizes > 1
            found.repeated.count += int(repeated.sum())
            starts, sizes = starts[repeated], sizes[repeated]
            # An id's rows are sorted: its first row is at its start.
            for i in np.argsort(rows[starts], kind="stable")[: self.limit].tolist():
                s, z = int(starts[i]), int(sizes[i])
                groups.append(rows[s : s + min(z, self.limit)].tolist())
        if with_input:
            theirs, input_rows = hashes[~merged], tags[~merged] >> 1
            strangers = ~_within(mine, theirs)
            found.strangers.add(int(strangers.sum()), rows[strangers], self.limit)
            missing = ~_within(theirs, mine)
            found.missing.add(int(missing.sum()), input_rows[missing], self.limit)
        return groups


def _within(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """For each of ``values``, whether it is in ``sorted_values`` (ascending)."""
    if not len(sorted_values):
        return np.zeros(len(values), dtype=bool)
    at = np.searchsorted(sorted_values, values).clip(0, len(sorted_values) - 1)
    return np.asarray(sorted_values[at] == values)


def input_ids(input: Path, id_column: str) -> Iterator[tuple[int, list[str], bool]]:
    """(first row number, ids, whether they are ``id_column``'s) for each batch of
    ``input``: its ``id_column`` as text, or without that column the row numbers.
    Bad lines are skipped (the run may have skipped them)."""
    from batchrun.inputs import InputTable

    table = InputTable(input, skip_bad_lines=True)
    by_id: bool | None = None
    for batch in table.batches([id_column], None, 65_536):
        if by_id is None:
            by_id = id_column in batch.rows[0]
        having = sum(1 for row in batch.rows if id_column in row)
        if having != (len(batch.rows) if by_id else 0):
            raise InputError(
                f"Input {input}: some rows have `{id_column}` and others do not, so the rows "
                "cannot be matched by id. Give --id-column a column every row has."
            )
        if not by_id:
            yield batch.start, batch.ids, False
            continue
        values = [row[id_column] for row in batch.rows]
        if None in values:
            raise InputError(
                f"Input {input}, row {batch.start + values.index(None)}: `{id_column}` is null. "
                "Give --id-column a column every row has a value in."
            )
        yield batch.start, [v if isinstance(v, str) else str(v) for v in values], True

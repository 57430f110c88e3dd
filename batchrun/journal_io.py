"""The journal's file work below the Journal: a record parsed from its line, a
batch's lines read at their offsets in few system calls (a line runs from its
offset to the next newline, so the index keeps no lengths), whole writes, the
temporary names a run leaves beside an output while it writes (and removes,
when a killed run left them), and an output's timestamps as a record holds them."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa


def parse_record(line: bytes) -> tuple[int, dict[str, Any]] | None:
    """(row, record) of a journal line, None when the line is not a record."""
    try:
        rec = orjson.loads(line)
        return int(rec["row"]), rec
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def temporary(path: Path) -> Path:
    """A hidden name beside ``path`` for a file or folder on its way in or out."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def remove_leftovers(output: Path) -> None:
    """Remove what a run killed mid-write left beside ``output``: a temporary output
    file (``files.atomic_write``), a take-back copy or a journal being removed
    (``temporary``). Called under the lock: no other run is writing them."""
    pattern = re.compile(rf"\.{re.escape(output.name)}(?:\.partial)?\.[0-9a-f]+\.tmp")
    with os.scandir(output.parent) as entries:
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def read_lines(fd: int, offsets: Any, rows: Sequence[int], typical: int) -> list[bytes]:
    """The journal lines of ``rows``, without their newlines (``typical``: about
    how long a line is). Rows finish roughly in input order, so a batch's lines
    usually sit close together: one read of their span then serves them all;
    lines scattered over the journal (a resume, retried rows) are read one by
    one, so memory never holds more than a batch's worth."""
    if not len(rows):
        return []
    starts = offsets[np.asarray(rows, dtype=np.int64)]
    low, high = int(starts.min()), int(starts.max())
    if high - low > 2 * typical * len(rows) + 65536:
        return [read_line(fd, o, typical) for o in starts.tolist()]
    span = os.pread(fd, high - low + 2 * typical + 1, low)
    while span.find(b"\n", high - low) < 0:
        more = os.pread(fd, max(len(span), 65536), low + len(span))
        if not more:
            break
        span += more
    lines = []
    for o in (starts - low).tolist():
        end = span.find(b"\n", o)
        lines.append(span[o:end] if end >= 0 else span[o:])
    return lines


def read_line(fd: int, offset: int, guess: int = 4096) -> bytes:
    """The journal line at ``offset``, without its newline."""
    data = os.pread(fd, max(guess, 256), offset)
    while (end := data.find(b"\n")) < 0:
        more = os.pread(fd, max(len(data), 4096), offset + len(data))
        if not more:
            return data
        data += more
    return data[:end]


def epoch_times(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with its timestamps as the journal keeps them, epoch microseconds:
    as Python datetimes they would load pandas (some 40 MB) to read the time zone."""
    columns = [
        c.cast(pa.timestamp("us", c.type.tz)).view(pa.int64())
        if pa.types.is_timestamp(c.type)
        else c
        for c in batch.columns
    ]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)

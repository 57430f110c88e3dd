"""The journal's file work below the Journal: whole writes, temporary names
beside the output, leftovers of a killed run, and reading the lines of many
rows in few system calls."""

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


def read_lines(fd: int, offsets: Any, lengths: Any, rows: Sequence[int]) -> list[bytes]:
    """The journal lines of ``rows``. Rows finish roughly in input order, so a
    batch's lines usually sit close together: one read of their span then
    serves them all; lines scattered over the journal (a resume, retried rows)
    are read one by one, so memory never holds more than a batch's worth."""
    if not len(rows):
        return []
    index = np.asarray(rows, dtype=np.int64)
    starts = offsets[index]
    sizes = lengths[index].astype(np.int64)
    low = int(starts.min())
    high = int((starts + sizes).max())
    if high - low > 2 * int(sizes.sum()) + 65536:
        return [os.pread(fd, int(n), int(o)) for o, n in zip(starts, sizes, strict=True)]
    span = os.pread(fd, high - low, low)
    return [
        span[o - low : o - low + n] for o, n in zip((starts).tolist(), sizes.tolist(), strict=True)
    ]

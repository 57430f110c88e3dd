"""Durable file writes: every file batchrun writes whole (the output Parquet, a
merged file, an HTML report, OpenAI batch lines, ``job.json``, a ready file)
goes through :func:`atomic_write`, so a reader never sees half a file and a
crash never leaves a temporary one behind."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from batchrun.errors import OutputError


def fsync_path(path: Path | str) -> None:
    """fsync a file or a folder (a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to. When the block ends without
    an error, the file is fsynced, renamed onto ``path`` and the folder fsynced;
    whatever ends the block otherwise (an error, Ctrl-C), the temporary file is
    removed and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def require_folder(path: Path, option: str) -> None:
    """OutputError unless the folder ``path`` will be written in exists; ``option``
    names where the user chose the path (``output``, ``-o``, ``--html``)."""
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(
            f"Output folder {folder} does not exist. Create it (mkdir -p {folder}) "
            f"or choose another {option}."
        )

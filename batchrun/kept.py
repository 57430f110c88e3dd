"""What a run learns about the server and keeps, so that its resume sends the
same bytes (the request hashes stay stable): a small JSON object per subject,
beside the journal as ``OUTPUT.partial/<name>.json`` while the job runs, and at
the end in the output's metadata under ``<name>``. A resume reads the journal's
copy; a rerun of a finished output (``--retry-failed``) and ``--reuse`` read the
metadata of the outputs they start from. ``--restart`` forgets it.

Subjects: ``schema_via`` (how a structured request carries its schema) and
``stream_options`` (whether a streamed request asks for usage that way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from batchrun.files import write_atomic


def state_file(name: str) -> str:
    """The file beside the journal that keeps subject ``name``."""
    return f"{name}.json"


def read_kept(name: str, folder: Path, earlier: Sequence[Path] = ()) -> dict[str, Any] | None:
    """Subject ``name`` as kept in ``folder`` (the journal's), else as the first
    of the ``earlier`` outputs (files or folders of them) recorded it; None when
    none did."""
    kept = _read(folder / state_file(name))
    for path in earlier if kept is None else ():
        kept = _recorded(name, path)
        if kept is not None:
            break
    return kept


def save_kept(name: str, folder: Path | None, state: Mapping[str, Any]) -> None:
    """Keep subject ``name`` beside the journal in ``folder`` (when there is one)."""
    if folder is not None and folder.is_dir():
        write_atomic(folder / state_file(name), orjson.dumps(dict(state)))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        kept = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return kept if isinstance(kept, dict) else None


def _recorded(name: str, output: Path) -> dict[str, Any] | None:
    """Subject ``name`` as an earlier output recorded it in its metadata."""
    import pyarrow.parquet as pq

    from batchrun.outputs import output_files

    try:
        files = output_files([output])
    except Exception:  # not there (yet): the ReuseIndex words that error
        return None
    for file in files:
        try:
            meta = pq.read_schema(file).metadata or {}
            kept = orjson.loads(meta[b"batchrun"]).get(name)
        except (OSError, KeyError, pa.ArrowInvalid, orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(kept, dict):
            return kept
    return None

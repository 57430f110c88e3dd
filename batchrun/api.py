"""The Python API: ``batchrun.run`` / ``batchrun.arun`` run a job from Python or
a notebook and return its output as a pandas DataFrame. Inputs that are not
files (a DataFrame, a pyarrow Table, dicts) are written to a temporary Parquet
file first; the job then runs exactly as ``batchrun run`` runs it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchrun.errors import JobError
from batchrun.lifecycle import RunOptions

InputLike = Any
"""A path (str or Path), a pandas DataFrame, a pyarrow Table, or an iterable of dicts."""


async def arun(
    job: str | Path | None = None,
    *,
    input: InputLike = None,
    output: str | Path | None = None,
    restart: bool = False,
    retry_failed: bool = False,
    reuse: tuple[str | Path, ...] | list[str | Path] = (),
    skip_bad_lines: bool = False,
    dedupe: bool = False,
    mock: bool = False,
    progress: bool = True,
    **keys: Any,
) -> Any:
    """Run a job from Python and return its output as a pandas DataFrame.

    ``job`` is an optional TOML job file; ``keys`` are job keys with the same
    names, checks and defaults as in the file and as CLI flags (they override
    the file). ``input`` may be a path, a DataFrame, a pyarrow Table or an
    iterable of dicts. With ``output``, the Parquet file is written there and a
    rerun resumes exactly as the CLI does; without it, the output lives in a
    temporary folder only for the call. ``DataFrame.attrs["batchrun"]`` holds
    the run's summary (rows ok/failed, tokens, requests, run id).

    Bad jobs raise ``batchrun.BatchrunError`` subclasses carrying the message the
    CLI prints; a failed row is a row (``status`` error or invalid), never an
    exception.
    """
    import tempfile

    import pandas as pd

    from batchrun.config import load_job

    with tempfile.TemporaryDirectory(prefix="batchrun-") as tmp:
        overrides: dict[str, Any] = dict(keys)
        if input is not None:
            overrides["input"] = _input_path(input, Path(tmp))
        if output is not None:
            overrides["output"] = output
        elif job is None or "output" not in _file_keys(job):
            overrides["output"] = Path(tmp) / "output.parquet"
        checked = load_job(job, overrides, overrides_source="keyword argument")
        options = RunOptions(
            restart=restart,
            retry_failed=retry_failed,
            reuse=tuple(Path(p) for p in reuse),
            skip_bad_lines=skip_bad_lines,
            dedupe=dedupe,
            mock=mock,
            progress=progress,
            progress_mode="notebook" if _in_notebook() else None,
        )
        from batchrun.engines.local import run_job

        result = await run_job(checked, options)
        frame = pd.read_parquet(result.output)
    frame.attrs["batchrun"] = result.as_dict()
    if output is None and (job is None or "output" not in _file_keys(job)):
        frame.attrs["batchrun"]["output"] = None  # it lived in a temporary folder, now gone
    return frame


def run(job: str | Path | None = None, **kwargs: Any) -> Any:
    """``arun`` for code without an event loop, and for notebooks, whose loop is
    already running (the job then runs on its own loop in a worker thread)."""
    import concurrent.futures

    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:
        return asyncio.run(arun(job, **kwargs))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchrun") as pool:
        return pool.submit(asyncio.run, arun(job, **kwargs)).result()


def _file_keys(job: str | Path) -> set[str]:
    from batchrun.config import read_job_file

    return set(read_job_file(Path(job)))


def _input_path(value: InputLike, tmp: Path) -> Path | str:
    """A path as it is; anything else written once to a Parquet file in ``tmp``."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(value, pa.Table):
        table = value
    elif type(value).__module__.startswith("pandas"):
        table = pa.Table.from_pandas(value, preserve_index=False)
    else:
        try:
            rows = list(value)
        except TypeError:
            rows = None
        if rows is None or not all(isinstance(r, Mapping) for r in rows):
            raise JobError(
                "`input` must be a path, a pandas DataFrame, a pyarrow Table or an iterable of dicts "
                "(one dict per row)."
            )
        try:
            table = pa.Table.from_pylist(rows)
        except (TypeError, pa.ArrowInvalid) as exc:
            raise JobError(
                f"`input` must be a path, a pandas DataFrame, a pyarrow Table or an iterable of dicts ({exc})."
            ) from None
    path = tmp / "input.parquet"
    pq.write_table(table, path)
    return path


def _in_notebook() -> bool:
    import sys

    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"

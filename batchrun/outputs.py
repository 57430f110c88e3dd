"""Where results go: a durable journal while the job runs, a Parquet file at the end.

While a job runs, each finished row is appended to ``OUTPUT.partial/journal.jsonl``
as one JSON line, with a single ``os.write`` the moment its answer arrives (no
buffer in this process: a ``kill -9`` loses only the requests in flight), and the
file is fsynced about once a second (a power cut loses at most that second).
``OUTPUT.partial/job.json`` ties the journal to the job that wrote it.

When every row has a result, ``finish`` streams the input once more for the
``keep_columns``, joins each row with its last journal record, writes Parquet in
input order to a temporary name, fsyncs it and ``os.replace``s it onto the
output path: a half-written file is never taken for a finished one. Then the
``.partial`` folder is renamed away and removed.

Resume: reopening the journal indexes each row's last record (offsets in numpy
arrays: about 21 bytes a row, never the records themselves). A damaged line is
skipped and counted, never the end of the reading; only a torn last line is cut
off. A finished output is copied back into a journal (``_take_back``) in a
temporary folder renamed into place once complete, so it stays the record of
the job until its copy is whole.

One run at a time: the journal holds an exclusive ``flock`` on ``OUTPUT.lock``
(with the PID of its run) from opening to ``close``; a second run on the same
output stops at once (OutputBusy, exit 3).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from batchrun._version import __version__
from batchrun.errors import (
    InputError,
    OutputBusy,
    OutputError,
    ResumeConflict,
    write_failed,
)
from batchrun.files import atomic_write, fsync_path, require_folder, write_atomic

log = logging.getLogger("batchrun")

STATUS_NONE, STATUS_OK, STATUS_ERROR, STATUS_INVALID = 0, 1, 2, 3
EMBEDDED_ENDPOINT = "the embedded endpoint (--mock)"
"""What ``answered_by`` in an output's metadata says for a ``--mock`` run
(else it holds the base URL that answered)."""
STATUS_CODES = {"ok": STATUS_OK, "error": STATUS_ERROR, "invalid": STATUS_INVALID}

TIMESTAMP = pa.timestamp("us", tz="UTC")
HEAD_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),
]
RESULT_FIELDS = [
    pa.field("model", pa.string()),
    pa.field("response_model", pa.string()),
    pa.field("completion", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("reasoning_tokens", pa.int64()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("http_status", pa.int32()),
    pa.field("attempts", pa.int32()),
    pa.field("latency_ms", pa.float64()),
    pa.field("queued_ms", pa.float64()),
    pa.field("response_id", pa.string()),
    pa.field("request_hash", pa.string()),
    pa.field("started_at", TIMESTAMP),
    pa.field("finished_at", TIMESTAMP),
    pa.field("tier", pa.string()),
]
TTFT_FIELD = pa.field("ttft_ms", pa.float64())
COST_FIELD = pa.field("cost", pa.float64())
"""The row's cost in the prices' currency (jobs with a prices file only)."""
FIXED_COLUMNS = frozenset(f.name for f in [*HEAD_FIELDS, *RESULT_FIELDS, TTFT_FIELD, COST_FIELD])


class Record(TypedDict):
    """One journal line: the result of one row, as the output's columns hold it
    (timestamps as epoch microseconds). Written by the scheduler (an answer or an
    error), by ``--reuse`` and when a finished output is taken back."""

    row: int
    id: str
    status: str
    """ok, error or invalid."""
    model: NotRequired[str | None]
    response_model: NotRequired[str | None]
    completion: NotRequired[str | None]
    finish_reason: NotRequired[str | None]
    prompt_tokens: NotRequired[int | None]
    completion_tokens: NotRequired[int | None]
    total_tokens: NotRequired[int | None]
    cached_tokens: NotRequired[int | None]
    """Prompt tokens read from the server's cache (part of prompt_tokens)."""
    reasoning_tokens: NotRequired[int | None]
    """Completion tokens of hidden reasoning (part of completion_tokens)."""
    error: NotRequired[str | None]
    http_status: NotRequired[int | None]
    attempts: NotRequired[int]
    latency_ms: NotRequired[float]
    """Milliseconds the row's requests spent at the API, summed over attempts."""
    queued_ms: NotRequired[float]
    """Milliseconds the row waited for the job's own limits and budget."""
    response_id: NotRequired[str | None]
    request_hash: NotRequired[str | None]
    started_at: NotRequired[int]
    finished_at: NotRequired[int]
    tier: NotRequired[str | None]
    """How the row was answered: ``online`` (one request at a time) or ``batch``
    (a provider's Batch API, at its discount)."""
    cost: NotRequired[float | None]
    """``prices.Prices.row_cost`` of the record, set as it is journaled."""
    ttft_ms: NotRequired[float | None]
    values: NotRequired[dict[str, Any]]
    """The typed columns of a structured answer."""


def output_schema(
    keep_schema: pa.Schema,
    metadata: Mapping[str, Any] | None = None,
    extra_fields: Sequence[pa.Field] = (),
) -> pa.Schema:
    """id, row, the keep_columns, the result columns, then the job's extra columns
    (``ttft_ms`` for streamed jobs). ``metadata`` goes in the file's key-value
    metadata under ``batchrun``."""
    fields = [*HEAD_FIELDS, *keep_schema, *RESULT_FIELDS, *extra_fields]
    meta = {b"batchrun": orjson.dumps(dict(metadata))} if metadata else None
    return pa.schema(fields, metadata=meta)


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def hash_key(request_hash: str | None) -> int:
    """The first 64 bits of a request hash, as the index keeps them."""
    return int(request_hash[:16], 16) - (1 << 63) if request_hash else 0


@dataclass(frozen=True)
class Resumed:
    """What an earlier, unfinished run of the same job left."""

    run_id: str
    rows_ok: int
    rows_failed: int
    rows_invalid: int


_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
"""What flock answers on a file system that has no locks."""


def lock_path(output: Path) -> Path:
    """The file a run locks for as long as it works on ``output`` (its PID inside)."""
    return output.with_name(output.name + ".lock")


class OutputLock:
    """An exclusive lock on one output for a whole run: ``fcntl.flock`` on
    ``OUTPUT.lock``, which holds the PID (and host) of the run. The kernel drops
    the lock when the process ends, however it ends, so a lock file left by a
    killed run blocks nobody. Two runs on one output at once would each send the
    rows the other has not journaled yet, and mix their journal lines."""

    def __init__(self, output: Path) -> None:
        """Take the lock, or raise OutputBusy naming the run that holds it."""
        import fcntl  # here, so that importing this module works where fcntl does not exist

        self.output = output
        self.path = lock_path(output)
        self.fd = -1
        while self.fd < 0:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # The run before us removes the file before it lets go: a lock on
                # a file no longer at this path would exclude nobody, so try again.
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self.fd, fd = fd, -1
            except BlockingIOError:
                raise self._busy(fd) from None
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
                # A file system without locks (some network and FUSE mounts): run unlocked.
                log.warning(
                    "cannot lock %s (%s): nothing stops a second run on this output at the same time",
                    self.path,
                    exc.strerror,
                    extra={"event": "no_lock"},
                )
                self.fd, fd = fd, -1
            finally:
                if fd >= 0:
                    os.close(fd)
        with contextlib.suppress(OSError):  # the PID only serves the message above
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def _busy(self, fd: int) -> OutputBusy:
        try:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
        except OSError:
            holder = []
        pid = holder[0] if holder else ""
        host = holder[1] if len(holder) > 1 and holder[1] != socket.gethostname() else ""
        who = (f"PID {pid}" if pid else "a run still starting") + (f" on {host}" if host else "")
        stop = f" (kill {pid})" if pid and not host else ""
        return OutputBusy(
            f"{self.output} is in use: another batchrun run ({who}) is working on it and holds "
            f"{self.path}. Two runs of one output would pay twice for the same rows, so this one "
            f"sent nothing. Wait for that run to end, or stop it{stop}, then run the same command again."
        )

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (in that order: see __init__)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


class Journal:
    """The append-only record of finished rows for one output path, and the lock
    on that output for as long as it is open."""

    def __init__(
        self,
        output: Path,
        num_rows: int,
        identity: Mapping[str, Any],
        restart: bool = False,
        keep_columns: Sequence[str] = (),
    ) -> None:
        """Lock ``output`` (OutputBusy when another run holds it), then open (or
        create) its journal.

        ``identity`` holds what must not change for a resume (model, prompts,
        parameters, input); a journal written under another identity raises
        ResumeConflict unless ``restart`` discards it. A finished output of the
        same job counts as a journal too: its rows are taken back in, so a rerun
        sends nothing (or, with --retry-failed, only the failed rows).
        """
        self.output = output
        self.folder = partial_dir(output)
        self.path = self.folder / "journal.jsonl"
        self.num_rows = num_rows
        self.offsets = np.full(num_rows, -1, dtype=np.int64)
        self.lengths = np.zeros(num_rows, dtype=np.int32)
        self.status = np.zeros(num_rows, dtype=np.int8)
        self.hashes = np.zeros(num_rows, dtype=np.int64)
        self.resumed: Resumed | None = None
        self.fd = self._rfd = -1
        self.end = 0
        require_folder(output, "`output`")
        try:
            self._lock = OutputLock(output)
        except OSError as exc:
            raise self._open_error(exc) from None
        try:
            self._open(dict(identity), restart, keep_columns)
        except BaseException:
            self.close()
            raise

    def _open(self, identity: dict[str, Any], restart: bool, keep_columns: Sequence[str]) -> None:
        finished_run = None
        try:
            _remove_leftovers(self.output)
            if restart and self.folder.exists():
                shutil.rmtree(self.folder)
            finished_run = None if restart else self._finished_run(identity)
            if finished_run is not None:
                self.run_id = finished_run
                self._take_back(identity, keep_columns)
            elif self.folder.exists() and (self.folder / "job.json").exists():
                self.run_id = self._check_identity(identity)
            else:
                self.folder.mkdir(exist_ok=True)
                self.run_id = uuid.uuid4().hex[:12]
                self._write_job_json(self.folder, identity)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise self._open_error(exc) from None
        self.end = self._load()
        if finished_run is None and not restart:
            self._complete_take_back(keep_columns)

    def _open_error(self, exc: OSError) -> OutputError:
        if isinstance(exc, PermissionError):
            return OutputError(
                f"Cannot write in {self.output.parent}: {exc.strerror}. Choose an `output` in a folder you can write to."
            )
        return write_failed(
            exc,
            f"Cannot write the journal in {self.folder}: {exc.strerror}. Every result written "
            "before is kept: free space (or fix the folder), then run the same command again.",
        )

    # ---- identity --------------------------------------------------------

    def _write_job_json(self, folder: Path, identity: Mapping[str, Any]) -> None:
        data = {**identity, "run_id": self.run_id, "batchrun_version": __version__}
        write_atomic(
            folder / "job.json",
            orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS),
        )

    def _check_identity(self, identity: dict[str, Any]) -> str:
        job_json = self.folder / "job.json"
        try:
            old = orjson.loads(job_json.read_bytes())
            reason = "" if isinstance(old, dict) else "not a JSON object"
        except OSError as exc:
            reason = str(exc.strerror)
        except orjson.JSONDecodeError as exc:
            reason = f"not JSON: {exc}"
        if reason:
            # Without it there is no telling whether the journal is this job's.
            raise ResumeConflict(
                f"{job_json} is unreadable ({reason}), so batchrun cannot tell whether the "
                f"unfinished run in {self.folder} belongs to this job. Restore job.json (from a "
                "backup) to resume that run, or run again with --restart to discard its results "
                "and start over."
            )
        changed = [k for k in identity if old.get(k) != identity[k]]
        if changed:
            what = ", ".join(f"`{k}`" for k in changed)
            raise ResumeConflict(
                f"{self.folder} holds an unfinished run of a different job: {what} changed since it started. "
                f"Run again with --restart to discard its results and start over, or put back the old "
                f"settings to keep going (the old ones are in {job_json})."
            )
        return str(old.get("run_id") or uuid.uuid4().hex[:12])

    def _written(self) -> dict[str, Any]:
        """The ``batchrun`` metadata of the finished output ({} when unreadable)."""
        try:
            meta = pq.read_schema(self.output).metadata or {}
            written = orjson.loads(meta[b"batchrun"])
        except (pa.ArrowInvalid, OSError, KeyError, orjson.JSONDecodeError):
            return {}
        return written if isinstance(written, dict) else {}

    def _finished_run(self, identity: dict[str, Any]) -> str | None:
        """The run id of a finished output of this same job, None when there is
        no finished output. ResumeConflict when it was written by another job."""
        if not self.output.exists() or self.folder.exists():
            return None
        written = self._written()
        old = written.get("identity") or {}
        changed = [k for k in identity if old.get(k) != identity[k]]
        if changed:
            what = ", ".join(f"`{k}`" for k in changed) if old else "its settings are unknown"
            raise ResumeConflict(
                f"{self.output} already exists and was written by a different job ({what}). "
                "Pass --restart to replace it, or choose another `output`."
            )
        return str(written.get("run_id") or uuid.uuid4().hex[:12])

    # ---- taking a finished output back -------------------------------------

    def _take_back(self, identity: dict[str, Any], keep_columns: Sequence[str]) -> None:
        """Journal every row of the finished output, so it resumes like a journal.

        The copy is written in a temporary folder and renamed onto ``.partial`` only
        once it is complete and on disk: until then the finished output stays the
        one record of the job, so a run stopped mid-copy (kill -9, SIGTERM, a full
        disk) leaves a finished job, never a partial journal whose missing rows the
        next run would send again.
        """
        tmp = _temporary(self.folder)
        tmp.mkdir()
        try:
            self._write_job_json(tmp, identity)
            fd = os.open(tmp / "journal.jsonl", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                self._copy_output(fd, keep_columns)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_path(tmp)
            os.rename(tmp, self.folder)
            fsync_path(self.folder.parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_failed(
                exc,
                f"Cannot take {self.output} back into a journal to resume it: {exc.strerror or exc}. "
                f"{self.output} is unchanged: free space (or fix the folder) and run the same command again.",
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _complete_take_back(self, keep_columns: Sequence[str]) -> None:
        """Copy in the rows this journal lacks from the finished output it was
        taken back from (same run id): what a take-back stopped midway left before
        the copy was made atomic, or a finish stopped while removing the journal.
        A journal of another run (after --restart) never takes the old output's rows."""
        if not self.output.exists() or self._written().get("run_id") != self.run_id:
            return
        try:
            in_output = pq.read_metadata(self.output).num_rows
        except (pa.ArrowInvalid, OSError):
            return
        if int((self.status != STATUS_NONE).sum()) >= in_output:
            return  # the journal has every row of the output (and perhaps newer results)
        try:
            copied = self._copy_output(self.fd, keep_columns, self.status == STATUS_NONE)
        except OSError as exc:
            os.ftruncate(self.fd, self.end)
            raise write_failed(
                exc,
                f"Cannot write to {self.path}: {exc.strerror or exc}. Every result written before "
                "this is kept: free space (or fix the folder) and run the same command again to resume.",
            ) from None
        log.warning(
            "%s held only part of %s, which it was taken back from: copied the other %d rows in",
            self.path,
            self.output,
            copied,
            extra={"event": "take_back_completed", "rows_copied": copied},
        )
        self.end = self._load()

    def _copy_output(
        self, fd: int, keep_columns: Sequence[str], wanted: np.ndarray | None = None
    ) -> int:
        """Write the finished output's rows (those ``wanted`` marks, else all) to
        ``fd`` as journal records, a batch per write. Returns how many."""
        skip = {"id", "row", *keep_columns}
        copied = 0
        for batch in pq.ParquetFile(self.output).iter_batches(batch_size=8192):
            lines = []
            for row in batch.to_pylist():
                n = row["row"]
                if not 0 <= n < self.num_rows or (wanted is not None and not wanted[n]):
                    continue
                rec = {k: journal_value(v) for k, v in row.items() if k in FIXED_COLUMNS}
                values = {k: v for k, v in row.items() if k not in FIXED_COLUMNS and k not in skip}
                if values:
                    rec["values"] = values
                lines.append(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
            _write_all(fd, b"".join(lines))
            copied += len(lines)
        return copied

    # ---- reading back ----------------------------------------------------

    def _load(self) -> int:
        """Index every readable record. Returns the end offset.

        A damaged line (garbage, or the NUL bytes a power cut leaves where a block
        never reached the disk) is skipped, counted and logged; every record after
        it is kept, and a whole record right after a run of NULs too. Only a torn
        last line (no newline: a write cut short) is cut off.
        """
        size = os.fstat(self.fd).st_size
        if size == 0:
            return 0
        pos = unreadable = 0
        with open(self.path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # a torn write at the very end: cut off below
                start, pos = pos, pos + len(line)
                found = _parse_record(line)
                if found is None and b"\0" in line:
                    tail = line[line.rindex(b"\0") + 1 :]
                    found, start = _parse_record(tail), pos - len(tail)
                if found is None:
                    unreadable += 1
                    continue
                row, rec = found
                if 0 <= row < self.num_rows:
                    self.offsets[row] = start
                    self.lengths[row] = pos - start - 1
                    self.status[row] = STATUS_CODES.get(str(rec.get("status")), STATUS_ERROR)
                    self.hashes[row] = hash_key(rec.get("request_hash"))
        if pos < size:
            os.ftruncate(self.fd, pos)
        if unreadable:
            log.warning(
                "%s: skipped %d unreadable line%s (damaged on disk); every readable record is "
                "kept, and the rows whose records were lost are sent again",
                self.path,
                unreadable,
                "" if unreadable == 1 else "s",
                extra={"event": "journal_damaged", "journal": str(self.path), "lines": unreadable},
            )
        ok, failed, invalid = self.counts()
        self.resumed = Resumed(self.run_id, ok, failed, invalid)
        return pos

    def record(self, row: int) -> dict[str, Any] | None:
        """The last record of ``row``, or None."""
        off = int(self.offsets[row])
        if off < 0:
            return None
        data = os.pread(self.fd_read(), int(self.lengths[row]), off)
        rec: dict[str, Any] = orjson.loads(data)
        return rec

    def fd_read(self) -> int:
        if self._rfd < 0:
            self._rfd = os.open(self.path, os.O_RDONLY)
        return self._rfd

    def hash_matches(self, row: int, request_hash: str) -> bool:
        return bool(self.hashes[row] == hash_key(request_hash))

    # ---- writing ---------------------------------------------------------

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one finished row now, with a single write call."""
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        row = int(record["row"])
        try:
            written = os.write(self.fd, line)
        except OSError as exc:
            raise self._write_error(exc) from None
        if written != len(line):
            # A short write (disk full): take the torn tail back so the journal stays clean.
            os.ftruncate(self.fd, self.end)
            raise self._write_error(OSError(errno.ENOSPC, "No space left on device"))
        self.offsets[row] = self.end
        self.lengths[row] = len(line) - 1
        self.status[row] = STATUS_CODES.get(record["status"], STATUS_ERROR)
        self.hashes[row] = hash_key(record.get("request_hash"))
        self.end += written

    def _write_error(self, exc: OSError) -> OutputError:
        return write_failed(
            exc,
            f"Cannot write to {self.path}: {exc.strerror}. Every result written before this is kept: "
            "free space (or fix the folder) and run the same command again to resume.",
        )

    def sync(self) -> None:
        """fsync the journal (called about once a second while the job runs)."""
        with contextlib.suppress(OSError):
            os.fsync(self.fd)

    def close(self) -> None:
        """Close the journal and release the output's lock; calling it again does nothing."""
        self._close_files()
        self._lock.release()

    def _close_files(self) -> None:
        if self.fd >= 0:
            self.sync()
            os.close(self.fd)
            self.fd = -1
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1

    def counts(self) -> tuple[int, int, int]:
        """Rows whose last result is ok, an error, and an invalid answer."""
        status = self.status
        return (
            int((status == STATUS_OK).sum()),
            int((status == STATUS_ERROR).sum()),
            int((status == STATUS_INVALID).sum()),
        )

    def missing_rows(self, skip: Any = None) -> int:
        """How many rows have no result yet (``skip``: a bool mask of rows left out)."""
        none = self.status == STATUS_NONE
        return int((none & ~skip).sum()) if skip is not None else int(none.sum())

    # ---- the finished file ----------------------------------------------

    def finish(
        self,
        keep_schema: pa.Schema,
        keep_batches: Iterator[pa.RecordBatch] | None,
        metadata: Mapping[str, Any],
        skip_rows: Any = None,
        batch_rows: int = 8192,
        extra_fields: Sequence[pa.Field] = (),
        value_columns: frozenset[str] = frozenset(),
    ) -> Path:
        """Write the output Parquet from the journal, atomically, and remove the journal.
        The lock stays held until ``close``."""
        self.sync()
        schema = output_schema(keep_schema, metadata, extra_fields)
        skip = skip_rows if skip_rows is not None else np.zeros(self.num_rows, dtype=bool)
        any_skipped = bool(skip.any())
        # Records are read row by row with pread, not through a map of the whole
        # journal: mapped pages count as this process's memory, and a million
        # rows' journal would double the peak.
        fd = self.fd_read()
        offsets, lengths = self.offsets, self.lengths
        try:
            with (
                atomic_write(self.output) as tmp,
                pq.ParquetWriter(tmp, schema, compression="zstd") as writer,
            ):
                for start, keep in self._ranges(keep_batches, batch_rows):
                    stop = start + (
                        keep.num_rows
                        if keep is not None
                        else min(batch_rows, self.num_rows - start)
                    )
                    rows = (
                        (np.nonzero(~skip[start:stop])[0] + start).tolist()
                        if any_skipped
                        else range(start, stop)
                    )
                    lines = _read_lines(fd, offsets, lengths, rows)
                    if not lines:
                        continue
                    if keep is not None and any_skipped:
                        keep = keep.take(pa.array([r - start for r in rows], pa.int64()))
                    writer.write_batch(_result_batch(lines, keep, schema, value_columns))
        except OSError as exc:
            raise write_failed(
                exc,
                f"Cannot write {self.output}: {exc.strerror}. The results are kept in {self.folder}: "
                "free space (or fix the folder) and run the same command again to write the file.",
            ) from None
        self._close_files()
        # The journal goes in one rename, then its files: a run stopped meanwhile
        # never leaves a journal with part of its records beside the finished file.
        trash = _temporary(self.folder)
        try:
            os.rename(self.folder, trash)
        except OSError:
            trash = self.folder
        shutil.rmtree(trash, ignore_errors=True)
        return self.output

    def _ranges(
        self, keep_batches: Iterator[pa.RecordBatch] | None, batch_rows: int
    ) -> Iterator[tuple[int, pa.RecordBatch | None]]:
        if keep_batches is None:
            for start in range(0, self.num_rows, batch_rows):
                yield start, None
            return
        start = 0
        for keep in keep_batches:
            yield start, keep
            start += keep.num_rows


def _parse_record(line: bytes) -> tuple[int, dict[str, Any]] | None:
    """(row, record) of a journal line, None when the line is not a record."""
    try:
        rec = orjson.loads(line)
        return int(rec["row"]), rec
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _temporary(path: Path) -> Path:
    """A hidden name beside ``path`` for a file or folder on its way in or out."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _remove_leftovers(output: Path) -> None:
    """Remove what a run killed mid-write left beside ``output``: a temporary output
    file (``files.atomic_write``), a take-back copy or a journal being removed
    (``_temporary``). Called under the lock: no other run is writing them."""
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


def output_files(specs: Iterable[Path | str], leave_out: Path | None = None) -> list[Path]:
    """The Parquet files named by ``specs``: files, folders (every ``*.parquet`` below,
    hidden ones skipped, sorted) and globs (``**`` recurses), in the order given; a
    file named twice is read once. ``leave_out`` is dropped when a folder or glob
    finds it (the merged file inside the folder being merged), kept when named.
    InputError when a spec matches nothing."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            found.append(path)
            continue
        if path.is_dir():
            matches = _parquet_below(path)
        elif glob.has_magic(str(spec)):
            matches = []
            for match in sorted(Path(m) for m in glob.glob(str(spec), recursive=True)):
                matches.extend(_parquet_below(match) if match.is_dir() else [match])
        else:
            raise InputError(
                f"Output {path} does not exist. Give the files `batchrun run` wrote, folders of them, or globs."
            )
        if leave_out is not None:
            matches = [m for m in matches if m.resolve() != leave_out.resolve()]
        if not matches and not path.is_dir():
            raise InputError(
                f"No file matches {spec}. Check the pattern (and quote it, so the shell leaves it alone)."
            )
        if not matches:
            raise InputError(
                f"{spec} holds no .parquet file. Give the files `batchrun run` wrote, folders of them, or globs."
            )
        found.extend(matches)
    seen: set[Path] = set()
    unique: list[Path] = []
    for file in found:
        if file.resolve() not in seen:
            seen.add(file.resolve())
            unique.append(file)
    return unique


def _parquet_below(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*.parquet")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def journal_value(value: Any) -> Any:
    """A value read back from Parquet as the journal keeps it (timestamps as epoch µs)."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000)
    return value


def _read_lines(fd: int, offsets: Any, lengths: Any, rows: Sequence[int]) -> list[bytes]:
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


def _json_type(t: pa.DataType) -> pa.DataType:
    """How the JSON reader reads a column: timestamps as the journal's int64
    microseconds, dictionaries as their values."""
    if pa.types.is_timestamp(t):
        return pa.int64()
    if pa.types.is_dictionary(t):
        return t.value_type
    if pa.types.is_list(t):
        return pa.list_(_json_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _json_type(f.type)) for f in t])
    return t


def _to_output_type(array: pa.Array, t: pa.DataType) -> pa.Array:
    if array.type == t:
        return array
    if pa.types.is_timestamp(t):
        return array.view(t)
    if pa.types.is_dictionary(t) and array.type == t.value_type:
        return array.dictionary_encode()
    return array.cast(t)  # nested dictionaries: rare, and pyarrow.compute loads only then


def _result_batch(
    lines: Sequence[bytes],
    keep: pa.RecordBatch | None,
    schema: pa.Schema,
    value_columns: frozenset[str],
) -> pa.RecordBatch:
    """One output batch: keep columns from the input, the rest from the journal
    lines (a structured job's typed columns from each record's ``values``).

    The lines are parsed by pyarrow's JSON reader with an explicit schema, in C++:
    several times faster than building each column from Python objects (and it
    keeps pandas, which pyarrow loads to convert Python lists, out of the run).
    """
    from_input = set(keep.schema.names) if keep is not None else set()
    top = [f for f in schema if f.name not in from_input and f.name not in value_columns]
    read = [pa.field(f.name, _json_type(f.type)) for f in top]
    values = [f for f in schema if f.name in value_columns]
    if values:
        read.append(
            pa.field("values", pa.struct([pa.field(f.name, _json_type(f.type)) for f in values]))
        )
    buffer = b"\n".join(lines)
    try:
        table = pa_json.read_json(
            io.BytesIO(buffer),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=len(buffer) + 1),
            parse_options=pa_json.ParseOptions(
                explicit_schema=pa.schema(read), unexpected_field_behavior="ignore"
            ),
        )
    except pa.ArrowInvalid:
        return _result_batch_from_python(
            [orjson.loads(line) for line in lines], keep, schema, value_columns
        )
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    struct = columns.pop("values", None)
    arrays: list[pa.Array] = []
    for f in schema:
        if f.name in from_input:
            assert keep is not None
            arrays.append(keep.column(f.name))
        elif f.name in value_columns:
            assert struct is not None
            arrays.append(_to_output_type(struct.field(f.name), f.type))
        else:
            arrays.append(_to_output_type(columns[f.name], f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _result_batch_from_python(
    records: Sequence[Mapping[str, Any]],
    keep: pa.RecordBatch | None,
    schema: pa.Schema,
    value_columns: frozenset[str],
) -> pa.RecordBatch:
    """The same batch built from Python objects: for records the JSON reader
    cannot type (a value the API sent in an unexpected JSON type)."""
    arrays: list[pa.Array] = []
    for f in schema:
        if keep is not None and f.name in keep.schema.names:
            arrays.append(keep.column(f.name))
        elif f.name in value_columns:
            name = f.name
            arrays.append(
                pa.array([(r.get("values") or {}).get(name) for r in records], type=f.type)
            )
        else:
            arrays.append(pa.array([r.get(f.name) for r in records], type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)

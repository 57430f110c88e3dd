"""The journal: while a job runs, each finished row is appended to
``OUTPUT.partial/journal.jsonl`` as one JSON line, with a single ``os.write`` the
moment its answer arrives (no buffer in this process: a ``kill -9`` loses only
the requests in flight), and the file is fsynced about once a second (a power
cut loses at most that second). ``OUTPUT.partial/job.json`` ties the journal to
the job that wrote it.

When every row has a result, ``finish`` streams the input once more for the
``keep_columns``, joins each row with its last journal record, writes Parquet in
input order (``outputs``) to a temporary name, fsyncs it and ``os.replace``s it
onto the output path: a half-written file is never taken for a finished one.
Then the ``.partial`` folder is renamed away and removed.

Resume: reopening the journal indexes each row's last record (offsets in numpy
arrays: 9 bytes a row, and 8 more for the request hashes a resume compares;
never the records themselves). A damaged line is skipped and counted, never the
end of the reading; only a torn last line is cut off. A finished output that
cannot answer a rerun on its own (``finished.py``) is copied back into a journal
(``_take_back``) in a temporary folder renamed into place once complete, so it
stays the record of the job until its copy is whole.

One run at a time: the journal holds an exclusive ``flock`` on ``OUTPUT.lock``
(with the PID of its run) from opening to ``close``; a second run on the same
output stops at once (OutputBusy, exit 3).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun._version import __version__
from batchrun.errors import (
    OutputError,
    ResumeConflict,
    write_failed,
)
from batchrun.files import atomic_write, fsync_path, require_folder, write_atomic
from batchrun.journal_io import (
    epoch_times,
    parse_record,
    read_line,
    read_lines,
    remove_leftovers,
    temporary,
    write_all,
)
from batchrun.lock import OutputLock
from batchrun.outputs import (
    FIXED_COLUMNS,
    STATUS_CODES,
    STATUS_ERROR,
    STATUS_INVALID,
    STATUS_NONE,
    STATUS_OK,
    journal_value,
    output_schema,
    result_batch,
)

log = logging.getLogger("batchrun")


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
        self._index_for(output, num_rows)
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

    def _index_for(self, output: Path, num_rows: int) -> None:
        """An empty index of ``num_rows`` rows for the journal of ``output``."""
        self.output = output
        self.folder = partial_dir(output)
        self.path = self.folder / "journal.jsonl"
        self.num_rows = num_rows
        self.offsets = np.full(num_rows, -1, dtype=np.int64)
        self.status = np.zeros(num_rows, dtype=np.int8)
        # Only a resume compares request hashes: a fresh run keeps none.
        self.hashes: np.ndarray | None = None
        self.resumed: Resumed | None = None
        self.fd = self._rfd = -1
        self.end = 0
        self.run_id = ""

    @classmethod
    def peek(
        cls, output: Path, num_rows: int, identity: Mapping[str, Any], restart: bool = False
    ) -> Journal:
        """What a run of ``output`` would resume, read without writing or locking
        anything (``batchrun plan``): the same identity checks as opening
        (ResumeConflict), and each row's status and request hash, from the
        unfinished journal or else the finished output."""
        self = cls.__new__(cls)
        self._index_for(output, num_rows)
        if restart:
            return self
        finished_run = self._finished_run(dict(identity))
        if finished_run is not None:
            self.run_id = finished_run
            self.hashes = np.zeros(num_rows, dtype=np.int64)
            columns = ["row", "status", "request_hash"]
            for batch in pq.ParquetFile(output, pre_buffer=False).iter_batches(
                batch_size=65536, columns=columns, use_threads=False
            ):
                for row, status, request_hash in zip(
                    *(c.to_pylist() for c in batch.columns), strict=True
                ):
                    if 0 <= row < num_rows:
                        self.status[row] = STATUS_CODES.get(status, STATUS_ERROR)
                        self.hashes[row] = hash_key(request_hash)
        elif (self.folder / "job.json").exists():
            self.run_id = self._check_identity(dict(identity))
            if self.path.exists():
                self._index()
        else:
            return self
        ok, failed, invalid = self.counts()
        self.resumed = Resumed(self.run_id, ok, failed, invalid)
        return self

    def _open(self, identity: dict[str, Any], restart: bool, keep_columns: Sequence[str]) -> None:
        finished_run = None
        try:
            remove_leftovers(self.output)
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
            what = ", ".join(_changed(k, old.get(k), identity[k]) for k in changed)
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
            what = (
                ", ".join(_changed(k, old.get(k), identity[k]) for k in changed)
                if old
                else "its settings are unknown"
            )
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
        tmp = temporary(self.folder)
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
        # Small batches, read ahead of nothing and on this thread: memory holds a
        # few thousand rows, however large the output.
        output = pq.ParquetFile(self.output, pre_buffer=False)
        for batch in output.iter_batches(batch_size=2048, use_threads=False):
            lines = []
            for row in epoch_times(batch).to_pylist():
                n = row["row"]
                if not 0 <= n < self.num_rows or (wanted is not None and not wanted[n]):
                    continue
                rec = {k: journal_value(v) for k, v in row.items() if k in FIXED_COLUMNS}
                values = {k: v for k, v in row.items() if k not in FIXED_COLUMNS and k not in skip}
                if values:
                    rec["values"] = values
                lines.append(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
            write_all(fd, b"".join(lines))
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
        pos, unreadable = self._index()
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

    def _index(self) -> tuple[int, int]:
        """Index every readable record of the journal file. Returns where the
        last whole line ends and how many lines were unreadable."""
        pos = unreadable = 0
        if self.hashes is None:
            self.hashes = np.zeros(self.num_rows, dtype=np.int64)
        with open(self.path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # a torn write at the very end: cut off below
                start, pos = pos, pos + len(line)
                found = parse_record(line)
                if found is None and b"\0" in line:
                    tail = line[line.rindex(b"\0") + 1 :]
                    found, start = parse_record(tail), pos - len(tail)
                if found is None:
                    unreadable += 1
                    continue
                row, rec = found
                if 0 <= row < self.num_rows:
                    self.offsets[row] = start
                    self.status[row] = STATUS_CODES.get(str(rec.get("status")), STATUS_ERROR)
                    self.hashes[row] = hash_key(rec.get("request_hash"))
        return pos, unreadable

    def record(self, row: int) -> dict[str, Any] | None:
        """The last record of ``row``, or None."""
        off = int(self.offsets[row])
        if off < 0:
            return None
        rec: dict[str, Any] = orjson.loads(read_line(self.fd_read(), off))
        return rec

    def fd_read(self) -> int:
        if self._rfd < 0:
            self._rfd = os.open(self.path, os.O_RDONLY)
        return self._rfd

    def hash_matches(self, row: int, request_hash: str) -> bool:
        return self.hashes is not None and bool(self.hashes[row] == hash_key(request_hash))

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
        self.status[row] = STATUS_CODES.get(record["status"], STATUS_ERROR)
        if self.hashes is not None:
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
        offsets = self.offsets
        typical = self.end // max(1, int((self.status != STATUS_NONE).sum()))
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
                    lines = read_lines(fd, offsets, rows, typical)
                    if not lines:
                        continue
                    if keep is not None and any_skipped:
                        keep = keep.take(pa.array([r - start for r in rows], pa.int64()))
                    writer.write_batch(result_batch(lines, keep, schema, value_columns))
        except OSError as exc:
            raise write_failed(
                exc,
                f"Cannot write {self.output}: {exc.strerror}. The results are kept in {self.folder}: "
                "free space (or fix the folder) and run the same command again to write the file.",
            ) from None
        self._close_files()
        # The journal goes in one rename, then its files: a run stopped meanwhile
        # never leaves a journal with part of its records beside the finished file.
        trash = temporary(self.folder)
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


def _changed(key: str, was: Any, now: Any) -> str:
    """One changed identity key for a message: its old and new value when short."""
    if all(isinstance(v, (str, int, float)) and len(str(v)) <= 60 for v in (was, now)):
        return f"`{key}` was {was!r}, now {now!r}"
    return f"`{key}`"

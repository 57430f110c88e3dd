"""What a batch or hybrid job keeps beside its journal, in ``OUTPUT.partial/batch/``:

- ``state.json``: the run it belongs to, its first start, the deadline (as
  written and as resolved), the online latency measured, whether the hybrid
  switch-over happened, and each part: its rows, its file id and its batch id
  the moment they exist, the batch's last status, and whether its output has
  been journaled. Written whole with ``files.write_atomic`` at every change.
- ``part-NNNN.rows``: part N's rows (number, id, request hash, model; JSON),
  written before the part is uploaded, so the rows of a batch are known whatever
  happens next, and its lines are mapped back without reading the input again.
- ``part-NNNN.jsonl``: part N's request file, from its writing until its batch
  exists (a crash in between uploads it again).

``BatchState.switch_at`` says when the batches must be cancelled: for a hybrid
job, from ``online_seconds``, the estimate of how long the online path takes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batchrun.config import Job
from batchrun.errors import ResumeConflict
from batchrun.files import fsync_path, write_atomic
from batchrun.journal import partial_dir
from batchrun.payload import Prepared

CLIENT_ROWS_PER_S = 2000.0
"""The most rows per second the estimate lets one process send online, however
fast the server (batchrun's own ceiling on a small machine, with room to spare)."""
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
"""Batch statuses that do not change any more."""
MARGIN = 1.5
"""The online estimate is stretched by this much before the switch-over is timed."""
SLACK_S = 2.0
"""Seconds kept for downloading a cancelled batch's output and starting the online path."""
CANCEL_SHARE, CANCEL_MIN_S, CANCEL_MAX_S = 0.1, 5.0, 600.0
"""Time allowed for a cancel to complete: a tenth of the window from the first
start to the deadline, at least 5 s, at most 10 minutes (OpenAI's bound)."""


def state_folder(output: Path) -> Path:
    return partial_dir(output) / "batch"


@dataclass
class Part:
    """One batch: at most 50,000 rows and 200 MB of requests."""

    number: int
    rows: int
    """How many rows it holds (``part-NNNN.rows`` says which)."""
    size: int
    """Bytes of its request file."""
    started_at: float
    """Epoch seconds when its upload began (the metadata search looks no further back)."""
    counts: dict[str, int] = field(default_factory=dict)
    """The batch's last ``request_counts``."""
    file_id: str | None = None
    batch_id: str | None = None
    status: str = "new"
    """The batch's last status seen (``new`` before it exists)."""
    collected: bool = False
    """Its output and error files are journaled: it holds no row any more."""
    lost: bool = False
    """The API no longer knows it (the embedded endpoint of an earlier process):
    its rows are free again."""

    @property
    def live(self) -> bool:
        return not self.collected and not self.lost

    @property
    def answered(self) -> int:
        """Rows the batch has run so far, by its own count."""
        return int(self.counts.get("completed") or 0) + int(self.counts.get("failed") or 0)


@dataclass
class BatchState:
    """``state.json`` and the part files of one run."""

    folder: Path
    run_id: str
    started_at: float
    deadline_text: str | None = None
    deadline_at: float | None = None
    latency_s: float | None = None
    """Seconds one online request took (the median of the calibration rows)."""
    tokens_per_row: float | None = None
    switched: bool = False
    """The hybrid switch-over happened: no new batch, the rest goes online."""
    parts: list[Part] = field(default_factory=list)

    @classmethod
    def load(cls, folder: Path) -> BatchState | None:
        """The state kept in ``folder``, None when there is none."""
        path = folder / "state.json"
        try:
            data = orjson.loads(path.read_bytes())
            parts = [Part(**p) for p in data.pop("parts")]
            return cls(folder=folder, parts=parts, **data)
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise ResumeConflict(
                f"{path} is unreadable ({exc}): it holds the ids of the batches this job "
                "submitted, so batchrun cannot tell which rows they answer. Restore it to "
                "re-attach to them, or run again with --restart (then cancel those batches in "
                "the provider's dashboard: without the file batchrun cannot)."
            ) from None

    def save(self) -> None:
        data = dataclasses.asdict(self)
        del data["folder"]
        write_atomic(self.folder / "state.json", orjson.dumps(data, option=orjson.OPT_INDENT_2))

    def live(self) -> list[Part]:
        return [p for p in self.parts if p.live]

    def switch_at(self, mode: str, open_rows: int, job: Job) -> float | None:
        """When the live batches must be cancelled (epoch seconds): None for never
        (no deadline), the past for an online job with batches left. A hybrid job
        switches over when what is left of the window is the online estimate for
        the ``open_rows`` (stretched by MARGIN), the cancel's allowance and SLACK_S;
        a batch job only keeps the allowance and the slack."""
        if mode == "online" or self.switched:
            return 0.0
        deadline = self.deadline_at
        if deadline is None:
            return None
        allowance = min(
            CANCEL_MAX_S, max(CANCEL_MIN_S, CANCEL_SHARE * (deadline - self.started_at))
        )
        if mode != "hybrid":
            return deadline - allowance - SLACK_S
        workers = (
            job.concurrency
            if isinstance(job.concurrency, int)
            else max(1, job.max_concurrency // 4)
        )
        latency = self.latency_s if self.latency_s is not None else job.request_timeout_s
        online = online_seconds(open_rows, workers, latency, job.rpm, job.tpm, self.tokens_per_row)
        return deadline - MARGIN * online - allowance - SLACK_S

    # ---- part files ------------------------------------------------------------

    def requests_path(self, part: Part | int) -> Path:
        number = part if isinstance(part, int) else part.number
        return self.folder / f"part-{number:04d}.jsonl"

    def entries(self, part: Part) -> list[list[Any]]:
        """``[row, id, request_hash, model]`` of each row of ``part``."""
        data: list[list[Any]] = orjson.loads(
            (self.folder / f"part-{part.number:04d}.rows").read_bytes()
        )
        return data

    def rows_of(self, part: Part) -> np.ndarray:
        return np.asarray([e[0] for e in self.entries(part)], dtype=np.int64)

    def keep_rows(self, number: int, entries: list[tuple[int, str, str, str | None]]) -> None:
        write_atomic(self.folder / f"part-{number:04d}.rows", orjson.dumps(entries))

    def rows_mask(self, size: int, parts: list[Part]) -> np.ndarray:
        """A mask of the rows ``parts`` hold."""
        mask = np.zeros(size, dtype=bool)
        for part in parts:
            rows = self.rows_of(part)
            mask[rows[(rows >= 0) & (rows < size)]] = True
        return mask


class PartWriter:
    """Writes one part's request lines to a hidden file, renamed into place once whole."""

    def __init__(self, state: BatchState, number: int) -> None:
        self.number = number
        self.path = state.requests_path(number)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.fh = self.tmp.open("wb")
        self.rows: list[tuple[int, str, str, str | None]] = []
        self.size = 0

    def add(self, p: Prepared, line: bytes) -> None:
        self.fh.write(line)
        self.rows.append((p.row, p.id, p.request_hash, p.model))
        self.size += len(line)

    def close(self) -> Path:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        fsync_path(self.path.parent)
        return self.path

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def online_seconds(
    rows: int,
    workers: int,
    latency_s: float,
    rpm: float | None,
    tpm: float | None,
    tokens_per_row: float | None,
) -> float:
    """How long sending ``rows`` online takes: ``workers`` requests in flight of
    ``latency_s`` each, no faster than ``rpm``, ``tpm`` (at ``tokens_per_row``)
    and ``CLIENT_ROWS_PER_S`` allow, plus one request's latency for the last."""
    if rows <= 0:
        return 0.0
    latency_s = max(latency_s, 0.001)
    rate = min(workers / latency_s, CLIENT_ROWS_PER_S)
    if rpm:
        rate = min(rate, rpm / 60)
    if tpm and tokens_per_row:
        rate = min(rate, tpm / 60 / tokens_per_row)
    return rows / rate + latency_s

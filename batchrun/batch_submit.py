"""Putting rows into batches: request files in parts, uploaded, made batches,
each step recorded in the state the moment it is done.

A part's rows and request file are written first (``batch_state``), then the
file is uploaded (its id recorded), then a batch is created from it (its id
recorded). A run that finds a part with a file id but no batch id cannot tell
whether the batch was created before the crash: it looks for the batch by its
metadata (the run id and the part number) before creating one, so no row is
ever submitted twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchrun.batch_client import BatchClient, remove_quietly
from batchrun.batch_lines import BatchRow, Collector
from batchrun.batch_state import TERMINAL, BatchState, Part, PartWriter
from batchrun.config import Job
from batchrun.openai_batch import input_line
from batchrun.payload import Prepared

log = logging.getLogger("batchrun")

FIND_BACK_S = 600.0
"""The metadata search looks this much further back than a part's upload (clock skew)."""


@dataclass(frozen=True)
class PartLimits:
    """The most lines and bytes of one batch's request file (OpenAI's limits)."""

    rows: int = 50_000
    bytes: int = 200_000_000


def metadata(run_id: str, number: int, job: Job) -> dict[str, str]:
    """What each batch carries to be found again: the run and the part."""
    output = job.output.name if job.output is not None else ""
    return {"batchrun_run": run_id, "batchrun_part": str(number), "batchrun_output": output[-200:]}


class Submitter:
    """Writes, uploads and submits the parts of one run."""

    def __init__(
        self,
        state: BatchState,
        api: BatchClient,
        job: Job,
        limits: PartLimits,
        rows: Callable[[], Iterator[Prepared]],
        lines: Collector,
        check_stop: Callable[[], None],
        seen: Callable[[Part, dict[str, Any]], None],
    ) -> None:
        self.state, self.api, self.job, self.limits = state, api, job, limits
        self.rows, self.lines, self.check_stop, self.seen = rows, lines, check_stop, seen

    async def submit(self, mask: np.ndarray) -> list[Part]:
        """Put the rows of ``mask`` into new batches; the parts made. A row that
        cannot become a request is journaled as an error at once."""
        made: list[Part] = []
        writer: PartWriter | None = None
        try:
            for p in self.rows():
                if not mask[p.row]:
                    continue
                if p.error is not None:
                    self.lines.unanswered(p.error, [BatchRow(p.row, p.id, "", p.model)])
                    continue
                line = input_line(p.id, p.body)
                if writer is not None and (
                    len(writer.rows) >= self.limits.rows
                    or writer.size + len(line) > self.limits.bytes
                ):
                    made.append(await self._close(writer))
                    writer = None
                if writer is None:
                    self.check_stop()
                    writer = PartWriter(self.state, len(self.state.parts))
                writer.add(p, line)
            if writer is not None:
                made.append(await self._close(writer))
                writer = None
        finally:
            if writer is not None:
                writer.discard()
        return made

    async def _close(self, writer: PartWriter) -> Part:
        writer.close()
        self.state.keep_rows(writer.number, writer.rows)
        part = Part(writer.number, len(writer.rows), writer.size, started_at=time.time())
        self.state.parts.append(part)
        self.state.save()
        await self.submit_part(part, resuming=False, create=True)
        return part

    async def submit_part(self, part: Part, resuming: bool, create: bool) -> dict[str, Any] | None:
        """Upload ``part`` (unless it was) and make it a batch, unless the API has
        it already (``resuming``: a crash may have come after the batch existed).
        Without ``create`` (the switch-over came), a part that is no batch yet is
        given up: its rows are free again. The batch, or None."""
        state, api = self.state, self.api
        path = state.requests_path(part)
        tags = metadata(state.run_id, part.number, self.job)
        info = await api.find(tags, part.started_at - FIND_BACK_S) if resuming else None
        if info is None:
            if not create:
                part.lost = True
                state.save()
                remove_quietly(path)
                return None
            if part.file_id is None:
                if not path.exists():
                    self._rewrite(part)
                part.file_id = await api.upload(path)
                state.save()
            info = await api.create(part.file_id, tags)
        part.batch_id = str(info["id"])
        state.save()
        self.seen(part, info)
        remove_quietly(path)
        log.info(
            "%s batch %s: part %d, %d rows, %.1f MB",
            "found" if resuming else "submitted",
            part.batch_id,
            part.number,
            part.rows,
            part.size / 1e6,
            extra={"event": "batch_submitted", "batch_id": part.batch_id, "rows": part.rows},
        )
        return info

    def _rewrite(self, part: Part) -> None:
        """The request file of ``part`` again, from its rows (a crash came before its upload)."""
        rows = self.state.rows_of(part)
        mask = np.zeros(int(rows.max()) + 1 if len(rows) else 0, dtype=bool)
        mask[rows] = True
        writer = PartWriter(self.state, part.number)
        try:
            for p in self.rows():
                if p.row < len(mask) and mask[p.row]:
                    writer.add(p, input_line(p.id, p.body))
            writer.close()
        except BaseException:
            writer.discard()
            raise


async def cancel_earlier(api: BatchClient, earlier: BatchState, job: Job) -> None:
    """``--restart``: cancel the batches the discarded run left open (those whose
    id was not recorded are found by their metadata)."""
    cancelled = 0
    for part in earlier.live():
        batch_id = part.batch_id
        if batch_id is None and part.file_id is not None:
            tags = metadata(earlier.run_id, part.number, job)
            found = await api.find(tags, part.started_at - FIND_BACK_S)
            batch_id = found.get("id") if found else None
        if batch_id is not None:
            info = await api.cancel(batch_id)
            cancelled += info is not None and info.get("status") not in TERMINAL
    if cancelled:
        log.info(
            "--restart: cancelled %d open batches of run %s",
            cancelled,
            earlier.run_id,
            extra={"event": "batch_restart", "batches_cancelled": cancelled},
        )

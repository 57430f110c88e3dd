"""A batch's output and error lines → its rows' journal records.

Lines come in any order; each is mapped back to its row by ``custom_id`` (the
row id). An output line (``response.status_code`` 200) becomes the same record
an online answer would: the completion, usage, ``ok`` (or, for a structured
job, ``invalid`` when the answer does not fit the schema: a batch cannot ask
again). An error line becomes an ``error`` row with the API's message: a
``response`` with another status, or an ``error`` object. A request the batch
never ran (``batch_expired``, ``batch_cancelled``) is no result: the row stays
open, for the online path or for an error row naming why. Every record says
``tier = "batch"``; every server text passes through the client's redaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batchrun.batch_client import BatchClient
from batchrun.batch_state import Part
from batchrun.config import Job
from batchrun.engines.shell import Recorder
from batchrun.errors import BadResponse, InvalidAnswer
from batchrun.outputs import STATUS_NONE, Record
from batchrun.payload import Completion, parse_completion
from batchrun.prices import BATCH
from batchrun.structured import Structured

log = logging.getLogger("batchrun")

NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})
"""Error codes of a request the batch never ran."""


@dataclass(frozen=True)
class BatchRow:
    """What a batch's line needs of its row."""

    row: int
    id: str
    request_hash: str
    model: str | None


class Collector:
    """Journals a batch's lines, through the job's recorder (which counts them)."""

    def __init__(
        self,
        recorder: Recorder,
        retry: np.ndarray,
        client: BatchClient,
        job: Job,
        structured: Structured | None,
    ) -> None:
        self.recorder, self.client, self.job, self.structured = recorder, client, job, structured
        self.retry = retry
        """Rows --retry-failed sends again that nothing has answered yet in this run."""

    def take(self, path: Path, index: dict[str, BatchRow], started: int, finished: int) -> None:
        """Journal every line of the file ``path`` whose row has no result yet
        (``started``, ``finished``: when the batch was submitted and ended, epoch µs)."""
        status = self.recorder.status
        with path.open("rb") as fh:
            for raw in fh:
                try:
                    line = orjson.loads(raw)
                    row = index[line["custom_id"]]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s: a line that names no row of its batch", path.name)
                    continue
                if status[row.row] != STATUS_NONE and not self.retry[row.row]:
                    continue  # journaled already (a resume collecting again)
                rec = self.line_record(line, row)
                if rec is not None:
                    rec["started_at"], rec["finished_at"] = started, finished
                    self.recorder.tally.requests += 1
                    self.record(rec)

    def line_record(self, line: dict[str, Any], row: BatchRow) -> Record | None:
        """The journal record of one output or error line; None for a request the
        batch never ran."""
        response, error = line.get("response"), line.get("error")
        rec = self.result(row, 1, "error", None)
        code = response.get("status_code") if isinstance(response, dict) else None
        if isinstance(response, dict) and isinstance(code, int):
            rec["http_status"] = code
            if not 200 <= code < 300:
                body = orjson.dumps(response.get("body"))
                rec["error"] = str(self.client._status_error(code, body, None))
                return rec
            try:
                answer = self.client._redact_answer(parse_completion(response.get("body")))
            except BadResponse as exc:
                rec["error"] = f"HTTP {code}: {exc}"
                return rec
            return self.answered(rec, answer)
        kind = error.get("code") if isinstance(error, dict) else None
        if kind in NOT_RUN:
            return None
        message = error.get("message") if isinstance(error, dict) else None
        rec["error"] = self.client._redact(f"batch error {kind}: {message}")[:300]
        return rec

    def answered(self, rec: Record, answer: Completion) -> Record:
        """``rec`` holding ``answer`` (parsed and typed, for a structured job)."""
        rec["status"] = "ok"
        rec["response_model"] = answer.response_model
        rec["completion"] = answer.text
        rec["finish_reason"] = answer.finish_reason
        rec["prompt_tokens"] = answer.prompt_tokens
        rec["completion_tokens"] = answer.completion_tokens
        rec["total_tokens"] = answer.total_tokens
        rec["cached_tokens"] = answer.cached_tokens
        rec["reasoning_tokens"] = answer.reasoning_tokens
        rec["response_id"] = answer.response_id
        if answer.refusal is not None:
            rec["refusal"] = answer.refusal
        if answer.tool_calls is not None:
            rec["tool_calls"] = answer.tool_calls
        if self.structured is not None:
            try:
                rec["values"] = self.structured.parse(
                    answer.text, answer.finish_reason, self.job.max_tokens
                )
            except InvalidAnswer as exc:
                rec["status"], rec["error"] = "invalid", str(exc)
        return rec

    def result(self, row: BatchRow, attempts: int, status: str, error: str | None) -> Record:
        """A row's record from a batch (``attempts`` 1), or of a row no batch
        answered (0: nothing was paid, and ``tier`` is null)."""
        now = time.time_ns() // 1000
        rec: Record = {"row": row.row, "id": row.id, "status": status, "error": error}
        rec["model"] = row.model or self.job.model
        rec["attempts"] = attempts
        rec["request_hash"] = row.request_hash or None
        rec["started_at"] = rec["finished_at"] = now
        rec["tier"] = BATCH if attempts else None
        return rec

    def record(self, rec: Record) -> None:
        """Journal ``rec``; raise the stop it calls for (max_failures)."""
        self.retry[rec["row"]] = False
        stop = self.recorder.record(rec)
        if stop is not None:
            raise stop

    def unanswered(self, why: str, rows: list[BatchRow]) -> None:
        """An error row saying ``why`` for each of ``rows`` without a result."""
        status = self.recorder.status
        for row in rows:
            if status[row.row] == STATUS_NONE or self.retry[row.row]:
                self.record(self.result(row, 0, "error", why))


def why(part: Part, info: dict[str, Any], late: str | None) -> str:
    """Why a batch job's row has no answer from ``part`` (``late``: the deadline
    came, when batchrun cancelled it)."""
    name = f"batch {part.batch_id}"
    status = part.status
    if status == "failed":
        errors = (info.get("errors") or {}).get("data") or []
        what = "; ".join(str(e.get("message")) for e in errors[:3] if isinstance(e, dict))
        return f"{name} failed validation: {what or 'no reason given'}"
    if status == "expired":
        return f"{name} expired before answering this row"
    if status == "cancelled":
        return late or f"{name} was cancelled before answering this row"
    return f"{name} ended ({status}) without answering this row"


def ended_at(info: dict[str, Any]) -> int:
    """When the batch ended, epoch µs (now if it does not say)."""
    for name in ("completed_at", "cancelled_at", "expired_at", "failed_at", "finalizing_at"):
        value = info.get(name)
        if isinstance(value, (int, float)) and value > 0:
            return int(value * 1_000_000)
    return time.time_ns() // 1000

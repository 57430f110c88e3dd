"""What one row's requests add up to, put into its journal record."""

from __future__ import annotations

from batchrun.outputs import Record
from batchrun.payload import Completion


class RowTotals:
    """What one row's requests add up to: tokens summed over every request it
    made (re-asks were paid too; a count stays None while no answer gave it),
    the seconds its requests spent at the API, and the seconds it waited for
    the job's own limits and budget."""

    __slots__ = ("api_s", "cached", "completion", "prompt", "queued_s", "reasoning", "total")

    def __init__(self) -> None:
        self.prompt: int | None = None
        self.completion: int | None = None
        self.total: int | None = None
        self.cached: int | None = None
        self.reasoning: int | None = None
        self.api_s = 0.0
        self.queued_s = 0.0

    def add(self, c: Completion) -> None:
        if c.prompt_tokens is not None:
            self.prompt = (self.prompt or 0) + c.prompt_tokens
        if c.completion_tokens is not None:
            self.completion = (self.completion or 0) + c.completion_tokens
        if c.total_tokens is not None:
            self.total = (self.total or 0) + c.total_tokens
        if c.cached_tokens is not None:
            self.cached = (self.cached or 0) + c.cached_tokens
        if c.reasoning_tokens is not None:
            self.reasoning = (self.reasoning or 0) + c.reasoning_tokens

    def put(self, rec: Record) -> Record:
        """``rec`` with the row's usage, its API time and its wait for the job's own limits."""
        rec["latency_ms"] = self.api_s * 1000
        rec["queued_ms"] = self.queued_s * 1000
        rec["prompt_tokens"] = self.prompt
        rec["completion_tokens"] = self.completion
        rec["total_tokens"] = self.total
        rec["cached_tokens"] = self.cached
        rec["reasoning_tokens"] = self.reasoning
        return rec

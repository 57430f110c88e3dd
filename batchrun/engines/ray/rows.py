"""A row's way through a Ray sender, as the driver handles it: what leaves the
driver with the row, and what the driver does to its result before the journal.

- ``Handoff``: each row is made to carry the job's ways as they are now (the
  schema's dialect, whether ``stream_options`` is sent) and leaves with the
  placeholder text only: a ``pii`` row's mapping, and its request hash (made
  with the mapping), stay on the driver. Its result is restored here (the
  values put back, the hash of the body the sender sent), so no personal data
  and no mapping ever leave the driver. What the senders learn of the server
  (``Ways``: ``schema_via = "auto"``'s search, a refused ``stream_options``)
  comes back here, is kept for the resume as a local run keeps it, and goes to
  every sender.
- ``Results``: each result journaled and counted as a local run's scheduler
  does it: one failure watch over every sender's rows, the rows failed before
  the job's first answer held back (not journaled) until an answer comes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchrun.engines.shell import Recorder
from batchrun.errors import EveryRequestFails, JobStopped
from batchrun.failures import Failure, FailureWatch, HeldFailures
from batchrun.outputs import Record
from batchrun.payload import Prepared
from batchrun.schema_via import SchemaVia
from batchrun.stream_options import StreamOptions


@dataclass(frozen=True)
class Ways:
    """How the job's requests are written, as one part of the run knows it:
    ``schema_via = "auto"``'s state (``SchemaVia.state``; None when the job has
    no search) and ``stream_options``' (refused: why; accepted: an answer came
    while it was sent)."""

    schema_via: dict[str, Any] | None = None
    stream_options_refused: str | None = None
    stream_options_accepted: bool = False

    @classmethod
    def of(cls, via: SchemaVia | None, options: StreamOptions) -> Ways:
        return cls(
            via.state() if via is not None and via.auto else None,
            options.refused,
            options.accepted,
        )

    def apply(self, via: SchemaVia | None, options: StreamOptions) -> bool:
        """Take these ways up where they are further along; whether anything changed."""
        changed = False
        if via is not None and self.schema_via is not None:
            changed = via.adopt(self.schema_via)
        return options.adopt(self.stream_options_refused, self.stream_options_accepted) or changed


class Handoff:
    """The driver's side of each row's way through a sender (see the module
    docstring). ``via`` and ``options`` are the run's (``OpenRun``): what they
    learn is saved beside the journal and in the output's metadata."""

    def __init__(self, via: SchemaVia | None, options: StreamOptions) -> None:
        self.via = via
        self.options = options
        self.ways = Ways.of(via, options)
        self.version = 0
        """Goes up each time the ways change: a sender told an older one is told again."""

    @property
    def settled(self) -> bool:
        """Whether the ways are known for the whole job: no search under way, and
        the server has shown whether it takes ``stream_options``. Until then one
        sender sends (as the key probe), so the others start with the ways found."""
        return (self.via is None or self.via.settled) and self.options.settled

    def learn(self, ways: Ways | None) -> None:
        """What a sender's reply says of the ways (None: nothing new)."""
        if ways is not None and ways.apply(self.via, self.options):
            self.ways = Ways.of(self.via, self.options)
            self.version += 1

    def outbound(self, p: Prepared) -> Prepared:
        """Row ``p`` (kept by the driver as it is) as it leaves for a sender: the
        ways as they are now, and without its pii mapping and request hash."""
        if self.via is not None:
            self.via.render(p)
        self.options.render(p)
        if p.pii is None:
            return p
        return dataclasses.replace(p, pii=None, request_hash="")

    def inbound(self, p: Prepared, rec: Record, body: bytes | None) -> None:
        """Row ``p``'s result as it comes back: ``body``, the body the sender
        sent when it changed the row's (a move of the search, a dropped field),
        makes the record's request hash; a pii row's values are put back."""
        if body is not None:
            p.body = body
            p.request_hash = p.rehash(body)
        if body is not None or p.pii is not None:
            rec["request_hash"] = p.request_hash or None
        if p.pii is None:
            return
        if rec["status"] == "error":
            rec["pii_found"] = p.pii.found  # the error keeps the placeholders, as locally
        else:
            p.pii.restore(rec)


class Results:
    """Each result journaled and counted as a local run's scheduler does it
    (``Scheduler._record``): one failure watch over every sender's rows, in
    the order their results arrive. A row that failed before the job's first
    answer is held back, not journaled, until an answer comes (or the run ends
    without a stop): a job the watch stops records none of them, so the rerun
    sends them. ``halt`` stops the job (``now``: at once)."""

    def __init__(
        self, recorder: Recorder, watch: FailureWatch, halt: Callable[[JobStopped, bool], None]
    ) -> None:
        self.recorder = recorder
        self.watch = watch
        self.halt = halt
        self.held = HeldFailures(self._write)
        self.verdict: EveryRequestFails | None = None

    def take(self, rec: Record, failure: Failure | None) -> None:
        """One row's result (``failure``: the row's, when the watch counts it)."""
        watch = self.watch
        failed = rec["status"] == "error" and bool(rec.get("attempts"))
        if not failed and rec.get("attempts"):
            watch.answer()
        if failed and not watch.answered and self.verdict is not None:
            return  # after the watch's stop, as the requests a local run abandons: the rerun sends it
        if failed and not watch.answered and self.held.holding:
            self.held.hold(rec)
        else:
            self.held.release()
            self._write(rec)
        if failure is not None and self.verdict is None:
            self.verdict = watch.count(failure)
            if self.verdict is not None:
                self.held.drop()
                self.halt(self.verdict, True)

    def _write(self, rec: Record) -> None:
        too_many = self.recorder.record(rec)
        if too_many is not None:
            self.halt(too_many, True)

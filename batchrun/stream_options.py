"""Whether a streamed job's requests carry ``stream_options`` (:class:`StreamOptions`).

``stream_options: {"include_usage": true}`` asks an OpenAI-style server for a
usage event at the end of a stream. Not every server knows the field (LLMTune's
guide does not list it), and a strict one refuses the request with a 400 naming
it. On such a refusal batchrun drops the field for the rest of the job: the row
is sent again without it (the refused request is in its ``attempts``, not a
failure), a log line and the summary say so, and the choice is kept beside the
journal and in the output's metadata (:mod:`batchrun.kept`), so a resume,
``--retry-failed`` or ``--reuse`` sends the same bodies. Without the field, usage
comes only where the server sends it unasked; rows without it are counted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from batchrun.config import Job
from batchrun.errors import FatalRequestError, RequestError
from batchrun.kept import read_kept, save_kept, state_file
from batchrun.payload import Completion, Prepared, encode_body

log = logging.getLogger("batchrun")

KEPT = "stream_options"
STATE_FILE = state_file(KEPT)
"""Beside the journal, once the server refused the field: ``{"sent": false, "refused": why}``."""

_REFUSING_STATUSES = frozenset({400, 422})
# As for schema_via, the text of an error decides here, and only this: among
# 400/422 answers, only the text tells "this server does not know the field"
# from any other refusal. Retries and row errors are still decided by status.
_NAMES_THE_FIELD = re.compile(r"stream_options", re.I)
_IN_BODY = b'"stream_options":'

Ask = Callable[[], Awaitable[tuple[Completion, int]]]


class StreamOptions:
    """Whether a streamed job still sends ``stream_options``; see the module docstring."""

    def __init__(
        self, job: Job, kept: dict[str, Any] | None = None, folder: Path | None = None
    ) -> None:
        self.folder = folder
        self.asked = job.stream
        refused = kept.get("refused") if kept and kept.get("sent") is False else None
        self.refused: str | None = str(refused) if refused is not None and job.stream else None
        self.accepted = False
        """An answer came while the field was sent: the server takes it (or the
        rows do not carry it, as an OpenAI batch input's bodies may not)."""

    @classmethod
    def open(cls, job: Job, folder: Path, earlier: Sequence[Path] = ()) -> StreamOptions:
        """The job's choice, resumed from ``folder`` (the journal's), else from
        the first of the ``earlier`` outputs that recorded one."""
        options = cls(job, read_kept(KEPT, folder, earlier) if job.stream else None, folder)
        if options.refused is not None:
            options._save()
        return options

    @property
    def sent(self) -> bool:
        return self.asked and self.refused is None

    @property
    def settled(self) -> bool:
        """Whether the server has shown how it takes the field (or it is not sent)."""
        return not self.sent or self.accepted

    def adopt(self, refused: str | None, accepted: bool) -> bool:
        """What another part of this run learned (a Ray sender): a refusal drops
        the field here too, kept as one seen here would be (it was logged where
        it was seen). Returns whether anything changed."""
        changed = accepted and not self.accepted
        self.accepted = self.accepted or accepted
        if refused is not None and self.refused is None and self.asked:
            self.refused = refused
            self._save()
            changed = True
        return changed

    def state(self) -> dict[str, Any] | None:
        """What is kept (beside the journal, in the output's metadata); None while sent."""
        return None if self.refused is None else {"sent": False, "refused": self.refused}

    # ---- the body --------------------------------------------------------------

    def render(self, p: Prepared) -> Prepared:
        """``p`` without ``stream_options`` once it is dropped: the body (and
        hash) a row prepared without it would have."""
        if self.refused is None or _IN_BODY not in p.body:
            return p
        body = orjson.loads(p.body)
        if "stream_options" in body:
            del body["stream_options"]
            p.body = encode_body(body)
            p.request_hash = p.rehash(p.body)  # a pii row's hash holds its values too
        return p

    def rendered(self, rows: Iterator[Prepared]) -> Iterator[Prepared]:
        """``rows`` as this job sends them (see :meth:`render`)."""
        if not self.asked:
            return rows
        return (self.render(p) for p in rows)

    # ---- sending ------------------------------------------------------------

    async def ask(self, p: Prepared, ask: Ask) -> tuple[Completion, int]:
        """``ask()`` (row ``p``'s request through the retry policy). A 400 or 422
        naming ``stream_options`` to a body that carried it drops the field (for
        every row from now on) and asks again; the refused requests are added to
        the attempts, as they are to a RequestError's."""
        spent = 0
        while True:
            self.render(p)
            try:
                completion, attempts = await ask()
            except FatalRequestError as exc:
                if not (_refuses_the_field(exc) and _carries(p.body)):
                    exc.attempts += spent
                    raise
                spent += exc.attempts
                self._drop(str(exc))  # and the next render takes it out of this body too
                continue
            except RequestError as exc:
                exc.attempts += spent
                raise
            if self.refused is None:
                self.accepted = True
            return completion, attempts + spent

    def _drop(self, why: str) -> None:
        if self.refused is not None:
            return  # another row's refusal came first
        self.refused = why[:200]
        log.warning(
            "the server refuses stream_options (%s): sending streamed requests without "
            "stream_options for the rest of the job; usage then comes only where the server "
            "sends it unasked",
            self.refused,
            extra={"event": "stream_options", "refused": self.refused},
        )
        self._save()

    def _save(self) -> None:
        state = self.state()
        if state is not None:
            save_kept(KEPT, self.folder, state)


def _carries(body: bytes) -> bool:
    """Whether a request body has ``stream_options`` (at its top level)."""
    if _IN_BODY not in body:
        return False
    request = orjson.loads(body)
    return isinstance(request, dict) and "stream_options" in request


def _refuses_the_field(exc: RequestError) -> bool:
    return exc.status in _REFUSING_STATUSES and bool(_NAMES_THE_FIELD.search(str(exc)))

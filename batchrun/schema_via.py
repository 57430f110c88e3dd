"""How a structured job's requests carry the schema: the ``schema_via`` key, and
``auto``'s search for a way the server takes (:class:`SchemaVia`).

======================  ==============================================================
dialect                 the request carries
======================  ==============================================================
``json_schema``         ``response_format: {"type": "json_schema", "json_schema": ...}`` (OpenAI)
``json_object_schema``  ``response_format: {"type": "json_object", "schema": ...}`` (llama.cpp)
``vllm``                ``structured_outputs: {"json": ...}`` (vLLM; it replaced ``guided_json``)
``prompt``              the schema at the end of the system prompt; no server-side constraint
======================  ==============================================================

``structured.Structured.carry`` writes each form; this module decides which one a
request gets, re-renders a prepared request when the choice changes, and keeps
the choice for the resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from batchrun.config import SCHEMA_DIALECTS, Job
from batchrun.errors import RequestError, SchemaRejected
from batchrun.kept import read_kept, save_kept, state_file
from batchrun.payload import (
    AFTER_SCHEMA,
    Completion,
    Prepared,
    encode_body,
    prompt_sizes,
)
from batchrun.structured import Structured

log = logging.getLogger("batchrun")

KEPT = "schema_via"
STATE_FILE = state_file(KEPT)
"""Beside the journal: the way ``auto`` settled on (or is trying), kept for the
resume (see :mod:`batchrun.kept`)."""

CONSTRAINING = frozenset({"json_schema", "json_object_schema", "vllm"})
"""Dialects that ask the server to hold its answer to the schema."""

_REFUSING_STATUSES = frozenset({400, 422, 500})
# The one place where an error's text decides something: among 400/422/500
# answers, only the text tells "this server does not take the schema this way"
# from any other refusal. It only ever chooses the next dialect; retries and
# row errors are still decided by type and status code.
_NAMES_THE_FORMAT = re.compile(
    r"response_format|json_schema|json_object|schema|grammar|guided|structured_output", re.I
)
_FENCE_OPENING = re.compile(r"^```[A-Za-z0-9_-]*\s*")

Attempt = Callable[[], Awaitable[Completion]]
Send = Callable[[Attempt], Awaitable[tuple[Completion, int]]]


class SchemaVia:
    """The way a structured job's requests carry the schema (``schema_via``), and
    ``auto``'s search for one the server takes.

    ``auto`` starts with the way kept for this output (see :meth:`open`), else
    with ``json_schema``. While it searches, rows are sent one at a time; a row
    whose request is refused for its format (a 400, 422 or 500 whose text names
    it) or whose answer ignores it (not JSON at all, from a dialect that
    constrains) is sent again the next way, and so on down the list to
    ``prompt``. The first answer that is JSON settles it. Each move is logged,
    kept in ``STATE_FILE`` beside the journal (so a resume sends the same
    bodies) and, at the end, in the output's metadata.
    """

    def __init__(
        self,
        structured: Structured,
        mode: str,
        kept: Mapping[str, Any] | None = None,
        folder: Path | None = None,
    ) -> None:
        self.structured = structured
        self.folder = folder
        self.auto = mode == "auto" and structured.format == "json_schema"
        self.refused: dict[str, str] = {}
        self._lock = asyncio.Lock()
        if structured.format != "json_schema":
            self.current: str | None = None
            self.tried: list[str] = []
        elif not self.auto:
            self.current, self.tried = mode, [mode]
        elif kept is not None and _well_formed(kept):
            self.current = kept["schema_via"]
            self.tried = list(kept["tried"])
            self.refused = dict(kept.get("refused") or {})
        else:
            kept = None  # none, or not one this version wrote: search from the start
            self.current, self.tried = SCHEMA_DIALECTS[0], [SCHEMA_DIALECTS[0]]
        self.settled = (
            not self.auto
            or self.current == SCHEMA_DIALECTS[-1]
            or bool(kept is not None and kept.get("settled"))
        )

    @classmethod
    def open(
        cls,
        structured: Structured,
        job: Job,
        folder: Path,
        earlier: Sequence[Path] = (),
    ) -> SchemaVia:
        """The job's way, resumed from ``folder`` (the journal's), else from the
        first of the ``earlier`` outputs (this output when finished, then the
        ``--reuse`` ones) whose metadata recorded one."""
        if job.schema_via != "auto":
            return cls(structured, job.schema_via)
        via = cls(structured, job.schema_via, read_kept(KEPT, folder, earlier), folder)
        if via.auto:
            via._save()
        return via

    # ---- the body -------------------------------------------------------------

    def shape(self, body: dict[str, Any]) -> str | None:
        """Put the schema into ``body`` the current way (``payload.Shape``)."""
        self.structured.carry(body, self.current)
        return self.current

    def render(self, p: Prepared) -> None:
        """Make ``p`` carry the schema the current way, if it does not already:
        body, hash and prompt estimates. The bytes are those a row prepared that
        way from the start would have."""
        dialect = self.current
        if dialect is None or p.schema_via in (dialect, None) or not p.body:
            return
        p.body = self._body(p, dialect)
        p.request_hash = p.rehash(p.body)
        p.schema_via = dialect
        if p.prompt_bound:
            messages = orjson.loads(p.body)["messages"]
            p.prompt_tokens, p.prompt_bound = prompt_sizes(messages)

    def _body(self, p: Prepared, dialect: str) -> bytes:
        body = orjson.loads(p.body)
        self.structured.uncarry(body, p.schema_via)
        tail = {k: body.pop(k) for k in AFTER_SCHEMA if k in body}
        self.structured.carry(body, dialect)
        body.update(tail)
        return encode_body(body)

    def other_hashes(self, p: Prepared) -> Iterator[str]:
        """The hashes of ``p``'s request the other ways tried for this output
        (rows finished before ``auto`` moved on were sent one of those ways)."""
        for dialect in self.tried:
            if dialect != p.schema_via and p.body and p.schema_via is not None:
                yield p.rehash(self._body(p, dialect))

    # ---- sending -------------------------------------------------------------

    async def ask(
        self, p: Prepared, attempt: Attempt, send: Send, paid: Callable[[Completion], None]
    ) -> tuple[Completion, int]:
        """One ask for row ``p``: ``send(attempt)`` (the retry policy around one
        request), the current way. While ``auto`` searches, a refusal or an
        answer that ignores the format moves the search on and the row is asked
        again the next way; those requests are not counted against
        ``max_attempts``, an ignored answer's usage goes to ``paid``. Returns the
        answer and every request made; a RequestError's ``attempts`` counts them too."""
        if p.schema_via is None:  # a body sent as it is (OpenAI batch input): nothing to change
            return await send(attempt)
        spent = 0
        # The row keeps its turn until its way is settled: no other row slips in
        # between a refusal and the next way's first answer.
        async with self._turn():
            while True:
                self.render(p)
                searching = not self.settled
                way = p.schema_via
                try:
                    completion, attempts = await send(
                        self._refusals(attempt) if searching else attempt
                    )
                except SchemaRejected as exc:
                    spent += exc.attempts
                    self._move_on(way, str(exc))
                    continue
                except RequestError as exc:
                    exc.attempts += spent
                    raise
                if searching and _ignores(way, completion.text):
                    paid(completion)
                    spent += attempts
                    self._move_on(way, f"answered without it: {(completion.text or '')[:60]!r}")
                    continue
                if searching:
                    self._settle(way)
                return completion, attempts + spent

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """One row at a time while searching; no wait once settled."""
        if self.settled:
            yield
            return
        await self._lock.acquire()
        if self.settled:  # settled while this row waited: it goes as the others do
            self._lock.release()
            yield
            return
        try:
            yield
        finally:
            self._lock.release()

    @staticmethod
    def _refusals(attempt: Attempt) -> Attempt:
        """``attempt``, with a refusal of the format raised as SchemaRejected
        (not retried: the next way is tried instead)."""

        async def guarded() -> Completion:
            try:
                return await attempt()
            except RequestError as exc:
                if exc.status in _REFUSING_STATUSES and _NAMES_THE_FORMAT.search(str(exc)):
                    raise SchemaRejected(str(exc), exc.status) from exc
                raise

        return guarded

    def _move_on(self, way: str | None, why: str) -> None:
        if self.settled or way != self.current or way is None:
            return  # another row moved on already
        following = SCHEMA_DIALECTS[SCHEMA_DIALECTS.index(way) + 1]
        self.refused[way] = why[:200]
        self.current = following
        self.tried.append(following)
        # prompt is the last way: nothing to judge it against, its answers are validated as any.
        self.settled = following == SCHEMA_DIALECTS[-1]
        log.warning(
            "structured outputs: the server does not take the schema via %s (%s); sending it via %s",
            way,
            why[:200],
            following,
            extra={
                "event": "schema_via",
                "refused": way,
                "reason": why[:200],
                "schema_via": following,
            },
        )
        self._save()

    def _settle(self, way: str | None) -> None:
        self.settled = True
        log.info(
            "structured outputs: the server takes the schema via %s",
            way,
            extra={"event": "schema_via", "schema_via": way},
        )
        self._save()

    # ---- what is kept ------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What is kept for the resume (``STATE_FILE``) and in the output's metadata."""
        return {
            "schema_via": self.current,
            "tried": list(self.tried),
            "settled": self.settled,
            "refused": dict(self.refused),
        }

    def adopt(self, state: Mapping[str, Any]) -> bool:
        """Take up ``auto``'s search where another part of this run has got to
        (a Ray sender: its ``state()``), when that is further along; kept as a
        move made here would be (the move was logged where it was made).
        Returns whether anything changed."""
        if not self.auto or not _well_formed(state):
            return False
        tried, settled = list(state["tried"]), bool(state.get("settled"))
        if len(tried) < len(self.tried) or (
            len(tried) == len(self.tried) and (self.settled or not settled)
        ):
            return False
        self.current, self.tried = state["schema_via"], tried
        self.refused = dict(state.get("refused") or {})
        self.settled = settled or self.current == SCHEMA_DIALECTS[-1]
        self._save()
        return True

    def _save(self) -> None:
        if self.auto:
            save_kept(KEPT, self.folder, self.state())


def _well_formed(kept: Mapping[str, Any]) -> bool:
    tried = kept.get("tried")
    return (
        isinstance(tried, list)
        and bool(tried)
        and tried == list(SCHEMA_DIALECTS[: len(tried)])
        and kept.get("schema_via") == tried[-1]
    )


def _ignores(way: str | None, text: str | None) -> bool:
    """Whether an answer shows the server ignored a dialect that constrains:
    text that does not even open a JSON object (an answer cut off inside one
    does). An empty answer shows nothing."""
    if way not in CONSTRAINING or not text or not text.strip():
        return False
    return not _FENCE_OPENING.sub("", text.lstrip(), count=1).startswith("{")

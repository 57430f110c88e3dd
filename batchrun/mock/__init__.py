"""Embedded OpenAI-compatible chat-completions endpoint for the demo, tests and benchmarks.

The server answers every valid request with a deterministic "extractive summary" of the
last user message (or, for a ``response_format``, an instance of the schema) and honest
token counts, and can inject faults (rate limits, 5xx, hangs, dropped connections,
broken bodies, cut streams) and the other answers real servers give (no content,
content parts, refusals, tool calls, streams that end early or are not OpenAI
chunks) at a configurable rate.

Endpoints (``/_stats`` and ``/_reset`` are outside ``/v1`` on purpose: they are test
controls, not part of the API being imitated):

* ``POST /v1/chat/completions``
* ``POST /v1/models/{model_id}/inference`` (``model_id`` may contain slashes)
* ``GET /_stats`` — :class:`MockStats` as JSON
* ``POST /_reset`` — zero the stats (this also re-arms ``fail_first`` and restarts the
  per-body retry counters, i.e. the server behaves as if freshly started)

Where each part lives:

* :mod:`.config` — :class:`MockConfig` and its validation (each field carries its
  ``batchrun mock-server`` flag), the fault and invalid kinds, :class:`MockStats`;
* :mod:`.answers` — token counts, the text answer, the structured answers (spoiled or
  fenced);
* :mod:`.instance` — the JSON-Schema instance generator behind the structured answers;
* :mod:`.server` — request validation, the aiohttp handlers, :func:`serve` and
  :func:`serve_forever` (with the ready file).

Run standalone with ``python -m batchrun.mock --port 8000``, the same as ``batchrun
mock-server --port 8000`` (see :func:`serve_forever`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batchrun.mock.config import (
    ANSWER_KINDS,
    FAULT_KINDS,
    FAULT_KINDS_DEFAULT,
    INVALID_KINDS,
    MockConfig,
    MockStats,
)

if TYPE_CHECKING:
    from batchrun.mock.answers import count_tokens
    from batchrun.mock.server import MockServer, create_app, serve, serve_forever

__all__ = [
    "ANSWER_KINDS",
    "FAULT_KINDS",
    "FAULT_KINDS_DEFAULT",
    "INVALID_KINDS",
    "MockConfig",
    "MockServer",
    "MockStats",
    "count_tokens",
    "create_app",
    "serve",
    "serve_forever",
]

# Imported on first use: the CLI reads MockConfig to build mock-server's flags, and
# `batchrun --help` must not import aiohttp.
_LAZY: dict[str, str] = {
    "count_tokens": "batchrun.mock.answers",
    "MockServer": "batchrun.mock.server",
    "create_app": "batchrun.mock.server",
    "serve": "batchrun.mock.server",
    "serve_forever": "batchrun.mock.server",
}


def __getattr__(name: str) -> Any:
    """Import the module of a name of :data:`_LAZY` on first use, and keep the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

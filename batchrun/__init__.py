"""batchrun: a batch job runner for OpenAI-compatible chat-completion APIs.

``batchrun.run(...)`` / ``await batchrun.arun(...)`` run a job from Python and
return its output as a pandas DataFrame; every error a bad job raises is a
``batchrun.BatchrunError``. The heavy modules load on first use, so importing
batchrun (and ``batchrun --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchrun._version import __version__
from batchrun.errors import BatchrunError

__all__ = ["BatchrunError", "__version__", "arun", "run"]

if TYPE_CHECKING:
    from batchrun.api import arun, run


def __getattr__(name: str) -> Any:
    if name in ("run", "arun"):
        from batchrun import api

        return getattr(api, name)
    raise AttributeError(f"module 'batchrun' has no attribute {name!r}")

"""batchrun: a batch job runner for OpenAI-compatible chat-completion APIs."""

from __future__ import annotations

__version__ = "0.1.0"

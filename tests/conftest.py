"""Shared fixtures: an isolated environment and the embedded endpoint on 127.0.0.1."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from batchrun.mock import MockConfig, MockServer, serve

REPO = Path(__file__).resolve().parent.parent
SAMPLE_JSONL = REPO / "sample_data" / "tickets.jsonl"
SAMPLE_PARQUET = REPO / "sample_data" / "tickets.parquet"
TEST_KEY = "sk-test-0123456789abcdef-secret"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test sees a real key or writes outside its temp dir."""
    for name in list(os.environ):
        if name.endswith("_API_KEY"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(autouse=True)
def restore_batchrun_logger() -> Iterator[None]:
    """The CLI configures the `batchrun` logger for its process; in-process CLI
    runs must not leave that (or open log files) to the next test."""
    logger = logging.getLogger("batchrun")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LLMTUNE_API_KEY", TEST_KEY)
    return TEST_KEY


@pytest.fixture
async def endpoint() -> AsyncIterator[MockServer]:
    """The embedded endpoint, requiring TEST_KEY."""
    async with serve(MockConfig(api_key=TEST_KEY)) as server:
        yield server


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def tickets(n: int) -> list[dict[str, object]]:
    """``n`` small tickets with ids T-0000 … (distinct bodies, so distinct requests)."""
    return [
        {
            "id": f"T-{i:04d}",
            "customer": f"Customer {i}",
            "ticket": f"Ticket number {i} is broken. Please fix it soon. Thanks.",
        }
        for i in range(n)
    ]

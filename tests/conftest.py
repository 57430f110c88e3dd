"""Shared fixtures: an isolated environment and the embedded endpoint on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aioresponses import aioresponses
from aioresponses import core as aioresponses_core
from click.testing import CliRunner, Result
from yarl import URL

from batchrun.cli import main
from batchrun.config import Job, load_job
from batchrun.mock import MockConfig, MockServer, serve

REPO = Path(__file__).resolve().parent.parent
SAMPLE_JSONL = REPO / "sample_data" / "tickets.jsonl"
SAMPLE_PARQUET = REPO / "sample_data" / "tickets.parquet"
TEST_KEY = "sk-test-0123456789abcdef-secret"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``real`` start llama.cpp's server and take minutes: they run
    only when the marker expression names them (``make test-real``, ``pytest -m real``)."""
    if "real" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="needs a real server: run `make test-real` (or pytest -m real)")
    for item in items:
        if item.get_closest_marker("real") is not None:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def local_ray() -> Iterator[Any]:
    """Ray on this machine with two CPUs (two row senders), once for every test
    that asks (it takes ~10 s to start). Its workers import this checkout's
    batchrun, wherever another one is installed."""
    ray = pytest.importorskip("ray")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LLMTUNE_API_KEY", TEST_KEY)
    return TEST_KEY


@pytest.fixture
async def endpoint() -> AsyncIterator[MockServer]:
    """The embedded endpoint, requiring TEST_KEY."""
    async with serve(MockConfig(api_key=TEST_KEY)) as server:
        yield server


class FakeSleep:
    """Stands in for asyncio.sleep in the retry policy: records each wait, waits not."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


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


def make_job(
    base_url: str | None = None,
    input: str | Path = "in.jsonl",
    output: str | Path | None = None,
    **keys: Any,
) -> Job:
    """A checked Job from overrides alone: shared defaults (a model, a prompt over the
    ``ticket`` column, no API key variable, a 5 s request timeout) with ``keys`` laid
    over them. A key given as None is not given, as in load_job: the Job default applies."""
    values: dict[str, Any] = {
        "input": str(input),
        "output": None if output is None else str(output),
        "model": "test-model",
        "base_url": base_url,
        "api_key_env": "",
        "prompt_template": "Summarize: {ticket}",
        "request_timeout_s": 5.0,
    }
    return load_job(None, values | keys)


# ---- aioresponses with aiohttp 3.14 ----------------------------------------------------


class _CompatResponse(aiohttp.ClientResponse):
    """aiohttp 3.14 made ``stream_writer`` a required argument of ClientResponse,
    which aioresponses 0.7.9 does not pass (pnuckowski/aioresponses#289). The
    mocked response is already "sent", so a writer reporting 0 bytes is enough."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        if _NEEDS_STREAM_WRITER:
            kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


_NEEDS_STREAM_WRITER = (
    "stream_writer" in inspect.signature(aiohttp.ClientResponse.__init__).parameters
)


@pytest.fixture
def mocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    monkeypatch.setattr(aioresponses_core, "ClientResponse", _CompatResponse)
    with aioresponses() as m:
        yield m


# ---- a server in a background thread (for the CLI, which runs its own loop) ------------


class ThreadedServer:
    """Runs an async-context-manager server in a thread with its own event loop."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory
        self.server: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="test-endpoint", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.factory() as server:
            self.server = server
            self._ready.set()
            await self._stop.wait()

    def start(self) -> Any:
        self._thread.start()
        assert self._ready.wait(10), "the endpoint did not start"
        if self._error is not None:
            raise self._error
        return self.server

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def threaded() -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """start(factory) → the running server; every server is stopped at teardown."""
    started: list[ThreadedServer] = []

    def start(factory: Callable[[], Any]) -> Any:
        ts = ThreadedServer(factory)
        started.append(ts)
        return ts.start()

    yield start
    for ts in started:
        ts.stop()


# ---- aiohttp apps and the CLI ---------------------------------------------------------


@contextlib.asynccontextmanager
async def run_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1; yield its base URL (…/v1)."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


def port_of(base_url: str) -> int:
    """The port of a base URL on 127.0.0.1: a rerun against another server on the
    same address counts as the same endpoint (a different base URL would not)."""
    return int(URL(base_url).port or 0)


def invoke(*args: str) -> Result:
    """``batchrun run ARGS`` in this process."""
    return CliRunner().invoke(main, ["run", *args], catch_exceptions=True)


def assert_exit(result: Result, code: int) -> None:
    assert result.exit_code == code, (
        f"exit {result.exit_code}, expected {code}\n{result.output}\n{result.exception!r}"
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )

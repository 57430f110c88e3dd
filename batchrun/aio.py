"""The event loop every batchrun process runs on: uvloop's when it is installed
(measurably faster on the hot path), else asyncio's. Used by the CLI, both
engines and the embedded endpoint. And a line of waiting tasks (``wait_in_line``,
``wake_first``), the one way batchrun's limits hand a place to the next task."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (asyncio's default loop)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to the end on a new loop of :func:`loop_factory`."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)


Line = deque[asyncio.Future[None]]
"""Tasks waiting their turn, first come first served."""


async def wait_in_line(line: Line, pass_on: Callable[[], None]) -> None:
    """Wait at the end of ``line`` until ``wake_first`` wakes this task. A task
    cancelled after its wake-up calls ``pass_on`` so that the wake-up is not lost;
    one cancelled before leaves the line."""
    waiter = asyncio.get_running_loop().create_future()
    line.append(waiter)
    try:
        await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled():
            pass_on()
        else:
            with contextlib.suppress(ValueError):
                line.remove(waiter)
        raise


def wake_first(line: Line) -> bool:
    """Wake the first task still waiting in ``line``; False when none is."""
    while line:
        waiter = line.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return True
    return False

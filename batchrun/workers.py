"""The scheduler's pool of workers, kept full while rows wait to retry.

``size`` workers take rows off the queue, one row at a time each: ``size``
places, and at most ``size`` requests in flight. A row that must wait before its
next attempt (a lone 429's Retry-After, a 503's backoff) would hold its place
for the whole wait, idle: with 5% of answers refused and a 1 s Retry-After,
most of a 64-worker pool sleeps. So the row lends its place to a stand-in
worker while it waits (``rest``), and takes a place back when its wait is over:
the next worker to finish a row hands its place over and ends.

At most ``size`` rows wait so at once (more wait holding their place, as
before), so memory stays bounded whatever the input. The job's own limits (the
pause, rpm, tpm) are waited out holding the place: only a row's own retry wait
lends it, and only while ``lends()`` says the row holds nothing that other rows
wait for (``schema_via = "auto"``'s search keeps one row's turn across its
retries: a stand-in's row would wait for it while holding the place it needs
back). Nothing here runs on the hot path but one deque check per row.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from batchrun.aio import Line, wait_in_line, wake_first


class Workers:
    """``size`` places for rows being sent. ``work`` is a worker's loop: it
    calls ``leave`` and ends when there are no more rows, or before taking a
    row when ``waiting`` holds a row back from its wait (which takes the place)."""

    def __init__(
        self,
        size: int,
        work: Callable[[], Coroutine[Any, Any, None]],
        sleep: Callable[[float], Awaitable[None]],
        lends: Callable[[], bool] = lambda: True,
    ) -> None:
        self.size = size
        self._work = work
        self._sleep = sleep
        self._lends = lends
        self.tasks: set[asyncio.Task[None]] = set()
        self._group: asyncio.TaskGroup | None = None
        self._resting = 0  # rows waiting to retry whose place a stand-in took
        self.waiting: Line = deque()  # rows back from their wait, for a place
        self._spare = 0  # places no worker holds (their workers ended: no more rows)

    def start(self, group: asyncio.TaskGroup) -> None:
        self._group = group
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        assert self._group is not None
        task = self._group.create_task(self._work())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    async def rest(self, seconds: float) -> None:
        """A row's wait before its next attempt, its place lent to a stand-in
        worker meanwhile; returns once the row holds a place again."""
        if self._resting >= self.size or self._group is None or not self._lends():
            await self._sleep(seconds)
            return
        try:
            self._spawn()
        except RuntimeError:  # the task group is ending (an error): no new workers
            await self._sleep(seconds)
            return
        self._resting += 1
        try:
            await self._sleep(seconds)
            await self._take_place()
        finally:
            self._resting -= 1

    async def _take_place(self) -> None:
        if self._spare:
            self._spare -= 1
        else:
            # A worker that ends hands its place over; a row cancelled after it
            # got one (the job stopping) passes it on.
            await wait_in_line(self.waiting, self.leave)

    def leave(self) -> None:
        """A worker ends: its place goes to the first row back from its wait,
        else stays spare for the next one."""
        if not wake_first(self.waiting):
            self._spare += 1

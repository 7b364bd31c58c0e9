"""A client process's side of the parent's signals: report ready, wait for go, notice stop.

The events are polled rather than waited on in a thread: a thread blocked in Event.wait() would keep
asyncio.run() from returning if the client failed before the parent signalled, and hang the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

READY = "ready"
GO_POLL_SECONDS = 0.001  # the load should start together in every process
STOP_POLL_SECONDS = 0.01  # stopping late only adds events after the window, which are discarded


async def _until(condition: Callable[[], bool], interval: float) -> None:
    while not condition():
        await asyncio.sleep(interval)


class Gate:
    def __init__(self, conn: Connection, go: Event, stop: Event) -> None:
        self._conn = conn
        self._go = go
        self._stop = stop
        self._watcher: asyncio.Task[None] | None = None  # held: the loop keeps only weak references to tasks
        self.stopping = False
        """Becomes True once the parent says stop; load loops check it between operations."""

    async def ready(self) -> None:
        """Tell the parent this process is prepared; return when it says go, then watch for stop."""
        self._conn.send(READY)
        await _until(self._go.is_set, GO_POLL_SECONDS)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        await _until(self._stop.is_set, STOP_POLL_SECONDS)
        self.stopping = True

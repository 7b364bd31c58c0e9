"""Keeps an eye on the state store's reachability; the server's health follows it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from cellstream.service.errors import CellstreamError
from cellstream.service.sessions.base import SessionStore

log = logging.getLogger(__name__)


class StoreWatch:
    """Pings the store every `interval` seconds and calls `on_change(reachable)` when that flips."""

    def __init__(self, store: SessionStore, interval: float, on_change: Callable[[bool], Awaitable[None]]) -> None:
        self._store = store
        self._interval = interval
        self._on_change = on_change
        self._reachable: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Probe once now (so health is right from the start), then keep probing in the background."""
        await self._probe()
        self._task = asyncio.get_running_loop().create_task(self._forever(), name="store-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._probe()

    async def _probe(self) -> None:
        try:
            await self._store.ping()
            reachable = True
        except CellstreamError as exc:
            reachable = False
            if self._reachable is not False:
                log.error("%s; health reports NOT_SERVING until it is back", exc.message)
        if reachable == self._reachable:
            return
        if reachable and self._reachable is False:
            log.warning("session store reachable again; health reports SERVING")
        self._reachable = reachable
        await self._on_change(reachable)

"""The shape every multiplexed stream (StreamMany, GenerateMany) shares: read messages of many items,
send their outcomes as they complete, as few messages as possible.

Outcomes are filed as they complete (by the batcher, through a step group's `on_done`, or by a chat turn's
task), and the writer sends everything filed since its previous message as one message. The batcher
completes a whole batch without yielding to the event loop, so the outcomes of one batch always
travel together.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import grpc

from cellstream.service.dataplane import REPLY_FRAMING_BYTES

Entry = TypeVar("Entry")
Message = TypeVar("Message")
Reply = TypeVar("Reply")


class Outbox(Generic[Entry]):
    def __init__(self) -> None:
        self._ready: list[Entry] = []
        self._wake = asyncio.Event()
        self.pending = 0
        """Items admitted whose final outcome is not filed yet: the stream ends only when none are left."""

    def file(self, entry: Entry, final: bool = True) -> None:
        """Add an outcome to the next message; `final`: the item has no further outcomes."""
        if not self._ready:  # the writer is woken once per message, not per outcome
            self._wake.set()
        self._ready.append(entry)
        if final:
            self.pending -= 1

    def file_many(self, entries: list[Entry]) -> None:
        """Add the final outcomes of several items to the next message."""
        if not self._ready:
            self._wake.set()
        self._ready += entries
        self.pending -= len(entries)

    def clear(self) -> list[Entry]:
        """Take back what was filed and never sent (the call ended)."""
        ready, self._ready = self._ready, []
        return ready

    async def drain(self, messages: AsyncIterator[Message], admit: Callable[[Message], Awaitable[None]]
                    ) -> AsyncIterator[list[Entry]]:
        """Admit each message in a reader task; yield what is ready until the messages end and every item
        has its final outcome. An error raised by `admit` (or the reading) ends the stream with it."""
        reader = asyncio.get_running_loop().create_task(self._read(messages, admit))
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._ready:
                    ready, self._ready = self._ready, []
                    yield ready
                if reader.done():
                    reader.result()  # raises what ended the reading, if anything
                    if not self.pending and not self._ready:
                        return
        finally:
            reader.cancel()

    async def _read(self, messages: AsyncIterator[Message], admit: Callable[[Message], Awaitable[None]]) -> None:
        try:
            async for message in messages:
                await admit(message)
        finally:
            self._wake.set()


class Multiplexer(Protocol[Message, Reply, Entry]):
    """One multiplexed call's items: admits messages, packs ready outcomes, cancels what is left."""

    outbox: Outbox[Entry]
    large_replies: bool
    """Some outcome may be large (every step's logits, gates): replies are then split by entry_bytes."""

    def entry_bytes(self, entry: Entry) -> int:
        """About how many bytes the outcome takes in a reply."""

    async def admit(self, message: Message, context: grpc.aio.ServicerContext) -> None: ...

    def pack(self, ready: list[Entry]) -> Reply: ...

    def cancel(self) -> None:
        """The call ended: whatever has not run yet never will (a caller that went away changes nothing)."""


async def relay(mux: Multiplexer[Message, Reply, Entry], messages: AsyncIterator[Message],
                context: grpc.aio.ServicerContext, max_bytes: int) -> AsyncIterator[Reply]:
    """The replies of a multiplexed stream: one per group of outcomes ready together, or as many as it takes to
    keep each within `max_bytes` (max_message_bytes) when outcomes may be large."""
    try:
        async for ready in mux.outbox.drain(messages, lambda message: mux.admit(message, context)):
            for part in by_size(ready, mux.entry_bytes, max_bytes) if mux.large_replies else (ready,):
                yield mux.pack(part)
    finally:
        mux.cancel()


def by_size(entries: list[Entry], size: Callable[[Entry], int], max_bytes: int) -> list[list[Entry]]:
    """`entries` in order, cut into runs whose sizes add up to at most `max_bytes` (less the reply's framing);
    each entry fits alone (checked when its item was admitted)."""
    room = max_bytes - REPLY_FRAMING_BYTES
    parts: list[list[Entry]] = [[]]
    used = 0
    for entry in entries:
        needed = size(entry)
        if parts[-1] and used + needed > room:
            parts.append([])
            used = 0
        parts[-1].append(entry)
        used += needed
    return parts

"""Coalescing: the requests of many concurrent callers, many per message, on one bidirectional stream.

Every request is added to the next message as it is made; a sender task writes that message as soon as it
runs, so the requests made while the previous message was being written (or while the caller's event loop
was busy with other callers) leave together, and a lone request leaves at once. Each request carries a tag;
a receiver task hands each outcome to its request's route by tag, so every caller gets its own outcome. The
stream opens with the first request. If it fails, every request still waiting on it is told so (`lose`):
their callers decide whether to retry (the next request opens a new stream). The server keeps the order of a
session's requests within a stream; callers of one session also wait for each other (cellstream.session).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import grpc

Batch = TypeVar("Batch")  # pb.StepBatch or pb.GenerateBatch: `items`
STREAM_ENDED = "the {name} stream ended before this request's outcome arrived"
# What a message holds besides its items (gRPC and protobuf framing), kept free under max_message_bytes.
MESSAGE_FRAMING_BYTES = 1024
# A reply of at least twice this many outcomes is handed out in two halves, the event loop running the first half's
# callers in between: their next requests leave while the client still works through the second half, so the
# client's work overlaps the server's instead of alternating with it (256 sessions stepping back to back on 2
# cores: 1.5x the steps/s; the server then runs two batches of 128 instead of one of 256).
MIN_SHARE = 64


class Route(Protocol):
    def deliver(self, outcome: Any) -> None:
        """The request's outcome (a StepOutcome, or one GenerateOutcome of a turn)."""

    def lose(self, code: grpc.StatusCode, details: str) -> None:
        """The stream failed (or closed) before the request's final outcome arrived."""


class CoalescingStream(Generic[Batch]):
    """One multiplexed RPC (StreamMany, GenerateMany) of one client, opened on demand.

    `open_call()` starts the RPC; `new_batch()` makes an empty request message; `outcomes(reply)` lists a
    reply's outcomes; `final(outcome)` says whether it is its request's last (None: every outcome is)."""

    def __init__(self, name: str, open_call: Callable[[], grpc.aio.StreamStreamCall], new_batch: Callable[[], Batch],
                 outcomes: Callable[[Any], Any], final: Callable[[Any], bool] | None, *, max_items: int,
                 max_bytes: int) -> None:
        self.name = name
        self._open_call = open_call
        self._new_batch = new_batch
        self._outcomes = outcomes
        self._final = final
        self._max_items = max_items
        self._room = max_bytes - MESSAGE_FRAMING_BYTES
        self._call: grpc.aio.StreamStreamCall | None = None
        self._sender: asyncio.Task[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._next: Batch = new_batch()  # filled in place by add(), then written as it is
        self._next_bytes = 0
        self._full: deque[Batch] = deque()
        self._routes: dict[int, Route] = {}
        self._tags = itertools.count(1)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self.messages_sent = 0
        """Messages written so far (items_sent / messages_sent: requests per message)."""
        self.items_sent = 0
        """Requests written so far."""

    def add(self, route: Route, size: int) -> Any:
        """A new item of the next message, its tag set, for the caller to fill; its outcomes go to `route`.
        `size`: about the bytes the item will take (messages are cut to stay within max_message_bytes)."""
        if self._call is None:
            self._open()
        items = self._next.items  # type: ignore[attr-defined]
        if items and (len(items) >= self._max_items or self._next_bytes + size > self._room):
            self._full.append(self._next)
            self._next, self._next_bytes = self._new_batch(), 0
            items = self._next.items  # type: ignore[attr-defined]
        self._next_bytes += size
        tag = next(self._tags)
        self._routes[tag] = route
        self._idle.clear()
        self._wake.set()  # the sender writes at its next turn of the event loop
        item = items.add()
        item.tag = tag
        return item

    def _open(self) -> None:
        call = self._open_call()
        loop = asyncio.get_running_loop()
        self._call = call
        self._sender = loop.create_task(self._send(call))
        self._receiver = loop.create_task(self._receive(call))

    async def _send(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._full or self._next.items:  # type: ignore[attr-defined]
                if self._full:
                    batch = self._full.popleft()
                else:
                    batch, self._next, self._next_bytes = self._next, self._new_batch(), 0
                self.messages_sent += 1
                self.items_sent += len(batch.items)  # type: ignore[attr-defined]
                try:
                    await call.write(batch)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    return  # the call is over: the receiver learns why and tells the waiting requests

    async def _receive(self, call: grpc.aio.StreamStreamCall) -> None:
        routes, outcomes, final = self._routes, self._outcomes, self._final
        code, details = grpc.StatusCode.UNAVAILABLE, STREAM_ENDED.format(name=self.name)
        try:
            async for reply in call:
                delivered = outcomes(reply)
                half = len(delivered) // 2 if len(delivered) >= 2 * MIN_SHARE else len(delivered)
                for k, outcome in enumerate(delivered, 1):
                    if final is None or final(outcome):
                        route = routes.pop(outcome.tag, None)
                    else:
                        route = routes.get(outcome.tag)
                    if route is not None:
                        route.deliver(outcome)
                    if k == half:  # let the first half's callers go on (and their next requests leave)
                        await asyncio.sleep(0)
                if not routes:
                    self._idle.set()
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or STREAM_ENDED.format(name=self.name)
        self._drop(call, code, details)

    def _drop(self, call: grpc.aio.StreamStreamCall, code: grpc.StatusCode, details: str) -> None:
        """The call ended: every request still routed to it (sent, or waiting to be) is lost."""
        if self._call is not call:
            return
        if self._sender is not None:
            self._sender.cancel()
        self._call = self._sender = self._receiver = None
        routes, self._routes = self._routes, {}
        self._next, self._next_bytes, self._full = self._new_batch(), 0, deque()
        self._idle.set()
        for route in routes.values():
            route.lose(code, details)

    async def aclose(self) -> None:
        """Wait until every request has its final outcome, then end the stream."""
        call, receiver = self._call, self._receiver
        if call is None or receiver is None:
            return
        await self._idle.wait()
        if self._call is not call:
            return
        if self._sender is not None:
            self._sender.cancel()
        await call.done_writing()
        await receiver  # the server ends the stream once every request has its outcome

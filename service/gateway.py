"""Gateway helper: the steps of many concurrent callers, coalesced into StepBatch messages on one stream.

A chat gateway holds thousands of conversations; if each step travelled as its own call or message,
gRPC's per-message cost would bound the server. With a Gateway, every coroutine just awaits
`gateway.step(session_id, tokens=[...])`: steps asked for while the previous message is being written
leave together in the next one, on one StreamMany stream, and each caller gets its own answer.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

import grpc

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.client import Client

DEFAULT_MAX_ITEMS = 1024  # the server's default max_items_per_message


def item_error(status: pb.Status) -> grpc.aio.AioRpcError:
    """The error a Step call with the item would have raised: same code, same details."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), status.message)


class Gateway:
    """Coalesces concurrent `step` calls into StepBatch messages on one StreamMany stream of `client`.

    `step` takes the arguments of `Client.step` and returns the same StepResponse, or raises the same
    grpc.aio.AioRpcError (code and details) a Step call would have. Steps of one session are applied in
    the order `step` was called. The stream opens at the first step and has no deadline; if it fails,
    the steps waiting on it fail with its error (each may or may not have been applied, as with a
    failed Step: read the position, or use expected_position) and the next step opens a new stream.
    A caller that stops waiting (cancelled) only stops waiting: its step may already be on its way.
    Use as `async with Gateway(client) as gateway:`; closing waits for the steps in flight.
    """

    def __init__(self, client: Client, *, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self._client = client
        self._max_items = max_items
        self._call: grpc.aio.StreamStreamCall | None = None
        self._sender: asyncio.Task[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._next = pb.StepBatch()  # filled in place by step(), then sent as it is
        self._full: deque[pb.StepBatch] = deque()
        self._waiting: dict[int, asyncio.Future[pb.StepResponse]] = {}
        self._tags = itertools.count(1)
        self._wake = asyncio.Event()
        self.messages_sent = 0
        """StepBatch messages written so far (items_sent / messages_sent: steps per message)."""
        self.items_sent = 0
        """Steps written so far."""

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def step(self, session_id: str, **kwargs: Any) -> pb.StepResponse:
        """Like Client.step, sent in the next StepBatch of the shared stream."""
        if self._call is None:
            self._open()
        if len(self._next.items) >= self._max_items:
            self._full.append(self._next)
            self._next = pb.StepBatch()
        tag = next(self._tags)
        Client.fill_step_request(self._next.items.add(), session_id, tag=tag, **kwargs)
        future: asyncio.Future[pb.StepResponse] = asyncio.get_running_loop().create_future()
        self._waiting[tag] = future
        self._wake.set()
        return await future

    def _open(self) -> None:
        call = self._client.stream_many()
        loop = asyncio.get_running_loop()
        self._call = call
        self._sender = loop.create_task(self._send(call))
        self._receiver = loop.create_task(self._receive(call))

    async def _send(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._full or self._next.items:
                if self._full:
                    batch = self._full.popleft()
                else:
                    batch, self._next = self._next, pb.StepBatch()
                self.messages_sent += 1
                self.items_sent += len(batch.items)
                try:
                    await call.write(batch)
                except grpc.aio.AioRpcError:
                    return  # the stream failed: the receiver sees it too and fails the waiting steps

    async def _receive(self, call: grpc.aio.StreamStreamCall) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            async for reply in call:
                for outcome in reply.items:
                    future = self._waiting.pop(outcome.tag, None)
                    if future is None or future.done():  # its caller stopped waiting
                        continue
                    if outcome.HasField("error"):
                        future.set_exception(item_error(outcome.error))
                    else:
                        future.set_result(outcome.response)
        except grpc.aio.AioRpcError as exc:
            error = exc
        self._drop(call, error)

    def _drop(self, call: grpc.aio.StreamStreamCall, error: grpc.aio.AioRpcError | None) -> None:
        """The stream ended: fail what still waits on it; the next step opens another."""
        if self._call is not call:
            return
        if self._sender is not None:
            self._sender.cancel()
        self._call = self._sender = None
        if error is None:
            error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                         "the StreamMany stream ended before this step's outcome arrived")
        waiting, self._waiting = self._waiting, {}
        self._next, self._full = pb.StepBatch(), deque()
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)

    async def aclose(self) -> None:
        """Wait for the steps in flight, then end the stream."""
        if self._waiting:
            await asyncio.wait(list(self._waiting.values()))
        call, receiver = self._call, self._receiver
        if call is None or receiver is None:
            return
        if self._sender is not None:
            self._sender.cancel()
        self._call = self._sender = None
        await call.done_writing()
        await receiver  # the server ends the stream once every item has its outcome

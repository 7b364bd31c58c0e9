"""The chat turns of GenerateMany: many sessions' replies on one stream, each chunk tagged by its turn.

A turn is a loop (feed the prompt, then sample and feed token after token), so each runs as a task:
one per turn, not per token. Every turn is checked and run exactly like a Generate call; a failing
turn ends with its own status and the others go on. Turns of one session run one after another, in
the order they arrived, so their tokens never interleave in the session's state.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.api.handling import INTERNAL_MESSAGE
from cellstream.service.api.multiplex import ITEM_FRAMING_BYTES, check_item_count
from cellstream.service.api.native_codec import fill_chunk, fill_status, generate
from cellstream.service.api.outbox import Outbox
from cellstream.service.dataplane import DataPlane, GeneratedChunk
from cellstream.service.errors import CellstreamError, ResourceExhausted
from cellstream.service.metrics import Metrics

log = logging.getLogger(__name__)

METHOD = "GenerateMany"
VARINT_BYTES = 5  # the most a token id takes in the reply
Entry = tuple[pb.GenerateRequest, GeneratedChunk | CellstreamError]


class Turns:
    """The turns of one GenerateMany call."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.outbox: Outbox[Entry] = Outbox()
        self._running: set[asyncio.Task[None]] = set()
        self._latest: dict[str, asyncio.Task[None]] = {}  # each session's latest turn
        self.large_replies = False  # a turn asked for gates: replies are split by size (see relay)

    async def admit(self, batch: pb.GenerateBatch, context: grpc.aio.ServicerContext) -> None:
        limit = self.dataplane.settings.max_items_per_message
        check_item_count(len(batch.items), limit, "GenerateBatch")
        loop = asyncio.get_running_loop()
        for request in batch.items:
            self.large_replies |= request.gates
            self.outbox.pending += 1
            if len(self._running) >= limit:
                self.outbox.file((request, ResourceExhausted(
                    f"this stream has {len(self._running)} turns in progress (max_items_per_message); "
                    "send more once some are done")))
                continue
            earlier = self._latest.get(request.session_id)
            task = loop.create_task(self._turn(request, earlier, context.time_remaining()))
            self._running.add(task)
            self._latest[request.session_id] = task
            task.add_done_callback(lambda done, session_id=request.session_id: self._done(done, session_id))

    def _done(self, task: asyncio.Task[None], session_id: str) -> None:
        self._running.discard(task)
        if self._latest.get(session_id) is task:
            del self._latest[session_id]

    async def _turn(self, request: pb.GenerateRequest, earlier: asyncio.Task[None] | None,
                    timeout: float | None) -> None:
        if earlier is not None:
            await asyncio.wait([earlier])  # its outcome, even a failure, is its own
        try:
            async for chunk in generate(self.dataplane, request, timeout, reply_limited=True):
                self.outbox.file((request, chunk), final=bool(chunk.finish_reason))
        except CellstreamError as exc:
            self.outbox.file((request, exc))
        except Exception:  # a bug: logged once, and this turn (only) ends INTERNAL
            log.exception("unexpected error in a %s turn", METHOD)
            self.outbox.file((request, CellstreamError(INTERNAL_MESSAGE)))

    @staticmethod
    def entry_bytes(entry: Entry) -> int:
        """About how many bytes an outcome takes in a reply: its gates, if any, and the rest."""
        request, outcome = entry
        size = ITEM_FRAMING_BYTES + len(request.session_id)
        if isinstance(outcome, GeneratedChunk):
            size += len(outcome.text.encode()) + VARINT_BYTES * len(outcome.tokens)
            if outcome.gates is not None:
                size += outcome.gates.nbytes
        return size

    def pack(self, entries: list[Entry]) -> pb.GenerateBatchResult:
        reply = pb.GenerateBatchResult()
        for request, outcome in entries:
            message = reply.chunks.add(tag=request.tag, session_id=request.session_id)
            if isinstance(outcome, CellstreamError):
                fill_status(message.error, outcome)
                self.metrics.items.labels(METHOD, outcome.code.name).inc()
            else:
                fill_chunk(message.chunk, outcome)
                if outcome.finish_reason:
                    self.metrics.items.labels(METHOD, grpc.StatusCode.OK.name).inc()
        return reply

    def cancel(self) -> None:
        for task in self._running:
            task.cancel()

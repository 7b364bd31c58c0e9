"""One chat turn of a session (Generate, or a turn of the client's GenerateMany stream): its chunks, in order,
to the caller that asked for them.

A turn is not retried: GenerateRequest has no expected position, so a second attempt could feed the prompt
twice. The session's turn is held until the reply's last chunk (or its error) arrives, even if the caller
stopped reading or its deadline passed: the server goes on to the end of the reply, and every chunk moves
the session's position. A turn that failed part way leaves the position unknown; the session reads it
before its next step.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

import grpc

from cellstream.errors import CellstreamError, DeadlineExceeded, error_for, status_code
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

# Refusals a turn gets before anything is fed (the session, the prompt, the gates are checked first).
REFUSED_BEFORE_FEEDING = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED,
                                    grpc.StatusCode.PERMISSION_DENIED})


class TurnSession(Protocol):
    """What a turn tells its session (cellstream.session.AsyncSession): where it moved, that it ended."""

    def moved_to(self, position: int) -> None: ...

    def forget_position(self) -> None: ...

    def end_turn(self) -> None: ...


class TurnOp:
    """A turn's chunks as they arrive (the route of its GenerateMany item, or fed by a Generate call)."""

    def __init__(self, session: TurnSession, request: pb.GenerateRequest, prompt_steps: int,
                 deadline: float | None) -> None:
        self.session = session
        self.request = request
        self.deadline = deadline
        self.prompt_steps = prompt_steps  # the first chunk's gates cover the prompt too
        self.chunks: deque[pb.GenerateChunk] = deque()
        self.received = 0
        self.ended = False
        self.error: CellstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def deliver(self, outcome: pb.GenerateOutcome) -> None:
        if outcome.HasField("error"):
            self.failed(status_code(outcome.error.code), outcome.error.message)
        else:
            self.chunk(outcome.chunk)

    def chunk(self, message: pb.GenerateChunk) -> None:
        if self.ended:
            return
        self.received += 1
        self.session.moved_to(message.position)
        self.chunks.append(message)
        if message.done:
            self._end(None)
        else:
            self._wake()

    def failed(self, code: grpc.StatusCode, message: str) -> None:
        if self.ended:
            return
        refused = not self.received and code in REFUSED_BEFORE_FEEDING
        if not refused:
            self.session.forget_position()  # part of the turn may have been fed
        self._end(error_for(code, message, applied=False if refused else None))

    def lose(self, code: grpc.StatusCode, details: str) -> None:
        self.failed(code, details)

    def _end(self, error: CellstreamError | None) -> None:
        self.ended, self.error = True, error
        self.session.end_turn()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def steps_fed(self, message: pb.GenerateChunk, first: bool) -> int:
        """How many steps a chunk's gates cover: its tokens, and the prompt's bytes in the first chunk."""
        return len(message.tokens) + (self.prompt_steps if first else 0)

    async def next(self, deadline: float | None) -> pb.GenerateChunk | None:
        """The next chunk, None after the last one; the turn's error if it failed; DeadlineExceeded at `deadline`."""
        while not self.chunks:
            if self.ended:
                if self.error is not None:
                    raise self.error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._waiter
            except TimeoutError:
                raise DeadlineExceeded("the deadline passed before the reply ended; the server finishes it (the "
                                       "session's next call waits for its end)", applied=None) from None
        return self.chunks.popleft()

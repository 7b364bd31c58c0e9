"""One step of a session, applied once and only once across lost replies.

Every attempt of a step is conditional on the position the session was at when the step began
(`expected_position`): the server applies it there or nowhere, so however many attempts reach the server,
at most one applies. An attempt whose outcome is lost (the stream or channel failed: UNAVAILABLE, a
replica killed, a server draining; or the server itself answered UNAVAILABLE, its session store unreachable)
is retried with backoff, within the call's deadline and `max_attempts`. A retry that gets ABORTED means
the session is no longer where the step expected it; the client reads the session's position (GetState):

- moved by exactly this step's length, after a lost attempt: that attempt was applied. The step returns
  the position and (if asked) the state read with GetState, flagged `recovered` (logits, top-k and outputs
  are gone: the server does not keep them);
- moved by exactly the length of an earlier step whose outcome this session never learned (its caller left
  at a deadline and its stream failed): that one was applied; this step is sent again from the new position;
- otherwise another writer moved the session: PositionConflict, with the position now (the session goes on
  from there).

A caller that stops waiting (deadline, cancellation) leaves its step in flight: the session's next call
waits until the step's outcome arrives (or its stream fails), so the session always knows its position or
knows it does not (then it reads it before its next step).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Protocol

import grpc

from cellstream import codec
from cellstream.errors import (
    DeadlineExceeded,
    PositionConflict,
    error_for,
    status_code,
)
from cellstream.results import StepResult
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})  # the call failed, not the step
# Codes after which an attempt may or may not have been applied (beside the retryable ones).
UNKNOWN_OUTCOME = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
FIRST_BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 1.0


def backoff_seconds(attempt: int) -> float:
    """How long to wait after the `attempt`-th failed attempt: doubling from 50 ms to 1 s, jittered."""
    return min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** (attempt - 1)) * random.uniform(0.5, 1)


@dataclass(frozen=True, slots=True)
class Doubt:
    """A step that may yet be applied at `before` (its outcome was lost after its caller left): at most one
    step applies at `before`, so the session's next step either lands there (and this one never will) or
    finds the session moved by `length` (this one was applied)."""

    before: int
    length: int


class StepClient(Protocol):
    """What a step needs of its client (cellstream.aio.AsyncClient)."""

    max_attempts: int
    retried_attempts: int
    recovered_steps: int

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def deadlines(self) -> Deadlines: ...

    def send_step(self, op: StepOp) -> None: ...

    async def read_state(self, session_id: str, deadline: float | None) -> pb.State: ...


class StepSession(Protocol):
    """What a step needs of its session (cellstream.session.AsyncSession): where it is, and its turn."""

    session_id: str
    doubt: Doubt | None

    @property
    def client(self) -> StepClient: ...

    def moved_to(self, position: int) -> None: ...

    def forget_position(self) -> None: ...

    def end_turn(self) -> None: ...


class Lost(Exception):
    """An attempt's outcome will not arrive: its call failed with `code`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Refused(Exception):
    """The server refused an attempt with `code`: that attempt changed nothing."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Deadlines:
    """Fails the attempts in flight whose deadline passed, with one timer for all of them, armed for the earliest
    deadline: a timer per step would cost more than the rest of a multiplexed step's work on the client (a
    libuv timer started and stopped: ~3 µs). With one timeout for every call, it fires about once a timeout."""

    def __init__(self) -> None:
        self._watched: set[StepOp] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def watch(self, op: StepOp, loop: asyncio.AbstractEventLoop) -> None:
        deadline = op.deadline
        assert deadline is not None
        self._watched.add(op)
        if self._timer is None or deadline < self._armed_at:
            self._arm(deadline, loop)

    def unwatch(self, op: StepOp) -> None:
        self._watched.discard(op)

    def _arm(self, when: float, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = loop.call_at(when, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        earliest: float | None = None
        for op in list(self._watched):
            deadline = op.deadline
            assert deadline is not None
            if deadline <= now:
                self._watched.discard(op)
                op.expire()
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._arm(earliest, loop)


class StepOp:
    """A step's attempts until it is settled; the session's turn is held until then (even if the caller left)."""

    __slots__ = ("attempts", "before", "deadline", "doubt", "future", "in_flight", "input", "lost", "session",
                 "settled", "unary", "want")

    def __init__(self, session: StepSession, step: codec.StepInput, want: pb.Outputs | None,
                 deadline: float | None) -> None:
        self.session = session
        self.input = step
        self.want = want
        self.deadline = deadline
        self.unary = want is not None and want.gates  # gates are served one session per call (Step)
        self.before = 0
        self.doubt = session.doubt  # an earlier step that may yet land at this step's position
        self.attempts = 0
        self.lost = False  # an attempt's outcome was lost: it may have been applied
        self.in_flight = False  # an attempt was sent and its outcome has not arrived
        self.settled = False
        self.future: asyncio.Future[pb.StepResponse] | None = None

    # The route of an attempt (cellstream.streams.Route), and the unary path's callbacks. An outcome whose caller
    # left (its future done: cancelled, or failed at the deadline) settles the step here.
    def deliver(self, outcome: pb.StepOutcome) -> None:
        if outcome.HasField("error"):
            self.refused(status_code(outcome.error.code), outcome.error.message)
        else:
            self.answered(outcome.response)

    def answered(self, response: pb.StepResponse) -> None:
        self.in_flight = False
        future = self.future
        if future is not None and not future.done():
            future.set_result(response)
        else:
            self._settle(response.position, None)

    def refused(self, code: grpc.StatusCode, message: str) -> None:
        if code in RETRYABLE or code in UNKNOWN_OUTCOME:
            self.lose(code, message)
            return
        self.in_flight = False
        future = self.future
        if future is not None and not future.done():
            future.set_exception(Refused(code, message))
        else:
            self._settle_refused(code)

    def lose(self, code: grpc.StatusCode, details: str) -> None:
        self.in_flight = False
        future = self.future
        if future is not None and not future.done():
            future.set_exception(Lost(code, details))
        else:
            self._settle(None, Doubt(self.before, self.input.length))

    def expire(self) -> None:
        future = self.future
        if future is not None and not future.done():
            future.set_exception(DeadlineExceeded(
                "the deadline passed before the step's outcome arrived; it may still be applied (once at most): "
                "the session learns which before its next call", applied=None))

    # Settling: the session learns where it stands, then the session's next call may go.
    def _settle(self, position: int | None, doubt: Doubt | None) -> None:
        if self.settled:
            return
        if position is not None:
            self.session.moved_to(position)
        elif doubt is not None:
            self.session.doubt = doubt
        self._finish()

    def _settle_refused(self, code: grpc.StatusCode) -> None:
        """This attempt changed nothing; an earlier lost one may have been applied."""
        if code == grpc.StatusCode.ABORTED:  # the session is not where the step expected it: read it next time
            if not self.settled:
                self.session.forget_position()
            self._finish()
        else:
            self._settle(None, Doubt(self.before, self.input.length) if self.lost else None)

    def _finish(self) -> None:
        if not self.settled:
            self.settled = True
            self.session.end_turn()

    async def run(self, before: int) -> StepResult:
        """Attempt the step from position `before` until it is settled; the caller holds the session's turn."""
        self.before = before
        client = self.session.client
        loop = client.loop
        deadlines = client.deadlines if self.deadline is not None else None
        try:
            while True:
                self.attempts += 1
                future = self.future = loop.create_future()
                client.send_step(self)
                self.in_flight = True
                if deadlines is not None:
                    deadlines.watch(self, loop)
                try:
                    response = await future
                except Lost as lost:
                    self.lost = True
                    if lost.code not in RETRYABLE or self.attempts >= client.max_attempts:
                        raise self._give_up(lost.code, f"{lost.details} (after {self.attempts} attempts)") from None
                    await self._backoff(loop, lost)
                    client.retried_attempts += 1
                    continue
                except Refused as refused:
                    if refused.code != grpc.StatusCode.ABORTED:
                        self._settle_refused(refused.code)
                        raise error_for(refused.code, refused.message,
                                        applied=None if self.lost else False) from None
                    result = await self._after_conflict(refused.message)
                    if result is None:
                        continue  # an earlier step had landed: this one goes again from the new position
                    return result
                finally:
                    if deadlines is not None:
                        deadlines.unwatch(self)
                self._settle(response.position, None)
                return codec.step_result(response, self.input.length, self.want)
        except BaseException:
            if not self.settled and not self.in_flight:  # in flight: its outcome settles the step when it arrives
                self._settle_left()
            raise

    def _settle_left(self) -> None:
        """The caller left with no attempt in flight: settle from what the last attempt's future holds."""
        future = self.future
        if future is not None and future.done() and not future.cancelled():
            error = future.exception()
            if error is None:
                self._settle(future.result().position, None)
                return
            if isinstance(error, Refused):
                self._settle_refused(error.code)
                return
            self.lost = self.lost or isinstance(error, Lost)
        self._settle(None, Doubt(self.before, self.input.length) if self.lost else None)

    def _give_up(self, code: grpc.StatusCode, details: str) -> Exception:
        self._settle(None, Doubt(self.before, self.input.length))
        return error_for(code, details, applied=None)

    async def _backoff(self, loop: asyncio.AbstractEventLoop, lost: Lost) -> None:
        delay = backoff_seconds(self.attempts)
        if self.deadline is not None and loop.time() + delay >= self.deadline:
            raise self._give_up(grpc.StatusCode.UNAVAILABLE, f"{lost.details} (no time left to retry after "
                                                             f"{self.attempts} attempts)")
        self.future = None  # no attempt in flight while waiting
        await asyncio.sleep(delay)

    async def _after_conflict(self, message: str) -> StepResult | None:
        """ABORTED: read where the session is and decide (see the module's docstring). The StepResult of this
        step if it had been applied; None to send it again from the new position; else PositionConflict."""
        self.future = None
        session, before, length = self.session, self.before, self.input.length
        try:
            state = await session.client.read_state(session.session_id, self.deadline)
        except BaseException:
            session.forget_position()  # it moved from `before`; where to, the next call reads
            self._finish()
            raise
        position = state.position
        ours = self.lost and position == before + length
        doubt = self.doubt
        earlier = doubt is not None and doubt.before == before and position == before + doubt.length
        session.moved_to(position)
        self.doubt = None
        if earlier and not ours:
            self.before, self.lost = position, False
            return None
        self._finish()
        if ours and not earlier:
            session.client.recovered_steps += 1
            wanted_state = self.want is not None and self.want.state
            return StepResult(session.session_id, position, state=codec.state_of(state) if wanted_state else None,
                              recovered=True)
        if ours:
            raise PositionConflict(
                f"this step's reply was lost and an earlier step that timed out was of the same length: the session "
                f"moved from {before} to {position}, and which of the two was applied cannot be told",
                position=position, applied=None)
        raise PositionConflict(f"{message} (the session is now at position {position}; continuing from there)",
                               position=position, applied=None if self.lost else False)

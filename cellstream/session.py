"""A session as an object: its steps, replies, state, forks; one call at a time, in the order they were made.

The session knows its position (every step's reply, every chunk of a reply moves it) and sends every step
conditional on it, which is what makes retries safe (cellstream.exactly_once). Its calls take turns: a step
made while another call of the same session is in flight waits for that call's outcome, so concurrent calls
of one session apply in the order they were made, while the calls of many sessions travel together.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence
from types import EllipsisType, TracebackType
from typing import Protocol

import numpy as np

from cellstream import codec
from cellstream.errors import CellstreamError, DeadlineExceeded, NotFound
from cellstream.exactly_once import Doubt, StepClient, StepOp
from cellstream.generation import TurnOp
from cellstream.results import Chunk, State, StepResult

Timeout = float | None | EllipsisType
"""A call's deadline in seconds from now; None: none; ... (the default): the client's `timeout`."""


class SessionClient(StepClient, Protocol):
    """What a session needs of its client (cellstream.aio.AsyncClient)."""

    def deadline(self, timeout: Timeout) -> float | None: ...

    def send_turn(self, turn: TurnOp) -> None: ...

    async def fork_session(self, session_id: str, ttl_seconds: int, deadline: float | None) -> AsyncSession: ...

    async def close_session(self, session_id: str, deadline: float | None) -> int | None: ...


class Turnstile:
    """First come, first served, with a deadline for those who wait; the turn is handed from one holder to the
    next (never taken by a newcomer in between). Cheaper than asyncio.Lock with a timeout on the common path:
    a free turnstile is taken without awaiting anything."""

    __slots__ = ("_busy", "_waiting")

    def __init__(self) -> None:
        self._busy = False
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def enter(self, deadline: float | None) -> None:
        if not self._busy:
            self._busy = True
            return
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append(turn)
        timer = None if deadline is None else loop.call_at(deadline, _too_late, turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.leave()  # handed the turn, then cancelled before using it: pass it on
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def leave(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._busy = False


def _too_late(turn: asyncio.Future[None]) -> None:
    if not turn.done():
        turn.set_exception(DeadlineExceeded("the deadline passed while this call waited for the session's previous "
                                            "call to end; nothing was sent", applied=False))


class AsyncSession:
    """A session of an AsyncClient (`async with client.session() as s:`, or `await client.open_session()`)."""

    def __init__(self, client: SessionClient, session_id: str, model: str, position: int | None) -> None:
        self.client = client
        self.session_id = session_id
        """The server's id of the session (any client, or the HTTP API, can reach it by this id)."""
        self.model = model
        self.position = position
        """Steps consumed so far, as this client knows it (None: unknown until its next call reads it)."""
        self.doubt: Doubt | None = None
        self.closed = False
        self._turns = Turnstile()

    def __repr__(self) -> str:
        return f"AsyncSession({self.session_id!r}, model={self.model!r}, position={self.position})"

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if self.closed:
            return
        try:
            await self.close()
        except NotFound:
            pass  # gone already (expired, evicted): what closing it was for
        except CellstreamError:
            if error is None:  # the body's own error matters more than a failed close
                raise

    # What the session's calls share.
    def moved_to(self, position: int) -> None:
        self.position, self.doubt = position, None

    def forget_position(self) -> None:
        self.position, self.doubt = None, None

    def observed(self, position: int) -> None:
        """A position read from the server (GetState): a step in doubt at it may still land, so it stays."""
        if self.doubt is None or self.doubt.before != position:
            self.moved_to(position)

    def end_turn(self) -> None:
        self._turns.leave()

    async def _known_position(self, deadline: float | None) -> int:
        if self.position is None:
            self.observed((await self.client.read_state(self.session_id, deadline)).position)
        assert self.position is not None
        return self.position

    # The calls.
    async def step(self, tokens: Sequence[int] | np.ndarray | None = None, *, text: str | None = None,
                   features: np.ndarray | Sequence[Sequence[float]] | None = None, logits: bool = False,
                   top_k: int = 0, all_steps: bool = False, state: bool = False, gates: bool = False,
                   expected_position: int | None = None, timeout: Timeout = ...) -> StepResult:
        """Feed `tokens` (ids), `text` (UTF-8, a byte-tokenizer model) or `features` ((steps, F) floats) and
        advance the state; returns the new position and what was asked for: the last step's `logits` (or a
        features model's `outputs`), every step's with `all_steps`, the `top_k` next tokens, the `state`, the
        `gates`. Applied once and only once, across lost replies (docs/CLIENT.md). `expected_position`: apply
        only if the session is there (default: where this client knows it is)."""
        step = codec.step_input(tokens, text, features)
        want = codec.outputs_wanted(logits=logits, top_k=top_k, all_steps=all_steps, state=state, gates=gates)
        deadline = self.client.deadline(timeout)
        await self._turns.enter(deadline)
        op = StepOp(self, step, want, deadline)
        before = expected_position if expected_position is not None else self.position
        if before is None:
            try:
                before = await self._known_position(deadline)
            except BaseException:
                self.end_turn()
                raise
        return await op.run(before)

    async def generate(self, prompt: str, *, max_tokens: int = 0, temperature: float = 0.0, top_k: int = 0,
                       seed: int | None = None, stop: Sequence[str] = (), gates: bool = False,
                       timeout: Timeout = ...) -> AsyncIterator[Chunk]:
        """A chat turn: feed `prompt`, then sample a reply token by token (greedy at temperature 0; `seed` makes
        a sampled reply repeatable), streamed as Chunks until `stop`, an end token or `max_tokens` (0: the
        server's default). The reply stays in the state. `timeout` bounds the whole reply."""
        deadline = self.client.deadline(timeout)
        request = codec.generate_request(self.session_id, prompt, max_tokens=max_tokens, temperature=temperature,
                                         top_k=top_k, seed=seed, stop=stop, gates=gates)
        await self._turns.enter(deadline)
        turn = TurnOp(self, request, len(prompt.encode()), deadline)
        try:
            self.client.send_turn(turn)
        except BaseException:
            self.end_turn()
            raise
        first = True
        while (message := await turn.next(deadline)) is not None:
            yield codec.chunk_of(message, turn.steps_fed(message, first))
            first = False

    async def reply(self, prompt: str, **options: object) -> str:
        """The whole text of `generate(prompt, **options)`."""
        return "".join([chunk.text async for chunk in self.generate(prompt, **options)])  # type: ignore[arg-type]

    async def get_state(self, *, timeout: Timeout = ...) -> State:
        """The session's state now (after every call made before this one): h and c as (layers, hidden)."""
        deadline = self.client.deadline(timeout)
        await self._turns.enter(deadline)
        try:
            message = await self.client.read_state(self.session_id, deadline)
            self.observed(message.position)
            return codec.state_of(message)
        finally:
            self.end_turn()

    async def fork(self, *, ttl_seconds: int = 0, timeout: Timeout = ...) -> AsyncSession:
        """A new session with this one's state and position (e.g. to try another reply from here)."""
        deadline = self.client.deadline(timeout)
        await self._turns.enter(deadline)
        try:
            return await self.client.fork_session(self.session_id, ttl_seconds, deadline)
        finally:
            self.end_turn()

    async def close(self, *, timeout: Timeout = ...) -> int | None:
        """Free the session on the server; its final position (None if a lost reply's retry found it gone)."""
        deadline = self.client.deadline(timeout)
        await self._turns.enter(deadline)
        try:
            position = await self.client.close_session(self.session_id, deadline)
        except NotFound:
            self.closed = True
            raise
        finally:
            self.end_turn()
        self.closed = True
        return position

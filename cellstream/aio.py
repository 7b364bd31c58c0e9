"""AsyncClient: cellstream from asyncio code; every session's steps ride one StreamMany stream, every reply one
GenerateMany stream, by themselves (docs/CLIENT.md)."""

from __future__ import annotations

import asyncio
import operator
import weakref
from collections.abc import Awaitable, Callable, Generator, Sequence
from types import TracebackType
from typing import Any

import grpc

from cellstream import codec
from cellstream.connection import DEFAULT_MAX_MESSAGE_BYTES, Pem, call_metadata, open_channel
from cellstream.errors import DeadlineExceeded, NotFound, error_for
from cellstream.exactly_once import RETRYABLE, Deadlines, StepOp, backoff_seconds
from cellstream.generation import TurnOp
from cellstream.results import ModelInfo, State
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc
from cellstream.session import AsyncSession, Timeout
from cellstream.streams import CoalescingStream

DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_MAX_ITEMS = 1024  # the server's default max_items_per_message


def _turn_final(outcome: pb.GenerateOutcome) -> bool:
    return outcome.HasField("error") or outcome.chunk.done


class SessionOpening:
    """What `AsyncClient.session()` returns: `await` it for an open session, or `async with` it to have the session
    closed at the end of the block."""

    def __init__(self, open_session: Callable[[], Awaitable[AsyncSession]]) -> None:
        self._open = open_session
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._open()
        return self._session

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        assert self._session is not None
        await self._session.__aexit__(kind, error, traceback)


class AsyncClient:
    """A client of one cellstream server (or of several behind one target); use as
    `async with AsyncClient("127.0.0.1:50051") as client:`.

    - `token`: sent as `authorization: Bearer <token>`; `tls`, `ca`, `cert`/`key`, `server_name`: TLS and mutual
      TLS (PEM paths or bytes; see cellstream.connection.open_channel).
    - `timeout`: every call's deadline in seconds unless the call gives its own (None: no deadline).
    - `multiplex`: steps and replies ride the StreamMany and GenerateMany streams (False: one Step or Generate
      call each, as for steps that ask for gates, which the multiplexed calls do not serve).
    - `max_attempts`: attempts of a step (or a read) whose call failed UNAVAILABLE, within its deadline.
    - `max_message_bytes`, `max_items_per_message`: the server's bounds (its defaults here); messages are cut
      to fit them.
    """

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False, ca: Pem | None = None,
                 cert: Pem | None = None, key: Pem | None = None, server_name: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_SECONDS, multiplex: bool = True,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_items_per_message: int = DEFAULT_MAX_ITEMS, options: Sequence[tuple[str, Any]] = ()) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.target = target
        self.timeout = timeout
        self.max_attempts = max_attempts
        self._channel = open_channel(target, tls=tls, ca=ca, cert=cert, key=key, server_name=server_name,
                                     max_message_bytes=max_message_bytes, options=options)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._metadata = call_metadata(token)
        self._largest_item = max_message_bytes // 2  # larger steps go as a Step call of their own
        self._steps: CoalescingStream[pb.StepBatch] | None = None
        self._turns: CoalescingStream[pb.GenerateBatch] | None = None
        if multiplex:
            self._steps = CoalescingStream(
                "StreamMany", lambda: self._stub.StreamMany(metadata=self._metadata), pb.StepBatch,
                operator.attrgetter("items"), None, max_items=max_items_per_message, max_bytes=max_message_bytes)
            self._turns = CoalescingStream(
                "GenerateMany", lambda: self._stub.GenerateMany(metadata=self._metadata), pb.GenerateBatch,
                operator.attrgetter("chunks"), _turn_final, max_items=max_items_per_message,
                max_bytes=max_message_bytes)
        self._sessions: weakref.WeakValueDictionary[str, AsyncSession] = weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.deadlines = Deadlines()
        self.retried_attempts = 0
        """Attempts sent again because an earlier one's outcome was lost (a failed stream or channel)."""
        self.recovered_steps = 0
        """Steps found applied after their reply was lost (StepResult.recovered)."""
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the client's channel belongs to (the one it is first used in)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for the steps and replies in flight, then close the channel."""
        if self._closed:
            return
        for stream in (self._steps, self._turns):
            if stream is not None:
                await stream.aclose()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._closed = True
        await self._channel.close()

    @property
    def steps_per_message(self) -> float:
        """Steps per StreamMany message so far (how much the client coalesced), 0 before the first."""
        stream = self._steps
        return stream.items_sent / stream.messages_sent if stream is not None and stream.messages_sent else 0.0

    # Sessions.
    def session(self, model: str = "", *, ttl_seconds: int = 0, state: State | None = None,
                timeout: Timeout = ...) -> SessionOpening:
        """A new session of `model` (empty: the server's default), from zero state or `state`:
        `async with client.session() as s:` closes it at the end; `s = await client.session()` does not."""
        return SessionOpening(lambda: self.open_session(model, ttl_seconds=ttl_seconds, state=state,
                                                        timeout=timeout))

    async def open_session(self, model: str = "", *, ttl_seconds: int = 0, state: State | None = None,
                           timeout: Timeout = ...) -> AsyncSession:
        """A new session (see `session`), left open: close it with `await s.close()`, or let its TTL expire it.
        A retry after a lost reply may leave an unused session behind, which its TTL expires."""
        request = pb.OpenSessionRequest(model=model, ttl_seconds=ttl_seconds,
                                        initial_state=None if state is None else codec.state_message(state))
        info = await self.call(self._stub.OpenSession, request, self.deadline(timeout))
        return self._known(AsyncSession(self, info.session_id, info.model, info.position))

    async def attach(self, session_id: str, *, timeout: Timeout = ...) -> AsyncSession:
        """The session of an existing id (opened elsewhere: another process, the HTTP API); the same object for
        the same id within this client, so its calls keep taking turns."""
        known = self._sessions.get(session_id)
        if known is not None:
            return known
        state = await self.read_state(session_id, self.deadline(timeout))
        return self._known(AsyncSession(self, session_id, state.model, state.position))

    def _known(self, session: AsyncSession) -> AsyncSession:
        return self._sessions.setdefault(session.session_id, session)

    async def models(self, *, timeout: Timeout = ...) -> list[ModelInfo]:
        """The models the server serves (one of them `is_default`)."""
        response = await self.call(self._stub.ListModels, pb.ListModelsRequest(), self.deadline(timeout))
        return [codec.model_info_of(model) for model in response.models]

    # What sessions use.
    def deadline(self, timeout: Timeout) -> float | None:
        """The event loop's time at which a call given `timeout` fails."""
        seconds = self.timeout if timeout is ... else timeout
        return None if seconds is None else self.loop.time() + seconds

    def remaining(self, deadline: float | None) -> float | None:
        """Seconds left until `deadline` (gRPC's timeout), None for none."""
        return None if deadline is None else max(0.0, deadline - self.loop.time())

    def send_step(self, op: StepOp) -> None:
        """An attempt of a step: an item of the next StreamMany message, or a Step call of its own."""
        if self._closed:
            self._check_open()
        session_id = op.session.session_id
        size = codec.item_bytes(session_id, op.input)
        if self._steps is not None and not op.unary and size <= self._largest_item:
            codec.fill_step(self._steps.add(op, size), session_id, op.input, op.want, op.before)
        else:
            request = codec.fill_step(pb.StepRequest(), session_id, op.input, op.want, op.before)
            self._spawn(self._unary_step(op, request))

    async def _unary_step(self, op: StepOp, request: pb.StepRequest) -> None:
        try:
            response = await self._stub.Step(request, timeout=self.remaining(op.deadline), metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            op.refused(exc.code(), exc.details() or exc.code().name)
        else:
            op.answered(response)

    def send_turn(self, turn: TurnOp) -> None:
        """A chat turn: an item of the next GenerateMany message, or a Generate call of its own."""
        self._check_open()
        if self._turns is not None:
            item = self._turns.add(turn, turn.request.ByteSize())
            tag = item.tag
            item.CopyFrom(turn.request)
            item.tag = tag
        else:
            self._spawn(self._unary_turn(turn))

    async def _unary_turn(self, turn: TurnOp) -> None:
        try:
            async for chunk in self._stub.Generate(turn.request, timeout=self.remaining(turn.deadline),
                                                   metadata=self._metadata):
                turn.chunk(chunk)
        except grpc.aio.AioRpcError as exc:
            turn.failed(exc.code(), exc.details() or exc.code().name)
        else:
            turn.failed(grpc.StatusCode.UNAVAILABLE, "the Generate call ended before the reply's last chunk")

    async def read_state(self, session_id: str, deadline: float | None) -> pb.State:
        """GetState, retried when UNAVAILABLE."""
        return await self.call(self._stub.GetState, pb.SessionRef(session_id=session_id), deadline)

    async def fork_session(self, session_id: str, ttl_seconds: int, deadline: float | None) -> AsyncSession:
        request = pb.ForkSessionRequest(session_id=session_id, ttl_seconds=ttl_seconds)
        info = await self.call(self._stub.ForkSession, request, deadline)
        return self._known(AsyncSession(self, info.session_id, info.model, info.position))

    async def close_session(self, session_id: str, deadline: float | None) -> int | None:
        """CloseSession; None when a retry found the session gone (the lost attempt had closed it)."""
        attempts: list[int] = []
        try:
            response = await self.call(self._stub.CloseSession, pb.SessionRef(session_id=session_id), deadline,
                                       attempts=attempts)
        except NotFound:
            if len(attempts) > 1:
                return None
            raise
        finally:
            self._sessions.pop(session_id, None)
        return response.position

    async def call(self, method: grpc.aio.UnaryUnaryMultiCallable, request: Any, deadline: float | None, *,
                   attempts: list[int] | None = None) -> Any:
        """A unary call, retried with backoff while it fails UNAVAILABLE (at most max_attempts times, within
        `deadline`); any other failure as its CellstreamError. `attempts` collects the attempt numbers made."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            if attempts is not None:
                attempts.append(attempt)
            self._check_open()
            try:
                return await method(request, timeout=self.remaining(deadline), metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or exc.code().name
            delay = backoff_seconds(attempt)
            if (code not in RETRYABLE or attempt >= self.max_attempts
                    or (deadline is not None and loop.time() + delay >= deadline)):
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(details, applied=None)
                raise error_for(code, details if attempt == 1 else f"{details} (after {attempt} attempts)",
                                applied=None if code in RETRYABLE else False)
            await asyncio.sleep(delay)

    def _check_open(self) -> None:
        if self._closed:
            raise error_for(grpc.StatusCode.UNAVAILABLE, "the client is closed")

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

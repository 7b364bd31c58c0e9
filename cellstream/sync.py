"""Client: the AsyncClient for code without an event loop. Its event loop runs in a thread of its own, so the
steps of many threads' sessions are coalesced onto one stream just as an AsyncClient's tasks' are."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from cellstream.aio import AsyncClient, Timeout
from cellstream.errors import CellstreamError, NotFound
from cellstream.results import Chunk, ModelInfo, State, StepResult
from cellstream.session import AsyncSession

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # the runtime's event loop where it exists (not on Windows): less CPU per step
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """An event loop running in a daemon thread; `run` a coroutine on it from any other thread."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cellstream-client", daemon=True)
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the caller: the call stops waiting as with asyncio
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _next(chunks: AsyncIterator[Chunk]) -> Chunk | None:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return None


class Session:
    """A session of a Client: the calls of AsyncSession, blocking (`with client.session() as s:`)."""

    def __init__(self, runner: LoopThread, session: AsyncSession) -> None:
        self._runner = runner
        self._async = session

    def __repr__(self) -> str:
        return f"Session({self.session_id!r}, model={self.model!r}, position={self.position})"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._async.closed:
            return
        try:
            self.close()
        except NotFound:
            pass  # gone already (expired, evicted): what closing it was for
        except CellstreamError:
            if error is None:  # the body's own error matters more than a failed close
                raise

    @property
    def session_id(self) -> str:
        return self._async.session_id

    @property
    def model(self) -> str:
        return self._async.model

    @property
    def position(self) -> int | None:
        """Steps consumed so far, as this client knows it (None: unknown until the session's next call)."""
        return self._async.position

    def step(self, tokens: Any = None, **options: Any) -> StepResult:
        return self._runner.run(self._async.step(tokens, **options))

    def generate(self, prompt: str, **options: Any) -> Iterator[Chunk]:
        chunks = self._async.generate(prompt, **options)
        try:
            while (chunk := self._runner.run(_next(chunks))) is not None:
                yield chunk
        finally:
            self._runner.run(chunks.aclose())

    def reply(self, prompt: str, **options: Any) -> str:
        return self._runner.run(self._async.reply(prompt, **options))

    @property
    def state(self) -> State:
        """The session's state now (GetState), with the client's default deadline."""
        return self.get_state()

    def get_state(self, *, timeout: Timeout = ...) -> State:
        return self._runner.run(self._async.get_state(timeout=timeout))

    def fork(self, *, ttl_seconds: int = 0, timeout: Timeout = ...) -> Session:
        return Session(self._runner, self._runner.run(self._async.fork(ttl_seconds=ttl_seconds, timeout=timeout)))

    def close(self, *, timeout: Timeout = ...) -> int | None:
        return self._runner.run(self._async.close(timeout=timeout))

    step.__doc__ = AsyncSession.step.__doc__
    generate.__doc__ = AsyncSession.generate.__doc__
    reply.__doc__ = AsyncSession.reply.__doc__
    get_state.__doc__ = AsyncSession.get_state.__doc__
    fork.__doc__ = AsyncSession.fork.__doc__
    close.__doc__ = AsyncSession.close.__doc__


class Client:
    """A blocking client, with the options of AsyncClient: `with Client("127.0.0.1:50051") as client:`.
    Safe to use from many threads at once: their sessions' steps are coalesced onto one stream."""

    def __init__(self, target: str, **options: Any) -> None:
        self._runner = LoopThread()
        try:
            self._async = self._runner.run(self._connect(target, options))
        except BaseException:
            self._runner.stop()
            raise

    @staticmethod
    async def _connect(target: str, options: dict[str, Any]) -> AsyncClient:
        return AsyncClient(target, **options)  # the channel belongs to the loop it is made in

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the calls in flight, close the channel and stop the client's thread."""
        if self._runner.loop.is_closed():
            return
        try:
            self._runner.run(self._async.aclose())
        finally:
            self._runner.stop()

    @property
    def steps_per_message(self) -> float:
        return self._async.steps_per_message

    def session(self, model: str = "", *, ttl_seconds: int = 0, state: State | None = None,
                timeout: Timeout = ...) -> Session:
        """A new session of `model` (empty: the server's default), from zero state or `state`; closed at the end
        of `with client.session() as s:`, else by `s.close()` or its TTL."""
        opened = self._runner.run(self._async.open_session(model, ttl_seconds=ttl_seconds, state=state,
                                                           timeout=timeout))
        return Session(self._runner, opened)

    def attach(self, session_id: str, *, timeout: Timeout = ...) -> Session:
        return Session(self._runner, self._runner.run(self._async.attach(session_id, timeout=timeout)))

    def models(self, *, timeout: Timeout = ...) -> list[ModelInfo]:
        return self._runner.run(self._async.models(timeout=timeout))

    attach.__doc__ = AsyncClient.attach.__doc__
    models.__doc__ = AsyncClient.models.__doc__

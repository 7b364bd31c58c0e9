"""Exactly once across lost replies: a real TCP proxy between client and server swallows the server's replies
or drops the connections, so an attempt's outcome is lost after (or before) the server applied it. Every step
is then applied once and only once, which the session's state (against in-process onnxruntime) and position
show. tests/e2e/test_client_failover.py does it with a server killed mid-call and another taking over."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

import cellstream
from cellstream import AsyncClient
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

CHAT = "tiny-chat"
pytestmark = pytest.mark.timeout(120)


class Proxy:
    """A TCP proxy on a free loopback port to `upstream`: passes bytes both ways, or (`mode`) swallows what the
    server sends ("hold": the replies are lost), or closes each new connection at once ("refuse"); `cut()`
    drops every connection, as a failed network or a dead server would."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers += [writer, up_writer]
        for pump in (self._pump(reader, up_writer, replies=False), self._pump(up_reader, writer, replies=True)):
            task = asyncio.ensure_future(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, replies: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if replies and self.mode == "hold":
                    continue  # lost on the way back
                sink.write(data)
                await sink.drain()
        sink.transport.abort()

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._pumps):
            task.cancel()


@pytest.fixture
async def proxy(server):
    running = await Proxy(server.port).start()
    yield running
    await running.stop()


async def position_on_server(stub, session_id: str) -> int:
    return (await stub.GetState(pb.SessionRef(session_id=session_id))).position


@pytest.mark.parametrize("multiplex", [True, False], ids=["StreamMany", "Step"])
async def test_a_step_applied_whose_reply_was_lost_returns_the_applied_result(proxy, stub, eventually, ref, close,
                                                                              multiplex):
    async with AsyncClient(proxy.target, multiplex=multiplex) as client:
        session = await client.session(CHAT)
        await session.step([1, 2])
        proxy.mode = "hold"
        step = asyncio.ensure_future(session.step([3, 4, 5], logits=True, state=True))

        async def applied() -> bool:
            return await position_on_server(stub, session.session_id) == 5

        await eventually(applied, "the step applied on the server")
        proxy.mode = "pass"
        proxy.cut()  # the reply never arrives: the client retries, is told ABORTED, and finds its step applied
        result = await asyncio.wait_for(step, 30)
        assert result.recovered and result.position == 5 and session.position == 5
        assert result.logits is None  # the server does not keep a step's outputs
        _, h, c = ref.run(CHAT, [1, 2, 3, 4, 5])
        close(result.state.h, h, "h after the step, applied once")
        close(result.state.c, c, "c")
        assert (client.retried_attempts, client.recovered_steps) == (1, 1)
        assert (await session.step([6])).position == 6
    assert await position_on_server(stub, session.session_id) == 6


async def test_a_step_cut_off_before_it_applied_is_applied_by_its_retry(proxy, stub, server, gate, scrape,
                                                                         eventually, ref, close):
    async with AsyncClient(proxy.target) as client:
        session = await client.session(CHAT)
        await session.step([9])
        held = gate(server)
        step = asyncio.ensure_future(session.step([10, 11], logits=True))
        await asyncio.to_thread(held.running.wait, 30)  # the step is in a batch, not committed yet

        async def stream_cancelled() -> bool:
            samples = await scrape(server)
            return samples.get("cellstream_requests_total", 0.0, method="StreamMany", code="CANCELLED") == 1

        proxy.cut()  # the stream is gone: the server commits nothing of it
        await eventually(stream_cancelled, "the server saw the stream go")
        held.open.set()
        result = await asyncio.wait_for(step, 30)
        assert not result.recovered and result.position == 3
        close(result.logits, ref.run(CHAT, [9, 10, 11])[0][-1], "logits of the retried step")
        assert client.retried_attempts == 1 and client.recovered_steps == 0
    assert await position_on_server(stub, session.session_id) == 3


async def test_steps_made_while_the_server_is_unreachable_are_retried_until_it_is_back(proxy, stub):
    async with AsyncClient(proxy.target) as client:
        session = await client.session(CHAT)
        proxy.mode = "refuse"
        proxy.cut()
        steps = asyncio.ensure_future(asyncio.gather(session.step([1]), session.step([2])))
        await asyncio.sleep(0.3)  # a few attempts fail UNAVAILABLE meanwhile
        assert not steps.done()
        proxy.mode = "pass"
        first, second = await asyncio.wait_for(steps, 30)
        assert (first.position, second.position) == (1, 2)
        assert client.retried_attempts >= 1
    assert await position_on_server(stub, session.session_id) == 2


async def test_a_server_gone_for_longer_than_the_attempts_fails_unavailable(proxy):
    async with AsyncClient(proxy.target, max_attempts=3) as client:
        session = await client.session(CHAT)
        proxy.mode = "refuse"
        proxy.cut()
        with pytest.raises(cellstream.Unavailable, match="after 3 attempts") as info:
            await session.step([1])
        assert info.value.applied is None  # sent at least once: the session settles it at its next call
        proxy.mode = "pass"
        await asyncio.sleep(1.1)  # the channel tries to reconnect at least every second (cellstream.connection)
        assert (await session.step([2])).position == 1  # the first never arrived; this one went from 0


async def test_an_earlier_step_that_landed_after_its_caller_left_is_learnt_by_the_next(proxy, stub, server, gate,
                                                                                        eventually, ref, close):
    async with AsyncClient(proxy.target) as client:
        session = await client.session(CHAT)
        held = gate(server)
        proxy.mode = "hold"
        with pytest.raises(cellstream.DeadlineExceeded):
            await session.step([20, 21, 22], timeout=0.3)
        held.open.set()

        async def landed() -> bool:
            return await position_on_server(stub, session.session_id) == 3

        await eventually(landed, "the timed-out step applied on the server")
        proxy.cut()  # its outcome is lost for good: the session is left in doubt about it
        proxy.mode = "pass"
        result = await asyncio.wait_for(session.step([23], logits=True), 30)
        assert result.position == 4 and not result.recovered  # sent again from where the earlier step left it
        close(result.logits, ref.run(CHAT, [20, 21, 22, 23])[0][-1], "both steps applied once, in order")
    assert await position_on_server(stub, session.session_id) == 4


async def test_another_writer_makes_a_position_conflict_and_the_session_goes_on_from_there(client, stub, step):
    session = await client.session(CHAT)
    await session.step([1])
    await stub.Step(step(session.session_id, tokens=[2, 3]))  # someone else, elsewhere
    with pytest.raises(cellstream.PositionConflict, match="now at position 3") as info:
        await session.step([4])
    assert (info.value.position, info.value.applied) == (3, False)
    assert session.position == 3
    assert (await session.step([4])).position == 4

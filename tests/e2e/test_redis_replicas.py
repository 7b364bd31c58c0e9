"""R. Server processes sharing one real redis-server: failover after SIGKILL, two replicas racing on
one session, and Redis stopped and restarted under load. Every output is checked against in-process
onnxruntime fed the session's whole history from zero state.

A conversation's next tokens are a function of its position, so whatever a failure did (a step
applied but unanswered, a step never applied), the history behind any position is known exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
REDIS_FLAGS = {"store_probe_interval_seconds": 0.2, "state_store_timeout_seconds": 0.5}
TIMEOUT = 10  # seconds, every call
Stub = pb_grpc.InferenceStub


def step_request(session_id: str, tokens: list[int], expected_position: int) -> pb.StepRequest:
    """A step conditional on the position, asking for the last logits."""
    return pb.StepRequest(session_id=session_id, tokens=pb.TokenSequence(ids=tokens),
                          expected_position=expected_position, want=pb.Outputs(logits=True))


async def get_state(stub: Stub, session_id: str) -> pb.State:
    return await stub.GetState(pb.SessionRef(session_id=session_id), timeout=TIMEOUT)


async def open_session(stub: Stub) -> str:
    return (await stub.OpenSession(pb.OpenSessionRequest(), timeout=TIMEOUT)).session_id


@contextlib.asynccontextmanager
async def stubs(*targets: str) -> AsyncIterator[list[Stub]]:
    """The cellstream.v1 stub on a channel of its own to each target (this test drives the RPCs itself: the
    conditional steps, the re-reads, the fail-over; cellstream.AsyncClient does it for users, see
    tests/e2e/test_client_failover.py)."""
    async with contextlib.AsyncExitStack() as stack:
        channels = [await stack.enter_async_context(grpc.aio.insecure_channel(t)) for t in targets]
        yield [pb_grpc.InferenceStub(channel) for channel in channels]


@dataclass
class Conversation:
    """Steps one session with tokens determined by its position, each conditional on that position."""

    seed: int
    session_id: str = ""
    position: int = 0
    outputs: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (position after, last logits)
    errors: list[grpc.StatusCode] = field(default_factory=list)

    def tokens_at(self, position: int) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + position)
        return [rng.randrange(256) for _ in range(rng.randint(1, 4))]

    def history(self, position: int) -> list[int]:
        tokens: list[int] = []
        while len(tokens) < position:
            tokens += self.tokens_at(len(tokens))
        assert len(tokens) == position, f"position {position} is not on the conversation's path"
        return tokens

    async def step(self, stub: Stub) -> bool:
        """One conditional step; on failure the position is re-read (the step may have been applied)."""
        try:
            response = await stub.Step(step_request(self.session_id, self.tokens_at(self.position), self.position),
                                       timeout=TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            self.errors.append(exc.code())
            await self.resync(stub)
            return False
        self.position = response.position
        self.outputs.append((response.position, np.asarray(response.logits, np.float32)))
        return True

    async def resync(self, stub: Stub) -> None:
        try:
            self.position = (await get_state(stub, self.session_id)).position
        except grpc.aio.AioRpcError as exc:
            self.errors.append(exc.code())

    def check(self, ref, close, state) -> None:
        """Every answered step and the final state equal the uninterrupted reference."""
        full = self.history(state.position)
        for position, logits in self.outputs:
            want, _, _ = ref.run("tiny-chat", full[:position])
            close(logits, want[-1], f"session {self.seed} logits at {position}")
        _, h, c = ref.run("tiny-chat", full)
        close(np.asarray(state.h).reshape(h.shape), h, f"session {self.seed} h")
        close(np.asarray(state.c).reshape(c.shape), c, f"session {self.seed} c")


async def keep_stepping(conversation: Conversation, clients: list[Stub], stop: asyncio.Event) -> None:
    """Step on clients[0]; when its server is gone (UNAVAILABLE), fail over to the next one."""
    current = 0
    while not stop.is_set():
        if not await conversation.step(clients[current]) and conversation.errors[-1] == grpc.StatusCode.UNAVAILABLE:
            if current + 1 < len(clients):
                current += 1
                await conversation.resync(clients[current])  # where the interrupted step left the session
            await asyncio.sleep(0.05)


def only_failure_codes(errors: list[grpc.StatusCode]) -> None:
    """UNAVAILABLE while a server or Redis is gone; ABORTED only after one, when a step whose answer
    was lost had been applied after all (the conversation then re-reads its position and goes on)."""
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}, errors
    unavailable = grpc.StatusCode.UNAVAILABLE
    first_failure = errors.index(unavailable) if unavailable in errors else len(errors)
    assert grpc.StatusCode.ABORTED not in errors[:first_failure], f"ABORTED with nothing having failed: {errors}"


async def health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)).status


@pytest.mark.timeout(180)
async def test_failover_after_sigkill_continues_exactly(serve_process, redis_server, ref, close):
    a = serve_process(state_store=redis_server.url, **REDIS_FLAGS)
    b = serve_process(state_store=redis_server.url, **REDIS_FLAGS)
    await asyncio.gather(a.wait_serving(), b.wait_serving())
    async with stubs(a.target, b.target) as (on_a, on_b):
        conversations = [Conversation(seed) for seed in range(8)]
        for conversation in conversations:
            conversation.session_id = await open_session(on_a)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(keep_stepping(c, [on_a, on_b], stop)) for c in conversations]
        while min(len(c.outputs) for c in conversations) < 5:
            await asyncio.sleep(0.02)
        a.signal(signal.SIGKILL)  # mid-conversation: steps are in flight on A right now
        killed_at = [len(c.outputs) for c in conversations]
        while any(len(c.outputs) < n + 10 for c, n in zip(conversations, killed_at, strict=True)):
            await asyncio.sleep(0.02)
            assert all(not t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        stop.set()
        await asyncio.gather(*tasks)
        assert await a.wait_exit(5) == -signal.SIGKILL
        for conversation in conversations:
            only_failure_codes(conversation.errors)
            conversation.check(ref, close, await get_state(on_b, conversation.session_id))
    assert sum(len(c.errors) for c in conversations) >= 1, "no step was in flight when A died"


@pytest.mark.timeout(180)
async def test_two_replicas_racing_on_one_session_lose_and_double_nothing(serve_process, redis_server, ref,
                                                                          close):
    a = serve_process(state_store=redis_server.url, **REDIS_FLAGS)
    b = serve_process(state_store=redis_server.url, **REDIS_FLAGS)
    await asyncio.gather(a.wait_serving(), b.wait_serving())
    accepted: list[tuple[int, list[int], int, np.ndarray, int]] = []  # (from, tokens, to, logits, who)
    aborted = [0, 0]

    async def race(stub: Stub, who: int, session_id: str) -> None:
        rng = random.Random(who)
        known = 0  # this client's idea of the position: stale whenever the other one stepped
        for _ in range(60):
            tokens = [rng.randrange(256) for _ in range(rng.randint(1, 3))]
            try:
                response = await stub.Step(step_request(session_id, tokens, known), timeout=TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.ABORTED, exc
                aborted[who] += 1
                known = (await get_state(stub, session_id)).position
                continue
            accepted.append((known, tokens, response.position, np.asarray(response.logits, np.float32), who))
            known = response.position

    async with stubs(a.target, b.target) as (on_a, on_b):
        session_id = await open_session(on_a)
        await asyncio.gather(race(on_a, 0, session_id), race(on_b, 1, session_id))
        final = await get_state(on_b, session_id)

    assert sum(aborted) > 0, "no race happened: no step was aborted"
    assert {who for *_, who in accepted} == {0, 1}, "one replica never got a step in"
    accepted.sort(key=lambda step: step[0])
    history: list[int] = []
    for start, tokens, end, logits, _ in accepted:
        assert start == len(history), "a step was lost or applied twice (the accepted steps do not tile)"
        assert end == start + len(tokens)
        history += tokens
        want, _, _ = ref.run("tiny-chat", history)
        close(logits, want[-1], f"logits of the step from {start}")
    assert final.position == len(history)
    _, h, c = ref.run("tiny-chat", history)
    close(np.asarray(final.h).reshape(h.shape), h, "final h")
    close(np.asarray(final.c).reshape(c.shape), c, "final c")
    print(f"\n{len(accepted)} steps accepted, {sum(aborted)} aborted")


@pytest.mark.timeout(180)
async def test_redis_stopped_mid_load_fails_unavailable_then_resumes_exactly(serve_process, redis_server,
                                                                             ref, close):
    server = serve_process(state_store=redis_server.url, **REDIS_FLAGS)
    await server.wait_serving()
    async with stubs(server.target) as (client,):
        conversations = [Conversation(seed) for seed in range(16)]
        for conversation in conversations:
            conversation.session_id = await open_session(client)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(keep_stepping(c, [client], stop)) for c in conversations]
        while min(len(c.outputs) for c in conversations) < 3:
            await asyncio.sleep(0.02)

        redis_server.stop(kill=True)
        down_at = [len(c.outputs) for c in conversations]
        deadline = time.monotonic() + 10
        while await health(server.target) != NOT_SERVING:
            assert time.monotonic() < deadline, "health never reported NOT_SERVING"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)
        assert server.proc.poll() is None, server.log()
        stalled = [len(c.outputs) for c in conversations]

        redis_server.start()
        deadline = time.monotonic() + 10
        while await health(server.target) != SERVING:
            assert time.monotonic() < deadline, "health never came back to SERVING"
            await asyncio.sleep(0.05)
        while any(len(c.outputs) < n + 5 for c, n in zip(conversations, stalled, strict=True)):
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*tasks)

        for conversation, before, during in zip(conversations, down_at, stalled, strict=True):
            assert during - before <= 2, "steps kept succeeding long after Redis went away"
            assert grpc.StatusCode.UNAVAILABLE in conversation.errors
            only_failure_codes(conversation.errors)
            conversation.check(ref, close, await get_state(client, conversation.session_id))
    log = server.log()
    assert "session store unreachable" in log and "reachable again" in log
    assert "Traceback" not in log, log

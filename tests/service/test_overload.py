"""O. Admission control on a live server: calls past max_inflight_requests are refused at once with
RESOURCE_EXHAUSTED, health keeps answering, and capacity comes back as calls finish."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(60)


async def test_calls_past_the_inflight_bound_are_refused_at_once(start, connect, scrape, rpc_error, step):
    server = await start(max_inflight_requests=2)
    stub = connect(server)
    sessions = [await stub.OpenSession(pb.OpenSessionRequest()) for _ in range(3)]
    streams = []
    for session in sessions[:2]:  # an open stream holds its slot
        stream = stub.StreamSteps(timeout=30)
        await stream.write(step(session.session_id, tokens=[1]))
        assert (await stream.read()).position == 1
        streams.append(stream)

    asked = time.monotonic()
    error = await rpc_error(stub.Step(step(sessions[2].session_id, tokens=[2])))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_inflight_requests" in error.details()
    assert time.monotonic() - asked < 1.0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == \
            health_pb2.HealthCheckResponse.SERVING

    await streams[0].done_writing()
    assert await streams[0].code() == grpc.StatusCode.OK
    assert (await stub.Step(step(sessions[2].session_id, tokens=[2]))).position == 1
    await streams[1].done_writing()
    assert await streams[1].code() == grpc.StatusCode.OK
    samples = await scrape(server)
    assert samples.get("cellstream_calls_refused_total", reason="overloaded") == 1


async def test_a_deadline_is_honoured_while_steps_queue(start, connect, gate, scrape, rpc_error, eventually, step):
    server = await start()
    stub = connect(server)
    held = gate(server)
    blocker, waiting = await stub.OpenSession(pb.OpenSessionRequest()), await stub.OpenSession(pb.OpenSessionRequest())
    first = asyncio.ensure_future(stub.Step(step(blocker.session_id, tokens=[1])))
    await asyncio.to_thread(held.running.wait, 30)  # the model is busy: the next step queues behind it
    late = asyncio.ensure_future(rpc_error(
        stub.Step(step(waiting.session_id, tokens=[2]), timeout=1.0)))
    batcher = server.dataplane.batchers["tiny-chat"]
    # Queued on the server, not lost on the way: the queue only empties once the gate opens.
    await eventually(lambda: batcher.queued == 1, "the step reaches the server and queues")

    # The deadline ends the call while the model is still held: the server does not wait for its turn.
    assert (await late).code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def counted() -> bool:
        samples = await scrape(server)
        return samples.get("cellstream_requests_total", 0.0, method="Step", code="DEADLINE_EXCEEDED") == 1

    await eventually(counted, "the server counts the queued Step DEADLINE_EXCEEDED")
    assert not first.done() and batcher.queued == 1
    held.open.set()
    assert (await asyncio.wait_for(first, 30)).position == 1

    # Its turn came after its caller had gone: dropped unrun, the session untouched and usable.
    await eventually(lambda: batcher.queued == 0, "the batcher takes up the late step")
    samples = await scrape(server)
    assert sum(samples.get("cellstream_steps_dropped_total", 0.0, model="tiny-chat", reason=reason)
               for reason in ("deadline", "cancelled")) == 1
    assert (await stub.GetState(pb.SessionRef(session_id=waiting.session_id))).position == 0
    assert (await stub.Step(step(waiting.session_id, tokens=[2]))).position == 1


async def test_a_burst_past_grpc_cores_pending_bound_is_served_not_cancelled(start, connect):
    # gRPC core cancels calls at random once more than 1,000 wait to be picked up; the server moves that
    # bound past its admission bound, which refuses with a message instead (bare CANCELLED was seen at 1,024).
    server = await start(max_inflight_requests=2048)
    clients = [connect(server), connect(server)]
    calls = [stub.ListModels(pb.ListModelsRequest(), timeout=30) for stub in clients for _ in range(1000)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    codes = Counter("OK" if isinstance(o, pb.ListModelsResponse) else o.code().name for o in outcomes)
    assert codes == {"OK": 2000}

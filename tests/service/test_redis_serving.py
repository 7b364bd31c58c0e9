"""L. Servers on a shared Redis store: any replica serves any session; Redis down means UNAVAILABLE
and NOT_SERVING (never a silent fallback), and everything resumes by itself when it is back."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import aio as triton_aio

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.config import SettingsError, load_settings

pytestmark = pytest.mark.timeout(90)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
TOKENS = [104, 105, 32, 116, 104, 101, 114, 101, 10]


async def health_status(running) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        return (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status


async def wait_health(running, status: int, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await health_status(running) == status:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"health not {health_pb2.HealthCheckResponse.ServingStatus.Name(status)} after {within}s")


async def test_any_replica_serves_any_session(start, connect, redis_server, scrape, ref, close, arrays, eventually,
                                              step):
    a = await start(state_store=redis_server.url)
    b = await start(state_store=redis_server.url)
    on_a, on_b = connect(a), connect(b)
    session = await on_a.OpenSession(pb.OpenSessionRequest())
    await on_a.Step(step(session.session_id, tokens=TOKENS[:4]))
    response = await on_b.Step(step(session.session_id, tokens=TOKENS[4:], logits=True, state=True))
    assert response.position == len(TOKENS)
    want, h, c = ref.run("tiny-chat", np.array(TOKENS))
    close(np.asarray(response.logits), want[-1], "logits")
    got_h, got_c = arrays(await on_a.GetState(pb.SessionRef(session_id=session.session_id)))
    close(got_h, h, "h")
    close(got_c, c, "c")

    # Both replicas report the shared store's total, refreshed by each one's probe (every second).
    for running in (a, b):
        async def reports_the_shared_store(running=running) -> bool:
            samples = await scrape(running)
            return (samples.get("cellstream_sessions_active"), samples.get("cellstream_state_bytes")) == \
                (1, 2 * 2 * 16 * 4)

        await eventually(reports_the_shared_store, f"replica on port {running.port} reports the shared session")

    await on_b.CloseSession(pb.SessionRef(session_id=session.session_id))
    error = await asyncio.gather(on_a.GetState(pb.SessionRef(session_id=session.session_id)), return_exceptions=True)
    assert error[0].code() == grpc.StatusCode.NOT_FOUND


async def readiness(server, triton: triton_aio.InferenceServerClient, scrape) -> tuple[float, bool, bool]:
    """The store gauge, KServe's ServerReady and ModelReady."""
    up = (await scrape(server)).get("cellstream_state_store_up")
    return up, await triton.is_server_ready(), await triton.is_model_ready("tiny-chat")


async def test_redis_outage_is_unavailable_not_serving_then_recovers(start, connect, redis_server, ref, close,
                                                                     rpc_error, scrape, step):
    server = await start(state_store=redis_server.url, store_probe_interval_seconds=0.2,
                         state_store_timeout_seconds=0.5)
    stub = connect(server)
    triton = triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}")
    session = await stub.OpenSession(pb.OpenSessionRequest())
    await stub.Step(step(session.session_id, tokens=TOKENS[:5]))
    assert await health_status(server) == SERVING
    assert await readiness(server, triton, scrape) == (1, True, True)

    redis_server.stop()
    await wait_health(server, NOT_SERVING, within=30)
    assert await readiness(server, triton, scrape) == (0, False, False)
    for call in (stub.Step(step(session.session_id, tokens=TOKENS[5:])), stub.OpenSession(pb.OpenSessionRequest()),
                 stub.GetState(pb.SessionRef(session_id=session.session_id))):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "session store unreachable (Redis at redis://127.0.0.1:" in error.details()
    assert await health_status(server) == NOT_SERVING

    redis_server.start()
    await wait_health(server, SERVING, within=30)
    assert await readiness(server, triton, scrape) == (1, True, True)
    await triton.close()
    state = await stub.GetState(pb.SessionRef(session_id=session.session_id))
    assert state.position == 5, "a step refused while Redis was down changed the session"
    response = await stub.Step(step(session.session_id, tokens=TOKENS[5:], logits=True))
    assert response.position == len(TOKENS)
    want, _, _ = ref.run("tiny-chat", np.array(TOKENS))
    close(np.asarray(response.logits), want[-1], "logits after recovery")


async def test_server_started_while_redis_is_down_waits_not_serving(start, connect, redis_server, step):
    redis_server.stop()
    server = await start(state_store=redis_server.url, store_probe_interval_seconds=0.2,
                         state_store_timeout_seconds=0.5)
    stub = connect(server)
    assert await health_status(server) == NOT_SERVING
    redis_server.start()
    await wait_health(server, SERVING, within=30)
    session = await stub.OpenSession(pb.OpenSessionRequest())
    assert (await stub.Step(step(session.session_id, tokens=TOKENS))).position == len(TOKENS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"state_store": "http://user:hunter2@host:1/0"}, "state_store must be 'memory' or a URL with scheme redis"),
        ({"state_store": "redis://:hunter2@host:1/0", "snapshot_path": "/tmp/s"}, "snapshot_path applies to the "
                                                                                   "memory store only"),
    ],
)
def test_store_settings_are_checked_without_echoing_passwords(overrides, message):
    with pytest.raises(SettingsError, match=message) as info:
        load_settings(**overrides)
    assert "hunter2" not in str(info.value)

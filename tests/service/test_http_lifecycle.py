"""The HTTP port's life: readiness follows the session store (Redis stopped and started), a session store
outage is 503 with the store's words, and a graceful stop lets a streamed turn finish while new
connections are refused."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cellstream.bench.server import free_ports
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

CHAT = "tiny-chat"

pytestmark = pytest.mark.timeout(120)


async def test_readiness_follows_the_session_store(start, redis_server, eventually):
    [port] = free_ports(1)
    server = await start(http_port=port, state_store=redis_server.url, store_probe_interval_seconds=0.2,
                         state_store_timeout_seconds=0.5)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as http:
        sid = (await http.post("/v1/sessions")).json()["session_id"]
        assert (await http.post(f"/v1/sessions/{sid}/step", json={"text": "hi"})).status_code == 200

        async def ready_is(status: int) -> bool:
            return (await http.get("/v2/health/ready")).status_code == status

        redis_server.stop()
        await eventually(lambda: ready_is(503), "readiness goes while Redis is down")
        assert (await http.get("/v2/health/live")).status_code == 200
        assert (await http.get(f"/v2/models/{CHAT}/ready")).json() == {"name": CHAT, "ready": False}
        refused = await http.post(f"/v1/sessions/{sid}/step", json={"text": "x"})
        assert refused.status_code == 503 and "session store unreachable" in refused.json()["error"]

        redis_server.start()
        await eventually(lambda: ready_is(200), "readiness comes back with Redis")
        state = (await http.get(f"/v1/sessions/{sid}/state")).json()
        assert state["position"] == "2", "the step refused while Redis was down changed the session"



async def test_a_graceful_stop_finishes_a_streamed_turn(start, connect, eventually, hold_run):
    [port] = free_ports(1)
    server = await start(http_port=port)
    sid = (await connect(server).OpenSession(pb.OpenSessionRequest())).session_id
    batcher = server.dataplane.batchers[CHAT]
    batcher.inline_max_tokens = 0  # the held engine blocks: never on the event loop
    hold = batcher.engine = hold_run(batcher.engine, 4)
    base = f"http://127.0.0.1:{server.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        body = {"prompt": "user: hi\nbot: ", "max_tokens": 12}
        async with http.stream("POST", f"/v1/sessions/{sid}/generate", json=body) as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("event: chunk")
            await asyncio.to_thread(hold.running.wait, 20)
            stopping = asyncio.create_task(server.stop(10))

            async def refused() -> bool:
                async with httpx.AsyncClient(timeout=5) as other:
                    try:
                        await other.get(f"{base}/v2/health/live")
                    except httpx.TransportError:
                        return True
                return False

            await eventually(refused, "the HTTP port stops accepting once the stop begins")
            assert not server.kserve.ready
            hold.open.set()
            rest = [line async for line in lines]
        assert "event: done" in rest, rest
        await asyncio.wait_for(stopping, 30)

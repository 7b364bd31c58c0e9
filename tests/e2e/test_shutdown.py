"""I. Graceful shutdown of a real `cellstream serve` process on SIGTERM.

While streams are stepping: health flips to NOT_SERVING, new calls are refused, the streams' steps
keep completing until the clients finish, and the process exits 0 within the grace period. Streams
that outlive the grace period are cut off and the process still exits 0 in time.
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
STREAMS = 3


async def new_calls_refused(target: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        async with grpc.aio.insecure_channel(target) as fresh:
            try:
                await pb_grpc.InferenceStub(fresh).OpenSession(pb.OpenSessionRequest(), timeout=2)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return True
        await asyncio.sleep(0.05)
    return False


class Stepper:
    """One StreamSteps call stepping a session two tokens at a time until told to stop."""

    def __init__(self, stub: pb_grpc.InferenceStub, session_id: str) -> None:
        self.stub = stub
        self.session_id = session_id
        self.sent = 0
        self.positions: list[int] = []
        self.progress = asyncio.Event()
        self.stop = asyncio.Event()

    async def run(self, stop_writing: bool = True) -> grpc.StatusCode:
        call = self.stub.StreamSteps(timeout=60)
        try:
            while not (stop_writing and self.stop.is_set()):
                request = pb.StepRequest(session_id=self.session_id if self.sent == 0 else "",
                                         tokens=pb.TokenSequence(ids=[self.sent % 256, 32]))
                await call.write(request)
                self.sent += 1
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                self.positions.append(response.position)
                if len(self.positions) >= 3:
                    self.progress.set()
            await call.done_writing()
            return await call.code()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return await call.code()


async def test_sigterm_drains_in_flight_streams(serve_process):
    grace = 5
    server = serve_process(shutdown_grace_seconds=grace)
    await server.wait_serving()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        sessions = [await stub.OpenSession(pb.OpenSessionRequest()) for _ in range(STREAMS)]
        steppers = [Stepper(stub, s.session_id) for s in sessions]
        tasks = [asyncio.create_task(s.run()) for s in steppers]
        await asyncio.wait_for(asyncio.gather(*(s.progress.wait() for s in steppers)), 30)

        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="cellstream.v1.Inference"), timeout=60)
        assert (await asyncio.wait_for(watch.read(), 10)).status == SERVING

        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
        watch.cancel()
        counts_at_signal = [len(s.positions) for s in steppers]

        # New calls are refused while the old ones drain (health flips a moment before the server stops
        # accepting, so allow that moment).
        assert await new_calls_refused(server.target, within=3.0)

        # The streams keep stepping well after the signal, within the grace period.
        await asyncio.sleep(1.0)
        for stepper in steppers:
            stepper.stop.set()
        codes = await asyncio.wait_for(asyncio.gather(*tasks), 30)

    assert codes == [grpc.StatusCode.OK] * STREAMS, server.log()
    for stepper, at_signal in zip(steppers, counts_at_signal, strict=True):
        assert len(stepper.positions) == stepper.sent, "a step that was sent got no response"
        assert stepper.positions == [2 * (i + 1) for i in range(stepper.sent)]
        assert len(stepper.positions) > at_signal, "no step completed after SIGTERM"
    code = await server.wait_exit(grace + 5 - (time.monotonic() - signalled))
    assert code == 0, f"exit code {code}:\n{server.log()}"
    log = server.log()
    assert "draining" in log and "stopped" in log
    assert "Traceback" not in log, log


async def test_streams_past_the_grace_period_are_cut_off(serve_process):
    grace = 1
    server = serve_process(shutdown_grace_seconds=grace)
    await server.wait_serving()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        session = await stub.OpenSession(pb.OpenSessionRequest())
        stepper = Stepper(stub, session.session_id)
        task = asyncio.create_task(stepper.run(stop_writing=False))
        await asyncio.wait_for(stepper.progress.wait(), 30)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = await asyncio.wait_for(task, 30)
        cut_after = time.monotonic() - signalled
    assert code != grpc.StatusCode.OK
    assert cut_after < grace + 5
    # Every response it did get was a consistent step.
    assert stepper.positions == [2 * (i + 1) for i in range(len(stepper.positions))]
    exit_code = await server.wait_exit(grace + 5 - (time.monotonic() - signalled))
    assert exit_code == 0, f"exit code {exit_code}:\n{server.log()}"
    assert "Traceback" not in server.log()

"""The client side of the multiplexed runs: many sessions' 1-token steps in each StreamMany or StepMany message.

Each call carries a fixed set of sessions and sends the same pre-serialised StepBatch (one step per
session) again as soon as every outcome of the previous one arrived: every session steps back to
back, as in the StreamSteps runs, but a message carries all of a call's sessions.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from cellstream.bench import wire
from cellstream.bench.gate import Gate
from cellstream.bench.jobs import Events, ManyLoad
from cellstream.bench.options import API_STREAM_MANY


async def many_load(channel: grpc.aio.Channel, job: ManyLoad, gate: Gate) -> Events:
    """One round per call before `ready` (nothing is cold), then rounds back to back until stop."""
    groups = [[await wire.open_session(channel, job.timeout_seconds) for _ in range(n)] for n in job.sessions_per_call]
    requests = [(wire.step_batch(ids), len(ids)) for ids in groups]
    events = Events()
    if job.api == API_STREAM_MANY:
        calls = [channel.stream_stream(wire.STREAM_MANY)(timeout=job.timeout_seconds) for _ in requests]
        for call, (request, count) in zip(calls, requests, strict=True):
            await _stream_round(call, request, count)
        await gate.ready()
        await asyncio.gather(*(_drive_stream(call, request, count, gate, events)
                               for call, (request, count) in zip(calls, requests, strict=True)))
        return events
    step_many = channel.unary_unary(wire.STEP_MANY)
    for request, _ in requests:
        wire.outcomes(await step_many(request, timeout=job.timeout_seconds))
    await gate.ready()
    await asyncio.gather(*(_drive_unary(step_many, request, count, job.timeout_seconds, gate, events)
                           for request, count in requests))
    return events


async def _stream_round(call: grpc.aio.StreamStreamCall, request: bytes, count: int) -> None:
    """Send one message and read replies until each of its `count` items has its outcome."""
    await call.write(request)
    received = 0
    while received < count:
        reply = await call.read()
        if reply is grpc.aio.EOF:
            raise RuntimeError(f"StreamMany ended with {(await call.code()).name}: {await call.details()}")
        received += wire.outcomes(reply)


async def _drive_stream(call: grpc.aio.StreamStreamCall, request: bytes, count: int, gate: Gate,
                        events: Events) -> None:
    while not gate.stopping:
        start = time.monotonic()
        await _stream_round(call, request, count)
        events.add(start, time.monotonic(), count)
    await wire.finish(call, "StreamMany")


async def _drive_unary(step_many: grpc.aio.UnaryUnaryMultiCallable, request: bytes, count: int, timeout: float,
                       gate: Gate, events: Events) -> None:
    while not gate.stopping:
        start = time.monotonic()
        received = wire.outcomes(await step_many(request, timeout=timeout))
        if received != count:
            raise RuntimeError(f"StepMany answered {received} of {count} items")
        events.add(start, time.monotonic(), count)

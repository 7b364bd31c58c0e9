"""The client side of each figure, run inside a client process on its own event loop (the multiplexed
runs' in bench/multiplexed.py)."""

from __future__ import annotations

import asyncio
import time

import grpc

from cellstream.bench import wire
from cellstream.bench.echo import STREAM as ECHO_STREAM
from cellstream.bench.echo import UNARY as ECHO_UNARY
from cellstream.bench.gate import Gate
from cellstream.bench.http_load import http_load
from cellstream.bench.jobs import (
    Conversation,
    EchoLoad,
    Events,
    GenerateLoad,
    HttpLoad,
    Job,
    KServeLoad,
    ManyLoad,
    OpenIdle,
    StepLoad,
    TurnLatencies,
)
from cellstream.bench.kserve_load import kserve_load
from cellstream.bench.multiplexed import many_load
from cellstream.bench.options import API_STREAM
from cellstream.bench.stats import split_evenly


async def run_job(target: str, job: Job, gate: Gate) -> Events | TurnLatencies | int:
    if isinstance(job, KServeLoad):  # tritonclient makes its own channel
        return await kserve_load(target, job, gate)
    if isinstance(job, HttpLoad):  # the HTTP port, through tritonclient.http's own client
        return await http_load(job, gate)
    async with grpc.aio.insecure_channel(target) as channel:
        match job:
            case StepLoad():
                return await step_load(channel, job, gate)
            case EchoLoad():
                return await echo_load(channel, job, gate)
            case ManyLoad():
                return await many_load(channel, job, gate)
            case GenerateLoad():
                return await generate_load(channel, job, gate)
            case OpenIdle():
                return await open_idle(channel, job, gate)
            case Conversation():
                return await conversation(channel, job, gate)
    raise TypeError(f"unknown job {job!r}")


async def _open_sessions(channel: grpc.aio.Channel, count: int, timeout: float) -> list[str]:
    return list(await asyncio.gather(*(wire.open_session(channel, timeout) for _ in range(count))))


async def step_load(channel: grpc.aio.Channel, job: StepLoad, gate: Gate) -> Events:
    """Every session steps back to back; one step each happens before `ready`, so nothing is cold."""
    ids = await _open_sessions(channel, job.sessions, job.timeout_seconds)
    # After its first request a StreamSteps call is bound to its session: every later one is the same bytes.
    return await _back_to_back(channel, job.api, (wire.STREAM_STEPS, wire.STEP),
                               [wire.step_request(sid) for sid in ids], wire.step_request(), job.timeout_seconds, gate)


async def echo_load(channel: grpc.aio.Channel, job: EchoLoad, gate: Gate) -> Events:
    """StepLoad's traffic against the empty echo server: the same bytes, streams and back-to-back pacing."""
    request = wire.step_request()
    return await _back_to_back(channel, job.api, (ECHO_STREAM, ECHO_UNARY), [request] * job.calls, request,
                               job.timeout_seconds, gate)


async def _back_to_back(channel: grpc.aio.Channel, api: str, methods: tuple[str, str], firsts: list[bytes],
                        later: bytes, timeout: float, gate: Gate) -> Events:
    """One stream (`methods[0]`) or unary call in flight (`methods[1]`) per request of `firsts`, each sent once
    before `ready`; then, until stop, a stream sends `later` and a unary call its own request, back to back."""
    stream_method, unary_method = methods
    events = Events()
    if api == API_STREAM:
        calls = await asyncio.gather(*(_open_stream(channel, stream_method, first, timeout) for first in firsts))
        await gate.ready()
        await asyncio.gather(*(_drive_stream(call, gate, events, later) for call in calls))
        return events
    call = channel.unary_unary(unary_method)
    await asyncio.gather(*(call(first, timeout=timeout) for first in firsts))
    await gate.ready()
    await asyncio.gather(*(_drive_unary(call, first, timeout, gate, events) for first in firsts))
    return events


async def _open_stream(channel: grpc.aio.Channel, method: str, first: bytes, timeout: float
                       ) -> grpc.aio.StreamStreamCall:
    """A stream after one round trip of `first` (a StreamSteps call: bound to the session it names)."""
    call = channel.stream_stream(method)(timeout=timeout)
    await call.write(first)
    await call.read()
    return call


async def _drive_stream(call: grpc.aio.StreamStreamCall, gate: Gate, events: Events, request: bytes) -> None:
    """Write `request` and read the reply, back to back."""
    while not gate.stopping:
        start = time.monotonic()
        await call.write(request)
        await call.read()
        events.add(start, time.monotonic())
    await wire.finish(call, "stream")


async def _drive_unary(step: grpc.aio.UnaryUnaryMultiCallable, request: bytes, timeout: float, gate: Gate,
                       events: Events) -> None:
    while not gate.stopping:
        start = time.monotonic()
        await step(request, timeout=timeout)
        events.add(start, time.monotonic())


async def generate_load(channel: grpc.aio.Channel, job: GenerateLoad, gate: Gate) -> Events:
    """Every session asks for replies back to back; each streamed chunk is one event counting its tokens."""
    ids = await _open_sessions(channel, job.sessions, job.timeout_seconds)
    generate = channel.unary_stream(wire.GENERATE)
    requests = [wire.generate_request(sid, job.prompt, job.max_tokens) for sid in ids]
    events = Events()
    await gate.ready()
    await asyncio.gather(*(_drive_generate(generate, r, job.timeout_seconds, gate, events) for r in requests))
    return events


async def _drive_generate(generate: grpc.aio.UnaryStreamMultiCallable, request: bytes, timeout: float, gate: Gate,
                          events: Events) -> None:
    while not gate.stopping:
        last = time.monotonic()
        async for chunk in generate(request, timeout=timeout):
            now = time.monotonic()
            events.add(last, now, wire.generated_tokens(chunk))
            last = now


async def open_idle(channel: grpc.aio.Channel, job: OpenIdle, gate: Gate) -> int:
    """Open sessions with `concurrency` calls in flight and leave them idle; returns how many were opened."""
    open_session = channel.unary_unary(wire.OPEN_SESSION)

    async def opener(count: int) -> None:
        for _ in range(count):
            await open_session(wire.OPEN_REQUEST, timeout=job.timeout_seconds)

    # The first sessions also warm the server's per-call machinery, which is not per-session memory.
    await asyncio.gather(*(opener(n) for n in split_evenly(job.warmup_sessions, job.concurrency)))
    await gate.ready()
    await asyncio.gather(*(opener(n) for n in split_evenly(job.sessions, job.concurrency)))
    return job.sessions


async def conversation(channel: grpc.aio.Channel, job: Conversation, gate: Gate) -> TurnLatencies:
    """Each turn: the new text to the carried session, then the whole history to a fresh zero-state one."""
    step = channel.unary_unary(wire.STEP)
    close = channel.unary_unary(wire.CLOSE_SESSION)
    timeout = job.timeout_seconds
    latencies = TurnLatencies([[] for _ in job.turns], [[] for _ in job.turns])
    await gate.ready()
    for _ in range(job.repetitions):
        session = await wire.open_session(channel, timeout)
        history = ""
        for turn, text in enumerate(job.turns):
            history += text
            latencies.stateful[turn].append(await _timed(step, wire.text_request(session, text), timeout))
            fresh = await wire.open_session(channel, timeout)
            latencies.stateless[turn].append(await _timed(step, wire.text_request(fresh, history), timeout))
            await close(wire.close_request(fresh), timeout=timeout)
        await close(wire.close_request(session), timeout=timeout)
    return latencies


async def _timed(call: grpc.aio.UnaryUnaryMultiCallable, request: bytes, timeout: float) -> float:
    start = time.monotonic()
    await call(request, timeout=timeout)
    return time.monotonic() - start

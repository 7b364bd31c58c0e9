"""The KServe figure's client side: the real `tritonclient.grpc.aio`, as a Triton user drives a sequence model.

Every session is a sequence (`sequence_id`, started by its first request) stepping one token back to
back: over unary ModelInfer calls, or over a ModelStreamInfer stream of its own. The same load runs
against Triton's sequence batcher (docs/BENCHMARKS.md), so the two servers are measured alike.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient

from cellstream.bench.gate import Gate
from cellstream.bench.jobs import Events, KServeLoad

TOKEN = np.ones((1, 1), np.int64)


def _inputs() -> list[InferInput]:
    tokens = InferInput("tokens", [1, 1], "INT64")
    tokens.set_data_from_numpy(TOKEN)
    return [tokens]


def sequence_ids(count: int) -> list[int]:
    """Unsigned ids no other client process uses (Triton's sequence ids are uint64 unless configured)."""
    base = (os.getpid() % 100_000) * 100_000 + 1
    return [base + k for k in range(count)]


Step = Callable[..., Awaitable[None]]


async def drive_sequences(ids: list[int], step: Step, gate: Gate) -> Events:
    """Start every sequence (`step(id, start=True)`), then step each back to back until stop, then end it."""
    events = Events()

    async def drive(sequence_id: int) -> None:
        while not gate.stopping:
            began = time.monotonic()
            await step(sequence_id)
            events.add(began, time.monotonic())
        await step(sequence_id, end=True)

    await asyncio.gather(*(step(sequence_id, start=True) for sequence_id in ids))
    await gate.ready()
    await asyncio.gather(*(drive(sequence_id) for sequence_id in ids))
    return events


async def kserve_load(target: str, job: KServeLoad, gate: Gate) -> Events:
    client = InferenceServerClient(target)
    try:
        if job.stream:
            return await _streams(client, job, gate)
        return await _unary(client, job, gate)
    finally:
        await client.close()


async def _unary(client: InferenceServerClient, job: KServeLoad, gate: Gate) -> Events:
    outputs = [InferRequestedOutput(job.output)]
    ids = sequence_ids(job.sessions)
    timeout = int(job.timeout_seconds)

    async def step(sequence_id: int, start: bool = False, end: bool = False) -> None:
        await client.infer(job.model, _inputs(), outputs=outputs, sequence_id=sequence_id, sequence_start=start,
                           sequence_end=end, client_timeout=timeout)

    return await drive_sequences(ids, step, gate)


async def _streams(client: InferenceServerClient, job: KServeLoad, gate: Gate) -> Events:
    """One ModelStreamInfer stream per sequence (tritonclient's aio stream_infer), a request written as soon as
    the previous response arrived."""
    events = Events()
    ready = asyncio.Barrier(job.sessions + 1)
    go = asyncio.Event()
    outputs = [InferRequestedOutput(job.output)]

    async def drive(sequence_id: int) -> None:
        answered = asyncio.Event()
        answered.set()
        began = 0.0

        async def requests() -> AsyncIterator[dict]:
            nonlocal began
            first = True
            while first or not gate.stopping:
                await answered.wait()
                answered.clear()
                began = time.monotonic()
                yield {"model_name": job.model, "inputs": _inputs(), "outputs": outputs,
                       "sequence_id": sequence_id, "sequence_start": first}
                first = False
            await answered.wait()
            yield {"model_name": job.model, "inputs": _inputs(), "outputs": outputs, "sequence_id": sequence_id,
                   "sequence_end": True}

        primed = False
        async for _, error in client.stream_infer(requests(), stream_timeout=job.timeout_seconds):
            if error is not None:
                raise RuntimeError(f"stream of sequence {sequence_id}: {error}")
            if primed and not gate.stopping:
                events.add(began, time.monotonic())
            if not primed:
                primed = True
                await ready.wait()
                await go.wait()
            answered.set()

    async def start() -> None:
        await ready.wait()  # every stream has its sequence started
        await gate.ready()
        go.set()

    await asyncio.gather(*(drive(sequence_id) for sequence_id in sequence_ids(job.sessions)), start())
    return events

"""B. Cross-session batching isolation: 64 sessions stepping concurrently in random chunk sizes get
exactly what each gets alone, and the server really did batch them.

The batcher has no timer: it batches only what queues up while a batch computes. The tiny model
computes in microseconds, far less than the RPC overhead on a shared event loop, so left alone the
server may legitimately run every step alone. To make batching certain (as it is for a model whose
compute dominates), the first onnxruntime call is held until half the sessions have a step queued;
everything after runs freely.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

SESSIONS = 64


def plan(seed: int) -> list[np.ndarray]:
    """A random token sequence cut into random chunks of 1-4 tokens."""
    rng = np.random.default_rng(seed)
    sequence = rng.integers(0, 260, size=int(rng.integers(12, 24)))
    chunks, start = [], 0
    while start < len(sequence):
        size = int(rng.integers(1, 5))
        chunks.append(sequence[start : start + size])
        start += size
    return chunks


class HoldFirstBatch:
    """The model's engine, but its first run waits (in the ORT worker thread) for a backlog."""

    def __init__(self, batcher, backlog: int) -> None:
        self.batcher, self.engine, self.backlog = batcher, batcher.engine, backlog
        self.spec = self.engine.spec
        self.calls = 0
        self.backlog_seen = 0

    def run(self, inputs, h0, c0):
        self.calls += 1
        if self.calls == 1:
            deadline = time.monotonic() + 20
            while self.batcher.queued < self.backlog and time.monotonic() < deadline:
                time.sleep(0.001)
            self.backlog_seen = self.batcher.queued
        return self.engine.run(inputs, h0, c0)


async def test_concurrent_sessions_get_their_own_outputs(server, stub, ref, close, arrays, scrape, step):
    batcher = server.dataplane.batchers["tiny-chat"]
    assert batcher.max_batch_size == 256  # the default
    hold = HoldFirstBatch(batcher, SESSIONS // 2)
    batcher.engine = hold
    batcher.inline_max_tokens = 0  # the held engine blocks: never on the event loop
    plans = [plan(seed) for seed in range(SESSIONS)]
    sessions = await asyncio.gather(*(stub.OpenSession(pb.OpenSessionRequest()) for _ in range(SESSIONS)))
    assert len({s.session_id for s in sessions}) == SESSIONS

    async def run(session_id: str, chunks: list[np.ndarray]) -> tuple[list, list[np.ndarray], object]:
        positions, logits = [], []
        for chunk in chunks:
            response = await stub.Step(step(session_id, tokens=chunk.tolist(), logits=True))
            positions.append(response.position)
            logits.append(np.asarray(response.logits, np.float32))
        return positions, logits, await stub.GetState(pb.SessionRef(session_id=session_id))

    results = await asyncio.wait_for(
        asyncio.gather(*(run(s.session_id, chunks) for s, chunks in zip(sessions, plans, strict=True))), 90
    )

    sent = 0
    for index, (chunks, (positions, logits, state)) in enumerate(zip(plans, results, strict=True)):
        h, c = ref.zero_state("tiny-chat")
        position = 0
        for k, chunk in enumerate(chunks):
            want, h, c = ref.run("tiny-chat", chunk, h, c)
            position += len(chunk)
            assert positions[k] == position, f"session {index} step {k}"
            close(logits[k], want[-1], f"session {index} step {k} logits")
        assert state.position == position
        got_h, got_c = arrays(state)
        close(got_h, h, f"session {index} h")
        close(got_c, c, f"session {index} c")
        sent += position

    samples = await scrape(server)
    count = samples.get("cellstream_batch_size_count", model="tiny-chat")
    total = samples.get("cellstream_batch_size_sum", model="tiny-chat")
    steps = sum(len(chunks) for chunks in plans)
    # Every step ran in exactly one batch; fewer batches than steps means some held several sessions.
    assert total == steps
    assert hold.backlog_seen >= SESSIONS // 2
    assert count < total, f"no batching: {count} batches for {total} steps"
    assert samples.get("cellstream_batch_size_bucket", model="tiny-chat", le="1.0") < count
    assert samples.get("cellstream_tokens_total", model="tiny-chat") == sent


async def test_concurrent_unary_steps_share_batches_without_a_held_model(server, stub, ref, close, scrape, step):
    """Unary calls of many sessions in flight together share batches with nothing held: the batcher waits
    for the steps of sessions that stepped recently and have none queued (service/batcher.py)."""
    opened = await asyncio.gather(*(stub.OpenSession(pb.OpenSessionRequest()) for _ in range(SESSIONS)))
    sessions = [s.session_id for s in opened]
    rounds = 8
    for k in range(rounds):
        responses = await asyncio.gather(*(stub.Step(step(sid, tokens=[k + 1], logits=True)) for sid in sessions))
        assert all(response.position == k + 1 for response in responses)
    h, c = ref.zero_state("tiny-chat")
    want, _, _ = ref.run("tiny-chat", np.arange(1, rounds + 1), h, c)
    close(np.asarray(responses[-1].logits, np.float32), want[-1], "the last step's logits")
    samples = await scrape(server)
    batches = samples.get("cellstream_batch_size_count", model="tiny-chat")
    steps = samples.get("cellstream_batch_size_sum", model="tiny-chat")
    assert steps == SESSIONS * rounds
    # Measured here: 40-64 steps per batch; 1.25 when a batch was taken as soon as a step was queued.
    assert steps / batches >= 4, f"{batches:.0f} batches for {steps:.0f} steps: unary calls did not share batches"

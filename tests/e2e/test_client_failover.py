"""The client's exactly-once steps through a real failure: two `cellstream serve` processes on one redis-server,
the client's channel on both addresses (gRPC's pick_first: A while it lives, then B), A killed with SIGKILL while
sixteen sessions step through it. No step fails; every step is applied once and only once (the positions its
results report tile each session's history, and the state B holds equals in-process onnxruntime fed that
history); a step whose reply died with A comes back `recovered`."""

from __future__ import annotations

import asyncio
import random
import signal

import pytest

import cellstream
from cellstream import AsyncClient

REDIS_FLAGS = {"store_probe_interval_seconds": 0.2, "state_store_timeout_seconds": 0.5}
SESSIONS = 16


def tokens_for(seed: int, k: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + k)
    return [rng.randrange(256) for _ in range(rng.randint(1, 4))]


@pytest.mark.timeout(180)
async def test_steps_through_a_replica_killed_mid_call_are_applied_exactly_once(serve_process, redis_server, ref,
                                                                                close):
    a = serve_process(state_store=redis_server.url, **REDIS_FLAGS)
    b = serve_process(state_store=redis_server.url, **REDIS_FLAGS)
    await asyncio.gather(a.wait_serving(), b.wait_serving())
    made: list[list[tuple[list[int], cellstream.StepResult]]] = [[] for _ in range(SESSIONS)]
    stop = asyncio.Event()
    async with AsyncClient(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", timeout=30) as client:
        sessions = [await client.session() for _ in range(SESSIONS)]

        async def converse(seed: int) -> None:
            while not stop.is_set():
                tokens = tokens_for(seed, len(made[seed]))
                made[seed].append((tokens, await sessions[seed].step(tokens, logits=True)))

        tasks = [asyncio.create_task(converse(seed)) for seed in range(SESSIONS)]
        while min(map(len, made)) < 5:
            await asyncio.sleep(0.01)
            assert all(not t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        assert a.metric("cellstream_items_total") > 0, "the steps did not go through A"
        a.signal(signal.SIGKILL)  # mid-call: a message of steps is in flight on A right now
        killed_at = [len(steps) for steps in made]
        while any(len(steps) < n + 10 for steps, n in zip(made, killed_at, strict=True)):
            await asyncio.sleep(0.01)
            assert all(not t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        stop.set()
        await asyncio.gather(*tasks)  # no step raised
        finals = [await s.get_state() for s in sessions]
        retried, recovered = client.retried_attempts, client.recovered_steps
    assert await a.wait_exit(5) == -signal.SIGKILL
    assert b.metric("cellstream_items_total") > 0, "B never took over"

    for seed, (steps, final) in enumerate(zip(made, finals, strict=True)):
        history: list[int] = []
        for tokens, result in steps:
            assert result.position == len(history) + len(tokens), f"session {seed}: a step lost or applied twice"
            history += tokens
            if not result.recovered:
                close(result.logits, ref.run("tiny-chat", history)[0][-1], f"session {seed} at {result.position}")
        _, h, c = ref.run("tiny-chat", history)
        assert final.position == len(history)
        close(final.h, h, f"session {seed} h")
        close(final.c, c, f"session {seed} c")
    assert retried >= 1, "no step was in flight when A died"
    print(f"\n{sum(map(len, made))} steps, {retried} attempts retried, {recovered} steps recovered "
          f"(applied by A, reply lost)")

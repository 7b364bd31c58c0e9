"""U. A bounded soak against a real server process: thousands of sessions opened, stepped, closed
or left to expire, for SOAK_SECONDS (15 here; `make soak` runs 60). No call may fail, sampled
outputs equal the reference, every session is gone once its TTL passed, and resident memory after
that stays within RSS_GROWTH_BOUND of what it was after warm-up."""

from __future__ import annotations

import asyncio
import os
import random
import time

import numpy as np
import pytest

from service.client import Client

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "15"))
WORKERS = 16
WARM_UP_SECONDS = 3.0
RSS_GROWTH_BOUND = 24 * 1024 * 1024  # allocator slack; leaked session state or tasks would exceed it


async def worker(client: Client, seed: int, until: float, stats: dict[str, int], ref, close) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        session = await client.open_session(ttl_seconds=1)
        stats["sessions"] += 1
        history: list[int] = []
        for _ in range(rng.randint(1, 5)):
            tokens = [rng.randrange(256) for _ in range(rng.randint(1, 16))]
            history += tokens
            checked = stats["steps"] % 97 == 0
            response = await client.step(session.session_id, tokens=tokens, logits=checked)
            stats["steps"] += 1
            assert response.position == len(history)
            if checked:
                want, _, _ = ref.run("tiny-chat", history)
                close(np.asarray(response.logits), want[-1], "sampled soak step")
        if rng.random() < 0.5:
            await client.close_session(session.session_id)  # the other half expire


@pytest.mark.timeout(SOAK_SECONDS + 120)
async def test_soak_no_errors_and_bounded_memory(serve_process, ref, close):
    server = serve_process(sweep_interval_seconds=0.5, max_queue_wait_ms=10_000)
    await server.wait_serving()
    stats = {"sessions": 0, "steps": 0}
    async with Client(server.target, timeout=30) as client:
        started = time.monotonic()
        until = started + SOAK_SECONDS
        workers = [asyncio.create_task(worker(client, seed, until, stats, ref, close)) for seed in range(WORKERS)]
        await asyncio.sleep(min(WARM_UP_SECONDS, SOAK_SECONDS / 3))
        warm_rss = server.rss_bytes()
        peak_sessions = 0.0
        while not all(w.done() for w in workers):
            peak_sessions = max(peak_sessions, server.metric("cellstream_sessions_active"))
            await asyncio.sleep(0.5)
        await asyncio.gather(*workers)  # re-raises the first failed call or mismatch
        await asyncio.sleep(2.5)  # every session's 1 s TTL passes, and a sweep runs
    end_rss = server.rss_bytes()
    print(f"\n{stats['sessions']} sessions, {stats['steps']} steps in {SOAK_SECONDS:.0f} s; peak "
          f"{peak_sessions:.0f} live; RSS {warm_rss / 2**20:.1f} MiB after warm-up, {end_rss / 2**20:.1f} MiB after")
    assert stats["sessions"] >= 1000 * SOAK_SECONDS / 15, "the soak did not exercise thousands of sessions"
    assert server.metric("cellstream_sessions_active") == 0
    assert server.metric("cellstream_state_bytes") == 0
    assert server.metric("cellstream_sessions_expired_total") > 0
    assert end_rss - warm_rss < RSS_GROWTH_BOUND
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()

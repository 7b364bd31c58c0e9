"""U. A bounded soak against a real server process: thousands of sessions opened, stepped, closed
or left to expire, for SOAK_SECONDS (15 here; `make soak` runs 60) and at least MIN_SESSIONS of them
(a slow machine runs longer rather than fail). No call may fail, sampled outputs equal the reference,
every session is gone once its TTL passed, and resident memory after that stays within RSS_GROWTH_BOUND
of what it was after warm-up."""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from cellstream import AsyncClient

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "15"))
MIN_SESSIONS = int(1000 * SOAK_SECONDS / 15)  # "thousands": a sixth of what 2 cores did beside a training run
CAP_SECONDS = 10 * SOAK_SECONDS  # a machine 10x slower still reaches MIN_SESSIONS within it
WORKERS = 16
WARM_UP_SECONDS = 3.0
# Idle TTL of the soak's sessions: a session is idle only between a call's reply and the next call, so a
# machine must stall 3 s to expire one in use, while the half left to expire go within the test.
SESSION_TTL_SECONDS = 3
RSS_GROWTH_BOUND = 24 * 1024 * 1024  # allocator slack; leaked session state or tasks would exceed it


class Soak:
    """Counts, and when the workers stop: SOAK_SECONDS passed and MIN_SESSIONS done (or CAP_SECONDS passed)."""

    def __init__(self) -> None:
        self.sessions = self.steps = 0
        self.started = time.monotonic()

    def going(self) -> bool:
        elapsed = time.monotonic() - self.started
        return elapsed < CAP_SECONDS and (elapsed < SOAK_SECONDS or self.sessions < MIN_SESSIONS)


async def worker(client: AsyncClient, seed: int, soak: Soak, ref, close) -> None:
    rng = random.Random(seed)
    while soak.going():
        session = await client.session(ttl_seconds=SESSION_TTL_SECONDS)
        soak.sessions += 1
        history: list[int] = []
        for _ in range(rng.randint(1, 5)):
            tokens = [rng.randrange(256) for _ in range(rng.randint(1, 16))]
            history += tokens
            checked = soak.steps % 97 == 0
            result = await session.step(tokens, logits=checked)
            soak.steps += 1
            assert result.position == len(history)
            if checked:
                want, _, _ = ref.run("tiny-chat", history)
                close(result.logits, want[-1], "sampled soak step")
        if rng.random() < 0.5:
            await session.close()  # the other half expire


@pytest.mark.timeout(CAP_SECONDS + 120)
async def test_soak_no_errors_and_bounded_memory(serve_process, ref, close):
    server = serve_process(sweep_interval_seconds=0.5, max_queue_wait_ms=10_000)
    await server.wait_serving()
    async with AsyncClient(server.target) as client:  # the sessions' steps ride one StreamMany stream
        soak = Soak()
        workers = [asyncio.create_task(worker(client, seed, soak, ref, close)) for seed in range(WORKERS)]
        # Warmed up once the allocator has seen a share of the run, however long that took.
        while soak.going() and (time.monotonic() - soak.started < min(WARM_UP_SECONDS, SOAK_SECONDS / 3)
                                or soak.sessions < MIN_SESSIONS // 5):
            await asyncio.sleep(0.1)
        warm_rss = server.rss_bytes()
        peak_sessions = 0.0
        while not all(w.done() for w in workers):
            peak_sessions = max(peak_sessions, server.metric("cellstream_sessions_active"))
            await asyncio.sleep(0.5)
        await asyncio.gather(*workers)  # re-raises the first failed call or mismatch
        elapsed = time.monotonic() - soak.started
    # Every session's TTL passes and a sweep runs: polled, a slow sweep only takes longer.
    gone_by = time.monotonic() + SESSION_TTL_SECONDS + 30
    while server.metric("cellstream_sessions_active") and time.monotonic() < gone_by:
        await asyncio.sleep(0.1)
    end_rss = server.rss_bytes()
    print(f"\n{soak.sessions} sessions, {soak.steps} steps in {elapsed:.1f} s; peak "
          f"{peak_sessions:.0f} live; RSS {warm_rss / 2**20:.1f} MiB after warm-up, {end_rss / 2**20:.1f} MiB after")
    assert soak.sessions >= MIN_SESSIONS, f"the soak did not exercise thousands of sessions in {CAP_SECONDS:.0f} s"
    assert server.metric("cellstream_sessions_active") == 0
    assert server.metric("cellstream_state_bytes") == 0
    assert server.metric("cellstream_sessions_expired_total") > 0
    assert end_rss - warm_rss < RSS_GROWTH_BOUND
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()

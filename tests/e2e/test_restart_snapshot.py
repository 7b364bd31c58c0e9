"""N. Restart of a memory-store server: SIGTERM writes the snapshot, the next process restores it, and
every session carries on exactly; an unusable snapshot is refused, kept aside, never half-loaded."""

from __future__ import annotations

import asyncio
import random
import signal

import numpy as np
import pytest

from cellstream.service.client import Client
from cellstream.service.sessions import snapshot
from cellstream.service.sessions.base import SessionRecord

SESSIONS = 200


async def gather_in_chunks(calls: list, size: int = 50) -> list:
    results = []
    for k in range(0, len(calls), size):
        results += await asyncio.gather(*calls[k:k + size])
    return results


@pytest.mark.timeout(180)
async def test_sigterm_then_restart_continues_all_200_sessions(serve_process, tmp_path, ref, close):
    path = tmp_path / "sessions.snap"
    rng = random.Random(6)
    first = serve_process(snapshot_path=path, shutdown_grace_seconds=5)
    await first.wait_serving()
    history: dict[str, list[int]] = {}
    async with Client(first.target, timeout=30) as client:
        opened = await gather_in_chunks([client.open_session(ttl_seconds=600) for _ in range(SESSIONS)])
        for _ in range(2):
            steps = {s.session_id: [rng.randrange(256) for _ in range(rng.randint(1, 6))] for s in opened}
            await gather_in_chunks([client.step(sid, tokens=tokens) for sid, tokens in steps.items()])
            for sid, tokens in steps.items():
                history.setdefault(sid, []).extend(tokens)
    first.signal(signal.SIGTERM)
    assert await first.wait_exit(20) == 0, first.log()
    assert "wrote 200 sessions to the snapshot" in first.log()
    assert path.exists()

    second = serve_process(snapshot_path=path)
    await second.wait_serving()
    assert "restored 200 sessions" in second.log(), second.log()
    assert not path.exists(), "the restored snapshot was left behind (a crash would restore it again)"
    async with Client(second.target, timeout=30) as client:
        steps = {sid: [rng.randrange(256) for _ in range(3)] for sid in history}
        responses = await gather_in_chunks(
            [client.step(sid, tokens=tokens, logits=True, state=True) for sid, tokens in steps.items()])
    for (sid, tokens), response in zip(steps.items(), responses, strict=True):
        full = history[sid] + tokens
        assert response.position == len(full)
        want, h, c = ref.run("tiny-chat", full)
        close(np.asarray(response.logits), want[-1], f"logits of {sid}")
        close(np.asarray(response.state.h).reshape(h.shape), h, f"h of {sid}")
        close(np.asarray(response.state.c).reshape(c.shape), c, f"c of {sid}")


def write_truncated(path) -> bytes:
    zeros = np.zeros((2, 16), np.float32)
    records = [(SessionRecord(f"{k:032x}", "tiny-chat", zeros, zeros, k, 600.0), 600.0) for k in range(5)]
    snapshot.write(path, records)
    data = path.read_bytes()[:-37]
    path.write_bytes(data)
    return data


@pytest.mark.timeout(120)
async def test_truncated_snapshot_is_refused_and_set_aside(serve_process, tmp_path):
    path = tmp_path / "sessions.snap"
    truncated = write_truncated(path)
    refused = serve_process(snapshot_path=path)
    assert await refused.wait_exit(60) == 2, refused.log()
    log = refused.log()
    assert f"refusing the session snapshot {path}: truncated or padded" in log, log
    assert "no session was restored" in log and "snapshot_on_invalid=start-empty" in log
    assert "Traceback" not in log
    aside = path.with_name(path.name + ".rejected")
    assert not path.exists() and aside.read_bytes() == truncated, "the refused file must be kept, unchanged"

    # Nothing left to refuse: the next start serves, with no sessions.
    again = serve_process(snapshot_path=path)
    await again.wait_serving()
    assert again.metric("cellstream_sessions_active") == 0


@pytest.mark.timeout(120)
async def test_start_empty_policy_serves_despite_a_bad_snapshot(serve_process, tmp_path):
    path = tmp_path / "sessions.snap"
    write_truncated(path)
    server = serve_process(snapshot_path=path, snapshot_on_invalid="start-empty")
    await server.wait_serving()
    assert "refused: truncated or padded" in server.log()
    assert server.metric("cellstream_sessions_active") == 0
    assert path.with_name(path.name + ".rejected").exists()

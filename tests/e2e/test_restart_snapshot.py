"""N. Restart of a memory-store server: SIGTERM writes the snapshot, the next process restores it, and
every session carries on exactly; an unusable snapshot is refused, kept aside, never half-loaded."""

from __future__ import annotations

import asyncio
import random
import signal

import numpy as np
import pytest

from cellstream import AsyncClient
from cellstream.service.sessions import snapshot
from cellstream.service.sessions.base import SessionRecord

SESSIONS = 200


@pytest.mark.timeout(180)
async def test_sigterm_then_restart_continues_all_200_sessions(serve_process, tmp_path, ref, close):
    path = tmp_path / "sessions.snap"
    rng = random.Random(6)
    first = serve_process(snapshot_path=path, shutdown_grace_seconds=5)
    await first.wait_serving()
    history: dict[str, list[int]] = {}
    async with AsyncClient(first.target) as client:
        opened = [await client.session(ttl_seconds=600) for _ in range(SESSIONS)]
        for _ in range(2):
            steps = {s: [rng.randrange(256) for _ in range(rng.randint(1, 6))] for s in opened}
            await asyncio.gather(*(s.step(tokens) for s, tokens in steps.items()))
            for s, tokens in steps.items():
                history.setdefault(s.session_id, []).extend(tokens)
    first.signal(signal.SIGTERM)
    assert await first.wait_exit(20) == 0, first.log()
    assert "wrote 200 sessions to the snapshot" in first.log()
    assert path.exists()

    second = serve_process(snapshot_path=path)
    await second.wait_serving()
    assert "restored 200 sessions" in second.log(), second.log()
    assert not path.exists(), "the restored snapshot was left behind (a crash would restore it again)"
    async with AsyncClient(second.target) as client:
        attached = [await client.attach(sid) for sid in history]  # where the snapshot left each one
        assert [s.position for s in attached] == [len(history[s.session_id]) for s in attached]
        steps = {s: [rng.randrange(256) for _ in range(3)] for s in attached}
        results = await asyncio.gather(*(s.step(tokens, logits=True, state=True) for s, tokens in steps.items()))
    for (session, tokens), result in zip(steps.items(), results, strict=True):
        sid = session.session_id
        full = history[sid] + tokens
        assert result.position == len(full)
        want, h, c = ref.run("tiny-chat", full)
        close(result.logits, want[-1], f"logits of {sid}")
        close(result.state.h, h, f"h of {sid}")
        close(result.state.c, c, f"c of {sid}")


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

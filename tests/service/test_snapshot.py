"""M. Memory-store snapshots: the file format refuses every damaged or foreign file, writes are
atomic, and a server restarted on its snapshot carries on every session exactly."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct

import grpc
import numpy as np
import pytest

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc
from cellstream.service.config import load_settings
from cellstream.service.errors import NotFound
from cellstream.service.metrics import Metrics
from cellstream.service.server import start_server
from cellstream.service.sessions import snapshot
from cellstream.service.sessions.base import SessionRecord, new_session_id
from cellstream.service.sessions.memory import MemoryStore

pytestmark = pytest.mark.timeout(60)
TOKENS = [99, 101, 108, 108, 115, 116, 114, 101, 97, 109]


def sessions(n: int = 3) -> list[tuple[SessionRecord, float]]:
    rng = np.random.default_rng(n)
    made = []
    for k in range(n):
        h, c = (rng.normal(size=(2, 16)).astype(np.float32) for _ in range(2))
        made.append((SessionRecord(new_session_id(), "tiny-chat", h, c, 2**64 - 1 - k, 60.0, f"p{k}"), 30.0 + k))
    return made


def test_round_trip_is_exact():
    original = sessions()
    decoded = snapshot.decode(snapshot.encode(original, 1234.5))
    assert decoded.written_at == 1234.5
    assert len(decoded.sessions) == len(original)
    for (got, got_left), (want, want_left) in zip(decoded.sessions, original, strict=True):
        assert (got.session_id, got.model, got.owner, got.position, got.ttl_seconds, got_left) == (
            want.session_id, want.model, want.owner, want.position, want.ttl_seconds, want_left)
        assert got.h.tobytes() == want.h.tobytes() and got.c.tobytes() == want.c.tobytes()
    assert snapshot.decode(snapshot.encode([], 0.0)).sessions == []


def _damaged() -> dict[str, tuple[bytes, str]]:
    good = snapshot.encode(sessions(), 1.0)
    header = snapshot.HEADER.size
    flipped = bytearray(good)
    flipped[header + 40] ^= 0x01
    newer = bytearray(good)
    struct.pack_into("<H", newer, 8, snapshot.VERSION + 1)
    return {
        "empty": (b"", "not a cellstream session snapshot"),
        "foreign": (b"PK\x03\x04" + good[4:], "not a cellstream session snapshot"),
        "header cut": (good[:header - 3], "not a cellstream session snapshot"),
        "truncated": (good[:-100], "truncated or padded"),
        "truncated to the header": (good[:header], "truncated or padded"),
        "padded": (good + b"\0", "truncated or padded"),
        "flipped bit": (bytes(flipped), "checksum mismatch"),
        "newer format": (bytes(newer), f"format version {snapshot.VERSION + 1}"),
    }


@pytest.mark.parametrize("case", list(_damaged()))
def test_damaged_or_foreign_files_are_refused_with_the_reason(case):
    data, reason = _damaged()[case]
    with pytest.raises(snapshot.SnapshotError, match=reason):
        snapshot.decode(data)


def test_a_checksummed_but_inconsistent_payload_is_refused():
    original = sessions(1)
    good = snapshot.encode(original, 1.0)
    payload = good[snapshot.HEADER.size:] + b"\0" * 8  # state bytes that belong to no session
    header = snapshot.HEADER.pack(snapshot.MAGIC, snapshot.VERSION, 0, len(payload), 1.0,
                                  hashlib.sha256(payload).digest())
    with pytest.raises(snapshot.SnapshotError, match="belong to no session"):
        snapshot.decode(header + payload)


def test_write_is_atomic_and_private(tmp_path):
    path = tmp_path / "sessions.snap"
    snapshot.write(path, sessions(2))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    before = path.read_bytes()
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "x").write_text("a non-empty directory cannot be replaced by a file")
    with pytest.raises(snapshot.SnapshotError, match="cannot write"):
        snapshot.write(blocked, sessions(1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_set_aside_keeps_earlier_rejects(tmp_path):
    path = tmp_path / "s.snap"
    for expected in ("s.snap.rejected", "s.snap.rejected.1", "s.snap.rejected.2"):
        path.write_bytes(b"junk")
        assert snapshot.set_aside(path).name == expected
    assert not path.exists()


async def test_memory_store_restores_remaining_ttl_and_lru_order(tmp_path):
    clock = [1000.0]
    store = MemoryStore(Metrics(), max_sessions=10, snapshot_path=tmp_path / "s.snap", clock=lambda: clock[0])
    first = await store.create(sessions(1)[0][0])
    clock[0] += 20
    second = await store.create(sessions(2)[1][0])
    clock[0] += 5
    listed = store.live_sessions()
    assert [r.session_id for r, _ in listed] == [first.session_id, second.session_id]
    assert [left for _, left in listed] == [35.0, 55.0]

    restored = MemoryStore(Metrics(), max_sessions=10, clock=lambda: clock[0])
    for record, left in listed:
        restored.restore(record, left)
    clock[0] += 36
    with pytest.raises(NotFound):
        await restored.get(first.session_id)
    assert (await restored.get(second.session_id)).position == second.position


async def test_server_restart_on_snapshot_continues_sessions(tiny_model_dir, tmp_path, ref, close, arrays, step):
    path = tmp_path / "sessions.snap"
    settings = load_settings(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                             model_dir=tiny_model_dir, default_model="tiny-chat", ort_intra_op_threads=1,
                             snapshot_path=path)
    first = await start_server(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        kept = await stub.OpenSession(pb.OpenSessionRequest(ttl_seconds=600))
        await stub.Step(step(kept.session_id, tokens=TOKENS[:6]))
        doomed = await stub.OpenSession(pb.OpenSessionRequest(ttl_seconds=1))
    await first.stop(0)
    assert path.exists()

    await asyncio.sleep(1.2)  # the 1 s session's idle time runs on while no server is up
    second = await start_server(settings)
    try:
        assert not path.exists(), "a restored snapshot must not be restored again after a crash"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            response = await stub.Step(step(kept.session_id, tokens=TOKENS[6:], logits=True, state=True))
            assert response.position == len(TOKENS)
            want, h, c = ref.run("tiny-chat", np.array(TOKENS))
            close(np.asarray(response.logits), want[-1], "logits")
            got_h, got_c = arrays(response.state)
            close(got_h, h, "h")
            close(got_c, c, "c")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetState(pb.SessionRef(session_id=doomed.session_id))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await second.stop(0)
    assert os.path.exists(path), "the second graceful stop writes a new snapshot"

"""Sessions keep their model version in every store: a server that does not serve a session's version refuses
its steps clearly (FAILED_PRECONDITION, nothing applied) instead of running them on other weights, through every
path (Step, StepMany, a KServe sequence), and goes on exactly once the version is loaded. Sessions written before
versions existed (a store's `model` without a version) are version 1's."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import redis
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(120)
CHAT = "tiny-chat"
FIRST, SECOND = [104, 105, 32, 116], [104, 101, 114, 101]
NOT_SERVED = "is pinned to version 2 of model 'tiny-chat', which this server does not serve (its loaded versions: " \
             "1 (READY)); a session keeps the model version it was opened with"


async def test_a_session_in_redis_on_a_version_this_replica_lacks_is_refused_on_every_path(
        start, connect, repository, redis_server, rpc_error, close, arrays, step):
    """Version 2 has version 1's shape here: run on version 1, its state would give an answer, a wrong one."""
    repository.add(CHAT, 1, "v1")
    repository.add(CHAT, 2, "v1-shaped")
    older = repository.another("older")  # another replica's repository: v1 only
    older.add(CHAT, 1, "v1")
    a = await start(model_dir=repository.path, state_store=redis_server.url, default_model=CHAT)
    b = await start(model_dir=older.path, state_store=redis_server.url, default_model=CHAT)
    on_a, on_b = connect(a), connect(b)
    session = await on_a.OpenSession(pb.OpenSessionRequest(model=CHAT))
    assert session.model_version == 2
    await on_a.Step(step(session.session_id, tokens=FIRST))

    refused = await rpc_error(on_b.Step(step(session.session_id, tokens=SECOND)))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.details() == f"session {session.session_id!r} {NOT_SERVED}: load that version, or open a new session"
    # StepMany on a replica of one model version queues without a lookup: the batch refuses the session.
    [item] = (await on_b.StepMany(pb.StepBatch(items=[step(session.session_id, tokens=SECOND)]))).items
    assert item.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and NOT_SERVED in item.error.message
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{a.port}") as triton_a, \
            triton_aio.InferenceServerClient(f"127.0.0.1:{b.port}") as triton_b:
        tokens = triton_aio.InferInput("tokens", [1, len(FIRST)], "INT64")
        tokens.set_data_from_numpy(np.array([FIRST], np.int64))
        started = await triton_a.infer(CHAT, [tokens], sequence_id=7, sequence_start=True)
        assert started.get_response().model_version == "2"
        with pytest.raises(InferenceServerException, match="is pinned to version 2 of model 'tiny-chat'"):
            await triton_b.infer(CHAT, [tokens], sequence_id=7)

    # Nothing was applied: the session goes on exactly on the replica that serves its version.
    state = await on_b.GetState(pb.SessionRef(session_id=session.session_id))  # reading it needs no model
    assert (state.model_version, state.position) == (2, len(FIRST))
    response = await on_a.Step(step(session.session_id, tokens=SECOND, state=True))
    fresh = await on_a.OpenSession(pb.OpenSessionRequest(model=CHAT))
    whole = await on_a.Step(step(fresh.session_id, tokens=FIRST + SECOND, state=True))
    assert response.position == whole.position == len(FIRST + SECOND)
    for got, want in zip(arrays(response.state), arrays(whole.state), strict=True):
        close(got, want, "state after the refusals")


async def test_a_session_stored_before_versions_existed_is_version_1s(start, connect, redis_server, ref, close,
                                                                      arrays, step):
    """A hash as the store wrote it before versions: `m` is the bare model name, no per-model index entry."""
    running = await start(state_store=redis_server.url)
    stub = connect(running)
    h = c = np.zeros((2, 16), np.float32)
    raw = redis.Redis(port=redis_server.port)
    key = "cellstream:s:old-session"
    raw.hset(key, mapping={"m": CHAT, "o": "", "p": 0, "l": 2, "h": h.tobytes(), "c": c.tobytes(), "t": 60_000})
    raw.pexpire(key, 60_000)
    raw.zadd("cellstream:idx", {"old-session": 10**13})
    raw.hset("cellstream:meta", "old-session", f"{h.nbytes + c.nbytes} ")
    response = await stub.Step(step("old-session", tokens=FIRST, state=True))
    assert (response.state.model, response.state.model_version, response.position) == (CHAT, 1, len(FIRST))
    _, want_h, want_c = ref.run(CHAT, np.array(FIRST))
    close(arrays(response.state)[0], want_h, "h")
    close(arrays(response.state)[1], want_c, "c")
    await stub.CloseSession(pb.SessionRef(session_id="old-session"))
    assert raw.hlen("cellstream:meta") == 0 and raw.zcard("cellstream:idx") == 0


async def test_a_snapshot_restored_without_its_version_refuses_until_the_version_is_loaded(
        start, connect, repository, tmp_path, rpc_error, close, arrays, step):
    repository.add(CHAT, 1, "v1")
    repository.add(CHAT, 2, "v2")
    path = tmp_path / "sessions.snap"
    first = await start(model_dir=repository.path, snapshot_path=path, default_model=CHAT)
    stub = connect(first)
    session = await stub.OpenSession(pb.OpenSessionRequest(model=CHAT))
    await stub.Step(step(session.session_id, tokens=FIRST))
    await first.stop(0)
    assert path.exists()

    repository.remove(CHAT, 2)
    second = await start(model_dir=repository.path, snapshot_path=path, default_model=CHAT, model_control="explicit",
                         load_model="*")
    stub = connect(second)
    refused = await rpc_error(stub.Step(step(session.session_id, tokens=SECOND)))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and NOT_SERVED in refused.details()
    assert (await stub.GetState(pb.SessionRef(session_id=session.session_id))).position == len(FIRST), "nothing applied"
    repository.add(CHAT, 2, "v2")
    await stub.LoadModel(pb.LoadModelRequest(model=CHAT))
    response = await stub.Step(step(session.session_id, tokens=SECOND, state=True))
    fresh = await stub.OpenSession(pb.OpenSessionRequest(model=CHAT))
    whole = await stub.Step(step(fresh.session_id, tokens=FIRST + SECOND, state=True))
    assert response.position == len(FIRST + SECOND) and fresh.model_version == 2
    for got, want in zip(arrays(response.state), arrays(whole.state), strict=True):
        close(got, want, "state across the restart, on v2 once loaded")


async def test_with_redis_every_replicas_sessions_hold_a_drain(start, connect, repository, redis_server, eventually,
                                                               step):
    repository.add(CHAT, 1, "v1")
    repository.add(CHAT, 2, "v2")
    a = await start(model_dir=repository.path, state_store=redis_server.url, default_model=CHAT)
    b = await start(model_dir=repository.path, state_store=redis_server.url, default_model=CHAT,
                    model_control="explicit", load_model="*", sweep_interval_seconds=0.1)
    on_a, on_b = connect(a), connect(b)
    session = await on_a.OpenSession(pb.OpenSessionRequest(model=CHAT, model_version=1))  # opened on replica a
    repository.remove(CHAT, 1)
    status = await on_b.LoadModel(pb.LoadModelRequest(model=CHAT))
    assert [(v.version, v.state, v.live_sessions) for v in status.versions] == [(1, "DRAINING", 1),
                                                                                (2, "READY", 0)]
    await on_b.Step(step(session.session_id, tokens=FIRST))  # b still serves it while it drains
    # Closed on the other replica: b's sweep counts it gone.
    await on_a.CloseSession(pb.SessionRef(session_id=session.session_id))

    async def released() -> bool:
        [model] = (await on_b.ListModels(pb.ListModelsRequest())).models
        return [v.version for v in model.versions] == [2]

    await eventually(released, "replica b releases version 1 once no replica's session is on it")

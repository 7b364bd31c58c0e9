"""Model versions on live servers: sessions pinned to the version they opened with, live load and unload with
draining, refusals that change nothing, the repository calls over both APIs and tritonclient unchanged.

"v1" is tiny-chat itself (2 layers x 16 units), "v2" a model of other weights and 24 units (conftest's
version_files): a state of 24 units says a session landed on v2.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import weakref

import grpc
import numpy as np
import pytest
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)
CHAT = "tiny-chat"
FIRST, SECOND, THIRD = [104, 105, 32, 116], [104, 101, 114, 101], [10, 98, 111, 116]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def kserve_tokens(tokens: list[int]) -> list[triton_aio.InferInput]:
    tensor = triton_aio.InferInput("tokens", [1, len(tokens)], "INT64")
    tensor.set_data_from_numpy(np.array([tokens], np.int64))
    return [tensor]


async def sequence_step(client: triton_aio.InferenceServerClient, tokens: list[int], *, version: str = "",
                        start: bool = False, end: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A step of the KServe sequence 'conversation' of tiny-chat: (logits of the last step, hn, cn)."""
    outputs = [triton_aio.InferRequestedOutput(name) for name in ("logits", "hn", "cn")]
    result = await client.infer(CHAT, kserve_tokens(tokens), model_version=version, outputs=outputs,
                                sequence_id="conversation", sequence_start=start, sequence_end=end)
    return result.as_numpy("logits")[0, -1], result.as_numpy("hn")[:, 0], result.as_numpy("cn")[:, 0]


def versions(listed: pb.ListModelsResponse, name: str = CHAT) -> dict[int, tuple[str, int]]:
    [model] = [m for m in listed.models if m.name == name]
    return {v.version: (v.state, v.live_sessions) for v in model.versions}


async def served_versions(stub: pb_grpc.InferenceStub, name: str = CHAT) -> dict[int, tuple[str, int]]:
    """ListModels: each loaded version of `name` with its state and live sessions."""
    return versions(await stub.ListModels(pb.ListModelsRequest()), name)


async def test_a_conversation_on_v1_continues_exactly_while_v2_loads_and_v1_drains(
        start, server, connect, repository, close, arrays, scrape, eventually, rpc_error, step):
    repository.add(CHAT, 1, "v1")
    versioned = await start(model_dir=repository.path, model_control="explicit", load_model="*", default_model=CHAT)
    stub, only_v1 = connect(versioned), connect(server)  # `server` only ever had v1 (tiny-chat.onnx)
    triton = triton_aio.InferenceServerClient(f"127.0.0.1:{versioned.port}")
    triton_v1 = triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        # Mid-way on v1: a native session and a KServe sequence, on both servers.
        sessions = [(await c.OpenSession(pb.OpenSessionRequest(model=CHAT))).session_id for c in (stub, only_v1)]
        assert (await stub.GetState(pb.SessionRef(session_id=sessions[0]))).model_version == 1
        for c, session in zip((stub, only_v1), sessions, strict=True):
            await c.Step(step(session, tokens=FIRST))
        for t in (triton, triton_v1):
            await sequence_step(t, FIRST, start=True)

        # v2 arrives and is loaded: new sessions and sequences land on it; the conversations stay on v1.
        repository.add(CHAT, 2, "v2")
        status = await stub.LoadModel(pb.LoadModelRequest(model=CHAT))
        assert [(v.version, v.state) for v in status.versions] == [(1, "READY"), (2, "READY")]
        newer = await stub.OpenSession(pb.OpenSessionRequest(model=CHAT))
        newer_state = await stub.GetState(pb.SessionRef(session_id=newer.session_id))
        assert newer.model_version == 2 and newer_state.hidden_size == 24
        pinned = await stub.OpenSession(pb.OpenSessionRequest(model=CHAT, model_version=1))
        assert pinned.model_version == 1
        for c, session in zip((stub, only_v1), sessions, strict=True):
            await c.Step(step(session, tokens=SECOND))
        got, want = await sequence_step(triton, SECOND), await sequence_step(triton_v1, SECOND)
        for name, a, b in zip(("logits", "hn", "cn"), got, want, strict=True):
            close(a, b, f"sequence {name} after v2 loaded")
        response = await triton.infer(CHAT, kserve_tokens(THIRD))  # stateless, no version: the latest
        assert (response.get_response().model_version, response.as_numpy("logits").shape) == ("2", (1, 4, 260))

        # v1's directory goes, the model is loaded again: v1 drains while its sessions live.
        repository.remove(CHAT, 1)
        status = await stub.LoadModel(pb.LoadModelRequest(model=CHAT))
        assert [(v.version, v.state) for v in status.versions] == [(1, "DRAINING"), (2, "READY")]
        listed = await served_versions(stub)
        assert listed == {1: ("DRAINING", 3), 2: ("READY", 1)}, "2 native sessions and the sequence on v1"
        refused = await rpc_error(stub.OpenSession(pb.OpenSessionRequest(model=CHAT, model_version=1)))
        assert refused.code() == FAILED_PRECONDITION and "version 1 of model 'tiny-chat' is draining" in \
            refused.details()
        fork = await rpc_error(stub.ForkSession(pb.ForkSessionRequest(session_id=sessions[0])))
        assert fork.code() == FAILED_PRECONDITION and "forks included" in fork.details()
        assert not await triton.is_model_ready(CHAT, "1") and await triton.is_model_ready(CHAT, "2")
        index = {(m.name, m.version): (m.state, m.reason) for m in (await triton.get_model_repository_index()).models}
        assert index[(CHAT, "1")][0] == "DRAINING" and "3 live sessions" in index[(CHAT, "1")][1]
        assert index[(CHAT, "2")] == ("READY", "1 live sessions")

        # The drained conversations go on exactly as on a server that only ever had v1.
        outcomes = [await c.Step(step(session, tokens=THIRD, logits=True, state=True))
                    for c, session in zip((stub, only_v1), sessions, strict=True)]
        close(np.asarray(outcomes[0].logits), np.asarray(outcomes[1].logits), "logits on the draining v1")
        for got_state, want_state in zip(arrays(outcomes[0].state), arrays(outcomes[1].state), strict=True):
            close(got_state, want_state, "state on the draining v1")
        assert outcomes[0].position == outcomes[1].position == len(FIRST + SECOND + THIRD)
        got, want = await sequence_step(triton, THIRD, end=True), await sequence_step(triton_v1, THIRD, end=True)
        for name, a, b in zip(("logits", "hn", "cn"), got, want, strict=True):
            close(a, b, f"sequence {name} on the draining v1")

        draining = await scrape(versioned)
        assert draining.get("cellstream_model_version_steps_total", model=CHAT, version="1") == 6, \
            "3 steps of the session, 3 of the sequence"
        assert draining.get("cellstream_model_version_state", model=CHAT, version="1", state="DRAINING") == 1
        assert draining.get("cellstream_model_version_sessions", model=CHAT, version="1") == 2

        # The last sessions on v1 close: v1 is released, its onnxruntime sessions freed.
        assert await served_versions(stub) == {1: ("DRAINING", 2), 2: ("READY", 1)}, "the sequence ended"
        v1 = versioned.dataplane.registry.versions[CHAT]
        engine = weakref.ref(v1.engine.session), weakref.ref(v1.engine.glass_box.session)
        del v1
        await stub.CloseSession(pb.SessionRef(session_id=sessions[0]))
        assert await served_versions(stub) == {1: ("DRAINING", 1), 2: ("READY", 1)}
        await stub.CloseSession(pb.SessionRef(session_id=pinned.session_id))
        assert await served_versions(stub) == {2: ("READY", 1)}
        gc.collect()
        assert engine[0]() is None and engine[1]() is None, "v1's onnxruntime sessions are still referenced"
        index = {(m.name, m.version): (m.state, m.reason) for m in (await triton.get_model_repository_index()).models}
        assert index == {(CHAT, "2"): ("READY", "1 live sessions")}, "v1's directory is gone: nothing to list"
        gone = await rpc_error(stub.OpenSession(pb.OpenSessionRequest(model=CHAT, model_version=1)))
        assert gone.code() == grpc.StatusCode.NOT_FOUND and "has no version 1 loaded; its loaded versions: 2" in \
            gone.details()
        samples = await scrape(versioned)
        for event, count in (("loaded", 1), ("unloaded", 1), ("released", 1)):
            assert samples.get("cellstream_model_events_total", model=CHAT, version="1", event=event) == count
        assert samples.get("cellstream_model_version_state", model=CHAT, version="2", state="READY") == 1
        assert not [labels for name, labels in samples.values
                    if name == "cellstream_model_version_state" and ("version", "1") in labels], "v1 is gone"
        assert samples.get("cellstream_model_version_steps_total", model=CHAT, version="2") == 1, "the stateless call"
        assert not [labels for name, labels in samples.values
                    if name == "cellstream_model_version_steps_total" and ("version", "1") in labels], "released"
    finally:
        await triton.close()
        await triton_v1.close()


async def test_a_bad_version_is_refused_and_nothing_changes(start, connect, repository, rpc_error, scrape, step):
    repository.add(CHAT, 1, "v1")
    repository.add(CHAT, 2, "v2")
    running = await start(model_dir=repository.path, model_control="explicit", load_model="*", default_model=CHAT)
    stub = connect(running)
    session = await stub.OpenSession(pb.OpenSessionRequest(model=CHAT))
    await stub.Step(step(session.session_id, tokens=FIRST))
    before = await stub.ListModels(pb.ListModelsRequest())
    repository.add(CHAT, 3, "broken")
    repository.remove(CHAT, 1)  # would unload v1, if the load went through
    refused = await rpc_error(stub.LoadModel(pb.LoadModelRequest(model=CHAT)))
    assert refused.code() == FAILED_PRECONDITION
    assert refused.details().startswith("model 'tiny-chat' was not loaded, and what is served is unchanged: "
                                        "version 3 of model 'tiny-chat': model.onnx: missing input 'c0'")
    assert await stub.ListModels(pb.ListModelsRequest()) == before
    assert (await stub.Step(step(session.session_id, tokens=SECOND))).position == len(FIRST + SECOND)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{running.port}") as triton:
        index = {m.version: (m.state, m.reason) for m in (await triton.get_model_repository_index()).models}
    assert index["1"] == ("READY", "0 live sessions") and index["2"] == ("READY", "1 live sessions")
    assert index["3"][0] == "UNAVAILABLE" and index["3"][1].startswith(
        "refused: version 3 of model 'tiny-chat': model.onnx: missing input 'c0'")
    assert (await scrape(running)).get("cellstream_model_events_total", model=CHAT, version="3", event="refused") == 1

    # Fixed, it loads; v1's directory is still gone, so v1 (without sessions) is released at once.
    repository.add(CHAT, 3, "v1")
    status = await stub.LoadModel(pb.LoadModelRequest(model=CHAT))
    assert [(v.version, v.state) for v in status.versions] == [(2, "READY"), (3, "READY")]
    assert (await stub.OpenSession(pb.OpenSessionRequest(model=CHAT))).model_version == 3


@pytest.mark.parametrize("control", ["none", "poll"])
async def test_repository_calls_are_refused_without_explicit_control(start, connect, repository, rpc_error, control):
    repository.add(CHAT, 1, "v1")
    running = await start(model_dir=repository.path, model_control=control, default_model=CHAT)
    stub = connect(running)
    for call in (stub.LoadModel(pb.LoadModelRequest(model=CHAT)), stub.UnloadModel(pb.UnloadModelRequest(model=CHAT))):
        error = await rpc_error(call)
        assert error.code() == FAILED_PRECONDITION
        assert error.details().startswith(f"model_control is {control!r}") and "--model-control explicit" in \
            error.details()
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{running.port}") as triton:
        with pytest.raises(InferenceServerException, match=f"model_control is '{control}'"):
            await triton.load_model(CHAT)
        with pytest.raises(InferenceServerException, match=f"model_control is '{control}'"):
            await triton.unload_model(CHAT)
        index = await triton.get_model_repository_index()  # reading is allowed
        assert [(m.name, m.version, m.state) for m in index.models] == [(CHAT, "1", "READY")]
        assert "model_repository" in (await triton.get_server_metadata()).extensions
    assert await served_versions(stub) == {1: ("READY", 0)}


async def test_unload_model_unloads_every_version_and_drains_those_with_sessions(
        start, connect, repository, rpc_error, eventually, step):
    repository.add(CHAT, 1, "v1")
    repository.add(CHAT, 2, "v2")
    running = await start(model_dir=repository.path, model_control="explicit", load_model=CHAT, default_model=CHAT)
    stub = connect(running)
    on_v1 = await stub.OpenSession(pb.OpenSessionRequest(model=CHAT, model_version=1))
    status = await stub.UnloadModel(pb.UnloadModelRequest(model=CHAT))
    assert [(v.version, v.state, v.live_sessions) for v in status.versions] == [(1, "DRAINING", 1)], \
        "v2 had no session: released at once"
    refused = await rpc_error(stub.OpenSession(pb.OpenSessionRequest(model=CHAT)))
    assert refused.code() == FAILED_PRECONDITION and "every loaded version of model 'tiny-chat' is draining" in \
        refused.details()
    assert (await stub.Step(step(on_v1.session_id, tokens=FIRST))).position == len(FIRST)
    await stub.CloseSession(pb.SessionRef(session_id=on_v1.session_id))
    assert (await stub.ListModels(pb.ListModelsRequest())).models == []
    unknown = await rpc_error(stub.OpenSession(pb.OpenSessionRequest(model=CHAT)))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "model 'tiny-chat' is not served; models: []" in \
        unknown.details()
    # Loading it again serves what the directory holds.
    assert [v.version for v in (await stub.LoadModel(pb.LoadModelRequest(model=CHAT))).versions] == [1, 2]
    missing = await rpc_error(stub.LoadModel(pb.LoadModelRequest(model="no-such-model")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "not in the model repository" in missing.details()


async def test_an_expired_session_ends_the_drain(start, connect, repository, clock, eventually):
    repository.add(CHAT, 1, "v1")
    running = await start(clock, model_dir=repository.path, model_control="explicit", load_model="*",
                          default_model=CHAT, sweep_interval_seconds=0.05)
    stub = connect(running)
    await stub.OpenSession(pb.OpenSessionRequest(model=CHAT, ttl_seconds=60))
    assert [v.state for v in (await stub.UnloadModel(pb.UnloadModelRequest(model=CHAT))).versions] == ["DRAINING"]
    await asyncio.sleep(0.3)
    assert await served_versions(stub) == {1: ("DRAINING", 1)}, "still live: no release"
    clock.advance(61)

    async def released() -> bool:
        return not (await stub.ListModels(pb.ListModelsRequest())).models

    await eventually(released, "the sweep expires the session and releases v1")


def run_reference(path, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(h, c) after feeding `tokens` from zero state to the graph at `path`, in-process, in one call."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    layers, _, hidden = session.get_inputs()[1].shape
    zeros = np.zeros((layers, 1, hidden), np.float32)
    _, h, c = session.run(["logits", "hn", "cn"], {"tokens": np.array([tokens], np.int64), "h0": zeros, "c0": zeros})
    return h[:, 0], c[:, 0]


@pytest.mark.timeout(240)
async def test_load_and_unload_under_load_lose_no_step_and_double_none(
        start, connect, repository, version_files, close, arrays, eventually, step):
    """64 sessions step back to back on v1 while v2 is loaded and v1 is unloaded (drained): every step applies
    exactly once (positions), every state equals in-process onnxruntime fed the session's whole history."""
    repository.add(CHAT, 1, "v1")
    running = await start(model_dir=repository.path, model_control="explicit", load_model="*", default_model=CHAT)
    stub = connect(running)
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest(model=CHAT))).session_id for _ in range(64)]
    sent: dict[str, list[int]] = {session: [] for session in sessions}
    rng = np.random.default_rng(27)
    plans = {session: [rng.integers(0, 256, size=rng.integers(1, 4)).tolist() for _ in range(24)]
             for session in sessions}
    steps_done = 0

    async def converse(session: str) -> None:
        nonlocal steps_done
        for tokens in plans[session]:
            response = await stub.Step(step(session, tokens=tokens))
            sent[session] += tokens
            assert response.position == len(sent[session]), "a step lost or doubled"
            steps_done += 1

    async def release_v2_then_retire_v1() -> list[str]:
        await eventually(lambda: steps_done >= 300, "the sessions are stepping")
        repository.add(CHAT, 2, "v2")
        loaded = [(v.version, v.state) for v in (await stub.LoadModel(pb.LoadModelRequest(model=CHAT))).versions]
        newer = await stub.OpenSession(pb.OpenSessionRequest(model=CHAT))
        await stub.Step(step(newer.session_id, tokens=FIRST))
        await eventually(lambda: steps_done >= 800, "the sessions go on stepping")
        repository.remove(CHAT, 1)
        unloaded = [(v.version, v.state) for v in (await stub.LoadModel(pb.LoadModelRequest(model=CHAT))).versions]
        return [str(loaded), str(unloaded), newer.session_id]

    *_, (loaded, unloaded, newer) = await asyncio.gather(*map(converse, sessions), release_v2_then_retire_v1())
    assert loaded == "[(1, 'READY'), (2, 'READY')]" and unloaded == "[(1, 'DRAINING'), (2, 'READY')]"
    assert steps_done == 64 * 24
    for session in sessions:
        state = await stub.GetState(pb.SessionRef(session_id=session))
        assert (state.model_version, state.position) == (1, len(sent[session]))
        want_h, want_c = run_reference(version_files["v1"], sent[session])
        got_h, got_c = arrays(state)
        close(got_h, want_h, f"h of {session}")
        close(got_c, want_c, f"c of {session}")
    state = await stub.GetState(pb.SessionRef(session_id=newer))
    want_h, _ = run_reference(version_files["v2"], FIRST)
    close(arrays(state)[0], want_h, "h of the session opened on v2")
    for session in sessions:
        await stub.CloseSession(pb.SessionRef(session_id=session))
    assert await served_versions(stub) == {2: ("READY", 1)}


async def test_poll_mode_follows_the_directory(start, connect, repository, eventually, caplog):
    repository.add(CHAT, 1, "v1")
    running = await start(model_dir=repository.path, model_control="poll", model_poll_interval_seconds=0.1,
                          default_model=CHAT)
    stub = connect(running)
    session = await stub.OpenSession(pb.OpenSessionRequest(model=CHAT))

    async def served(expected: dict[int, tuple[str, int]]) -> bool:
        return await served_versions(stub) == expected

    repository.add(CHAT, 2, "v2")
    await eventually(lambda: served({1: ("READY", 1), 2: ("READY", 0)}), "v2 is loaded by the poll")
    repository.remove(CHAT, 1)
    await eventually(lambda: served({1: ("DRAINING", 1), 2: ("READY", 0)}), "v1 drains: its directory is gone")
    with caplog.at_level(logging.ERROR, logger="cellstream.service.model_control"):
        repository.add(CHAT, 3, "broken")
        await eventually(lambda: "missing input 'c0'" in caplog.text, "the broken v3 is refused")
        await asyncio.sleep(0.5)  # a few more polls: the same file is not read (nor logged) again
    assert caplog.text.count("missing input 'c0'") == 1
    assert await served_versions(stub) == {1: ("DRAINING", 1), 2: ("READY", 0)}
    repository.add(CHAT, 3, "v1")  # fixed: a new file
    await eventually(lambda: served({1: ("DRAINING", 1), 2: ("READY", 0), 3: ("READY", 0)}), "v3 loads once fixed")
    await stub.CloseSession(pb.SessionRef(session_id=session.session_id))
    await eventually(lambda: served({2: ("READY", 0), 3: ("READY", 0)}), "v1 released after its last session")


async def test_kserve_sequences_stay_on_the_version_they_started_on(start, connect, repository):
    repository.add(CHAT, 1, "v1")
    running = await start(model_dir=repository.path, model_control="explicit", load_model="*", default_model=CHAT)
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{running.port}") as triton:
        await sequence_step(triton, FIRST, start=True)
        repository.add(CHAT, 2, "v2")
        await connect(running).LoadModel(pb.LoadModelRequest(model=CHAT))
        _, h, _ = await sequence_step(triton, SECOND)  # no version: the one it started on
        assert h.shape == (2, 16)
        _, h, _ = await sequence_step(triton, SECOND, version="1")
        assert h.shape == (2, 16)
        with pytest.raises(InferenceServerException, match=re.escape(
                "sequence 'conversation' of model 'tiny-chat' runs on version 1 (since its START): send its requests "
                "with that version or none, or START it again")):
            await sequence_step(triton, SECOND, version="2")
        with pytest.raises(InferenceServerException, match="has no version 3 loaded"):
            await sequence_step(triton, SECOND, version="3")
        _, h, _ = await sequence_step(triton, FIRST, start=True)  # started again: on the latest
        assert h.shape == (2, 24)
        _, h, _ = await sequence_step(triton, FIRST, version="1", start=True)
        assert h.shape == (2, 16)


async def test_version_policy_and_pinned_default_versions(start, connect, repository, rpc_error):
    for version in (1, 2, 3):
        repository.add(CHAT, version, "v1" if version != 2 else "v2")
    latest = await start(model_dir=repository.path, version_policy="latest:2", default_model=CHAT)
    assert await served_versions(connect(latest)) == {2: ("READY", 0), 3: ("READY", 0)}
    pinned = await start(model_dir=repository.path, default_versions=f"{CHAT}=2", default_model=CHAT)
    stub = connect(pinned)
    listed = await stub.ListModels(pb.ListModelsRequest())
    assert versions(listed) == {1: ("READY", 0), 2: ("READY", 0), 3: ("READY", 0)}
    assert (listed.models[0].version, listed.models[0].hidden_size) == (2, 24), "ModelInfo describes the default"
    assert (await stub.OpenSession(pb.OpenSessionRequest())).model_version == 2
    assert (await stub.OpenSession(pb.OpenSessionRequest(model_version=3))).model_version == 3
    async with triton_aio.InferenceServerClient(f"127.0.0.1:{pinned.port}") as triton:
        metadata = await triton.get_model_metadata(CHAT)
        assert list(metadata.versions) == ["1", "2", "3"] and metadata.outputs[1].shape == [2, -1, 24]
        assert list((await triton.get_model_metadata(CHAT, "3")).outputs[1].shape) == [2, -1, 16]
        with pytest.raises(InferenceServerException, match="has no version 'x'"):
            await triton.get_model_metadata(CHAT, "x")


async def test_listmodels_keeps_one_entry_per_model(server, stub):
    """Without versions nothing changes for a client: one ModelInfo per model, version 1 of each."""
    listed = await stub.ListModels(pb.ListModelsRequest())
    assert [(m.name, m.version, [(v.version, v.state) for v in m.versions]) for m in listed.models] == [
        ("tiny-chat", 1, [(1, "READY")]), ("tiny-features", 1, [(1, "READY")])]
    session = await stub.OpenSession(pb.OpenSessionRequest())
    assert (session.model, session.model_version) == (CHAT, 1)


async def test_a_version_whose_glass_box_is_not_its_own_is_refused(start, connect, repository, version_files,
                                                                     rpc_error):
    repository.add(CHAT, 1, "v1")
    running = await start(model_dir=repository.path, model_control="explicit", load_model="*", default_model=CHAT)
    stub = connect(running)
    stale = repository.add(CHAT, 2, "v1")  # v1's graph, but v2's gates (other weights, other shape) beside it
    stale.with_name("model.gates.onnx").write_bytes(version_files["v2"].with_name("v2.gates.onnx").read_bytes())
    refused = await rpc_error(stub.LoadModel(pb.LoadModelRequest(model=CHAT)))
    assert refused.code() == FAILED_PRECONDITION
    assert "version 2 of model 'tiny-chat': model.gates.onnx" in refused.details()
    assert await served_versions(stub) == {1: ("READY", 0)}


async def test_generate_on_a_pinned_session_stays_on_its_version(start, server, connect, repository):
    repository.add(CHAT, 1, "v1")
    versioned = await start(model_dir=repository.path, model_control="explicit", load_model="*", default_model=CHAT)
    stub, only_v1 = connect(versioned), connect(server)
    sessions = [(await c.OpenSession(pb.OpenSessionRequest(model=CHAT))).session_id for c in (stub, only_v1)]
    repository.add(CHAT, 2, "v2")
    await stub.LoadModel(pb.LoadModelRequest(model=CHAT))
    turn = "user: hi\nbot: "
    replies = [[(chunk.tokens, chunk.position) async for chunk in c.Generate(pb.GenerateRequest(
                session_id=session, prompt=turn, max_tokens=12))]
               for c, session in zip((stub, only_v1), sessions, strict=True)]
    assert replies[0] == replies[1] and replies[0][-1][1] > len(turn)

"""D. Session lifecycle through the API: initial_state, forks, close, and the model list."""

from __future__ import annotations

import time

import grpc
import numpy as np

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

PREFIX = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]  # "Hello, world"


async def test_initial_state_continues_like_the_source(stub, ref, close, arrays, step):
    source = await stub.OpenSession(pb.OpenSessionRequest())
    await stub.Step(step(source.session_id, tokens=PREFIX))
    exported = await stub.GetState(pb.SessionRef(session_id=source.session_id))
    assert exported.position == len(PREFIX)

    copy = await stub.OpenSession(pb.OpenSessionRequest(initial_state=exported))
    assert copy.session_id != source.session_id
    assert copy.position == len(PREFIX), "initial_state.position becomes the session's position"
    assert await stub.GetState(pb.SessionRef(session_id=copy.session_id)) == exported

    continuation = [33, 10, 257, 5, 200]
    a = await stub.Step(step(source.session_id, tokens=continuation, logits=True, state=True))
    b = await stub.Step(step(copy.session_id, tokens=continuation, logits=True, state=True))
    assert a.position == b.position == len(PREFIX) + len(continuation)
    assert list(a.logits) == list(b.logits)
    assert list(a.state.h) == list(b.state.h) and list(a.state.c) == list(b.state.c)
    want, h, c = ref.run("tiny-chat", np.array(PREFIX + continuation))
    close(np.asarray(b.logits), want[-1], "logits")
    got_h, got_c = arrays(b.state)
    close(got_h, h, "h")
    close(got_c, c, "c")


async def test_initial_state_without_model_name_and_features(stub, ref, close, arrays, step):
    rng = np.random.default_rng(3)
    h0 = rng.normal(0, 0.5, (2, 12)).astype(np.float32)
    c0 = rng.normal(0, 0.5, (2, 12)).astype(np.float32)
    state = pb.State(num_layers=2, hidden_size=12, h=h0.ravel().tolist(), c=c0.ravel().tolist(), position=100)
    session = await stub.OpenSession(pb.OpenSessionRequest(model="tiny-features", initial_state=state))
    assert session.model == "tiny-features" and session.position == 100
    features = rng.normal(0, 1, (6, 5)).astype(np.float32)
    response = await stub.Step(step(session.session_id, features=features, logits=True, state=True))
    assert response.position == 106
    want, h, c = ref.run("tiny-features", features, h0, c0)
    close(np.asarray(response.logits), want[-1], "logits")
    got_h, got_c = arrays(response.state)
    close(got_h, h, "h")
    close(got_c, c, "c")


async def test_forks_diverge_independently(stub, ref, close, arrays, step):
    parent = await stub.OpenSession(pb.OpenSessionRequest())
    await stub.Step(step(parent.session_id, tokens=PREFIX))
    fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=parent.session_id))
    assert fork.session_id != parent.session_id
    assert fork.model == "tiny-chat" and fork.position == len(PREFIX)
    forked, original = [await stub.GetState(pb.SessionRef(session_id=s.session_id)) for s in (fork, parent)]
    assert forked == original

    _, h, c = ref.run("tiny-chat", np.array(PREFIX))
    branches = {parent.session_id: [[1, 2, 3], [4]], fork.session_id: [[200, 201], [202, 203, 204], [5]]}
    # Interleave the two branches' steps.
    for index in range(3):
        for sid, steps in branches.items():
            if index < len(steps):
                await stub.Step(step(sid, tokens=steps[index]))
    for sid, steps in branches.items():
        tokens = [t for part in steps for t in part]
        _, want_h, want_c = ref.run("tiny-chat", np.array(tokens), h, c)
        state = await stub.GetState(pb.SessionRef(session_id=sid))
        assert state.position == len(PREFIX) + len(tokens)
        got_h, got_c = arrays(state)
        close(got_h, want_h, f"h of {sid}")
        close(got_c, want_c, f"c of {sid}")
        response = await stub.Step(step(sid, tokens=[0], logits=True))
        next_logits, _, _ = ref.run("tiny-chat", np.array([0]), want_h, want_c)
        close(np.asarray(response.logits), next_logits[-1], f"logits of {sid}")

    # Closing the parent leaves the fork alive.
    await stub.CloseSession(pb.SessionRef(session_id=parent.session_id))
    assert (await stub.GetState(pb.SessionRef(session_id=fork.session_id))).position == len(PREFIX) + 6 + 1


async def test_fork_ttl_and_expiry_stamp(stub):
    parent = await stub.OpenSession(pb.OpenSessionRequest(ttl_seconds=60))
    now = time.time()
    assert now + 50 < parent.expires_at.ToSeconds() <= now + 61
    fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=parent.session_id, ttl_seconds=600))
    assert now + 590 < fork.expires_at.ToSeconds() <= now + 601
    default = await stub.OpenSession(pb.OpenSessionRequest())
    assert now + 1790 < default.expires_at.ToSeconds() <= now + 1801  # session_ttl_seconds default 1800


async def test_close_returns_position_and_frees(server, stub, rpc_error, scrape, step):
    session = await stub.OpenSession(pb.OpenSessionRequest())
    await stub.Step(step(session.session_id, tokens=PREFIX))
    await stub.Step(step(session.session_id, text="!"))
    closed = await stub.CloseSession(pb.SessionRef(session_id=session.session_id))
    assert closed.position == len(PREFIX) + 1
    error = await rpc_error(stub.GetState(pb.SessionRef(session_id=session.session_id)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    samples = await scrape(server)
    assert samples.get("cellstream_sessions_closed_total") == 1
    assert samples.get("cellstream_sessions_active") == 0
    assert samples.get("cellstream_state_bytes") == 0


async def test_list_models(stub):
    response = await stub.ListModels(pb.ListModelsRequest())
    assert response.default_model == "tiny-chat"
    models = {m.name: m for m in response.models}
    assert sorted(models) == ["tiny-chat", "tiny-features"]
    chat, features = models["tiny-chat"], models["tiny-features"]
    assert (chat.input_kind, chat.vocab_size, chat.feature_size, chat.num_layers, chat.hidden_size) == (
        "tokens",
        260,
        0,
        2,
        16,
    )
    assert chat.is_default
    assert chat.metadata["cellstream.tokenizer"] == "bytes-v1"
    assert chat.metadata["cellstream.vocab_size"] == "260"
    assert chat.metadata["cellstream.corpus"] == "test"
    assert (
        features.input_kind,
        features.vocab_size,
        features.feature_size,
        features.num_layers,
        features.hidden_size,
    ) == ("features", 7, 5, 2, 12)
    assert not features.is_default


async def test_default_model_is_used_when_none_is_named(start, connect):
    server = await start(default_model="tiny-features")
    stub = connect(server)
    session = await stub.OpenSession(pb.OpenSessionRequest())
    assert session.model == "tiny-features"
    assert (await stub.ListModels(pb.ListModelsRequest())).default_model == "tiny-features"

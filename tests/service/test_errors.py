"""C. Every refused request gets its status and a message that names the problem, changes no state
(GetState before == after, bit for bit), and is counted in cellstream_requests_total."""

from __future__ import annotations

import math
from collections import Counter

import grpc
import numpy as np
import pytest

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture
def refused(rpc_error):
    """refused(client, session_ids, call, code, *fragments, counts=, method=) -> the error, after checking
    the status, that the message holds every fragment, and that no listed session changed."""

    async def _refused(stub, session_ids, call, code, *fragments, counts: Counter, method: str):
        before = [await stub.GetState(pb.SessionRef(session_id=sid)) for sid in session_ids]
        error = await rpc_error(call)
        assert error.code() == code, f"{error.code()}: {error.details()}"
        for fragment in fragments:
            assert fragment in error.details(), f"{fragment!r} not in {error.details()!r}"
        after = [await stub.GetState(pb.SessionRef(session_id=sid)) for sid in session_ids]
        assert after == before, "a refused request changed a session"
        counts[(method, code.name)] += 1
        return error

    return _refused


@pytest.fixture
def counted(scrape):
    """counted(server, counts): cellstream_requests_total{method, code} equals `counts` for each key."""

    async def _counted(server, counts: Counter) -> None:
        samples = await scrape(server)
        for (method, code), n in counts.items():
            got = samples.get("cellstream_requests_total", default=0.0, method=method, code=code)
            assert got == n, f"cellstream_requests_total{{method={method},code={code}}} = {got}, expected {n}"

    return _counted


async def test_unknown_and_closed_sessions(server, stub, refused, counted, warmed, step, reply):
    counts: Counter = Counter()
    live = await warmed(stub)
    unknown = "0" * 32
    await refused(stub, [live], stub.Step(step(unknown, tokens=[1])), NOT_FOUND, unknown, counts=counts, method="Step")
    await refused(stub, [live], stub.GetState(pb.SessionRef(session_id=unknown)), NOT_FOUND, unknown, counts=counts,
                  method="GetState")
    await refused(stub, [live], stub.ForkSession(pb.ForkSessionRequest(session_id=unknown)), NOT_FOUND, counts=counts,
                  method="ForkSession")
    await refused(stub, [live], stub.CloseSession(pb.SessionRef(session_id=unknown)), NOT_FOUND, counts=counts,
                  method="CloseSession")
    await refused(stub, [live], reply(stub, unknown, "hi"), NOT_FOUND, counts=counts, method="Generate")

    closed = await warmed(stub)
    await stub.CloseSession(pb.SessionRef(session_id=closed))
    for call, method in (
        (stub.Step(step(closed, tokens=[1])), "Step"),
        (stub.GetState(pb.SessionRef(session_id=closed)), "GetState"),
        (stub.CloseSession(pb.SessionRef(session_id=closed)), "CloseSession"),
        (stub.ForkSession(pb.ForkSessionRequest(session_id=closed)), "ForkSession"),
    ):
        await refused(stub, [live], call, NOT_FOUND, closed, counts=counts, method=method)
    await refused(
        stub,
        [live],
        stub.Step(step("", tokens=[1])),
        INVALID,
        "session_id is empty",
        counts=counts,
        method="Step",
    )
    await counted(server, counts)


async def test_bad_token_inputs(server, stub, refused, counted, warmed, step):
    counts: Counter = Counter()
    sid = await warmed(stub)
    await refused(
        stub,
        [sid],
        stub.Step(step(sid, tokens=[1, 2, 260, 3])),
        INVALID,
        "tokens.ids[2]",
        "260",
        counts=counts,
        method="Step",
    )
    await refused(
        stub,
        [sid],
        stub.Step(step(sid, tokens=[-1, 5])),
        INVALID,
        "tokens.ids[0]",
        "-1",
        counts=counts,
        method="Step",
    )
    empty = pb.StepRequest(session_id=sid, tokens=pb.TokenSequence())
    await refused(
        stub,
        [sid],
        stub.Step(empty, timeout=30),
        INVALID,
        "tokens.ids is empty",
        counts=counts,
        method="Step",
    )
    await refused(
        stub,
        [sid],
        stub.Step(pb.StepRequest(session_id=sid), timeout=30),
        INVALID,
        "no input",
        counts=counts,
        method="Step",
    )
    await refused(
        stub,
        [sid],
        stub.Step(step(sid, features=np.zeros((2, 5)))),
        INVALID,
        "takes tokens",
        counts=counts,
        method="Step",
    )
    await refused(stub, [sid], stub.Step(step(sid, text="")), INVALID, "empty", counts=counts, method="Step")
    # The same session still steps normally afterwards.
    response = await stub.Step(step(sid, tokens=[259]))
    assert response.position == 6
    await counted(server, counts)


async def test_bad_feature_inputs(server, stub, refused, counted, warmed, step):
    counts: Counter = Counter()
    sid = await warmed(stub, "tiny-features")
    chat = await warmed(stub)
    both = [sid, chat]
    await refused(
        stub,
        both,
        stub.Step(step(sid, text="hello")),
        INVALID,
        "no byte tokenizer",
        counts=counts,
        method="Step",
    )
    await refused(
        stub,
        both,
        stub.Step(step(sid, tokens=[1, 2])),
        INVALID,
        "takes features",
        "tokens.ids",
        counts=counts,
        method="Step",
    )
    await refused(
        stub,
        both,
        stub.Step(step(sid, features=np.zeros((2, 4)))),
        INVALID,
        "features.dim is 4",
        counts=counts,
        method="Step",
    )
    ragged = pb.StepRequest(session_id=sid, features=pb.FloatSequence(values=[0.5] * 12, dim=5))
    await refused(
        stub,
        both,
        stub.Step(ragged, timeout=30),
        INVALID,
        "12 floats",
        "not a multiple of dim 5",
        counts=counts,
        method="Step",
    )
    empty = pb.StepRequest(session_id=sid, features=pb.FloatSequence(dim=5))
    await refused(stub, both, stub.Step(empty, timeout=30), INVALID, "empty", counts=counts, method="Step")
    for bad, index in ((math.nan, 7), (math.inf, 0), (-math.inf, 9)):
        values = np.zeros((2, 5), np.float32)
        values.flat[index] = bad
        await refused(
            stub,
            both,
            stub.Step(step(sid, features=values)),
            INVALID,
            f"features.values[{index}]",
            "finite",
            counts=counts,
            method="Step",
        )
    response = await stub.Step(step(sid, features=np.ones((1, 5))))
    assert response.position == 4
    await counted(server, counts)


async def test_too_many_tokens(start, connect, refused, counted, warmed, step):
    server = await start(max_tokens_per_request=8)
    stub = connect(server)
    counts: Counter = Counter()
    sid = await warmed(stub)
    features = await warmed(stub, "tiny-features")
    await refused(
        stub,
        [sid],
        stub.Step(step(sid, tokens=list(range(9)))),
        INVALID,
        "9 steps",
        "max_tokens_per_request (8)",
        counts=counts,
        method="Step",
    )
    await refused(
        stub,
        [sid],
        stub.Step(step(sid, text="123456789")),
        INVALID,
        "max_tokens_per_request (8)",
        counts=counts,
        method="Step",
    )
    await refused(
        stub,
        [features],
        stub.Step(step(features, features=np.zeros((9, 5)))),
        INVALID,
        "max_tokens_per_request (8)",
        counts=counts,
        method="Step",
    )
    # The limit itself is allowed.
    assert (await stub.Step(step(sid, tokens=list(range(8))))).position == 13
    assert (await stub.Step(step(features, features=np.zeros((8, 5))))).position == 11
    await counted(server, counts)


async def test_expected_position(server, stub, refused, counted, warmed, step):
    counts: Counter = Counter()
    sid = await warmed(stub)
    for wrong in (0, 4, 6, 10**12):
        await refused(
            stub,
            [sid],
            stub.Step(step(sid, tokens=[1], expected_position=wrong)),
            grpc.StatusCode.ABORTED,
            f"expected_position is {wrong}",
            "position 5",
            "nothing was applied",
            counts=counts,
            method="Step",
        )
    response = await stub.Step(step(sid, tokens=[1, 2], expected_position=5))
    assert response.position == 7
    await counted(server, counts)


async def test_store_full_rejects(start, connect, refused, counted, warmed):
    server = await start(max_sessions=2, when_full="reject")
    stub = connect(server)
    counts: Counter = Counter()
    first, second = await warmed(stub), await warmed(stub)
    await refused(
        stub,
        [first, second],
        stub.OpenSession(pb.OpenSessionRequest()),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "max_sessions",
        counts=counts,
        method="OpenSession",
    )
    await refused(
        stub,
        [first, second],
        stub.ForkSession(pb.ForkSessionRequest(session_id=first)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "max_sessions",
        counts=counts,
        method="ForkSession",
    )
    # Nothing was evicted to make room, and closing one makes room again.
    assert (await stub.GetState(pb.SessionRef(session_id=first))).position == 5
    assert (await stub.GetState(pb.SessionRef(session_id=second))).position == 5
    await stub.CloseSession(pb.SessionRef(session_id=second))
    third = await stub.OpenSession(pb.OpenSessionRequest())
    assert third.position == 0
    await counted(server, counts)


async def test_open_session_arguments(server, stub, refused, counted, scrape, warmed):
    counts: Counter = Counter()
    sid = await warmed(stub)
    await refused(
        stub,
        [sid],
        stub.OpenSession(pb.OpenSessionRequest(model="no-such-model")),
        NOT_FOUND,
        "no-such-model",
        "tiny-chat",
        counts=counts,
        method="OpenSession",
    )
    await refused(
        stub,
        [sid],
        stub.OpenSession(pb.OpenSessionRequest(ttl_seconds=86_401)),
        INVALID,
        "ttl_seconds",
        "max_session_ttl_seconds",
        counts=counts,
        method="OpenSession",
    )
    await refused(
        stub,
        [sid],
        stub.ForkSession(pb.ForkSessionRequest(session_id=sid, ttl_seconds=86_401)),
        INVALID,
        "ttl_seconds",
        counts=counts,
        method="ForkSession",
    )
    good = await stub.GetState(pb.SessionRef(session_id=sid))
    short = pb.State(
        model=good.model, num_layers=2, hidden_size=16, h=list(good.h)[:-1], c=good.c, position=good.position
    )
    await refused(
        stub,
        [sid],
        stub.OpenSession(pb.OpenSessionRequest(initial_state=short)),
        INVALID,
        "initial_state.h",
        "31 floats",
        "expected 32",
        counts=counts,
        method="OpenSession",
    )
    long_c = pb.State(
        model=good.model, num_layers=2, hidden_size=16, h=good.h, c=[*good.c, 0.0], position=good.position
    )
    await refused(
        stub,
        [sid],
        stub.OpenSession(pb.OpenSessionRequest(initial_state=long_c)),
        INVALID,
        "initial_state.c",
        counts=counts,
        method="OpenSession",
    )
    layers = pb.State(num_layers=1, hidden_size=32, h=good.h, c=good.c, position=3)
    await refused(
        stub,
        [sid],
        stub.OpenSession(pb.OpenSessionRequest(initial_state=layers)),
        INVALID,
        "1 layers x 32",
        counts=counts,
        method="OpenSession",
    )
    other = pb.State(model="tiny-features", num_layers=2, hidden_size=16, h=good.h, c=good.c, position=3)
    await refused(
        stub,
        [sid],
        stub.OpenSession(pb.OpenSessionRequest(initial_state=other)),
        INVALID,
        "initial_state.model",
        counts=counts,
        method="OpenSession",
    )
    nan = pb.State(num_layers=2, hidden_size=16, h=[math.nan] * 32, c=good.c, position=3)
    await refused(
        stub,
        [sid],
        stub.OpenSession(pb.OpenSessionRequest(initial_state=nan)),
        INVALID,
        "NaN or Inf",
        counts=counts,
        method="OpenSession",
    )
    # None of the refused opens created a session.
    samples = await scrape(server)
    assert samples.get("cellstream_sessions_active") == 1
    assert samples.get("cellstream_sessions_opened_total") == 1
    await counted(server, counts)


async def test_stream_steps_binding(server, stub, counted, warmed, step):
    counts: Counter = Counter()
    sid = await warmed(stub)
    other = await warmed(stub)
    before = [await stub.GetState(pb.SessionRef(session_id=s)) for s in (sid, other)]

    call = stub.StreamSteps([step("", tokens=[1, 2])], timeout=30)
    assert await call.code() == INVALID
    assert "first StepRequest of a stream must name session_id" in await call.details()
    counts[("StreamSteps", "INVALID_ARGUMENT")] += 1

    requests = [step(sid, tokens=[1]), step(other, tokens=[2])]
    call = stub.StreamSteps(requests, timeout=30)
    responses = [r async for r in _until_error(call)]
    assert [r.position for r in responses] == [6]
    assert await call.code() == INVALID
    assert "bound to session" in await call.details()
    counts[("StreamSteps", "INVALID_ARGUMENT")] += 1
    after = [await stub.GetState(pb.SessionRef(session_id=s)) for s in (sid, other)]
    assert after[1] == before[1], "a step naming another session was applied"
    assert after[0].position == 6

    call = stub.StreamSteps([step(sid, tokens=[300])], timeout=30)
    assert await call.code() == INVALID
    assert "tokens.ids[0]" in await call.details()
    counts[("StreamSteps", "INVALID_ARGUMENT")] += 1
    assert await stub.GetState(pb.SessionRef(session_id=sid)) == after[0]
    await counted(server, counts)


async def _until_error(call):
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError:
        return


async def test_generate_arguments(server, stub, refused, counted, warmed, reply):
    counts: Counter = Counter()
    sid = await warmed(stub)
    features = await warmed(stub, "tiny-features")
    both = [sid, features]
    await refused(
        stub,
        both,
        reply(stub, sid, "hi", temperature=-1.0),
        INVALID,
        "temperature",
        counts=counts,
        method="Generate",
    )
    await refused(
        stub,
        both,
        reply(stub, sid, "hi", temperature=math.nan),
        INVALID,
        "temperature",
        counts=counts,
        method="Generate",
    )
    await refused(
        stub,
        both,
        reply(stub, sid, "hi", top_k=261),
        INVALID,
        "top_k is 261",
        "260",
        counts=counts,
        method="Generate",
    )
    await refused(
        stub,
        both,
        reply(stub, sid, "hi", stop=["x", ""]),
        INVALID,
        "stop has an empty string",
        counts=counts,
        method="Generate",
    )
    await refused(
        stub,
        both,
        reply(stub, sid, "hi", max_tokens=513),
        INVALID,
        "max_generate_tokens",
        counts=counts,
        method="Generate",
    )
    await refused(
        stub,
        both,
        reply(stub, features, "hi"),
        INVALID,
        "no byte tokenizer",
        counts=counts,
        method="Generate",
    )
    await refused(stub, both, reply(stub, sid, ""), INVALID, "prompt is empty", counts=counts, method="Generate")
    await counted(server, counts)


async def test_states_roundtrip_exactly(stub, arrays, warmed):
    """The 'bit-identical' comparisons above rely on GetState being a faithful float32 copy."""
    sid = await warmed(stub)
    state = await stub.GetState(pb.SessionRef(session_id=sid))
    h, c = arrays(state)
    assert h.dtype == np.float32 and np.any(h != 0) and np.any(c != 0)
    copy = await stub.OpenSession(pb.OpenSessionRequest(initial_state=state))
    assert await stub.GetState(pb.SessionRef(session_id=copy.session_id)) == state

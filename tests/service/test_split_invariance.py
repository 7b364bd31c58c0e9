"""A. Split invariance through the server: however a sequence is cut into requests (one Step, many
Steps, one StreamSteps message per chunk), the last logits and the carried state equal in-process
onnxruntime on the whole sequence from zero state."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

LENGTH = 40
SPLIT_SEEDS = (1, 2, 3)


def random_chunks(rng: np.random.Generator, sequence: np.ndarray) -> list[np.ndarray]:
    cuts = sorted(set(rng.integers(1, len(sequence), size=rng.integers(3, 12)).tolist()))
    return np.split(sequence, cuts)


def token_sequence(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 260, size=LENGTH)


def feature_sequence(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, size=(LENGTH, 5)).astype(np.float32)


def step_kwargs(model: str, chunk: np.ndarray) -> dict:
    return {"tokens": chunk.tolist()} if model == "tiny-chat" else {"features": chunk}


async def check_against_reference(
    stub,
    session_id: str,
    model: str,
    sequence: np.ndarray,
    last_logits: np.ndarray,
    ref,
    close,
    arrays,
) -> None:
    want_logits, want_h, want_c = ref.run(model, sequence)
    close(last_logits, want_logits[-1], "last logits")
    state = await stub.GetState(pb.SessionRef(session_id=session_id))
    assert state.position == len(sequence)
    assert state.model == model
    h, c = arrays(state)
    close(h, want_h, "h")
    close(c, want_c, "c")


@pytest.mark.parametrize(("model", "make"), [("tiny-chat", token_sequence), ("tiny-features", feature_sequence)])
async def test_one_step_matches_reference(stub, ref, close, arrays, model, make, step):
    sequence = make()
    session = await stub.OpenSession(pb.OpenSessionRequest(model=model))
    assert session.model == model and session.position == 0
    response = await stub.Step(step(session.session_id, logits=True, state=True, **step_kwargs(model, sequence)))
    assert response.position == LENGTH
    await check_against_reference(
        stub, session.session_id, model, sequence, np.asarray(response.logits), ref, close, arrays
    )
    # The state returned with the step is the state the session keeps.
    stored = await stub.GetState(pb.SessionRef(session_id=session.session_id))
    assert list(response.state.h) == list(stored.h) and list(response.state.c) == list(stored.c)
    assert response.state.position == stored.position == LENGTH
    # all_steps returns every step's logits, steps * vocab, in order.
    again = await stub.OpenSession(pb.OpenSessionRequest(model=model))
    response = await stub.Step(step(again.session_id, all_steps=True, **step_kwargs(model, sequence)))
    want, _, _ = ref.run(model, sequence)
    close(np.asarray(response.logits).reshape(want.shape), want, "all_steps logits")


@pytest.mark.parametrize(("model", "make"), [("tiny-chat", token_sequence), ("tiny-features", feature_sequence)])
@pytest.mark.parametrize("seed", SPLIT_SEEDS)
async def test_random_splits_match_reference(stub, ref, close, arrays, model, make, seed, step):
    sequence = make()
    chunks = random_chunks(np.random.default_rng(seed), sequence)
    assert len(chunks) > 2
    session = await stub.OpenSession(pb.OpenSessionRequest(model=model))
    position = 0
    for chunk in chunks:
        response = await stub.Step(step(session.session_id, logits=True, **step_kwargs(model, chunk)))
        position += len(chunk)
        assert response.position == position
        # Every intermediate answer is already exact, not just the last one.
        want, _, _ = ref.run(model, sequence[:position])
        close(np.asarray(response.logits), want[-1], f"logits after {position} steps")
    await check_against_reference(
        stub, session.session_id, model, sequence, np.asarray(response.logits), ref, close, arrays
    )


@pytest.mark.parametrize(("model", "make"), [("tiny-chat", token_sequence), ("tiny-features", feature_sequence)])
async def test_stream_steps_match_reference(stub, ref, close, arrays, model, make, step):
    sequence = make()
    chunks = random_chunks(np.random.default_rng(7), sequence)
    session = await stub.OpenSession(pb.OpenSessionRequest(model=model))
    call = stub.StreamSteps()
    position = 0
    for i, chunk in enumerate(chunks):
        # Only the first request needs the session id; later ones may omit it.
        request = step(session.session_id if i == 0 else "", logits=True, **step_kwargs(model, chunk))
        await asyncio.wait_for(call.write(request), 30)
        response = await asyncio.wait_for(call.read(), 30)
        position += len(chunk)
        assert response.session_id == session.session_id
        assert response.position == position
    await call.done_writing()
    assert await asyncio.wait_for(call.code(), 30) == grpc.StatusCode.OK
    await check_against_reference(
        stub, session.session_id, model, sequence, np.asarray(response.logits), ref, close, arrays
    )


async def test_text_equals_its_utf8_tokens(stub, ref, close, arrays, step):
    text = "héllo, wörld ✓"
    tokens = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
    by_text = await stub.OpenSession(pb.OpenSessionRequest())
    by_tokens = await stub.OpenSession(pb.OpenSessionRequest())
    a = await stub.Step(step(by_text.session_id, text=text, logits=True))
    b = await stub.Step(step(by_tokens.session_id, tokens=tokens.tolist(), logits=True))
    assert a.position == b.position == len(tokens)
    assert list(a.logits) == list(b.logits)
    await check_against_reference(
        stub, by_text.session_id, "tiny-chat", tokens, np.asarray(a.logits), ref, close, arrays
    )

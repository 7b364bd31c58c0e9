"""cellstream.AsyncClient and cellstream.Client against a live server: sessions as objects, typed results (NumPy
arrays equal to in-process onnxruntime), both input kinds, gates, replies, forks, states, and every failure as
its own exception class carrying the status."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

import cellstream
from cellstream import AsyncClient, Client
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

CHAT, FEATURES = "tiny-chat", "tiny-features"
ARTIFACTS = Path(__file__).resolve().parents[2] / "model" / "artifacts"
pytestmark = pytest.mark.timeout(120)


async def test_a_session_steps_and_returns_arrays_equal_to_onnxruntime(client, ref, close):
    tokens = [72, 105, 33, 10, 200]
    async with client.session(CHAT) as session:
        assert session.position == 0 and session.model == CHAT
        first = await session.step(tokens[:2], logits=True, top_k=3, state=True)
        assert isinstance(first, cellstream.StepResult) and not first.recovered
        assert first.position == 2 == session.position and first.session_id == session.session_id
        want, h, c = ref.run(CHAT, tokens[:2])
        assert first.logits.dtype == np.float32 and first.logits.shape == (260,)
        close(first.logits, want[-1], "last logits")
        assert first.state.position == 2 and first.state.h.shape == (2, 16)
        close(first.state.h, h, "h")
        close(first.state.c, c, "c")
        probs = [t.prob for t in first.top]
        assert [t.token for t in first.top] == list(np.argsort(-want[-1])[:3]) and probs == sorted(probs, reverse=True)
        every = await session.step(np.array(tokens[2:]), all_steps=True)
        assert every.position == 5 and every.logits.shape == (3, 260) and every.state is None and every.top == ()
        whole, h, c = ref.run(CHAT, tokens)
        close(every.logits, whole[2:], "every step's logits")
        state = await session.get_state()
        assert state.position == 5 and state.model == CHAT
        close(state.h, h, "state h")
        close(state.c, c, "state c")
        plain = await session.step(text="é")  # two UTF-8 bytes, two steps; nothing asked: the position only
        assert (plain.position, plain.logits, plain.state) == (7, None, None)
        session_id = session.session_id
    assert session.closed
    with pytest.raises(cellstream.NotFound, match="not found") as info:
        await client.attach(session_id)
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.applied is False


async def test_a_features_model_returns_its_outputs(client, ref, close, start):
    readings = np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)
    session = await client.session(FEATURES)  # its output is named "logits": it comes back as logits
    last = await session.step(features=readings[:3], logits=True)
    assert last.outputs is None and last.logits.shape == (7,)
    close(last.logits, ref.run(FEATURES, readings[:3])[0][-1], "last output")
    every = await session.step(features=readings[3], all_steps=True)  # one vector: one step
    assert every.position == 4 and every.logits.shape == (1, 7)
    close(every.logits, ref.run(FEATURES, readings)[0][3:], "every step's outputs")
    assert await session.close() == 4
    # A model whose output is not logits (the shipped forecaster's "forecast") fills `outputs` instead.
    shipped = await start(model_dir=ARTIFACTS, default_model="cellstream-chat")
    async with AsyncClient(f"127.0.0.1:{shipped.port}") as other, other.session("cellstream-sensor") as sensor:
        forecast = await sensor.step(features=[[0.5], [0.25]], logits=True, all_steps=True)
        assert forecast.logits is None and forecast.outputs.shape == (2, 1) and forecast.outputs.dtype == np.float32


async def test_gates_come_back_as_arrays_of_layers_steps_and_units(client):
    session = await client.session(CHAT)
    result = await session.step([1, 2, 3], gates=True, state=True)
    gates = result.gates
    assert isinstance(gates, cellstream.Gates)
    for name in ("forget", "input", "candidate", "cell", "output", "hidden"):
        assert getattr(gates, name).shape == (2, 3, 16), name  # (layers, steps, hidden)
    np.testing.assert_allclose(gates.hidden[:, -1], result.state.h, atol=1e-5)
    np.testing.assert_allclose(gates.cell[:, -1], result.state.c, atol=1e-5)
    assert ((gates.forget > 0) & (gates.forget < 1)).all()


async def test_replies_stream_as_chunks_equal_to_greedy_decoding(client, ref):
    prompt = "user: hi\nbot: "
    session = await client.session(CHAT)
    chunks = [chunk async for chunk in session.generate(prompt, max_tokens=6)]
    tokens, _, _ = ref.greedy(prompt, 6)
    assert [t for chunk in chunks for t in chunk.tokens] == tokens
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].finish_reason in ("length", "end_token")
    positions = [c.position for c in chunks]
    assert positions == sorted(positions) and positions[-1] == len(prompt.encode()) + len(tokens) == session.position
    other = await client.session(CHAT)
    assert await other.reply(prompt, max_tokens=6) == "".join(c.text for c in chunks)
    gated = [chunk async for chunk in (await client.session(CHAT)).generate(prompt, max_tokens=2, gates=True)]
    assert gated[0].gates.forget.shape == (2, len(prompt.encode()) + len(gated[0].tokens), 16)


async def test_a_fork_starts_where_its_session_is_and_goes_its_own_way(client):
    session = await client.session(CHAT)
    await session.step([5, 6, 7])
    fork = await session.fork()
    assert fork.session_id != session.session_id and fork.position == 3
    forked, original = await fork.step([8], logits=True), await session.step([8], logits=True)
    np.testing.assert_array_equal(forked.logits, original.logits)
    await fork.step([9])
    assert (await fork.get_state()).position == 5 and (await session.get_state()).position == 4


async def test_attach_reaches_a_session_by_id_and_models_lists_the_served_ones(client, connect, server):
    models = {m.name: m for m in await client.models()}
    assert set(models) == {CHAT, FEATURES}
    assert models[CHAT].is_default and models[CHAT].gates and models[CHAT].vocab_size == 260
    assert (models[FEATURES].input_kind, models[FEATURES].feature_size, models[FEATURES].output_name) == (
        "features", 5, "logits")
    async with AsyncClient(f"127.0.0.1:{server.port}") as other:
        opened = await other.session(CHAT)
        await opened.step([1, 2])
        attached = await client.attach(opened.session_id)
        assert attached is await client.attach(opened.session_id)  # one object per session: one queue of calls
        assert (attached.position, attached.model) == (2, CHAT)
        assert (await attached.step([3])).position == 3


async def test_a_session_can_start_from_an_exported_state(client, close, ref):
    source = await client.session(CHAT)
    await source.step([40, 41, 42])
    state = await source.get_state()
    copy = await client.session(CHAT, state=state)
    assert copy.position == 3
    result = await copy.step([43], logits=True)
    close(result.logits, ref.run(CHAT, [40, 41, 42, 43])[0][-1], "logits after the imported state")


async def test_each_failure_is_its_own_exception_with_its_status(client, start, gate):
    session = await client.session(CHAT)
    with pytest.raises(cellstream.InvalidArgument, match=r"outside the vocabulary") as info:
        await session.step([400])
    assert (info.value.code, info.value.applied) == (grpc.StatusCode.INVALID_ARGUMENT, False)
    assert str(info.value).startswith("INVALID_ARGUMENT: ")
    with pytest.raises(cellstream.InvalidArgument, match="exactly one of tokens, text or features"):
        await session.step([1], text="x")
    with pytest.raises(cellstream.InvalidArgument, match="32-bit"):
        await session.step([2**40])
    with pytest.raises(cellstream.PositionConflict, match="expected_position is 7") as conflict:
        await session.step([1], expected_position=7)
    assert (conflict.value.position, conflict.value.applied) == (0, False)
    with pytest.raises(cellstream.NotFound, match="model"):
        await client.session("no-such-model")
    assert session.position == 0  # every refusal changed nothing
    assert (await session.step([1])).position == 1

    full = await start(max_sessions=1, when_full="reject")
    async with AsyncClient(f"127.0.0.1:{full.port}") as other:
        await other.session(CHAT)
        with pytest.raises(cellstream.ResourceExhausted, match="max_sessions"):
            await other.session(CHAT)


async def test_a_step_past_its_deadline_may_still_apply_and_the_session_knows(client, server, gate):
    session = await client.session(CHAT)
    held = gate(server)
    with pytest.raises(cellstream.DeadlineExceeded) as late:
        await session.step([1], timeout=0.3)
    assert late.value.applied is None  # on its way: it may still be applied
    assert held.running.is_set()
    held.open.set()
    # The next call waits for the first step's outcome, so it knows where the session is: after the first step.
    assert (await session.step([2])).position == 2
    assert (await session.get_state()).position == 2


async def test_the_blocking_client_from_several_threads(server, ref, close):
    """Client runs its own event loop in a thread: here in worker threads, while this test's loop serves."""
    results: dict[int, list[int]] = {}

    def converse(client: Client, seed: int) -> None:
        with client.session(CHAT) as session:
            positions = [session.step([seed, k]).position for k in range(5)]
            final = session.state
            close(final.h, ref.run(CHAT, [t for k in range(5) for t in (seed, k)])[1], f"thread {seed}")
            assert session.reply("user: hi\nbot: ", max_tokens=3)
            assert [c.done for c in session.generate("x", max_tokens=2)][-1]
            results[seed] = positions

    def run() -> float:
        with Client(f"127.0.0.1:{server.port}") as client:
            threads = [threading.Thread(target=converse, args=(client, seed)) for seed in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            return client.steps_per_message

    per_message = await asyncio.to_thread(run)
    assert results == {seed: [2, 4, 6, 8, 10] for seed in range(8)}
    assert per_message >= 1.0


async def test_a_session_gone_before_its_block_ends_is_no_error_at_the_end(client, stub):
    async with client.session(CHAT) as session:
        await stub.CloseSession(pb.SessionRef(session_id=session.session_id))  # expired, evicted, closed elsewhere
    assert session.closed
    with pytest.raises(cellstream.NotFound):
        await session.close()  # said plainly when asked for

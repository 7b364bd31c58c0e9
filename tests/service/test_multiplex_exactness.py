"""A/B through the multiplexed RPCs: many sessions' items interleaved in each StepMany call or
StreamMany message (a session sometimes twice in one message) give every session exactly what it
gets alone, as in-process onnxruntime computes it, and the server really batched them."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

SESSIONS = 64
METHODS = ("StepMany", "StreamMany")


def plan(seed: int) -> list[np.ndarray]:
    """A random token sequence cut into random chunks of 1-4 tokens."""
    rng = np.random.default_rng(seed)
    sequence = rng.integers(0, 260, size=int(rng.integers(12, 24)))
    cuts = np.cumsum(rng.integers(1, 5, size=len(sequence)))
    return np.split(sequence, cuts[cuts < len(sequence)])


def interleave(queues: list[list[pb.StepRequest]], rng: np.random.Generator, per_message: int
               ) -> list[pb.StepBatch]:
    """Every queue's requests, interleaved at random across messages of `per_message` items, each
    queue's requests staying in their order (so a session may appear twice in one message)."""
    items: list[pb.StepRequest] = []
    live = [list(q) for q in queues if q]
    while live:
        k = int(rng.integers(len(live)))
        items.append(live[k].pop(0))
        if not live[k]:
            live.pop(k)
    return [pb.StepBatch(items=items[i : i + per_message]) for i in range(0, len(items), per_message)]


async def send(stub, method: str, messages: list[pb.StepBatch]) -> list[pb.StepOutcome]:
    """Every item's outcome, in the order they arrived. StreamMany: all messages are written before
    any reply is read, so several messages' items of one session are in flight at once."""
    if method == "StepMany":
        arrived = []
        for message in messages:
            reply = await asyncio.wait_for(stub.StepMany(message, timeout=30), 30)
            assert [o.tag for o in reply.items] == [i.tag for i in message.items], "StepMany keeps item order"
            arrived += reply.items
        return arrived
    call = stub.StreamMany()
    for message in messages:
        await asyncio.wait_for(call.write(message), 30)
    await call.done_writing()

    async def read_all() -> list[pb.StepOutcome]:
        return [outcome async for reply in call for outcome in reply.items]

    arrived = await asyncio.wait_for(read_all(), 60)
    assert await call.code() == grpc.StatusCode.OK
    return arrived


def tag_of(session: int, chunk: int) -> int:
    return session * 1000 + chunk


@pytest.mark.parametrize("method", METHODS)
async def test_64_interleaved_sessions_get_their_own_outputs(server, stub, ref, close, arrays, scrape, method, step):
    plans = [plan(seed) for seed in range(SESSIONS)]
    opened = await asyncio.gather(*(stub.OpenSession(pb.OpenSessionRequest()) for _ in range(SESSIONS)))
    sessions = [s.session_id for s in opened]
    queues = [[step(sid, tokens=chunk.tolist(), logits=True, tag=tag_of(s, k))
               for k, chunk in enumerate(chunks)] for s, (sid, chunks) in enumerate(zip(sessions, plans, strict=True))]
    messages = interleave(queues, np.random.default_rng(5), per_message=48)
    assert any(len({i.session_id for i in m.items}) < len(m.items) for m in messages), "no session twice in a message"

    arrived = await send(stub, method, messages)
    outcomes = {o.tag: o for o in arrived}
    assert len(outcomes) == len(arrived) == sum(len(p) for p in plans)
    for s, chunks in enumerate(plans):
        order = [o.tag for o in arrived if o.tag // 1000 == s]
        assert order == sorted(order), f"session {s}: outcomes out of item order"
        h, c = ref.zero_state("tiny-chat")
        position = 0
        for k, chunk in enumerate(chunks):
            outcome = outcomes[tag_of(s, k)]
            assert outcome.WhichOneof("outcome") == "response", outcome.error.message
            want, h, c = ref.run("tiny-chat", chunk, h, c)
            position += len(chunk)
            assert outcome.response.session_id == sessions[s]
            assert outcome.response.position == position, f"session {s} chunk {k}"
            close(np.asarray(outcome.response.logits), want[-1], f"session {s} chunk {k} logits")
        state = await stub.GetState(pb.SessionRef(session_id=sessions[s]))
        assert state.position == position
        got_h, got_c = arrays(state)
        close(got_h, h, f"session {s} h")
        close(got_c, c, f"session {s} c")

    samples = await scrape(server)
    steps = sum(len(p) for p in plans)
    assert samples.get("cellstream_batch_size_sum", model="tiny-chat") == steps
    batches = samples.get("cellstream_batch_size_count", model="tiny-chat")
    assert batches < steps / 4, f"{batches} batches for {steps} steps: the items were not batched"
    assert samples.get("cellstream_items_total", method=method, code="OK") == steps
    assert samples.get("cellstream_requests_total", method=method, code="OK") == (
        len(messages) if method == "StepMany" else 1)


def random_chunks(rng: np.random.Generator, sequence: np.ndarray) -> list[np.ndarray]:
    cuts = sorted(set(rng.integers(1, len(sequence), size=rng.integers(3, 12)).tolist()))
    return np.split(sequence, cuts)


@pytest.mark.parametrize("method", METHODS)
async def test_split_sequences_of_both_models_in_shared_messages(stub, ref, close, arrays, method, step):
    """Token and feature sessions, each fed a sequence cut at random, their items sharing messages:
    the last logits, the returned state and the kept state equal one in-process run of the whole."""
    rng = np.random.default_rng(11)
    models = ["tiny-chat", "tiny-features"] * 8
    sequences = [rng.integers(0, 260, size=40) if m == "tiny-chat" else rng.normal(0, 1, (40, 5)).astype(np.float32)
                 for m in models]
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest(model=m))).session_id for m in models]
    queues = []
    for s, (model, sequence) in enumerate(zip(models, sequences, strict=True)):
        chunks = random_chunks(rng, sequence)
        assert len(chunks) > 2
        queue = []
        for k, chunk in enumerate(chunks):
            last = k == len(chunks) - 1
            kwargs = {"tokens": chunk.tolist()} if model == "tiny-chat" else {"features": chunk}
            queue.append(step(sessions[s], logits=last, state=last, tag=tag_of(s, k), **kwargs))
        queues.append(queue)
    arrived = await send(stub, method, interleave(queues, rng, per_message=10))
    lasts = {o.tag // 1000: o for o in arrived if o.response.HasField("state")}
    assert len(lasts) == len(models)
    for s, (model, sequence) in enumerate(zip(models, sequences, strict=True)):
        want_logits, want_h, want_c = ref.run(model, sequence)
        response = lasts[s].response
        assert response.position == len(sequence)
        close(np.asarray(response.logits), want_logits[-1], f"{model} session {s} last logits")
        kept = await stub.GetState(pb.SessionRef(session_id=sessions[s]))
        assert kept == response.state, "the state returned is not the state kept"
        h, c = arrays(kept)
        close(h, want_h, f"{model} session {s} h")
        close(c, want_c, f"{model} session {s} c")


@pytest.mark.parametrize("method", METHODS)
async def test_items_that_all_name_their_position_apply_where_they_hold(server, stub, step, ref, close, scrape,
                                                                       method):
    """The message cellstream.AsyncClient sends: distinct sessions of one model and length, every item with its
    expected position. The right ones apply, each wrong one alone is ABORTED, and together they batch."""
    opened = await asyncio.gather(*(stub.OpenSession(pb.OpenSessionRequest()) for _ in range(32)))
    sessions = [s.session_id for s in opened]
    for sid in sessions[::4]:  # every fourth session has moved: its item's position is stale
        await stub.Step(step(sid, tokens=[9]))
    items = [step(sid, tokens=[k % 256], expected_position=0, logits=True, tag=k + 1)
             for k, sid in enumerate(sessions)]
    before = (await scrape(server)).get("cellstream_batch_size_count", model="tiny-chat")
    outcomes = {o.tag: o for o in await send(stub, method, [pb.StepBatch(items=items)])}
    for k, sid in enumerate(sessions):
        outcome = outcomes[k + 1]
        if k % 4 == 0:
            assert outcome.error.code == grpc.StatusCode.ABORTED.value[0], outcome
            assert "expected_position is 0" in outcome.error.message
            assert (await stub.GetState(pb.SessionRef(session_id=sid))).position == 1
        else:
            assert outcome.response.position == 1, outcome
            close(np.asarray(outcome.response.logits), ref.run("tiny-chat", [k % 256])[0][-1], f"item {k}")
    batches = (await scrape(server)).get("cellstream_batch_size_count", model="tiny-chat") - before
    assert batches <= 2, f"{batches} batches for one message of 32 items"

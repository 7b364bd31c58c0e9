"""A/B through the multiplexed RPCs: many sessions' items interleaved in each StepMany call or
StreamMany message (a session sometimes twice in one message) give every session exactly what it
gets alone, as in-process onnxruntime computes it, and the server really batched them."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.client import Client

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


async def send(client: Client, method: str, messages: list[pb.StepBatch]) -> list[pb.StepOutcome]:
    """Every item's outcome, in the order they arrived. StreamMany: all messages are written before
    any reply is read, so several messages' items of one session are in flight at once."""
    if method == "StepMany":
        arrived = []
        for message in messages:
            reply = await asyncio.wait_for(client.stub.StepMany(message, timeout=30), 30)
            assert [o.tag for o in reply.items] == [i.tag for i in message.items], "StepMany keeps item order"
            arrived += reply.items
        return arrived
    call = client.stream_many()
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
async def test_64_interleaved_sessions_get_their_own_outputs(server, client, ref, close, arrays, scrape, method):
    plans = [plan(seed) for seed in range(SESSIONS)]
    sessions = [s.session_id for s in await asyncio.gather(*(client.open_session() for _ in range(SESSIONS)))]
    queues = [[Client.step_request(sid, tokens=chunk.tolist(), logits=True, tag=tag_of(s, k))
               for k, chunk in enumerate(chunks)] for s, (sid, chunks) in enumerate(zip(sessions, plans, strict=True))]
    messages = interleave(queues, np.random.default_rng(5), per_message=48)
    assert any(len({i.session_id for i in m.items}) < len(m.items) for m in messages), "no session twice in a message"

    arrived = await send(client, method, messages)
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
        state = await client.get_state(sessions[s])
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
async def test_split_sequences_of_both_models_in_shared_messages(client, ref, close, arrays, method):
    """Token and feature sessions, each fed a sequence cut at random, their items sharing messages:
    the last logits, the returned state and the kept state equal one in-process run of the whole."""
    rng = np.random.default_rng(11)
    models = ["tiny-chat", "tiny-features"] * 8
    sequences = [rng.integers(0, 260, size=40) if m == "tiny-chat" else rng.normal(0, 1, (40, 5)).astype(np.float32)
                 for m in models]
    sessions = [(await client.open_session(model=m)).session_id for m in models]
    queues = []
    for s, (model, sequence) in enumerate(zip(models, sequences, strict=True)):
        chunks = random_chunks(rng, sequence)
        assert len(chunks) > 2
        queue = []
        for k, chunk in enumerate(chunks):
            last = k == len(chunks) - 1
            kwargs = {"tokens": chunk.tolist()} if model == "tiny-chat" else {"features": chunk}
            queue.append(Client.step_request(sessions[s], logits=last, state=last, tag=tag_of(s, k), **kwargs))
        queues.append(queue)
    arrived = await send(client, method, interleave(queues, rng, per_message=10))
    lasts = {o.tag // 1000: o for o in arrived if o.response.HasField("state")}
    assert len(lasts) == len(models)
    for s, (model, sequence) in enumerate(zip(models, sequences, strict=True)):
        want_logits, want_h, want_c = ref.run(model, sequence)
        response = lasts[s].response
        assert response.position == len(sequence)
        close(np.asarray(response.logits), want_logits[-1], f"{model} session {s} last logits")
        kept = await client.get_state(sessions[s])
        assert kept == response.state, "the state returned is not the state kept"
        h, c = arrays(kept)
        close(h, want_h, f"{model} session {s} h")
        close(c, want_c, f"{model} session {s} c")

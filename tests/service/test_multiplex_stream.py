"""The multiplexed streams: StreamMany echoes tags and packs the outcomes of one batch into one message,
keeps each session's order, and applies nothing of a cancelled stream; GenerateMany runs many
sessions' chat turns on one stream, chunks tagged by turn and session, a failing turn alone."""

from __future__ import annotations

import asyncio

import grpc

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

PROMPT = "user: héllo\nbot: "


async def read(call: grpc.aio.StreamStreamCall) -> pb.StepBatchResult:
    return await asyncio.wait_for(call.read(), 30)


async def test_tags_are_echoed_and_one_batch_is_one_message(server, stub, gate, step):
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(16)]
    tags = [2**63 + 977 * k for k in range(16)]  # any uint64 the client likes
    call = stub.StreamMany()
    await call.write(pb.StepBatch(items=[step(sid, tokens=[k], tag=tag)
                                         for k, (sid, tag) in enumerate(zip(sessions, tags, strict=True))]))
    reply = await read(call)
    # All 16 were queued before the batcher ran: one batch, so one message.
    assert sorted(o.tag for o in reply.items) == sorted(tags)
    assert {o.tag: o.response.session_id for o in reply.items} == dict(zip(tags, sessions, strict=True))

    # Two batches (the second queued while the first computes): two messages, one per batch.
    held = gate(server)
    await call.write(pb.StepBatch(items=[step(sid, tokens=[1], tag=k) for k, sid
                                         in enumerate(sessions[:8])]))
    assert await asyncio.to_thread(held.running.wait, 30)
    await call.write(pb.StepBatch(items=[step(sid, tokens=[1], tag=100 + k) for k, sid
                                         in enumerate(sessions[8:])]))
    batcher = server.dataplane.batchers["tiny-chat"]

    async def second_queued() -> None:  # read and queued behind the held batch
        while batcher.queued < 8:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(second_queued(), 30)
    held.open.set()
    first, second = await read(call), await read(call)
    assert sorted(o.tag for o in first.items) == list(range(8))
    assert sorted(o.tag for o in second.items) == list(range(100, 108))
    await call.done_writing()
    assert await asyncio.wait_for(call.code(), 30) == grpc.StatusCode.OK


async def test_a_sessions_outcomes_keep_its_item_order(stub, step):
    sid = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    other = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    call = stub.StreamMany()
    # The refused item (bad token) is known at once, but its outcome waits for the earlier item of its session.
    await call.write(pb.StepBatch(items=[
        step(sid, tokens=[1], tag=1),
        step(sid, tokens=[999], tag=2),
        step(sid, tokens=[2], tag=3),
        step(other, tokens=[999], tag=4),
    ]))
    await call.done_writing()
    arrived = [o async for reply in call for o in reply.items]
    mine = [(o.tag, o.WhichOneof("outcome")) for o in arrived if o.tag != 4]
    assert mine == [(1, "response"), (2, "error"), (3, "response")]
    assert [o.response.position for o in arrived if o.tag in (1, 3)] == [1, 2]
    assert arrived[0].tag == 4, "an error of a session with nothing in flight is sent at once"


async def test_cancelled_stream_applies_nothing_still_queued_or_running(server, stub, gate, scrape, eventually, step):
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(4)]
    held = gate(server)
    batcher = server.dataplane.batchers[server.dataplane.spec("").name]  # the sessions' model, the default
    call = stub.StreamMany()
    await call.write(pb.StepBatch(items=[step(sid, tokens=[1, 2]) for sid in sessions]))
    assert await asyncio.to_thread(held.running.wait, 30)
    await call.write(pb.StepBatch(items=[step(sid, tokens=[3]) for sid in sessions]))
    await eventually(lambda: batcher.queued == len(sessions), "the second message is queued behind the held batch")
    call.cancel()

    async def counted() -> bool:
        return bool((await scrape(server)).get("cellstream_requests_total", 0.0, method="StreamMany",
                                               code="CANCELLED"))

    await eventually(counted, "the server sees the cancellation while the batch is held")
    held.open.set()
    for sid in sessions:
        position = (await stub.GetState(pb.SessionRef(session_id=sid))).position
        assert position == 0, "a cancelled stream's step was applied"
    assert (await stub.Step(step(sessions[0], tokens=[1]))).position == 1  # the batcher serves on


async def test_step_many_past_its_deadline_applies_nothing(server, stub, gate, rpc_error, scrape, eventually, step):
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(4)]
    other = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    held = gate(server)
    batch = pb.StepBatch(items=[step(sid, tokens=[1, 2]) for sid in sessions])
    error = await rpc_error(stub.StepMany(batch, timeout=1.0))  # the batch is held past the deadline
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert held.running.is_set()

    async def ended() -> bool:  # the client may learn of the deadline before the server cancels the call
        return bool((await scrape(server)).get("cellstream_requests_total", 0.0, method="StepMany",
                                               code="DEADLINE_EXCEEDED"))

    await eventually(ended, "the server ends the StepMany call at its deadline")
    held.open.set()
    # A later batch runs only once the held one has finished (its steps' callers are gone: nothing committed).
    assert (await stub.Step(step(other, tokens=[1]))).position == 1
    for sid in sessions:
        position = (await stub.GetState(pb.SessionRef(session_id=sid))).position
        assert position == 0, "a step of a call that ended was applied"


async def test_generate_many_tags_chunks_and_isolates_turns(server, stub, ref, close, arrays, rpc_error, scrape, step,
                                                            reply):
    first, second, untouched = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(3)]
    await stub.Step(step(untouched, tokens=[1, 2, 3]))
    before = await stub.GetState(pb.SessionRef(session_id=untouched))
    turns = [
        pb.GenerateRequest(session_id=first, prompt=PROMPT, max_tokens=8, tag=1),
        pb.GenerateRequest(session_id="0" * 32, prompt=PROMPT, tag=2),
        pb.GenerateRequest(session_id=untouched, prompt=PROMPT, temperature=-1.0, tag=3),
        pb.GenerateRequest(session_id=second, prompt=PROMPT, max_tokens=8, tag=4),
        pb.GenerateRequest(session_id=first, prompt="user: and?\nbot: ", max_tokens=6, tag=5),  # after tag 1
    ]
    call = stub.GenerateMany()
    await call.write(pb.GenerateBatch(items=turns))
    await call.done_writing()

    async def read_all() -> list[pb.GenerateBatchResult]:
        return [message async for message in call]

    replies = await asyncio.wait_for(read_all(), 60)
    assert await call.code() == grpc.StatusCode.OK
    arrived = [o for message in replies for o in message.chunks]
    assert any(len({o.tag for o in message.chunks}) > 1 for message in replies), "no message carried several turns"
    by_tag = {tag: [o for o in arrived if o.tag == tag] for tag in range(1, 6)}
    sessions = {t.tag: t.session_id for t in turns}
    assert all(o.session_id == sessions[o.tag] for o in arrived)

    for tag, request in ((2, turns[1]), (3, turns[2])):
        [outcome] = by_tag[tag]
        single = await rpc_error(reply(stub, request.session_id, request.prompt, temperature=request.temperature))
        assert (outcome.error.code, outcome.error.message) == (single.code().value[0], single.details())
    assert await stub.GetState(pb.SessionRef(session_id=untouched)) == before

    want1, h, c = ref.greedy(PROMPT, 8)
    want5, h, c = ref.greedy("user: and?\nbot: ", 6, h, c)
    want4, _, _ = ref.greedy(PROMPT, 8)
    for tag, want in ((1, want1), (4, want4), (5, want5)):
        chunks = [o.chunk for o in by_tag[tag]]
        assert [o.WhichOneof("outcome") for o in by_tag[tag]] == ["chunk"] * len(chunks)
        assert [t for chunk in chunks for t in chunk.tokens] == want, f"turn {tag}"
        assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    last_of_1 = max(k for k, o in enumerate(arrived) if o.tag == 1)
    assert min(k for k, o in enumerate(arrived) if o.tag == 5) > last_of_1, "a session's turns overlapped"
    state = await stub.GetState(pb.SessionRef(session_id=first))
    got_h, got_c = arrays(state)
    close(got_h, h, "h after both turns")
    close(got_c, c, "c after both turns")

    samples = await scrape(server)
    assert samples.get("cellstream_items_total", method="GenerateMany", code="OK") == 3
    assert samples.get("cellstream_items_total", method="GenerateMany", code="NOT_FOUND") == 1
    assert samples.get("cellstream_items_total", method="GenerateMany", code="INVALID_ARGUMENT") == 1


async def test_generate_many_with_gates_keeps_every_reply_within_max_message_bytes(start, connect):
    """Turns' first chunks carry their prompt's gates (768 bytes a byte on tiny-chat): four turns' chunks ready
    together would take ~21 kB, more than one reply of 20,000 bytes holds; they travel in several."""
    stub = connect(await start(max_message_bytes=20_000))
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(4)]
    call = stub.GenerateMany()
    await call.write(pb.GenerateBatch(items=[pb.GenerateRequest(session_id=sid, prompt=PROMPT, max_tokens=3, tag=k,
                                                                gates=True) for k, sid in enumerate(sessions)]))
    await call.done_writing()
    replies = [reply async for reply in call]
    assert await call.code() == grpc.StatusCode.OK
    assert all(reply.ByteSize() <= 20_000 for reply in replies)
    for k, sid in enumerate(sessions):
        chunks = [o.chunk for reply in replies for o in reply.chunks if o.tag == k]
        assert chunks[-1].done and len(PROMPT.encode()) < chunks[-1].position <= len(PROMPT.encode()) + 3
        steps = sum(len(chunk.gates[0].forget) for chunk in chunks) // 16
        assert steps == chunks[-1].position == (await stub.GetState(pb.SessionRef(session_id=sid))).position

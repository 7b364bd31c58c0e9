"""C/D through the multiplexed RPCs: every item gets the status and message a Step with it would get,
only the valid items apply, a session's items apply in order, the item cap refuses a whole message,
and another principal's session is NOT_FOUND per item."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import numpy as np
import pytest

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

UNKNOWN = "0" * 32
ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"
AS_ALICE, AS_BOB = (("authorization", f"Bearer {ALICE}"),), (("authorization", f"Bearer {BOB}"),)
Metadata = tuple[tuple[str, str], ...] | None


async def answer(stub, method: str, items: list[pb.StepRequest], metadata: Metadata = None) -> list[pb.StepOutcome]:
    """The outcomes of one message, by item (StreamMany: matched by tag, all items must answer)."""
    if method == "StepMany":
        return list((await stub.StepMany(pb.StepBatch(items=items), metadata=metadata)).items)
    call = stub.StreamMany(metadata=metadata)
    await call.write(pb.StepBatch(items=items))
    await call.done_writing()

    async def read_all() -> list[pb.StepOutcome]:
        return [outcome async for reply in call for outcome in reply.items]

    by_tag = {o.tag: o for o in await asyncio.wait_for(read_all(), 30)}
    assert await call.code() == grpc.StatusCode.OK
    assert sorted(by_tag) == sorted(i.tag for i in items)
    return [by_tag[i.tag] for i in items]


@pytest.mark.parametrize("method", ["StepMany", "StreamMany"])
async def test_each_item_gets_its_own_status_and_only_valid_items_apply(server, stub, ref, close, arrays, scrape,
                                                                        rpc_error, method, warmed, step):
    a, b, bad_tokens, moved = [await warmed(stub) for _ in range(4)]
    features = await warmed(stub, "tiny-features")
    closed = await warmed(stub)
    await stub.CloseSession(pb.SessionRef(session_id=closed))
    items = [
        step(a, tokens=[1, 2], logits=True),
        step(UNKNOWN, tokens=[1]),
        step(bad_tokens, tokens=[1, 260]),
        step(b, tokens=[3], expected_position=5, logits=True),
        step(moved, tokens=[4], expected_position=4),
        step("", tokens=[1]),
        step(features, tokens=[1, 2]),
        step(closed, tokens=[1]),
        step(a, tokens=[5], expected_position=7, logits=True),  # after the first item of a: in order
        pb.StepRequest(session_id=bad_tokens),  # no input
        step(moved, text=""),
        step(b, features=np.zeros((1, 5))),
        step(features, features=np.full((1, 5), np.nan)),
    ]
    for k, item in enumerate(items):
        item.tag = 900 + k
    untouched = [bad_tokens, moved, features]
    before = [await stub.GetState(pb.SessionRef(session_id=sid)) for sid in untouched]

    outcomes = await answer(stub, method, items)

    assert [o.tag for o in outcomes] == [i.tag for i in items]
    valid = {0, 3, 8}
    assert {k for k, o in enumerate(outcomes) if o.WhichOneof("outcome") == "response"} == valid
    codes = Counter()
    for k, (item, outcome) in enumerate(zip(items, outcomes, strict=True)):
        if k in valid:
            codes["OK"] += 1
            continue
        # Word for word what a Step with this very request gets (it is refused too: nothing changes).
        single = await rpc_error(stub.Step(item, timeout=30))
        assert (outcome.error.code, outcome.error.message) == (single.code().value[0], single.details()), k
        codes[single.code().name] += 1
    assert codes == {"OK": 3, "INVALID_ARGUMENT": 7, "NOT_FOUND": 2, "ABORTED": 1}

    after = [await stub.GetState(pb.SessionRef(session_id=sid)) for sid in untouched]
    assert after == before, "a refused item changed a session"
    history = np.array([10, 20, 30, 40, 50, 1, 2, 5])
    want, h, c = ref.run("tiny-chat", history)
    assert [outcomes[0].response.position, outcomes[8].response.position] == [7, 8]
    close(np.asarray(outcomes[0].response.logits), want[6], "a after its first item")
    close(np.asarray(outcomes[8].response.logits), want[7], "a after its second item")
    kept = await stub.GetState(pb.SessionRef(session_id=a))
    assert kept.position == 8
    got_h, got_c = arrays(kept)
    close(got_h, h, "a's h")
    close(got_c, c, "a's c")
    assert (await stub.GetState(pb.SessionRef(session_id=b))).position == 6

    samples = await scrape(server)
    for code, count in codes.items():
        assert samples.get("cellstream_items_total", method=method, code=code) == count
    assert samples.get("cellstream_requests_total", method=method, code="OK") == 1


@pytest.mark.parametrize("method", ["StepMany", "StreamMany"])
async def test_a_session_repeated_in_one_message_applies_in_order(stub, ref, close, method, step):
    sid = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    other = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    tokens = [7, 8, 9, 10, 11]
    items = []
    for k, token in enumerate(tokens):
        items.append(step(sid, tokens=[token], expected_position=k, logits=True, tag=k))
        items.append(step(other, tokens=[token], tag=100 + k))
    outcomes = await answer(stub, method, items)
    mine = [o for o in outcomes if o.tag < 100]
    assert [o.WhichOneof("outcome") for o in mine] == ["response"] * 5, [o.error.message for o in mine]
    assert [o.response.position for o in mine] == [1, 2, 3, 4, 5]
    want, _, _ = ref.run("tiny-chat", np.array(tokens))
    for k, outcome in enumerate(mine):
        close(np.asarray(outcome.response.logits), want[k], f"step {k}")
    assert (await stub.GetState(pb.SessionRef(session_id=sid))).position == 5


@pytest.mark.parametrize("method", ["StepMany", "StreamMany"])
async def test_a_sessions_later_step_of_another_length_runs_after_its_earlier_one(stub, method, step):
    """Items travel in groups of one input length; `other` is named twice first, so a group for its second
    1-token step exists before `sid`'s 2-token step has a group: sid's 1-token step must not join it."""
    sid = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    other = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    items = [step(other, tokens=[1], tag=0), step(other, tokens=[2], tag=1),
             step(sid, tokens=[3, 4], tag=2), step(sid, tokens=[5], tag=3)]
    outcomes = await answer(stub, method, items)
    assert [o.response.position for o in outcomes] == [1, 2, 2, 3], [o.error.message for o in outcomes]


@pytest.mark.parametrize("method", ["StepMany", "StreamMany"])
@pytest.mark.parametrize("repeat", [False, True])  # distinct sessions (cut in slices) / one named twice (item by item)
async def test_a_message_of_more_items_than_a_batch_runs_in_several(start, connect, ref, close, scrape, method, repeat,
                                                                    step):
    server = await start(max_batch_size=4)
    stub = connect(server)
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(10)]
    named = sessions + sessions[:1] if repeat else sessions
    items = [step(sid, tokens=[k + 1], logits=True, tag=k) for k, sid in enumerate(named)]
    outcomes = await answer(stub, method, items)
    assert [o.WhichOneof("outcome") for o in outcomes] == ["response"] * len(items), [o.error.message for o in outcomes]
    fed: dict[str, list[int]] = {}
    for k, (sid, outcome) in enumerate(zip(named, outcomes, strict=True)):
        fed.setdefault(sid, []).append(k + 1)
        assert outcome.response.session_id == sid
        assert outcome.response.position == len(fed[sid])
        want, _, _ = ref.run("tiny-chat", np.array(fed[sid]))
        close(np.asarray(outcome.response.logits), want[-1], f"item {k}")
    samples = await scrape(server)
    batches = samples.get("cellstream_batch_size_count", model="tiny-chat")
    assert samples.get("cellstream_batch_size_sum", model="tiny-chat") == len(items)
    assert samples.get("cellstream_batch_size_bucket", model="tiny-chat", le="4.0") == batches >= 3


@pytest.mark.parametrize("method", ["StepMany", "StreamMany"])
async def test_a_full_queue_takes_part_of_a_message_and_refuses_the_rest(start, connect, gate, method, eventually,
                                                                         step):
    server = await start(max_queue_size=3)
    stub = connect(server)
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(6)]
    held = gate(server)
    busy = asyncio.ensure_future(stub.Step(step(sessions[5], tokens=[1])))  # holds the model; the queue is empty
    assert await asyncio.to_thread(held.running.wait, 30)
    items = [step(sid, tokens=[2], tag=k) for k, sid in enumerate(sessions[:5])]
    pending = asyncio.ensure_future(answer(stub, method, items))
    batcher = server.dataplane.batchers[server.dataplane.spec("").name]
    await eventually(lambda: batcher.queued == 3, "the message is read, three of its steps queued")
    held.open.set()
    outcomes = await asyncio.wait_for(pending, 30)
    await asyncio.wait_for(busy, 30)
    assert [o.WhichOneof("outcome") for o in outcomes] == ["response"] * 3 + ["error"] * 2
    for outcome in outcomes[3:]:
        assert outcome.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "has 3 steps queued (max_queue_size)" in outcome.error.message
    positions = [(await stub.GetState(pb.SessionRef(session_id=sid))).position for sid in sessions[:5]]
    assert positions == [1, 1, 1, 0, 0], "a refused item was applied, or a queued one was not"


async def test_item_cap_refuses_the_whole_message(start, connect, rpc_error, warmed, step):
    server = await start(max_items_per_message=4)
    stub = connect(server)
    sid = await warmed(stub)
    before = await stub.GetState(pb.SessionRef(session_id=sid))
    five = [step(sid, tokens=[1], tag=k) for k in range(5)]

    error = await rpc_error(stub.StepMany(pb.StepBatch(items=five)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "StepBatch has 5 items, more than max_items_per_message (4)" in error.details()
    assert await stub.GetState(pb.SessionRef(session_id=sid)) == before

    call = stub.StreamMany()
    await call.write(pb.StepBatch(items=five[:2]))
    reply = await asyncio.wait_for(call.read(), 30)
    assert [o.response.position for o in reply.items] == [6, 7]
    await call.write(pb.StepBatch(items=five))
    assert await asyncio.wait_for(call.code(), 30) == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_items_per_message (4)" in await call.details()
    position = (await stub.GetState(pb.SessionRef(session_id=sid))).position
    assert position == 7, "items of the refused message were applied"

    turns = stub.GenerateMany()
    await turns.write(pb.GenerateBatch(items=[pb.GenerateRequest(session_id=sid, prompt="a")] * 5))
    assert await asyncio.wait_for(turns.code(), 30) == grpc.StatusCode.INVALID_ARGUMENT
    assert "GenerateBatch has 5 items" in await turns.details()
    assert (await stub.GetState(pb.SessionRef(session_id=sid))).position == 7

    assert len((await stub.StepMany(pb.StepBatch(items=five[:4]))).items) == 4  # the cap itself is allowed


async def test_another_principals_session_is_not_found_per_item(start, connect, tmp_path, warmed, step):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\nbob {BOB}\n")
    server = await start(auth_token_file=tokens)
    stub = connect(server)
    hers = await warmed(stub, metadata=AS_ALICE)
    his = await warmed(stub, metadata=AS_BOB)
    before = await stub.GetState(pb.SessionRef(session_id=hers), metadata=AS_ALICE)
    items = [step(hers, tokens=[1], tag=1), step(his, tokens=[1], tag=2),
             step(UNKNOWN, tokens=[1], tag=3)]
    for method in ("StepMany", "StreamMany"):
        theirs, own, missing = await answer(stub, method, items, AS_BOB)
        assert theirs.error.code == missing.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        # Word for word the answer for an id that does not exist: existence is not revealed.
        assert theirs.error.message.replace(hers, UNKNOWN) == missing.error.message
        assert own.WhichOneof("outcome") == "response"
    turns = stub.GenerateMany(metadata=AS_BOB)
    await turns.write(pb.GenerateBatch(items=[pb.GenerateRequest(session_id=hers, prompt="hi", tag=4)]))
    await turns.done_writing()
    replies = [reply async for reply in turns]
    [outcome] = [o for reply in replies for o in reply.chunks]
    assert (outcome.tag, outcome.error.code) == (4, grpc.StatusCode.NOT_FOUND.value[0])
    unchanged = await stub.GetState(pb.SessionRef(session_id=hers), metadata=AS_ALICE)
    assert unchanged == before, "another principal's items changed the session"
    assert (await stub.GetState(pb.SessionRef(session_id=his), metadata=AS_BOB)).position == 7


@pytest.fixture
def one_model_dir(tiny_model_dir, tmp_path):
    """A model directory serving tiny-chat alone: every session is of that model, so items are queued
    without a lookup and their batch's load finds unknown, closed and other principals' sessions."""
    directory = tmp_path / "one-model"
    directory.mkdir()
    (directory / "tiny-chat.onnx").symlink_to(tiny_model_dir / "tiny-chat.onnx")
    return directory


@pytest.mark.parametrize("method", ["StepMany", "StreamMany"])
async def test_one_model_server_finds_bad_sessions_when_their_batch_loads_them(start, connect, one_model_dir,
                                                                               tmp_path, rpc_error, method, warmed,
                                                                               step):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\nbob {BOB}\n")
    server = await start(model_dir=one_model_dir, default_model="", auth_token_file=tokens)
    assert server.dataplane.only_spec is not None
    stub = connect(server)
    hers = await warmed(stub, metadata=AS_ALICE)
    mine, moved, closed = [await warmed(stub, metadata=AS_BOB) for _ in range(3)]
    await stub.CloseSession(pb.SessionRef(session_id=closed), metadata=AS_BOB)
    before = await stub.GetState(pb.SessionRef(session_id=hers), metadata=AS_ALICE)
    items = [step(mine, tokens=[1], tag=1), step(hers, tokens=[1], tag=2), step(UNKNOWN, tokens=[1], tag=3),
             step(closed, tokens=[1], tag=4), step(moved, tokens=[2], expected_position=0, tag=5),
             step(mine, tokens=[3], expected_position=6, tag=6), step("", tokens=[1], tag=7),
             step(mine, tokens=[260], tag=8)]
    outcomes = await answer(stub, method, items, AS_BOB)
    assert [o.WhichOneof("outcome") for o in outcomes] == ["response", "error", "error", "error", "error",
                                                           "response", "error", "error"]
    assert [o.response.position for o in outcomes if o.HasField("response")] == [6, 7]
    for item, outcome in zip(items, outcomes, strict=True):
        if outcome.HasField("error"):
            single = await rpc_error(stub.Step(item, timeout=30, metadata=AS_BOB))
            assert (outcome.error.code, outcome.error.message) == (single.code().value[0], single.details())
    assert outcomes[1].error.message.replace(hers, UNKNOWN) == outcomes[2].error.message
    assert await stub.GetState(pb.SessionRef(session_id=hers), metadata=AS_ALICE) == before
    assert (await stub.GetState(pb.SessionRef(session_id=moved), metadata=AS_BOB)).position == 5


# tiny-chat's logits: 260 x 4 = 1,040 bytes a step. With max_message_bytes 20,000 a reply has room for 15,904
# bytes of outcomes beside its framing (cellstream.service.dataplane.REPLY_FRAMING_BYTES).
SMALL_REPLIES = 20_000


async def test_an_item_whose_outputs_no_reply_holds_is_refused_alone(start, connect, step):
    stub = connect(await start(max_message_bytes=SMALL_REPLIES))
    a, b = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(2)]
    for method in ("StepMany", "StreamMany"):
        outcomes = await answer(stub, method, [step(a, tokens=[1] * 16, all_steps=True, tag=1),
                                                 step(b, tokens=[1] * 2, all_steps=True, tag=2)])
        assert outcomes[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], method
        assert "every step's output of 16 steps of model 'tiny-chat'" in outcomes[0].error.message
        assert "at most 15 steps per request" in outcomes[0].error.message
        assert len(outcomes[1].response.logits) == 2 * 260
    assert [(await stub.GetState(pb.SessionRef(session_id=s))).position for s in (a, b)] == [0, 4]


async def test_a_step_many_whose_outcomes_no_reply_holds_is_refused_whole(start, connect, rpc_error, step):
    stub = connect(await start(max_message_bytes=SMALL_REPLIES))
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(4)]
    items = [step(sid, tokens=[1] * 4, all_steps=True) for sid in sessions]  # 4 x 4,160 bytes
    error = await rpc_error(stub.StepMany(pb.StepBatch(items=items)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than one reply of max_message_bytes (20000) holds; nothing was done" in error.details()
    assert [(await stub.GetState(pb.SessionRef(session_id=sid))).position for sid in sessions] == [0, 0, 0, 0]
    reply = await stub.StepMany(pb.StepBatch(items=items[:3]))  # 12,480 bytes: one reply holds them
    assert [len(o.response.logits) for o in reply.items] == [4 * 260] * 3


async def test_stream_many_splits_outcomes_ready_together_into_replies_that_fit(start, connect, gate, step):
    running = await start(max_message_bytes=SMALL_REPLIES)
    stub = connect(running)
    sessions = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(7)]
    call = stub.StreamMany()
    held = gate(running)
    await call.write(pb.StepBatch(items=[step(sessions[0], tokens=[1], tag=0)]))
    assert await asyncio.to_thread(held.running.wait, 30)
    # Two messages of three items whose outputs fit one reply each, queued behind the held batch: their
    # outcomes complete together (one batch), 24,960 bytes, more than one reply of 20,000 bytes holds.
    for first in (1, 4):
        await call.write(pb.StepBatch(items=[step(sid, tokens=[1] * 4, all_steps=True, tag=first + k)
                                             for k, sid in enumerate(sessions[first:first + 3])]))
    batcher = running.dataplane.batchers["tiny-chat"]
    while batcher.queued < 6:
        await asyncio.sleep(0.01)
    held.open.set()
    await call.done_writing()
    replies = [reply async for reply in call]
    assert await call.code() == grpc.StatusCode.OK
    assert sorted(o.tag for reply in replies for o in reply.items) == list(range(7))
    assert all(reply.ByteSize() <= SMALL_REPLIES for reply in replies)
    # The six outcomes of one batch travel in two replies or more (none holds more than three of them).
    assert max(sum(o.tag >= 1 for o in reply.items) for reply in replies) <= 3

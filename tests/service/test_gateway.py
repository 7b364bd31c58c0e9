"""The gateway helper: many coroutines' `await gateway.step(...)` travel as few StepBatch messages on one
StreamMany stream, each caller gets exactly its own answer (or the error a Step would raise), a
session's steps apply in call order, and a failed stream fails its waiting steps and is replaced."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from cellstream.service.gateway import Gateway

SESSIONS = 64


def chunks_of(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 260, size=int(rng.integers(1, 4))).tolist() for _ in range(6)]


async def test_concurrent_callers_are_coalesced_and_exact(server, client, ref, close, scrape):
    sessions = [(await client.open_session()).session_id for _ in range(SESSIONS)]
    plans = [chunks_of(seed) for seed in range(SESSIONS)]

    async def conversation(gateway: Gateway, session_id: str, chunks: list[list[int]]) -> list:
        return [await gateway.step(session_id, tokens=chunk, logits=True) for chunk in chunks]

    async with Gateway(client) as gateway:
        answers = await asyncio.wait_for(asyncio.gather(
            *(conversation(gateway, sid, chunks) for sid, chunks in zip(sessions, plans, strict=True))), 60)
        steps = SESSIONS * 6
        assert gateway.items_sent == steps
        # Each round of 64 concurrent steps leaves in a message or two, not 64.
        assert gateway.messages_sent <= steps / 8, f"{gateway.messages_sent} messages for {steps} steps"

    for sid, chunks, responses in zip(sessions, plans, answers, strict=True):
        h, c = ref.zero_state("tiny-chat")
        position = 0
        for chunk, response in zip(chunks, responses, strict=True):
            want, h, c = ref.run("tiny-chat", np.array(chunk), h, c)
            position += len(chunk)
            assert (response.session_id, response.position) == (sid, position)
            close(np.asarray(response.logits), want[-1], f"{sid} at {position}")
    samples = await scrape(server)
    assert samples.get("cellstream_items_total", method="StreamMany", code="OK") == steps
    assert samples.get("cellstream_requests_total", method="StreamMany", code="OK") == 1


async def test_steps_of_one_session_apply_in_call_order_and_errors_are_a_steps(client, rpc_error):
    sid = (await client.open_session()).session_id
    async with Gateway(client) as gateway:
        # Asked for all at once: each names the position it expects, so any reordering would be ABORTED.
        responses = await asyncio.gather(*(gateway.step(sid, tokens=[k], expected_position=k) for k in range(20)))
        assert [r.position for r in responses] == list(range(1, 21))
        for bad in ({"tokens": [400]}, {"tokens": [1], "expected_position": 3}):
            via_gateway = await rpc_error(gateway.step(sid, **bad))
            direct = await rpc_error(client.step(sid, **bad))
            assert (via_gateway.code(), via_gateway.details()) == (direct.code(), direct.details())
        unknown = await rpc_error(gateway.step("0" * 32, tokens=[1]))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert (await gateway.step(sid, tokens=[1])).position == 21, "the stream serves on after item errors"


async def test_a_failed_stream_fails_its_steps_and_the_next_step_reopens(start, connect, rpc_error):
    server = await start(max_items_per_message=4)
    client = connect(server)
    sessions = [(await client.open_session()).session_id for _ in range(8)]
    async with Gateway(client, max_items=8) as gateway:  # more than the server allows: the message is refused
        errors = await asyncio.gather(*(rpc_error(gateway.step(sid, tokens=[1])) for sid in sessions))
        assert {e.code() for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
        assert all("max_items_per_message (4)" in e.details() for e in errors)
        assert (await gateway.step(sessions[0], tokens=[1])).position == 1
    assert [(await client.get_state(sid)).position for sid in sessions] == [1] + [0] * 7

"""The client multiplexes by itself: concurrent steps of many sessions ride one StreamMany stream (replies one
GenerateMany stream), many per message, each caller with its own outcome, a session's steps in the order they
were made, messages within the server's bounds."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import cellstream
from cellstream import AsyncClient

CHAT = "tiny-chat"
pytestmark = pytest.mark.timeout(120)


def tokens_of(seed: int, k: int) -> list[int]:
    return [(seed * 31 + k * 7) % 256, (seed + k) % 256]


async def test_many_sessions_steps_ride_one_stream_each_with_its_own_result(server, scrape, ref, close):
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        sessions = [await client.session(CHAT) for _ in range(48)]

        async def converse(seed: int) -> list[cellstream.StepResult]:
            return [await sessions[seed].step(tokens_of(seed, k), logits=True) for k in range(4)]

        results = await asyncio.gather(*(converse(seed) for seed in range(48)))
        coalesced = client.steps_per_message
    for seed, steps in enumerate(results):
        history = [t for k in range(4) for t in tokens_of(seed, k)]
        assert [r.position for r in steps] == [2, 4, 6, 8]
        assert all(r.session_id == sessions[seed].session_id for r in steps)
        logits, _, _ = ref.run(CHAT, history)
        for k, result in enumerate(steps):
            close(result.logits, logits[2 * k + 1], f"session {seed} step {k}")
    assert coalesced > 8, f"{coalesced} steps per message: the steps did not travel together"
    samples = await scrape(server)
    assert samples.get("cellstream_requests_total", method="StreamMany", code="OK") == 1
    assert samples.get("cellstream_items_total", method="StreamMany", code="OK") == 48 * 4
    assert samples.get("cellstream_requests_total", 0.0, method="Step", code="OK") == 0


async def test_each_caller_gets_its_own_exception_and_the_others_their_results(client, connect, server):
    good = [await client.session(CHAT) for _ in range(6)]
    closed = await client.session(CHAT)
    await closed.close()
    moved = await client.session(CHAT)
    outcomes = await asyncio.gather(
        *(s.step([k]) for k, s in enumerate(good)), good[0].step([300]), closed.step([1]),
        moved.step([1], expected_position=9), return_exceptions=True)
    assert [r.position for r in outcomes[:6]] == [1] * 6
    bad_token, gone, conflict = outcomes[6:]
    assert isinstance(bad_token, cellstream.InvalidArgument) and "outside the vocabulary" in bad_token.message
    assert isinstance(gone, cellstream.NotFound)
    assert isinstance(conflict, cellstream.PositionConflict) and conflict.position == 0
    assert all(e.applied is False for e in (bad_token, gone, conflict))
    assert good[0].position == 1 and moved.position == 0


async def test_the_steps_of_one_session_apply_in_the_order_they_were_made(client, ref, close):
    session, other = await client.session(CHAT), await client.session(CHAT)
    made = [[k, 255 - k] for k in range(20)]
    results = await asyncio.gather(*(s.step(tokens, logits=True) for tokens in made for s in (session, other)))
    assert [r.position for r in results[::2]] == list(range(2, 42, 2))
    history = [t for tokens in made for t in tokens]
    logits, h, _ = ref.run(CHAT, history)
    for k, result in enumerate(results[::2]):
        close(result.logits, logits[2 * k + 1], f"step {k}")
    close((await session.get_state()).h, h, "final h")
    close((await other.get_state()).h, h, "the other session's final h")


async def test_messages_hold_at_most_the_items_and_bytes_given(server):
    async with AsyncClient(f"127.0.0.1:{server.port}", max_items_per_message=8) as client:
        sessions = [await client.session(CHAT) for _ in range(50)]
        assert [r.position for r in await asyncio.gather(*(s.step([1]) for s in sessions))] == [1] * 50
        assert 50 / 8 <= 50 / client.steps_per_message <= 8
    async with AsyncClient(f"127.0.0.1:{server.port}", max_message_bytes=8_192) as client:
        sessions = [await client.session(CHAT) for _ in range(20)]
        results = await asyncio.gather(*(s.step(text="a" * 2_000) for s in sessions))
        assert [r.position for r in results] == [2_000] * 20
        assert client.steps_per_message <= 8_192 // 2_000  # cut by size, not only by count
        lone = await sessions[0].step(text="b" * 4_096)  # more than half a message: a Step of its own
        assert lone.position == 6_096


async def test_a_server_that_takes_fewer_items_per_message_says_so(start):
    running = await start(max_items_per_message=4)
    async with AsyncClient(f"127.0.0.1:{running.port}") as client:
        sessions = [await client.session(CHAT) for _ in range(10)]
        outcomes = await asyncio.gather(*(s.step([1]) for s in sessions), return_exceptions=True)
        assert all(isinstance(e, cellstream.InvalidArgument) and "max_items_per_message (4)" in e.message
                   for e in outcomes), outcomes
    async with AsyncClient(f"127.0.0.1:{running.port}", max_items_per_message=4) as client:
        sessions = [await client.attach(s.session_id) for s in sessions]
        assert [r.position for r in await asyncio.gather(*(s.step([1]) for s in sessions))] == [1] * 10


async def test_replies_of_many_sessions_ride_one_generate_many_stream(server, scrape, ref):
    prompts = [f"user: {word}\nbot: " for word in ("hi", "hello", "bonjour", "salut", "hey", "yo")]
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        sessions = [await client.session(CHAT) for _ in prompts]

        async def reply(session: cellstream.AsyncSession, prompt: str) -> list[int]:
            return [t async for chunk in session.generate(prompt, max_tokens=5) for t in chunk.tokens]

        replies = await asyncio.gather(*(reply(s, p) for s, p in zip(sessions, prompts, strict=True)))
    for prompt, tokens in zip(prompts, replies, strict=True):
        assert tokens == ref.greedy(prompt, 5)[0]
    samples = await scrape(server)
    assert samples.get("cellstream_requests_total", method="GenerateMany", code="OK") == 1
    assert samples.get("cellstream_items_total", method="GenerateMany", code="OK") == len(prompts)
    assert samples.get("cellstream_requests_total", 0.0, method="Generate", code="OK") == 0


async def test_without_multiplexing_each_step_and_reply_is_a_call_of_its_own(server, scrape):
    async with AsyncClient(f"127.0.0.1:{server.port}", multiplex=False) as client:
        sessions = [await client.session(CHAT) for _ in range(3)]
        await asyncio.gather(*(s.step([1, 2]) for s in sessions))
        assert await sessions[0].reply("x", max_tokens=2)
        assert client.steps_per_message == 0.0
    samples = await scrape(server)
    assert samples.get("cellstream_requests_total", method="Step", code="OK") == 3
    assert samples.get("cellstream_requests_total", method="Generate", code="OK") == 1
    assert samples.get("cellstream_requests_total", 0.0, method="StreamMany", code="OK") == 0


async def test_a_lone_step_leaves_at_once_in_a_message_of_its_own(client, ref, close):
    session = await client.session(CHAT)
    result = await asyncio.wait_for(session.step([7], logits=True), 5)
    close(result.logits, ref.run(CHAT, [7])[0][-1], "lone step")
    assert client.steps_per_message == 1.0
    np.testing.assert_array_equal(result.logits.shape, (260,))

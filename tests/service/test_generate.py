"""G. Generate on the tiny random model: greedy equals in-process greedy decoding, chunks are well formed,
the reply stays in the state, seeds reproduce, stop sequences stop."""

from __future__ import annotations

import asyncio

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

PROMPT = "user: héllo\nbot: "
END_TOKENS = {258, 259}  # eos, eot


def decode(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


async def collect(stub, session_id: str, prompt: str, **kwargs) -> list:
    async def run() -> list:
        request = pb.GenerateRequest(session_id=session_id, prompt=prompt, **kwargs)
        return [chunk async for chunk in stub.Generate(request)]

    return await asyncio.wait_for(run(), 60)


def check_chunks(chunks: list, start_position: int) -> tuple[list[int], str]:
    assert chunks, "no chunks"
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.finish_reason == "" for c in chunks[:-1])
    assert chunks[-1].finish_reason in ("length", "stop", "end_token")
    tokens = [t for c in chunks for t in c.tokens]
    text = "".join(c.text for c in chunks)
    assert text == decode(tokens)
    # Positions grow with the tokens of each chunk.
    position = start_position
    for chunk in chunks:
        position += len(chunk.tokens)
        assert chunk.position == position
    return tokens, text


async def test_greedy_matches_in_process_decoding(stub, ref, close, arrays):
    session = await stub.OpenSession(pb.OpenSessionRequest())
    chunks = await collect(stub, session.session_id, PROMPT, max_tokens=12, temperature=0.0)
    prompt_bytes = len(PROMPT.encode())
    tokens, _ = check_chunks(chunks, prompt_bytes)
    want_tokens, want_h, want_c = ref.greedy(PROMPT, 12)
    assert tokens == want_tokens
    finish = chunks[-1].finish_reason
    if finish == "length":
        assert len(tokens) == 12
    else:
        assert finish == "end_token" and tokens[-1] in END_TOKENS
    assert chunks[-1].position == prompt_bytes + len(tokens)
    # The reply stays in the state: the session is exactly where in-process decoding ended.
    state = await stub.GetState(pb.SessionRef(session_id=session.session_id))
    assert state.position == prompt_bytes + len(tokens)
    h, c = arrays(state)
    close(h, want_h, "h")
    close(c, want_c, "c")


async def test_top_k_one_is_greedy(stub):
    first, second = await stub.OpenSession(pb.OpenSessionRequest()), await stub.OpenSession(pb.OpenSessionRequest())
    greedy_chunks = await collect(stub, first.session_id, PROMPT, max_tokens=12)
    top1_chunks = await collect(stub, second.session_id, PROMPT, max_tokens=12, temperature=5.0, top_k=1, seed=9)
    assert [t for c in greedy_chunks for t in c.tokens] == [t for c in top1_chunks for t in c.tokens]


async def test_same_seed_same_reply_on_forks(stub, step):
    base = await stub.OpenSession(pb.OpenSessionRequest())
    await stub.Step(step(base.session_id, text="user: tell me a story\n"))
    forks = [await stub.ForkSession(pb.ForkSessionRequest(session_id=base.session_id)) for _ in range(3)]
    runs = [await collect(stub, f.session_id, "bot: ", max_tokens=20, temperature=1.0, seed=42) for f in forks[:2]]
    other = await collect(stub, forks[2].session_id, "bot: ", max_tokens=20, temperature=1.0, seed=43)
    start = len("user: tell me a story\n") + len("bot: ")
    (tokens_a, text_a), (tokens_b, text_b) = (check_chunks(r, start) for r in runs)
    assert tokens_a == tokens_b and text_a == text_b
    assert [c.position for c in runs[0]] == [c.position for c in runs[1]]
    states = [await stub.GetState(pb.SessionRef(session_id=f.session_id)) for f in forks[:2]]
    assert states[0] == states[1]
    tokens_other, _ = check_chunks(other, start)
    assert tokens_other != tokens_a, "seed 43 sampled exactly what seed 42 did"
    # The base session was never touched by its forks' replies.
    assert (await stub.GetState(pb.SessionRef(session_id=base.session_id))).position == len("user: tell me a story\n")


async def test_stop_sequence(stub, step):
    base = await stub.OpenSession(pb.OpenSessionRequest())
    await stub.Step(step(base.session_id, text="user: hi\n"))
    # Find a seed whose unconstrained reply holds an "e" (deterministic: fixed weights and seeds).
    for seed in range(40):
        fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=base.session_id))
        free = await collect(stub, fork.session_id, "bot: ", max_tokens=150, temperature=1.5, seed=seed)
        free_tokens, free_text = check_chunks(free, 9 + 5)
        if "e" in free_text[1:]:
            break
    else:
        raise AssertionError("no seed in 0..39 produced an 'e' in 150 tokens")
    fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=base.session_id))
    chunks = await collect(
        stub,
        fork.session_id,
        "bot: ",
        max_tokens=150,
        temperature=1.5,
        seed=seed,
        stop=["no such stop", "e"],
    )
    tokens, text = check_chunks(chunks, 9 + 5)
    assert chunks[-1].finish_reason == "stop"
    assert text == free_text[: free_text.index("e") + 1]
    assert text.endswith("e") and "e" not in text[:-1]
    assert tokens == free_tokens[: len(tokens)] and tokens[-1] == ord("e")
    # The stop sequence is kept in the state.
    assert (await stub.GetState(pb.SessionRef(session_id=fork.session_id))).position == 9 + 5 + len(tokens)


async def test_default_max_tokens(start, connect, ref):
    server = await start(max_generate_tokens=5)
    stub = connect(server)
    session = await stub.OpenSession(pb.OpenSessionRequest())
    # Greedy decoding of "a" on this model meets no end token for longer than the default: only the
    # default can stop it at 5.
    want, _, _ = ref.greedy("a", 6)
    assert len(want) == 6 and not END_TOKENS & set(want)
    chunks = await collect(stub, session.session_id, "a", temperature=0.0)  # max_tokens unset (0)
    tokens, _ = check_chunks(chunks, 1)
    assert tokens == want[:5]
    assert chunks[-1].finish_reason == "length"

"""The shipped default model, end to end: it recalls facts only when its state is carried.

In-process (greedy decoding under onnxruntime) and through a live server with one Generate call per
turn. The full 300-dialogue evaluation is `make model`'s report; these use fewer dialogues to stay fast.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from model import corpus
from model.evaluate import evaluate_recall
from service.client import Client
from service.config import load_settings
from service.server import start_server

ARTIFACTS = Path(__file__).resolve().parents[2] / "model" / "artifacts"
SHIPPED = ARTIFACTS / "cellstream-chat.onnx"
RECALL_WITH_STATE = 0.90
RECALL_AFTER_RESET = 0.15


def test_shipped_model_is_small_and_present():
    assert SHIPPED.is_file(), "run `make model` to produce the shipped model"
    assert SHIPPED.stat().st_size <= 10 * 1024 * 1024


@pytest.mark.timeout(300)
def test_recall_with_state_carried_and_after_reset():
    carried = evaluate_recall(SHIPPED, 150, reset=False)
    reset = evaluate_recall(SHIPPED, 150, reset=True)
    for kind in ("name", "city", "job"):
        assert carried.rate(kind) >= RECALL_WITH_STATE, (kind, carried.as_dict())
        assert reset.rate(kind) <= RECALL_AFTER_RESET, (kind, reset.as_dict())


@pytest.fixture
async def shipped_server():
    settings = load_settings(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                             model_dir=ARTIFACTS, ort_intra_op_threads=1)
    running = await start_server(settings)
    yield running
    await running.stop(0)


async def _converse(client: Client, dialogue: corpus.Dialogue) -> dict[str, bool]:
    """Replay the dialogue's context one turn per request, then ask each question with Generate."""
    session = await client.open_session()
    sid = session.session_id
    lines = dialogue.context.splitlines(keepends=True)
    for user_line, bot_line in zip(lines[::2], lines[1::2], strict=True):
        await client.step(sid, text=user_line + bot_line)
    correct = {}
    for qa in dialogue.questions:
        reply = await client.reply(sid, corpus.line("user", qa.question) + "bot: ", stop=["\n"], max_tokens=48)
        correct[qa.kind] = reply == qa.answer + "\n"
    await client.close_session(sid)
    return correct


@pytest.mark.timeout(300)
async def test_generate_recalls_facts_one_request_per_turn(shipped_server):
    rng = random.Random(7)
    dialogues = [corpus.make_dialogue(rng, heldout=True, exact_questions=True) for _ in range(60)]
    async with Client(f"127.0.0.1:{shipped_server.port}") as client:
        results = await asyncio.gather(*(_converse(client, d) for d in dialogues))
    for kind in ("name", "city", "job"):
        rate = sum(r[kind] for r in results) / len(results)
        assert rate >= RECALL_WITH_STATE, (kind, rate)


async def test_forked_conversations_diverge_independently(shipped_server):
    async with Client(f"127.0.0.1:{shipped_server.port}") as client:
        session = await client.open_session()
        sid = session.session_id
        await client.step(sid, text="user: my name is alice.\nbot: nice to meet you, alice.\n")
        fork = (await client.fork(sid)).session_id
        await client.step(sid, text="user: i live in paris.\nbot: noted.\n")
        await client.step(fork, text="user: i live in tokyo.\nbot: noted.\n")
        question = "user: where do i live?\nbot: "
        original_reply = await client.reply(sid, question, stop=["\n"])
        fork_reply = await client.reply(fork, question, stop=["\n"])
        assert original_reply == "you live in paris.\n"
        assert fork_reply == "you live in tokyo.\n"
        name_question = "user: what is my name?\nbot: "
        assert await client.reply(fork, name_question, stop=["\n"]) == "your name is alice.\n"
        assert await client.reply(sid, name_question, stop=["\n"]) == "your name is alice.\n"

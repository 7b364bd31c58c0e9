"""Facts the model never saw, told through the service as a user would (issue 24's bars).

Conversations go through a live server one turn at a time, as `cellstream chat` holds them: every user
line is a Generate call whose greedy reply stays in the session's state. Their names, cities and jobs
are held out of training (`cellstream.model.values`), typed as people type them (capitalised, upper
case, two words, hyphenated, accented), stated in every phrasing the corpus knows, in English and in
French; half the conversations change one fact after some small talk. An answer counts when it holds
the value exactly as typed.

The same harness holds conversations on the values the model trained on (issue 14's lists): a control
that must score as the model's quality report says, so that a low figure on unseen values is the
model's and not the harness's.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cellstream import AsyncClient
from cellstream.model import corpus
from cellstream.model.evaluate import MAX_REPLY_TOKENS, says
from cellstream.model.values import ValuePool, is_heldout
from cellstream.service.config import load_settings
from cellstream.service.server import start_server

ARTIFACTS = Path(__file__).resolve().parents[2] / "model" / "artifacts"
COUNT = 100  # conversations per language and value source: 300 questions, 50 updates, ~350 statements
CONCURRENT = 64  # conversations held at once (more would queue past the server's max_queue_wait_ms on 2 cores)
BARS = {"overall": 0.95, "kind": 0.90, "acknowledged": 0.95, "new_value": 0.95, "old_value": 0.03}
CONTROL_RECALL = 0.95  # issue 14's lists as a chat: 99.7-99.8% in the quality report
BELOW_THE_BARS = pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="the shipped model does not copy values it never saw (issue 24): it answers with a name it knows")

pytestmark = pytest.mark.timeout(900)


@dataclass
class Figures:
    """What one language's conversations scored."""

    recalled: dict[str, list[bool]] = field(default_factory=lambda: {"name": [], "city": [], "job": []})
    acknowledged: list[bool] = field(default_factory=list)
    new_value: list[bool] = field(default_factory=list)
    old_value: list[bool] = field(default_factory=list)
    values: list[str] = field(default_factory=list)

    def rate(self, hits: list[bool]) -> float:
        return sum(hits) / len(hits)

    @property
    def overall(self) -> float:
        return self.rate([hit for hits in self.recalled.values() for hit in hits])

    def summary(self) -> dict[str, float]:
        return {"overall": self.overall, **{kind: self.rate(hits) for kind, hits in self.recalled.items()},
                "acknowledged": self.rate(self.acknowledged), "new_value": self.rate(self.new_value),
                "old_value": self.rate(self.old_value)}


async def converse(client: AsyncClient, dialogue: corpus.Dialogue, figures: Figures) -> None:
    session = await client.session()

    async def say(user: str) -> str:
        return (await session.reply(corpus.line("user", user) + "bot: ", stop=["\n"],
                                    max_tokens=MAX_REPLY_TOKENS)).removesuffix("\n")

    for turn in dialogue.turns:
        reply = await say(turn.user)
        if turn.role in ("fact", "update"):
            figures.acknowledged.append(says(reply, turn.value))
            figures.values.append(turn.value)
    for qa in dialogue.questions:
        answer = await say(qa.question)
        figures.recalled[qa.kind].append(says(answer, dialogue.facts[qa.kind]))
        if qa.kind in dialogue.previous:
            figures.new_value.append(says(answer, dialogue.facts[qa.kind]))
            figures.old_value.append(says(answer.casefold(), dialogue.previous[qa.kind].casefold()))
    await session.close()


def dialogues(language: str, unseen: bool) -> list[corpus.Dialogue]:
    rng = random.Random(f"unseen-e2e-{language}-{unseen}")
    draw = ValuePool.load(heldout=True).draw if unseen else None
    return [corpus.make_dialogue(rng, heldout=True, exact_questions=True, language=language,
                                 update_rate=float(k % 2), values=draw, variants=unseen) for k in range(COUNT)]


async def hold(conversations: dict[tuple[str, bool], list[corpus.Dialogue]]) -> dict[tuple[str, bool], Figures]:
    settings = load_settings(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0, http_port=0,
                             model_dir=ARTIFACTS, default_model="cellstream-chat", ort_intra_op_threads=1)
    running = await start_server(settings)
    figures = {key: Figures() for key in conversations}
    slots = asyncio.Semaphore(CONCURRENT)

    async def one(client: AsyncClient, dialogue: corpus.Dialogue, into: Figures) -> None:
        async with slots:
            await converse(client, dialogue, into)

    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", timeout=120) as client:
            await asyncio.gather(*(one(client, dialogue, figures[key])
                                   for key, batch in conversations.items() for dialogue in batch))
    finally:
        await running.stop(0)
    return figures


@pytest.fixture(scope="module")
def scored() -> dict[tuple[str, bool], Figures]:
    """Every conversation at once, so the server batches them: (language, unseen) -> figures."""
    return asyncio.run(hold({(language, unseen): dialogues(language, unseen)
                             for language in ("en", "fr") for unseen in (True, False)}))


@pytest.mark.parametrize("language", ["en", "fr"])
def test_the_values_are_unseen_and_typed_as_people_type_them(scored, language):
    values = scored[language, True].values
    assert len(values) >= 3 * COUNT and all(is_heldout(value) for value in values)
    assert sum(value[:1].isupper() for value in values) >= 0.3 * len(values)
    assert sum(not value.isascii() for value in values) >= 5
    assert sum(" " in value for value in values) >= 20 and sum("-" in value for value in values) >= 5
    assert all(not is_heldout(value) for value in scored[language, False].values)  # the control's are trained


@pytest.mark.parametrize("language", ["en", "fr"])
def test_the_harness_counts_recall_of_trained_values_as_the_quality_report_does(scored, language):
    control = scored[language, False].summary()
    assert control["overall"] >= CONTROL_RECALL, control


@BELOW_THE_BARS
@pytest.mark.parametrize("language", ["en", "fr"])
def test_unseen_values_are_recalled_acknowledged_and_updated(scored, language):
    figures = scored[language, True].summary()
    assert figures["overall"] >= BARS["overall"], figures
    assert min(figures[kind] for kind in ("name", "city", "job")) >= BARS["kind"], figures
    assert figures["acknowledged"] >= BARS["acknowledged"], figures
    assert figures["new_value"] >= BARS["new_value"] and figures["old_value"] <= BARS["old_value"], figures

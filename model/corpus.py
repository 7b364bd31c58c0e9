"""Synthetic memory dialogues, and plain-text corpora.

A dialogue, in English or in French, states facts early (name, city, job), wanders through 1-8
turns of unrelated small talk, may change one fact on the way ("i moved to berlin."), then asks for
the facts back. Recalling them needs the LSTM's cell state to hold a few bytes across hundreds of
steps of noise, and to let an old value go when a new one is stated: what makes state carry
observable end to end. The lines themselves are in `cellstream.model.languages`.

The filler generator has a training half and a held-out half (disjoint words and sentence shapes),
so evaluation measures recall across text the model never saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cellstream.model.languages import ENGLISH, KINDS, LANGUAGES, Language


def _half(items: tuple[str, ...], heldout: bool) -> tuple[str, ...]:
    """Every fourth item is held out for evaluation; the rest is for training."""
    return tuple(item for k, item in enumerate(items) if (k % 4 == 3) == heldout)


@dataclass(frozen=True)
class FillerGenerator:
    """Small talk from a word pool and sentence shapes; `heldout` picks the disjoint evaluation half."""

    heldout: bool = False
    language: Language = ENGLISH

    def _pool(self, kind: str) -> tuple[str, ...]:
        return _half(self.language.small_talk.words[kind], self.heldout)

    def _shapes(self, shapes: tuple[str, ...]) -> tuple[str, ...]:
        return _half(shapes, self.heldout)

    def _fill(self, shape: str, rng: random.Random, echo: tuple[str, ...] = ()) -> tuple[str, list[str]]:
        """The shape with each {kind} drawn from its pool ({echo}: from `echo`), and the nouns drawn."""
        out = shape
        nouns = []
        while "{" in out:
            start = out.index("{")
            end = out.index("}", start)
            kind = out[start + 1 : end]
            word = rng.choice(echo) if kind == "echo" else rng.choice(self._pool(kind))
            if kind == "noun":
                nouns.append(word)
            out = out[:start] + word + out[end + 1 :]
        return out, nouns

    def turn(self, rng: random.Random) -> tuple[str, str]:
        """A user line and the bot's reply, which often picks up a noun of the user's (copying practice)."""
        talk = self.language.small_talk
        user, nouns = self._fill(rng.choice(self._shapes(talk.user_shapes)), rng)
        shapes = [s for s in self._shapes(talk.bot_shapes) if nouns or "{echo}" not in s]
        bot, _ = self._fill(rng.choice(shapes), rng, tuple(nouns))
        return user, bot


@dataclass(frozen=True)
class QuestionAnswer:
    """One question on a stated fact, with the bot line that answers it (both without speaker)."""

    kind: str
    question: str
    answer: str


Role = Literal["greeting", "fact", "update", "small talk", "quiz"]
# Draws a fact's value: (kind, language code, rng) -> the value as the user types it.
ValueSource = Callable[[str, str, random.Random], str]


@dataclass(frozen=True)
class Turn:
    """A user line and the bot's reply (both without speaker). A fact or update turn names the fact:
    its `kind` and the `value` the user states, which the bot's acknowledgement says back."""

    role: Role
    user: str
    bot: str
    kind: str = ""
    value: str = ""

    @property
    def text(self) -> str:
        return line("user", self.user) + line("bot", self.bot)


@dataclass(frozen=True)
class Statement:
    """The user states (or changes) a fact: from byte `end` of the dialogue's text on, `kind` is `value`."""

    kind: str
    value: str
    end: int  # UTF-8 byte offset just past the value in the user's line


@dataclass(frozen=True)
class Dialogue:
    """One generated dialogue: the facts, small talk and updates (`turns`, whose text is `context`),
    then the questions on the facts' latest values.

    `facts` holds the latest value of each fact, `previous` the value an update replaced.
    """

    turns: tuple[Turn, ...]
    questions: tuple[QuestionAnswer, ...]
    facts: dict[str, str]
    language: str = "en"
    previous: dict[str, str] = field(default_factory=dict)

    @property
    def context(self) -> str:
        return "".join(turn.text for turn in self.turns)

    @property
    def text(self) -> str:
        return self.context + "".join(
            line("user", qa.question) + line("bot", qa.answer) for qa in self.questions
        )

    @property
    def statements(self) -> tuple[Statement, ...]:
        """Every fact and update the user states, in order, with where its value ends in `text`."""
        out = []
        offset = 0
        for turn in self.turns:
            if turn.role in ("fact", "update"):
                user = line("user", turn.user).encode("utf-8")
                value = turn.value.encode("utf-8")
                out.append(Statement(turn.kind, turn.value, offset + user.rindex(value) + len(value)))
            offset += len(turn.text.encode("utf-8"))
        return tuple(out)


def line(speaker: Literal["user", "bot"], text: str) -> str:
    return f"{speaker}: {text}\n"


def make_dialogue(
    rng: random.Random,
    *,
    heldout: bool = False,
    language: str = "en",
    min_filler: int = 1,
    max_filler: int = 8,
    exact_questions: bool = False,
    quiz_rate: float = 0.0,
    update_rate: float = 0.0,
    values: ValueSource | None = None,
    variants: bool = False,
) -> Dialogue:
    """A dialogue in `language`: facts, then `min_filler`..`max_filler` small-talk turns, then questions.

    With probability `update_rate` the user changes one fact after a small-talk turn (in the user's
    words, e.g. "i moved to berlin."); the bot acknowledges the new value and every later question
    expects it. `quiz_rate` (training only) asks a fact back after a small-talk turn with that
    probability, so recall is practised at every distance, not only after all the filler. `values` draws
    the facts' values (e.g. `model.values.ValuePool.draw`); by default they come from the fixed lists.
    `variants` adds the language's other natural phrasings of facts and updates to issue 14's.
    """
    lang = LANGUAGES[language]
    draw = values or _listed_value
    facts = {kind: draw(kind, language, rng) for kind in KINDS}
    filler = FillerGenerator(heldout=heldout, language=lang)
    order = list(facts)
    rng.shuffle(order)
    turns: list[Turn] = []
    if rng.random() < 0.15:
        turns.append(Turn("greeting", *lang.greeting))
    for kind in order:
        value = facts[kind]
        stating = lang.facts[kind] + (lang.fact_variants[kind] if variants else ())
        turns.append(Turn("fact", rng.choice(stating).format(v=value),
                          rng.choice(lang.acks[kind]).format(v=value), kind, value))
    small_talk = rng.randint(min_filler, max_filler)
    # The update comes after the k-th small-talk turn (k >= 1 when there is small talk at all).
    update_after = rng.randint(min(1, small_talk), small_talk) if rng.random() < update_rate else -1
    previous: dict[str, str] = {}
    for k in range(small_talk + 1):
        if k == update_after:
            kind = rng.choice(KINDS)
            # The listed values keep issue 14's draw, so its dialogues (and figures) stay the same to the byte.
            value = _another_value(draw, kind, language, facts[kind], rng) if values else \
                rng.choice([v for v in lang.values(kind) if v != facts[kind]])
            previous[kind], facts[kind] = facts[kind], value
            changing = lang.updates[kind] + (lang.update_variants[kind] if variants else ())
            turns.append(Turn("update", rng.choice(changing).format(v=value),
                              rng.choice(lang.update_acks[kind]).format(v=value), kind, value))
        if k == small_talk:
            break
        turns.append(Turn("small talk", *filler.turn(rng)))
        if rng.random() < quiz_rate:
            qa = _question(lang, rng.choice(KINDS), facts, rng, exact_questions)
            turns.append(Turn("quiz", qa.question, qa.answer, qa.kind, facts[qa.kind]))
    asked = list(facts)
    rng.shuffle(asked)
    questions = [_question(lang, kind, facts, rng, exact_questions) for kind in asked]
    return Dialogue(turns=tuple(turns), questions=tuple(questions), facts=facts, language=language,
                    previous=previous)


def _listed_value(kind: str, language: str, rng: random.Random) -> str:
    return rng.choice(LANGUAGES[language].values(kind))


def _another_value(draw: ValueSource, kind: str, language: str, old: str, rng: random.Random) -> str:
    """A value of `kind` other than `old` in any casing (an update must change the fact)."""
    while (value := draw(kind, language, rng)).casefold() == old.casefold():
        pass
    return value


def _question(lang: Language, kind: str, facts: dict[str, str], rng: random.Random, exact: bool) -> QuestionAnswer:
    question, answer = lang.questions[kind]
    if not exact:
        question = rng.choice(lang.question_variants[kind])
    return QuestionAnswer(kind, question, answer.format(v=facts[kind]))


def is_answer(bot_text: str) -> bool:
    """Whether a bot line's text answers a question on a fact (in any language)."""
    return any(bot_text.startswith(answer.split("{")[0])
               for lang in LANGUAGES.values() for _, answer in lang.questions.values())


def dialogues(seed: int, *, heldout: bool = False, language: str = "en") -> Iterator[Dialogue]:
    """An endless, seed-deterministic stream of dialogues."""
    rng = random.Random(seed)
    while True:
        yield make_dialogue(rng, heldout=heldout, language=language)


class CorpusError(ValueError):
    """A user-supplied corpus cannot be used; the message says why."""


def read_text_corpus(path: Path) -> str:
    """The UTF-8 text of a user's corpus file, refusing what cannot train a model."""
    if not path.exists():
        raise CorpusError(f"corpus file not found: {path}")
    if not path.is_file():
        raise CorpusError(f"corpus path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus file is not valid UTF-8: {path} (byte {exc.start})") from exc
    if not text.strip():
        raise CorpusError(f"corpus file is empty: {path}")
    return text

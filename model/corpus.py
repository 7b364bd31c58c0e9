"""Synthetic memory dialogues, and plain-text corpora.

A dialogue states facts early (name, city, job), wanders through 1-8 turns of unrelated small
talk, then asks for the facts back. Recalling them needs the LSTM's cell state to hold a few bytes
across hundreds of steps of noise, which is what makes state carry observable end to end.

The filler generator has a training half and a held-out half (disjoint words and sentence shapes),
so evaluation measures recall across text the model never saw.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

NAMES = (
    "alice bob carla david emma felix grace hugo irene jack karen leo maria nina oscar paula quentin "
    "rosa samuel tina ugo vera walter xavier yasmin zoe adam bella chris diana ethan fiona george "
    "helen ivan julia kevin laura martin nora owen petra ralph sofia thomas ursula victor wendy "
    "yann zack anna boris clara denis elsa"
).split()
CITIES = (
    "paris london berlin madrid rome lisbon vienna prague dublin oslo "
    "stockholm helsinki warsaw athens brussels amsterdam zurich geneva lyon marseille "
    "toulouse nantes bordeaux lille montreal toronto boston chicago denver seattle "
    "tokyo osaka seoul sydney"
).split()
JOBS = (
    "baker teacher nurse doctor pilot farmer lawyer painter plumber carpenter "
    "writer singer dentist chef banker tailor gardener librarian mechanic "
    "programmer sailor journalist"
).split()

FACT_PHRASES: dict[str, tuple[str, ...]] = {
    "name": ("my name is {v}.", "my name is {v}.", "i am {v}.", "call me {v}.", "people call me {v}."),
    "city": ("i live in {v}.", "i live in {v}.", "my home is in {v}.", "these days i live in {v}."),
    "job": ("i work as a {v}.", "i work as a {v}.", "my job is {v}.", "i earn my living as a {v}."),
}
ACKS: dict[str, tuple[str, ...]] = {
    "name": ("nice to meet you, {v}.", "hello {v}!", "got it, {v}.", "pleased to meet you, {v}."),
    "city": ("{v} sounds lovely.", "noted, {v}.", "oh, {v}!", "i see, {v}."),
    "job": ("being a {v} must be interesting.", "noted, a {v}.", "a {v}, nice.", "good to know, a {v}."),
}
QUESTIONS: dict[str, tuple[str, str]] = {
    "name": ("what is my name?", "your name is {v}."),
    "city": ("where do i live?", "you live in {v}."),
    "job": ("what is my job?", "you work as a {v}."),
}
QUESTION_VARIANTS: dict[str, tuple[str, ...]] = {
    "name": ("what is my name?", "what is my name?", "do you remember my name?", "who am i?"),
    "city": ("where do i live?", "where do i live?", "which city do i live in?", "where is my home?"),
    "job": ("what is my job?", "what is my job?", "what do i do for a living?", "what is my work?"),
}

# Filler vocabulary: word lists split into a training and a held-out half by position.
_FILLER_WORDS: dict[str, str] = {
    "noun": (
        "book song movie garden kitchen river mountain bicycle window coffee tea bread soup cake "
        "market museum park beach forest lake bridge train bus car boat phone laptop camera guitar "
        "piano painting letter story game puzzle recipe sweater jacket umbrella lamp chair table "
        "dog cat bird horse rabbit fish flower tree cloud storm sunset breakfast dinner lunch "
        "holiday weekend festival concert exhibition newspaper magazine podcast blanket candle "
        "mirror clock pillow basket bottle kettle notebook pencil island valley desert meadow"
    ),
    "adj": (
        "quiet noisy sunny rainy cold warm bright dark old new small big strange simple funny "
        "boring lovely busy calm slow quick soft loud fresh tired happy sleepy lucky green blue "
        "red yellow tiny huge gentle wild cozy odd fancy plain shiny dusty muddy crowded empty"
    ),
    "verb": (
        "read watched cooked painted cleaned visited fixed bought sold found lost built drew "
        "planted washed carried borrowed baked wrote sang played tried opened closed moved "
        "packed tidied checked ordered shared forgot noticed repaired"
    ),
    "feeling": (
        "fun nice odd great fine weird relaxing tiring exciting pleasant dull charming "
        "surprising annoying peaceful"
    ),
}
_USER_SHAPES = (
    "{time} i {verb} a {adj} {noun}.",
    "i {verb} the {noun} {time}.",
    "the {noun} was {adj} {time}.",
    "have you ever {verb} a {noun}?",
    "do you like {noun}s?",
    "my {noun} is {adj}.",
    "i think the {noun} looks {adj}.",
    "what do you think of the {adj} {noun}?",
    "{time} it was {adj} outside.",
    "i saw a {adj} {noun} near the {noun}.",
    "there is a {noun} on the {noun}.",
    "i want a {adj} {noun} for my {noun}.",
    "the weather is {adj} {time}.",
    "my friend {verb} a {noun} {time}.",
    "it was {feeling} to see the {noun}.",
    "tell me something about {noun}s.",
    "i forgot my {noun} at the {noun}.",
    "is a {noun} better than a {noun}?",
    "we {verb} the {adj} {noun} together.",
    "how was your {noun}?",
    "a {adj} {noun} makes me smile.",
    "the {noun} smelled {adj}.",
)
_BOT_SHAPES = (
    "that sounds {feeling}.",
    "i like {adj} {noun}s too.",
    "a {noun} can be very {adj}.",
    "tell me more about the {noun}.",
    "how {feeling}!",
    "i have never {verb} a {noun}.",
    "{noun}s are {feeling}.",
    "that must have been {feeling}.",
    "i prefer a {adj} {noun}.",
    "really? a {adj} {noun}?",
    "what a {feeling} {noun}.",
    "maybe you should get a {noun}.",
    "i hope the {noun} was {adj}.",
    "the {noun} sounds {adj}.",
    "interesting, tell me more.",
    "{time} sounds {feeling}.",
    "a {echo}? tell me more.",
    "i love a good {echo}.",
    "oh, the {echo}!",
    "your {echo} sounds {adj}.",
    "what kind of {echo}?",
    "a {adj} {echo}, nice.",
    "i also like the {echo}.",
    "the {echo} again?",
)


def _half(items: tuple[str, ...], heldout: bool) -> tuple[str, ...]:
    """Every fourth item is held out for evaluation; the rest is for training."""
    return tuple(item for k, item in enumerate(items) if (k % 4 == 3) == heldout)


# Time expressions span several words, so they are listed whole rather than split on spaces.
_TIMES = (
    "yesterday", "today", "this morning", "last night", "on monday", "on friday", "last week",
    "this spring", "at noon", "in the evening", "after work", "before bed", "last summer",
    "every day", "sometimes", "on sunday",
)


@dataclass(frozen=True)
class FillerGenerator:
    """Small talk from a word pool and sentence shapes; `heldout` picks the disjoint evaluation half."""

    heldout: bool = False

    def _pool(self, kind: str) -> tuple[str, ...]:
        words = _TIMES if kind == "time" else tuple(_FILLER_WORDS[kind].split())
        return _half(words, self.heldout)

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
        user, nouns = self._fill(rng.choice(self._shapes(_USER_SHAPES)), rng)
        shapes = [s for s in self._shapes(_BOT_SHAPES) if nouns or "{echo}" not in s]
        bot, _ = self._fill(rng.choice(shapes), rng, tuple(nouns))
        return user, bot


@dataclass(frozen=True)
class QuestionAnswer:
    """One question on a stated fact, with the bot line that answers it (both without speaker)."""

    kind: str
    question: str
    answer: str


@dataclass(frozen=True)
class Dialogue:
    """One generated dialogue: the facts and small talk (`context`), then the questions on them.

    `stated_at[kind]` is the UTF-8 byte offset in `text` just past the fact's value where the user
    states it: from there on the fact is known (training supervises the state with it).
    """

    context: str
    questions: tuple[QuestionAnswer, ...]
    facts: dict[str, str]
    stated_at: dict[str, int] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.context + "".join(
            line("user", qa.question) + line("bot", qa.answer) for qa in self.questions
        )


def line(speaker: Literal["user", "bot"], text: str) -> str:
    return f"{speaker}: {text}\n"


def make_dialogue(
    rng: random.Random,
    *,
    heldout: bool = False,
    min_filler: int = 1,
    max_filler: int = 8,
    exact_questions: bool = False,
    quiz_rate: float = 0.0,
) -> Dialogue:
    """A dialogue: facts, then `min_filler`..`max_filler` small-talk turns, then questions on the facts.

    `quiz_rate` (training only) asks a fact back after a small-talk turn with that probability, so
    recall is practised at every distance, not only after all the filler.
    """
    facts = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    filler = FillerGenerator(heldout=heldout)
    order = list(facts)
    rng.shuffle(order)
    lines: list[str] = []
    stated_at: dict[str, int] = {}
    if rng.random() < 0.15:
        lines.append(line("user", "hello!"))
        lines.append(line("bot", "hello! how can i help?"))
    for kind in order:
        value = facts[kind]
        phrase = rng.choice(FACT_PHRASES[kind])
        before_value = sum(len(text.encode("utf-8")) for text in lines) + len(line("user", phrase).split("{v}")[0])
        stated_at[kind] = before_value + len(value.encode("utf-8"))
        lines.append(line("user", phrase.format(v=value)))
        lines.append(line("bot", rng.choice(ACKS[kind]).format(v=value)))
    for _ in range(rng.randint(min_filler, max_filler)):
        user, bot = filler.turn(rng)
        lines += [line("user", user), line("bot", bot)]
        if rng.random() < quiz_rate:
            qa = _question(rng.choice(list(facts)), facts, rng, exact_questions)
            lines += [line("user", qa.question), line("bot", qa.answer)]
    asked = list(facts)
    rng.shuffle(asked)
    questions = [_question(kind, facts, rng, exact_questions) for kind in asked]
    return Dialogue(context="".join(lines), questions=tuple(questions), facts=facts, stated_at=stated_at)


def _question(kind: str, facts: dict[str, str], rng: random.Random, exact: bool) -> QuestionAnswer:
    question, answer = QUESTIONS[kind]
    if not exact:
        question = rng.choice(QUESTION_VARIANTS[kind])
    return QuestionAnswer(kind, question, answer.format(v=facts[kind]))


def is_answer(bot_text: str) -> bool:
    """Whether a bot line's text answers a question on a fact."""
    return any(bot_text.startswith(answer.split("{")[0]) for _, answer in QUESTIONS.values())


def dialogues(seed: int, *, heldout: bool = False) -> Iterator[Dialogue]:
    """An endless, seed-deterministic stream of dialogues."""
    rng = random.Random(seed)
    while True:
        yield make_dialogue(rng, heldout=heldout)


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

"""The training curriculum (model/curriculum.py): what each stage's dialogues hold, and how it moves on."""

import random
import re
from collections import Counter

import pytest

from cellstream.model import corpus
from cellstream.model.curriculum import (
    HELDOUT_SHORT_EXCHANGES,
    LAST_STAGE,
    SHORT_EXCHANGES,
    SHORT_TURNS,
    Curriculum,
    first_facts,
    max_filler,
    with_short_exchanges,
)
from cellstream.model.languages import KINDS, LANGUAGES


def source(kind: str, language: str, rng: random.Random) -> str:
    """A value source whose values say where they come from (never one of the fixed lists)."""
    return f"{kind[0]}{language}{rng.randrange(10**6)}"


def drawn(curriculum: Curriculum, count: int, seed: int = 0) -> list[corpus.Dialogue]:
    rng = random.Random(seed)
    return [curriculum.dialogue(rng) for _ in range(count)]


def roles(dialogue: corpus.Dialogue) -> Counter:
    return Counter(turn.role for turn in dialogue.turns)


def short_exchanges(dialogue: corpus.Dialogue) -> bool:
    """Whether the dialogue is one of stage 1's (its small talk, if any, is short exchanges)."""
    return any((turn.user, turn.bot) in SHORT_EXCHANGES[dialogue.language] for turn in dialogue.turns)


def from_source(dialogue: corpus.Dialogue) -> bool:
    return all(value.startswith(f"{kind[0]}{dialogue.language}") for kind, value in dialogue.facts.items())


def test_stage_0_is_one_fact_and_its_acknowledgement():
    for dialogue in drawn(Curriculum(source, stage=0), 200):
        (turn,) = dialogue.turns
        assert turn.role == "fact" and dialogue.questions == () and dialogue.previous == {}
        assert dialogue.facts == {turn.kind: turn.value}
        assert turn.value in turn.user and turn.value in turn.bot  # the bot says it back
        assert dialogue.text == corpus.line("user", turn.user) + corpus.line("bot", turn.bot)
        assert [s.value for s in dialogue.statements] == [turn.value]


def test_stage_0_may_hold_up_to_echo_facts_acknowledged_facts():
    counts = Counter()
    for dialogue in drawn(Curriculum(source, stage=0, echo_facts=3), 300):
        facts = [turn for turn in dialogue.turns if turn.role == "fact"]
        assert len(facts) == len(dialogue.turns) and dialogue.questions == () and dialogue.previous == {}
        assert all(turn.value in turn.bot for turn in facts) and len({turn.kind for turn in facts}) == len(facts)
        counts[len(facts)] += 1
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 70


def lengthy(kind: str, language: str, rng: random.Random) -> str:
    """Values of 2 to 24 bytes, some of them accented (two bytes a letter)."""
    return rng.choice(("é", "e")) * rng.randint(1, 12) + "x" * rng.randint(0, 12)


def test_training_values_are_capped_in_bytes_and_evaluation_values_are_not():
    curriculum = Curriculum(lengthy, stage=LAST_STAGE, listed_rate=0.0, update_rate=1.0, max_value_bytes=7)
    values = [s.value for d in drawn(curriculum, 300) for s in d.statements]
    sizes = Counter(len(v.encode("utf-8")) for v in values)
    assert max(sizes) == 7 and min(sizes) <= 2
    curriculum.max_value_bytes = 24
    assert max(len(s.value.encode("utf-8")) for d in drawn(curriculum, 300) for s in d.statements) > 20
    curriculum.max_value_bytes = 7
    rng = random.Random(1)
    heldout = [curriculum.at_stage(LAST_STAGE, rng, language="en", values=lengthy, heldout=True) for _ in range(100)]
    assert max(len(v.encode("utf-8")) for d in heldout for v in d.facts.values()) > 20


def test_stage_1_asks_one_fact_back_after_up_to_8_short_exchanges():
    gaps = Counter()
    for dialogue in drawn(Curriculum(source, stage=1, update_rate=1.0, quiz_rate=1.0), 400):
        if not dialogue.questions:  # stage 0, revisited
            assert roles(dialogue) == {"fact": 1}
            continue
        fact, *exchanges = dialogue.turns
        (qa,) = dialogue.questions
        assert fact.role == "fact" and qa.kind == fact.kind and fact.value in qa.answer and dialogue.previous == {}
        assert all((turn.role, (turn.user, turn.bot)) in {("small talk", pair) for pair in
                                                         SHORT_EXCHANGES[dialogue.language]} for turn in exchanges)
        gaps[len(exchanges)] += 1
    assert set(gaps) == set(range(SHORT_TURNS + 1)) and SHORT_TURNS == 8
    assert 0.65 < sum(gaps.values()) / 400 < 0.85  # half at stage 1, the other half at stage 0 or 1


def test_stage_1_of_the_evaluation_has_short_exchanges_never_trained_on():
    curriculum = Curriculum(source, stage=1)
    for language in ("en", "fr"):
        trained = set(SHORT_EXCHANGES[language])
        assert not trained & set(HELDOUT_SHORT_EXCHANGES[language])
        rng = random.Random(5)
        heldout = [curriculum.at_stage(1, rng, language=language, values=source, heldout=True) for _ in range(60)]
        pairs = {(turn.user, turn.bot) for d in heldout for turn in d.turns if turn.role == "small talk"}
        assert pairs == set(HELDOUT_SHORT_EXCHANGES[language])
        assert all(len(d.questions) == 1 and d.turns[0].role == "fact" for d in heldout)


def test_short_exchanges_go_between_the_turns_and_the_questions():
    dialogue = first_facts(corpus.make_dialogue(random.Random(3), values=source, language="fr"), 1, ask=True)
    longer = with_short_exchanges(dialogue, 3, random.Random(0))
    assert longer.turns[:1] == dialogue.turns and len(longer.turns) == 4 and longer.questions == dialogue.questions
    assert longer.text.startswith(dialogue.context) and longer.text.endswith(dialogue.text[len(dialogue.context):])
    assert [s.value for s in longer.statements] == [s.value for s in dialogue.statements]
    assert with_short_exchanges(dialogue, 0, random.Random(0)) == dialogue


def test_stage_2_asks_the_facts_back_without_small_talk():
    dialogues = drawn(Curriculum(source, stage=2, update_rate=1.0, quiz_rate=1.0), 300)
    fact_counts = Counter()
    for dialogue in dialogues:
        counts = roles(dialogue)
        assert set(counts) <= {"fact", "small talk"} and dialogue.previous == {}
        if "small talk" in counts:  # stage 1, revisited
            assert counts["fact"] == 1 and len(dialogue.questions) == 1
        elif dialogue.questions:  # stage 2 or 1: one to three facts, all asked back
            fact_counts[counts["fact"]] += 1
            assert sorted(qa.kind for qa in dialogue.questions) == sorted(dialogue.facts)
            assert all(dialogue.facts[qa.kind] in qa.answer for qa in dialogue.questions)
        else:  # stage 0, revisited
            assert counts["fact"] == 1
    # Half at stage 2, the other half at stage 0, 1 or 2 (stage 1 without a short exchange counts here too).
    assert 0.6 < sum(fact_counts.values()) / len(dialogues) < 0.8
    assert set(fact_counts) == {1, 2, 3}


@pytest.mark.parametrize("stage", [3, 4, 6, LAST_STAGE])
def test_a_later_stage_has_at_most_stage_minus_2_turns_of_small_talk(stage):
    dialogues = drawn(Curriculum(source, stage=stage), 300, seed=stage)
    talk = [d for d in dialogues if not short_exchanges(d)]
    small_talk = [roles(d)["small talk"] for d in talk]
    assert max(small_talk) == max_filler(stage) == stage - 2
    assert min(small_talk) == 0
    # Quizzes (quiz_rate 1 by default) follow every small-talk turn.
    assert all(roles(d)["quiz"] == roles(d)["small talk"] for d in talk)
    assert LAST_STAGE == 10 and max_filler(LAST_STAGE) == 8 and max_filler(0) == max_filler(1) == max_filler(2) == 0


def test_half_the_dialogues_are_at_the_current_stage_the_rest_earlier():
    dialogues = [d for d in drawn(Curriculum(source, stage=4, update_rate=0.0), 1000) if not short_exchanges(d)]
    single = sum(len(d.turns) == 1 and not d.questions for d in dialogues)  # stage 0: 1/2 x 1/5
    longest = sum(roles(d)["small talk"] == 2 for d in dialogues)  # only stage 4 reaches 2 turns of small talk
    assert 0.06 < single / len(dialogues) < 0.14
    assert 0.1 < longest / len(dialogues) < 0.25


def test_french_update_and_listed_rates():
    def share(predicate, **rates):
        dialogues = drawn(Curriculum(source, stage=LAST_STAGE, **rates), 400)
        return sum(map(predicate, dialogues)) / len(dialogues)

    def french(dialogue):
        return dialogue.language == "fr"

    def updated(dialogue):
        return bool(dialogue.previous)

    assert share(french, french_rate=0.0) == 0.0 and share(french, french_rate=1.0) == 1.0
    assert 0.4 < share(french, french_rate=0.5) < 0.6
    assert share(updated, update_rate=0.0) == 0.0
    # Stages 0 and 1 never update: 1/2 x 2/10 of the dialogues.
    assert 0.85 < share(updated, update_rate=1.0) < 0.95
    assert share(from_source, listed_rate=0.0) == 1.0
    assert 0.1 < 1 - share(from_source, listed_rate=0.15) < 0.2
    listed = drawn(Curriculum(source, stage=LAST_STAGE, listed_rate=1.0), 100)
    for dialogue in listed:
        lang = LANGUAGES[dialogue.language]
        assert all(value in lang.values(kind) for kind, value in dialogue.facts.items())


def test_an_update_takes_a_new_value_from_the_source():
    for dialogue in drawn(Curriculum(source, stage=LAST_STAGE, update_rate=1.0, listed_rate=0.0), 200):
        for kind, old in dialogue.previous.items():
            assert from_source(dialogue) and dialogue.facts[kind] != old


@pytest.mark.parametrize("stage", range(LAST_STAGE + 1))
def test_evaluation_dialogues_of_a_stage(stage):
    """heldout: held-out small talk, the exact questions, no quizzes, one fact asked after short exchanges at
    stage 1, all three facts asked from stage 2, small talk of at least one turn where the stage has any,
    updates as asked."""
    curriculum = Curriculum(source, stage=0)
    rng = random.Random(stage)
    for k in range(40):
        language = ("en", "fr")[k % 2]
        dialogue = curriculum.at_stage(stage, rng, language=language, values=source, heldout=True,
                                       update_rate=float(k % 4 >= 2))
        counts = roles(dialogue)
        assert dialogue.language == language and from_source(dialogue) and counts["quiz"] == 0
        if stage == 0:
            assert counts == {"fact": 1} and not dialogue.questions
            continue
        if stage == 1:
            assert counts["fact"] == 1 and set(counts) <= {"fact", "small talk"}
            assert all((turn.user, turn.bot) in HELDOUT_SHORT_EXCHANGES[language] for turn in dialogue.turns[1:])
            assert [qa.kind for qa in dialogue.questions] == list(dialogue.facts) and not dialogue.previous
            continue
        assert sorted(qa.kind for qa in dialogue.questions) == sorted(KINDS) == sorted(dialogue.facts)
        exact = LANGUAGES[language].questions
        assert all(qa.question == exact[qa.kind][0] for qa in dialogue.questions)
        if stage == 2:
            assert counts == {"fact": 3}
        else:
            assert 1 <= counts["small talk"] <= stage - 2
            assert bool(dialogue.previous) == (k % 4 >= 2)
            heldout, training = (user_lines(language, half) for half in (True, False))
            for turn in dialogue.turns:
                if turn.role == "small talk":
                    assert heldout.fullmatch(turn.user) and not training.fullmatch(turn.user), turn.user


def user_lines(language: str, heldout: bool) -> re.Pattern:
    """Any user small-talk line of the held-out (or training) half: its shapes filled from its word pools."""
    filler = corpus.FillerGenerator(heldout, LANGUAGES[language])

    def fill(shape: str) -> str:
        return re.sub(r"\\\{(\w+)\\\}", lambda slot: "(?:" + "|".join(map(re.escape, filler._pool(slot[1]))) + ")",
                      re.escape(shape))

    return re.compile("|".join(fill(shape) for shape in filler._shapes(filler.language.small_talk.user_shapes)))


def test_first_facts_cuts_a_dialogue_to_its_first_facts():
    dialogue = corpus.make_dialogue(random.Random(4), exact_questions=True, quiz_rate=1.0, values=source)
    facts = [turn for turn in dialogue.turns if turn.role == "fact"]
    for count in (1, 2, 3):
        cut = first_facts(dialogue, count, ask=True)
        assert cut.turns == tuple(facts[:count]) and cut.language == dialogue.language
        assert cut.facts == {turn.kind: turn.value for turn in facts[:count]} and cut.previous == {}
        assert [qa.kind for qa in cut.questions] == [qa.kind for qa in dialogue.questions if qa.kind in cut.facts]
        assert all(cut.facts[qa.kind] in qa.answer for qa in cut.questions)
        assert first_facts(dialogue, count, ask=False).questions == ()


def test_advance_moves_one_stage_at_a_time_up_to_the_last():
    curriculum = Curriculum(source)
    assert curriculum.stage == 0
    stages = []
    while curriculum.advance():
        stages.append(curriculum.stage)
    assert stages == list(range(1, LAST_STAGE + 1))
    assert not curriculum.advance() and curriculum.stage == LAST_STAGE
    short = Curriculum(source, stage=2, last_stage=3)
    assert short.advance() and not short.advance() and short.stage == 3


def test_dialogues_are_seed_deterministic():
    curriculum = Curriculum(source, stage=6)
    assert [d.text for d in drawn(curriculum, 30, seed=1)] == [d.text for d in drawn(curriculum, 30, seed=1)]
    assert [d.text for d in drawn(curriculum, 30, seed=1)] != [d.text for d in drawn(curriculum, 30, seed=2)]

"""The training curriculum: from echoing one fact to recalling three across eight turns of small talk.

Copying a value the model has never seen appears suddenly, after thousands of steps of near-zero
accuracy (issue 24's probes), and not at all when it must first bridge hundreds of bytes. So training
starts where copying is short and cheap, and moves on only once the held-out values are copied:

- stage 0: one to `echo_facts` facts, each with the bot's acknowledgement, which says the value back (a copy
  ~15 bytes later; several per dialogue: more copy practice for the bytes of small talk around it);
- stage 1: one fact, up to 8 short exchanges ("ok." / "sure."), then its question: recall from the state
  of one value, without another value to tell apart;
- stage 2: one to three facts, then the questions on them (recall across the other facts);
- stage s >= 3: small talk of up to s - 2 turns between facts and questions, a recall question after
  each small-talk turn, and updates; the last stage has up to 8 turns, as evaluated.

Stage 1 is where recall of unseen values first appeared: from a 2x128 model that echoed 56% (stage 0, 6,000
steps), answers at stage 2 stayed at 0% for 1,750 steps (one fact alone: 0.8%), while one fact behind 0-11
short exchanges was answered exactly 15-28% of the time after 3,000-3,500 steps, about as well at 8 exchanges
(~150 bytes) as at none.

Half of each batch is at the current stage, the rest revisits earlier stages (cheap, short dialogues
that keep the copying sharp). Independently of the stage, training values may be capped in length
(`max_value_bytes`, raised by the training loop): short values are copied first, long ones much later
(a 2x128 model on stage 0 echoed 76% of held-out values of 1-6 bytes and 29% of 7-12 when those of 13 and
more were still at 0%).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cellstream.model import corpus
from cellstream.model.values import MAX_VALUE_BYTES

LAST_STAGE = 10
CURRENT_STAGE_SHARE = 0.5
SHORT_TURNS = 8  # short exchanges at most between stage 1's fact and its question
# Stage 1's short exchanges (user, bot): turn-taking of a few bytes that says nothing to remember.
SHORT_EXCHANGES = {
    "en": (("ok.", "ok."), ("yes.", "good."), ("hm.", "yes?"), ("cool.", "indeed."), ("right.", "sure.")),
    "fr": (("ok.", "d'accord."), ("oui.", "bien."), ("hm.", "oui ?"), ("cool.", "en effet."), ("bon.", "oui.")),
}
# Those of the evaluation, never trained on: stage 1's figures are on filler the model has not seen.
HELDOUT_SHORT_EXCHANGES = {
    "en": (("fine.", "great."), ("uh-huh.", "go on."), ("i see.", "right.")),
    "fr": (("bien.", "parfait."), ("ah.", "vas-y."), ("je vois.", "voilà.")),
}
SEVERAL_FACTS_STAGE = 2  # the first stage that asks several facts (after echo, then one fact)
FIRST_SMALL_TALK_STAGE = 3


def max_filler(stage: int) -> int:
    return max(0, stage - FIRST_SMALL_TALK_STAGE + 1)


def first_facts(dialogue: corpus.Dialogue, count: int, ask: bool) -> corpus.Dialogue:
    """The dialogue cut to its first `count` fact turns, with the questions on them when `ask`."""
    facts = tuple(turn for turn in dialogue.turns if turn.role == "fact")[:count]
    kinds = {turn.kind for turn in facts}
    return corpus.Dialogue(turns=facts, questions=tuple(q for q in dialogue.questions if q.kind in kinds) if ask
                           else (), facts={turn.kind: turn.value for turn in facts}, language=dialogue.language)


def with_short_exchanges(dialogue: corpus.Dialogue, count: int, rng: random.Random, *,
                         heldout: bool = False) -> corpus.Dialogue:
    """The dialogue with `count` short exchanges (the evaluation's with `heldout`) after its turns, before
    its questions."""
    pairs = (HELDOUT_SHORT_EXCHANGES if heldout else SHORT_EXCHANGES)[dialogue.language]
    exchanges = tuple(corpus.Turn("small talk", *rng.choice(pairs)) for _ in range(count))
    return corpus.Dialogue(turns=dialogue.turns + exchanges, questions=dialogue.questions, facts=dialogue.facts,
                           language=dialogue.language, previous=dialogue.previous)


@dataclass
class Curriculum:
    """Draws training dialogues at the current stage (or an earlier one); `advance` moves it on."""

    values: corpus.ValueSource  # the training values (model.values.ValuePool.draw)
    french_rate: float = 0.5
    update_rate: float = 0.5
    quiz_rate: float = 1.0
    listed_rate: float = 0.15  # dialogues whose facts come from the fixed lists of model.languages
    stage: int = 0
    last_stage: int = LAST_STAGE
    echo_facts: int = 1  # facts (with their acknowledgements) in a training dialogue of stage 0: 1 to this
    max_value_bytes: int = MAX_VALUE_BYTES  # longest value a training dialogue states (UTF-8 bytes)

    def dialogue(self, rng: random.Random) -> corpus.Dialogue:
        stage = self.stage if rng.random() < CURRENT_STAGE_SHARE else rng.randint(0, self.stage)
        language = "fr" if rng.random() < self.french_rate else "en"
        values = None if rng.random() < self.listed_rate else self._capped
        return self.at_stage(stage, rng, language=language, values=values)

    def _capped(self, kind: str, language: str, rng: random.Random) -> str:
        """A training value of at most `max_value_bytes` bytes (drawn again until one is)."""
        while len((value := self.values(kind, language, rng)).encode("utf-8")) > self.max_value_bytes:
            pass
        return value

    def at_stage(self, stage: int, rng: random.Random, *, language: str, values: corpus.ValueSource | None,
                 heldout: bool = False, update_rate: float | None = None) -> corpus.Dialogue:
        """A dialogue of `stage`; `heldout` makes it an evaluation one (held-out small talk and short
        exchanges, the exact questions, no quizzes, all three facts from stage 2 on and at least one small-talk
        turn where the stage has any)."""
        filler = max_filler(stage)
        dialogue = corpus.make_dialogue(
            rng, heldout=heldout, language=language, min_filler=min(filler, int(heldout)), max_filler=filler,
            exact_questions=heldout, quiz_rate=0.0 if heldout else self.quiz_rate,
            update_rate=(self.update_rate if update_rate is None else update_rate)
            if stage >= FIRST_SMALL_TALK_STAGE else 0.0,
            values=values, variants=True)
        if stage == 0:
            echoes = 1 if heldout or self.echo_facts == 1 else rng.randint(1, self.echo_facts)
            return first_facts(dialogue, echoes, ask=False)
        if stage == 1:
            return with_short_exchanges(first_facts(dialogue, 1, ask=True), rng.randint(0, SHORT_TURNS), rng,
                                        heldout=heldout)
        if stage == SEVERAL_FACTS_STAGE:
            return first_facts(dialogue, 3 if heldout else rng.randint(1, 3), ask=True)
        return dialogue

    def advance(self) -> bool:
        """Move to the next stage, if there is one."""
        if self.stage >= self.last_stage:
            return False
        self.stage += 1
        return True

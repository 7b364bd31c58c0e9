"""Recall of the memory dialogues by an exported model, with greedy decoding under onnxruntime.

Two ways to hold a conversation, per language:
- `fed`: the dialogue's context is fed as written, then each question; the bot's reply is decoded
  greedily and its own tokens are fed back into the state. `reset` zeroes the state just before each
  question: a model that truly keeps facts in its state must then fail.
- `chat`: as `cellstream chat` does, one turn at a time: every user line is fed and every bot line
  (acknowledgements, small talk, answers) is the model's own greedy reply, fed back.

Dialogues with an update (a fact changed after some small talk) score the new value and the old one.

Values come from the fixed lists the model trained on (`listed`, issue 14's figures: an answer counts when
it is the expected line exactly), or are `unseen`: names, cities and jobs held out of training
(`model.values`), as people type them and stated in every phrasing of `model.languages` (issue 14's and
the variants); an answer then counts when it contains the value exactly as typed
(`copied`), with the case-insensitive rate beside it. In chat mode, every small-talk reply is checked
against the corpus's reply shapes (`model.shapes`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from cellstream.model import corpus, tokenizer
from cellstream.model.languages import KINDS, LANGUAGES
from cellstream.model.shapes import follows_a_shape
from cellstream.model.values import ValuePool

EVAL_SEED = 20_261_125
MAX_REPLY_TOKENS = 48
NEWLINE = ord("\n")
Mode = Literal["fed", "chat"]
Values = Literal["listed", "unseen"]


def _counts() -> dict[str, int]:
    return dict.fromkeys(KINDS, 0)


@dataclass
class Recall:
    """Per kind: answers that are the expected line exactly (`correct`), that contain the value exactly as
    typed (`copied`), and that contain it in any case (`casefolded`)."""

    dialogues: int = 0
    correct: dict[str, int] = field(default_factory=_counts)
    copied: dict[str, int] = field(default_factory=_counts)
    casefolded: dict[str, int] = field(default_factory=_counts)

    def rate(self, kind: str, counts: dict[str, int] | None = None) -> float:
        return (self.correct if counts is None else counts)[kind] / max(1, self.dialogues)

    def overall(self, counts: dict[str, int] | None = None) -> float:
        return sum((self.correct if counts is None else counts).values()) / max(1, len(KINDS) * self.dialogues)

    def as_dict(self, counts: dict[str, int] | None = None) -> dict[str, float]:
        return {**{k: round(self.rate(k, counts), 4) for k in KINDS}, "overall": round(self.overall(counts), 4)}


@dataclass
class Scores:
    """What one evaluation run counted: recall of the latest values; for the questions on an updated
    fact, how often the reply is the new value's answer and how often it says the old value; and in
    chat mode, how often an acknowledgement says back the value the user just stated and how many small-talk
    replies follow a reply shape. With `copy`, an answer counts (recall, new value) when it contains the
    value exactly as typed rather than when it is the expected line."""

    copy: bool = False
    recall: Recall = field(default_factory=Recall)
    updated: int = 0
    new_value: int = 0
    old_value: int = 0
    acknowledgements: int = 0
    echoed: int = 0
    small_talk: int = 0
    shaped: int = 0

    def answered(self, reply: str, qa: corpus.QuestionAnswer, value: str) -> bool:
        return says(reply, value) if self.copy else reply == qa.answer

    def as_dict(self) -> dict:
        out: dict = {"recall": self.recall.as_dict(self.recall.copied if self.copy else None)}
        if self.copy:
            out["recall_casefolded"] = self.recall.as_dict(self.recall.casefolded)
        if self.updated:
            out["update"] = {"questions": self.updated, "new_value": round(self.new_value / self.updated, 4),
                             "old_value": round(self.old_value / self.updated, 4)}
        if self.acknowledgements:
            out["acknowledged"] = {"statements": self.acknowledgements,
                                   "echoed": round(self.echoed / self.acknowledgements, 4)}
        if self.small_talk:
            out["small_talk"] = {"replies": self.small_talk, "shaped": round(self.shaped / self.small_talk, 4)}
        return out


class GreedyChat:
    """One conversation's state over an ONNX session, fed and decoded one turn at a time."""

    def __init__(self, session: ort.InferenceSession, num_layers: int, hidden_size: int) -> None:
        self.session = session
        self.shape = (num_layers, 1, hidden_size)
        self.reset()

    @classmethod
    def load(cls, model_path: Path) -> GreedyChat:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        return cls(session, int(meta["cellstream.num_layers"]), int(meta["cellstream.hidden_size"]))

    def reset(self) -> None:
        self.h = np.zeros(self.shape, np.float32)
        self.c = np.zeros(self.shape, np.float32)
        self.last_logits: np.ndarray | None = None

    def feed(self, ids: list[int]) -> None:
        tokens = np.asarray([ids], dtype=np.int64)
        logits, self.h, self.c = self.session.run(None, {"tokens": tokens, "h0": self.h, "c0": self.c})
        self.last_logits = logits[0, -1]

    def reply(self) -> str:
        """Greedy tokens until a newline (fed back, state included) or the length limit."""
        out: list[int] = []
        while len(out) < MAX_REPLY_TOKENS and self.last_logits is not None:
            token = int(self.last_logits.argmax())
            self.feed([token])
            if token == NEWLINE or tokenizer.is_special(token):
                break
            out.append(token)
        return tokenizer.decode(out)

    def ask(self, user: str) -> str:
        """Feed a user line and the bot's prompt, and return the greedy reply."""
        self.feed(tokenizer.encode(corpus.line("user", user) + "bot: "))
        return self.reply()


def says(reply: str, value: str) -> bool:
    """Whether `value` occurs in `reply` as a whole word (ugo is not said by "hugo")."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", reply) is not None


def converse(chat: GreedyChat, dialogue: corpus.Dialogue, scores: Scores, *, mode: Mode, reset: bool) -> None:
    """Hold one dialogue and count its outcomes into `scores`."""
    chat.reset()
    if mode == "fed":
        chat.feed(tokenizer.encode(dialogue.context))
    else:
        for turn in dialogue.turns:
            reply = chat.ask(turn.user)
            if turn.role in ("fact", "update"):
                scores.acknowledgements += 1
                scores.echoed += says(reply, turn.value)
            elif turn.role == "small talk":
                scores.small_talk += 1
                scores.shaped += follows_a_shape(reply, turn.user, dialogue.language)
    for qa in dialogue.questions:
        if reset:
            chat.reset()
        reply = chat.ask(qa.question)
        value = dialogue.facts[qa.kind]
        scores.recall.correct[qa.kind] += reply == qa.answer
        scores.recall.copied[qa.kind] += says(reply, value)
        scores.recall.casefolded[qa.kind] += says(reply.casefold(), value.casefold())
        if qa.kind in dialogue.previous:
            scores.updated += 1
            scores.new_value += scores.answered(reply, qa, value)
            scores.old_value += says(reply.casefold(), dialogue.previous[qa.kind].casefold())
    scores.recall.dialogues += 1


def evaluate(model_path: Path, count: int, *, language: str = "en", mode: Mode = "fed", reset: bool = False,
             updates: bool = False, seed: int = EVAL_SEED, values: Values = "listed") -> Scores:
    """Greedy scores on `count` held-out-filler dialogues in `language` asked the exact questions; with
    `updates`, every dialogue changes one fact after some small talk; `values` says where facts come from."""
    chat = GreedyChat.load(model_path)
    unseen = values == "unseen"
    rng = random.Random(f"{seed}-{language}-{'updates' if updates else 'facts'}{'-unseen' if unseen else ''}")
    draw = ValuePool.load(heldout=True).draw if unseen else None
    scores = Scores(copy=unseen)
    for _ in range(count):
        dialogue = corpus.make_dialogue(rng, heldout=True, exact_questions=True, language=language,
                                        update_rate=float(updates), values=draw, variants=unseen)
        converse(chat, dialogue, scores, mode=mode, reset=reset)
    return scores


def evaluate_recall(model_path: Path, count: int, *, reset: bool, seed: int = EVAL_SEED,
                    language: str = "en") -> Recall:
    """Greedy recall, context fed, on `count` dialogues without updates."""
    return evaluate(model_path, count, language=language, reset=reset, seed=seed).recall


def language_report(model_path: Path, count: int, language: str, values: Values = "listed") -> dict:
    """Every figure of one language and source of values (the README's quality tables)."""
    report = {}
    for mode in ("fed", "chat"):
        facts = evaluate(model_path, count, language=language, mode=mode, values=values)
        moved = evaluate(model_path, count, language=language, mode=mode, updates=True, values=values)
        report[mode] = {"facts": facts.as_dict(), "updates": moved.as_dict()}
    report["fed"]["facts_state_reset"] = evaluate(model_path, count, language=language, reset=True,
                                                  values=values).as_dict()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellstream evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="exported .onnx model")
    parser.add_argument("--dialogues", type=int, default=300, help="per language and measure")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        print(f"cellstream evaluate: error: model not found: {args.model}", file=sys.stderr)
        return 2
    report = {
        "dialogues": args.dialogues,
        "filler": "held-out",
        "decoding": "greedy, replies fed back",
        "modes": {"fed": "context fed as written, then the questions",
                  "chat": "every bot line generated by the model and fed back, one turn at a time"},
        "languages": {language: language_report(args.model, args.dialogues, language) for language in LANGUAGES},
        "unseen": {
            "values": "names, cities and jobs held out of training (model.values), as people type them",
            "scoring": "an answer counts when it contains the value exactly as typed; recall_casefolded beside it",
            "languages": {language: language_report(args.model, args.dialogues, language, "unseen")
                          for language in LANGUAGES},
        },
    }
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

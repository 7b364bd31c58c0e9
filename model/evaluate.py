"""Recall of the memory dialogues by an exported model, with greedy decoding under onnxruntime.

The context is fed, then each question; the bot's reply is decoded greedily and its own tokens are
fed back into the state, as a chat front end would. `reset` zeroes the state just before each
question: a model that truly keeps facts in its state must then fail.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model import corpus, tokenizer

EVAL_SEED = 20_261_125
MAX_REPLY_TOKENS = 48
NEWLINE = ord("\n")


@dataclass
class Recall:
    dialogues: int = 0
    correct: dict[str, int] = field(default_factory=lambda: {"name": 0, "city": 0, "job": 0})

    def rate(self, kind: str) -> float:
        return self.correct[kind] / max(1, self.dialogues)

    def overall(self) -> float:
        return sum(self.correct.values()) / max(1, 3 * self.dialogues)

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(self.rate(k), 4) for k in self.correct}, "overall": round(self.overall(), 4)}


class GreedyChat:
    """One conversation's state over an ONNX session, fed and decoded one turn at a time."""

    def __init__(self, session: ort.InferenceSession, num_layers: int, hidden_size: int) -> None:
        self.session = session
        self.shape = (num_layers, 1, hidden_size)
        self.reset()

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


def evaluate_recall(model_path: Path, count: int, *, reset: bool, seed: int = EVAL_SEED) -> Recall:
    """Greedy recall on `count` held-out-filler dialogues asked the exact questions."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    chat = GreedyChat(session, int(meta["cellstream.num_layers"]), int(meta["cellstream.hidden_size"]))
    rng = random.Random(seed)
    recall = Recall()
    for _ in range(count):
        dialogue = corpus.make_dialogue(rng, heldout=True, exact_questions=True)
        chat.reset()
        chat.feed(tokenizer.encode(dialogue.context))
        for qa in dialogue.questions:
            if reset:
                chat.reset()
            chat.feed(tokenizer.encode(f"user: {qa.question}\nbot: "))
            recall.correct[qa.kind] += chat.reply() == qa.answer
        recall.dialogues += 1
    return recall


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellstream evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="exported .onnx model")
    parser.add_argument("--dialogues", type=int, default=300)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        print(f"cellstream evaluate: error: model not found: {args.model}", file=sys.stderr)
        return 2
    report = {
        "dialogues": args.dialogues,
        "filler": "held-out",
        "decoding": "greedy, replies fed back",
        "recall_with_state": evaluate_recall(args.model, args.dialogues, reset=False).as_dict(),
        "recall_state_reset_before_question": evaluate_recall(args.model, args.dialogues, reset=True).as_dict(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

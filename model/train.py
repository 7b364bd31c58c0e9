"""Train the LSTM language model: `cellstream train` or `python -m cellstream.model.train`.

Truncated BPTT: a batch is cut into windows of `--bptt` steps; the state (h, c) flows from one window
to the next (detached), so dialogues and text streams longer than a window keep their memory.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from cellstream.model import corpus, tokenizer
from cellstream.model.batches import Batch, LossWeights, dialogue_batches, encode_dialogue, pad_batch, text_batches
from cellstream.model.network import LSTMLanguageModel, ModelConfig
from cellstream.model.probe import FactProbe

EVAL_SEED_OFFSET = 1_000_003  # evaluation dialogues never share a seed with training ones


def _bounded(cast: type, what: str, minimum: float, *, strict: bool = False, maximum: float = math.inf
             ) -> Callable[[str], float]:
    """An argparse type: `cast` the text and keep it within bounds, or explain what was expected."""

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        low_ok = value > minimum if strict else value >= minimum
        if not (low_ok and value <= maximum and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _bounded(int, "a positive integer", 1)
_non_negative_int = _bounded(int, "an integer >= 0", 0)
_positive_float = _bounded(float, "a positive finite number", 0.0, strict=True)
_non_negative_float = _bounded(float, "a finite number >= 0", 0.0)
_probability = _bounded(float, "a probability in [0, 1]", 0.0, maximum=1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellstream train", description="Train the byte-level LSTM language model."
    )
    parser.add_argument("--corpus", type=Path, help="plain UTF-8 text file (default: synthetic dialogues)")
    parser.add_argument("--out", type=Path, default=Path("runs/model.pt"), help="final checkpoint path")
    parser.add_argument("--resume", type=Path, help="checkpoint to continue training from")
    parser.add_argument("--steps", type=_positive_int, default=4500, help="optimiser steps in total")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="sequences per batch")
    parser.add_argument("--bptt", type=_positive_int, default=1024, help="truncated-BPTT window (steps)")
    parser.add_argument("--lr", type=_positive_float, default=1e-2, help="Adam peak learning rate (one-cycle)")
    parser.add_argument("--clip", type=_positive_float, default=1.0, help="gradient-norm clip")
    parser.add_argument("--head-weight-decay", type=_non_negative_float, default=0.0,
                        help="decoupled weight decay on the head's weights (AdamW); smaller head weights "
                             "amplify float32 rounding in h less, which the export's parity check measures")
    parser.add_argument("--answer-weight", type=_positive_float, default=10.0,
                        help="loss weight of the bytes where the bot says a stated fact back")
    parser.add_argument("--user-weight", type=_non_negative_float, default=0.1,
                        help="loss weight of the user's lines (the bot never writes them)")
    parser.add_argument("--fact-weight", type=_non_negative_float, default=2.0,
                        help="weight of the fact probe's loss (model/probe.py; 0: off)")
    parser.add_argument("--quiz-rate", type=_probability, default=1.0,
                        help="chance of a recall question after each small-talk turn (training dialogues)")
    parser.add_argument("--update-rate", type=_probability, default=0.5,
                        help="chance that a training dialogue changes one fact after some small talk")
    parser.add_argument("--french-rate", type=_probability, default=0.5,
                        help="share of training dialogues in French")
    parser.add_argument("--curriculum-steps", type=_non_negative_int, default=500,
                        help="steps over which the most filler turns grows from 0 to 8 (0: always 8)")
    parser.add_argument("--embed-dim", type=_positive_int, default=64)
    parser.add_argument("--hidden-size", type=_positive_int, default=128)
    parser.add_argument("--layers", type=_positive_int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=_positive_int, default=2, help="torch intra-op threads")
    parser.add_argument("--eval-every", type=_positive_int, default=250, help="steps between evaluations")
    parser.add_argument("--eval-dialogues", type=_positive_int, default=64)
    parser.add_argument("--checkpoint-every", type=_positive_int, default=100)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


@dataclass
class Evaluation:
    loss: float
    answer_accuracy: float | None  # teacher-forced exact answers; synthetic corpus only
    probe_accuracy: float | None = None  # facts named from the state at every byte after they are stated


def describe_corpus(args: argparse.Namespace) -> str:
    if args.corpus is None:
        return (f"synthetic memory dialogues (seed {args.seed}, filler 1-8 turns, "
                f"curriculum over {args.curriculum_steps} steps, quiz rate {args.quiz_rate}, "
                f"update rate {args.update_rate}, French {args.french_rate}, fact probe weight {args.fact_weight})")
    return f"text file {args.corpus.name}"


def run_batch(
    model: LSTMLanguageModel, batch: Batch, state: tuple[torch.Tensor, torch.Tensor], bptt: int
) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], slice]]:
    """Yield (top-layer h per step, state after the window, window) per BPTT window; the head turns
    that h into logits. The caller owns backward()."""
    h, c = state
    for start in range(0, batch.inputs.shape[1], bptt):
        window = slice(start, start + bptt)
        hidden, h, c = model.hidden_states(batch.inputs[:, window], h, c)
        yield hidden, (h, c), window
        h, c = h.detach(), c.detach()


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * weights.flatten()).sum() / weights.sum().clamp(min=1.0)


@torch.no_grad()
def evaluate_dialogues(model: LSTMLanguageModel, probe: FactProbe, seed: int, count: int) -> Evaluation:
    """Held-out-filler dialogues, half of them French, half with an update: mean loss, how often every
    answer byte is predicted exactly, and how often the probe names the stated facts from the state."""
    rng = random.Random(seed + EVAL_SEED_OFFSET)
    dialogues = [corpus.make_dialogue(rng, heldout=True, exact_questions=True, language=("en", "fr")[k % 2],
                                      update_rate=float(k % 4 >= 2))
                 for k in range(count)]
    batch = pad_batch([encode_dialogue(d, LossWeights()) for d in dialogues])
    hidden, _, _ = model.hidden_states(batch.inputs, *model.zero_state(len(dialogues)))
    logits = model.head(hidden)
    loss = weighted_loss(logits, batch.targets, batch.weights).item()
    predicted = logits.argmax(-1)
    correct = total = 0
    for row, dialogue in enumerate(dialogues):
        text = dialogue.text.encode("utf-8")
        for qa in dialogue.questions:
            answer = f"bot: {qa.answer}\n".encode()
            start = text.index(answer, len(dialogue.context)) + len(b"bot: ")
            end = start + len(qa.answer)
            # Target k is predicted at input position k - 1.
            correct += bool((predicted[row, start - 1 : end - 1] == batch.targets[row, start - 1 : end - 1]).all())
            total += 1
    assert batch.facts is not None
    return Evaluation(loss=loss, answer_accuracy=correct / total, probe_accuracy=probe.accuracy(hidden, batch.facts))


@torch.no_grad()
def evaluate_text(model: LSTMLanguageModel, text: str, bptt: int) -> Evaluation:
    batch = next(text_batches(text, 1, bptt * 4))
    logits, _, _ = model(batch.inputs, *model.zero_state(1))
    return Evaluation(loss=weighted_loss(logits, batch.targets, batch.weights).item(), answer_accuracy=None)


def save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def train(args: argparse.Namespace) -> dict:
    """Run training as configured; returns the final checkpoint payload (also written to --out)."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    config = ModelConfig(embed_dim=args.embed_dim, hidden_size=args.hidden_size, num_layers=args.layers)
    text = corpus.read_text_corpus(args.corpus) if args.corpus else None
    if text is not None:
        train_text, eval_text = text[: int(len(text) * 0.95)] or text, text[int(len(text) * 0.95) :] or text
    model = LSTMLanguageModel(config)
    probe = FactProbe(config.hidden_size)
    others = [p for name, p in model.named_parameters() if name != "head.weight"]
    optimizer = torch.optim.AdamW(
        [{"params": [model.head.weight], "weight_decay": args.head_weight_decay},
         {"params": [*others, *probe.parameters()], "weight_decay": 0.0}],
        lr=args.lr,
    )
    start_step = 0
    if args.resume:
        checkpoint = torch.load(args.resume, weights_only=False)
        if checkpoint["config"] != asdict(config):
            raise ValueError(f"--resume checkpoint has model config {checkpoint['config']}, not {asdict(config)}")
        model.load_state_dict(checkpoint["model"])
        probe.load_state_dict(checkpoint["probe"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_step = checkpoint["step"]
        if start_step >= args.steps:
            raise ValueError(f"--resume checkpoint is already at step {start_step}, --steps must exceed it")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.steps + 1, pct_start=0.05, last_epoch=start_step - 1
    )
    # Resuming restarts the batch stream from a seed derived from the step: deterministic, never a replay.
    if text is None:
        weights = LossWeights(value=args.answer_weight, user=args.user_weight)
        batches = dialogue_batches(args.seed + start_step, args.batch_size, weights,
                                   first_batch=start_step, ramp_batches=args.curriculum_steps,
                                   quiz_rate=args.quiz_rate, update_rate=args.update_rate,
                                   french_rate=args.french_rate)
    else:
        batches = text_batches(train_text, args.batch_size, args.bptt)
    state = model.zero_state(args.batch_size)
    history: list[dict] = []
    evaluation = None
    started = time.monotonic()
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=args.quiet)
    for step in bar:
        model.train()
        batch = next(batches)
        if not batch.carry_state or state[0].shape[1] != batch.inputs.shape[0]:
            state = model.zero_state(batch.inputs.shape[0])
        optimizer.zero_grad()
        total_loss = 0.0
        for hidden, window_state, window in run_batch(model, batch, state, args.bptt):
            loss = weighted_loss(model.head(hidden), batch.targets[:, window], batch.weights[:, window])
            if batch.facts is not None and args.fact_weight > 0:
                loss = loss + args.fact_weight * probe.loss(hidden, batch.facts[:, window])
            loss.backward()
            total_loss += loss.item()
            carried = window_state
        state = (carried[0].detach(), carried[1].detach())
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *probe.parameters()], args.clip)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{total_loss:.3f}")
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            model.eval()
            if text is None:
                evaluation = evaluate_dialogues(model, probe, args.seed, args.eval_dialogues)
            else:
                evaluation = evaluate_text(model, eval_text, args.bptt)
            history.append({"step": done, "seconds": round(time.monotonic() - started, 1), **asdict(evaluation)})
            bar.write(json.dumps(history[-1]))
        if done % args.checkpoint_every == 0 or done == args.steps:
            payload = {
                "model": model.state_dict(),
                "probe": probe.state_dict(),
                "optimizer": optimizer.state_dict(),
                "config": asdict(config),
                "step": done,
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "corpus": describe_corpus(args),
                "seed": args.seed,
                "history": history,
                "tokenizer": {"kind": tokenizer.KIND, "special_tokens": tokenizer.SPECIAL_TOKENS},
            }
            save_checkpoint(args.out, payload)
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (corpus.CorpusError, ValueError, FileNotFoundError) as exc:
        print(f"cellstream train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

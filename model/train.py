"""Train the LSTM language model: `cellstream train` or `python -m cellstream.model.train`.

On the synthetic dialogues (the default), training follows the curriculum of `model.curriculum` and adds
the spelling probe's loss (`model.probe`); facts are values as users type them (`model.values`), and
every evaluation uses values held out of training. A run is resumable: started again with the same
`--out`, it continues from that checkpoint (weights, optimiser, curriculum stage and the data stream's
random state) and says so. A resumed run is deterministic, but not bit for bit the run it interrupted: the
data stream draws a few batches ahead of the checkpoint, and continues after them.

On a user's text file (`--corpus`), truncated BPTT: a batch is cut into windows of `--bptt` steps and
the state (h, c) flows from one window to the next (detached), so streams longer than a window keep
their memory.
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
from cellstream.model.batches import (
    Batch,
    LossWeights,
    dialogue_batches,
    encode_dialogue,
    pad_batch,
    random_cuts,
    text_batches,
)
from cellstream.model.curriculum import LAST_STAGE, SEVERAL_FACTS_STAGE, Curriculum
from cellstream.model.network import LSTMLanguageModel, ModelConfig
from cellstream.model.probe import SpellingProbe
from cellstream.model.values import MAX_VALUE_BYTES, ValuePool

EVAL_SEED_OFFSET = 1_000_003  # evaluation dialogues never share a seed with training ones
EVAL_CUTS = 16
LENGTH_BUCKET = 6  # bytes: echoes are also counted by value length, 1-6, 7-12, 13-18, 19-24


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
_stage = _bounded(int, f"a stage in 0..{LAST_STAGE}", 0, maximum=LAST_STAGE)
_value_bytes = _bounded(int, f"a length in 4..{MAX_VALUE_BYTES} bytes", 4, maximum=MAX_VALUE_BYTES)
_echo_facts = _bounded(int, "1, 2 or 3 facts", 1, maximum=3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellstream train", description="Train the byte-level LSTM language model."
    )
    parser.add_argument("--corpus", type=Path, help="plain UTF-8 text file (default: synthetic dialogues)")
    parser.add_argument("--out", type=Path, default=Path("runs/model.pt"),
                        help="checkpoint path; a run that stopped early continues from it")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint instead of --out's")
    parser.add_argument("--fresh", action="store_true", help="start from scratch even when --out exists")
    parser.add_argument("--steps", type=_positive_int, default=9000, help="optimiser steps in total")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="sequences per batch")
    parser.add_argument("--bptt", type=_positive_int, default=1024, help="truncated-BPTT window (text corpus)")
    parser.add_argument("--lr", type=_positive_float, default=1e-3,
                        help="Adam peak learning rate (linear warm-up, then cosine to --final-lr-ratio of it)")
    parser.add_argument("--warmup-steps", type=_non_negative_int, default=300)
    parser.add_argument("--final-lr-ratio", type=_probability, default=0.1)
    parser.add_argument("--clip", type=_positive_float, default=1.0, help="gradient-norm clip")
    parser.add_argument("--head-weight-decay", type=_non_negative_float, default=0.0,
                        help="decoupled weight decay on the head's weights (AdamW); smaller head weights "
                             "amplify float32 rounding in h less, which the export's parity check measures")
    parser.add_argument("--answer-weight", type=_positive_float, default=20.0,
                        help="loss weight of the bytes where the bot says a stated fact back (the copies)")
    parser.add_argument("--user-weight", type=_non_negative_float, default=0.1,
                        help="loss weight of the user's lines (the bot never writes them)")
    parser.add_argument("--probe-weight", type=_non_negative_float, default=1.0,
                        help="weight of the spelling probe's loss (model/probe.py; 0: off)")
    parser.add_argument("--probe-cuts", type=_positive_int, default=12,
                        help="points per batch where the probe reads the state")
    parser.add_argument("--quiz-rate", type=_probability, default=1.0,
                        help="chance of a recall question after each small-talk turn (training dialogues)")
    parser.add_argument("--update-rate", type=_probability, default=0.5,
                        help="chance that a training dialogue changes one fact after some small talk")
    parser.add_argument("--french-rate", type=_probability, default=0.5,
                        help="share of training dialogues in French")
    parser.add_argument("--listed-rate", type=_probability, default=0.15,
                        help="share of training dialogues whose facts come from the fixed lists")
    parser.add_argument("--advance-at", type=_probability, default=0.7,
                        help="held-out exactness (echo at stage 0, answers after) that moves the curriculum on")
    parser.add_argument("--first-stage", type=_stage, default=0, help="curriculum stage to start at")
    parser.add_argument("--echo-facts", type=_echo_facts, default=3,
                        help="facts, each acknowledged, in a training dialogue of stage 0 (1 to this many)")
    parser.add_argument("--value-bytes-from", type=_value_bytes, default=6,
                        help="longest training value at the first step, in bytes; it grows by one byte every "
                             f"--value-bytes-every steps up to {MAX_VALUE_BYTES} (evaluation values are never capped)")
    parser.add_argument("--value-bytes-every", type=_non_negative_int, default=300,
                        help=f"steps per byte of growth of the training values' cap (0: no cap, {MAX_VALUE_BYTES} "
                             "bytes from the start)")
    parser.add_argument("--last-stage-by", type=_probability, default=0.6,
                        help="share of --steps by which the curriculum reaches its last stage, mastered or not "
                             f"(stage s by s/{LAST_STAGE} of it)")
    parser.add_argument("--several-facts-by", type=_probability,
                        help=f"share of --steps by which the curriculum reaches stage {SEVERAL_FACTS_STAGE} "
                             "(several facts), mastered or not; stage 1 (one fact) by half of it, later stages then "
                             "evenly up to --last-stage-by (default: every stage evenly)")
    parser.add_argument("--embed-dim", type=_positive_int, default=64)
    parser.add_argument("--hidden-size", type=_positive_int, default=256)
    parser.add_argument("--layers", type=_positive_int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=_positive_int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when torch sees a GPU), 'cpu', 'cuda'")
    parser.add_argument("--eval-every", type=_positive_int, default=250, help="steps between evaluations")
    parser.add_argument("--eval-dialogues", type=_positive_int, default=64)
    parser.add_argument("--checkpoint-every", type=_positive_int, default=100)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


@dataclass
class Evaluation:
    loss: float
    answer_accuracy: float | None  # teacher-forced exact answers, all eight turns of small talk at most
    stage_answer_accuracy: float | None = None  # the same at the curriculum's current stage
    echo_accuracy: float | None = None  # acknowledgements that say the value back, byte for byte
    echo_by_length: dict[str, float] | None = None  # the same by the value's length in bytes ("1-6": ...)
    probe_accuracy: float | None = None  # bytes of the stated facts spelt from the state
    stage: int | None = None


def describe_corpus(args: argparse.Namespace) -> str:
    if args.corpus is None:
        return (f"synthetic memory dialogues (seed {args.seed}, curriculum from stage {args.first_stage} to "
                f"{LAST_STAGE}, advancing at {args.advance_at}, quiz rate {args.quiz_rate}, update rate "
                f"{args.update_rate}, French {args.french_rate}, listed values {args.listed_rate}, other values "
                f"from model.values' training half, {value_cap(args)}, up to {args.echo_facts} facts a dialogue "
                f"at stage 0, {stage_deadlines(args)}, spelling probe weight {args.probe_weight})")
    return f"text file {args.corpus.name}"


def stage_deadlines(args: argparse.Namespace) -> str:
    last = f"the last stage by {args.last_stage_by:.0%} of the steps"
    if args.several_facts_by is None:
        return last
    return f"stage {SEVERAL_FACTS_STAGE} by {args.several_facts_by:.0%} of the steps and {last}"


def value_cap(args: argparse.Namespace) -> str:
    if not args.value_bytes_every:
        return f"values up to {MAX_VALUE_BYTES} bytes"
    return (f"values up to {args.value_bytes_from} bytes at first, one more every {args.value_bytes_every} steps "
            f"up to {MAX_VALUE_BYTES}")


def max_value_bytes(args: argparse.Namespace, step: int) -> int:
    """The cap on training values' length at `step`: short values are copied long before long ones."""
    if not args.value_bytes_every:
        return MAX_VALUE_BYTES
    return min(MAX_VALUE_BYTES, args.value_bytes_from + step // args.value_bytes_every)


def run_batch(
    model: LSTMLanguageModel, batch: Batch, state: tuple[torch.Tensor, torch.Tensor], bptt: int
) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], slice]]:
    """Yield (top-layer h per step, state after the window, window) per BPTT window; the head turns
    that h into logits. The caller owns backward()."""
    h, c = state
    for start in range(0, batch.inputs.shape[1], bptt):
        window = slice(start, start + bptt)
        hidden, h, c = model.hidden_states(batch.inputs[:, window].to(h.device), h, c)
        yield hidden, (h, c), window
        h, c = h.detach(), c.detach()


def states_at_cuts(model: LSTMLanguageModel, inputs: torch.Tensor, cuts: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top layer's h at every step (B, T, H), and [h; c] of every layer after each cut (B, cuts, 2LH):
    the sequence runs in pieces between the cuts, which gives the same result as one run."""
    batch = inputs.shape[0]
    h, c = model.zero_state(batch)
    hidden, states, start = [], [], 0
    for cut in [*cuts, inputs.shape[1]]:
        if cut > start:
            out, h, c = model.hidden_states(inputs[:, start:cut], h, c)
            hidden.append(out)
            start = cut
        if len(states) < len(cuts):
            states.append(torch.cat([h.transpose(0, 1).reshape(batch, -1), c.transpose(0, 1).reshape(batch, -1)], -1))
    return torch.cat(hidden, 1), torch.stack(states, 1) if states else inputs.new_zeros((batch, 0, 0)).float()


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * weights.flatten()).sum() / weights.sum().clamp(min=1.0)


def _spans(dialogue: corpus.Dialogue) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Byte spans (start, end) in the dialogue's text of each value an acknowledgement says back, and of
    each answer line after `bot: `."""
    echoes, answers, offset = [], [], 0
    for turn in dialogue.turns:
        text = turn.text.encode("utf-8")
        if turn.role in ("fact", "update"):
            bot = corpus.line("bot", turn.bot).encode("utf-8")
            value = turn.value.encode("utf-8")
            start = offset + text.rindex(bot) + len(b"bot: ") + turn.bot.encode("utf-8").find(value)
            echoes.append((start, start + len(value)))
        offset += len(text)
    for qa in dialogue.questions:
        start = offset + len(corpus.line("user", qa.question).encode("utf-8")) + len(b"bot: ")
        answers.append((start, start + len(qa.answer.encode("utf-8"))))
        offset += len((corpus.line("user", qa.question) + corpus.line("bot", qa.answer)).encode("utf-8"))
    return echoes, answers


def _exact(predicted: torch.Tensor, targets: torch.Tensor, spans: list[tuple[int, int]]) -> list[bool]:
    # The byte at text offset k is predicted from input position k - 1.
    return [bool((predicted[start - 1 : end - 1] == targets[start - 1 : end - 1]).all()) for start, end in spans]


@torch.no_grad()
def evaluate_dialogues(model: LSTMLanguageModel, probe: SpellingProbe, seed: int, count: int,
                       curriculum: Curriculum, stage: int, values: corpus.ValueSource | None) -> Evaluation:
    """Held-out dialogues at `stage` (half French, half with an update where the stage has small talk), with
    held-out `values`: mean loss, how often every answer byte and every echoed value byte is predicted exactly
    (teacher-forced), and how often the probe spells the stated facts' bytes from the state."""
    rng = random.Random(seed + EVAL_SEED_OFFSET + stage)
    dialogues = [curriculum.at_stage(stage, rng, language=("en", "fr")[k % 2], values=values, heldout=True,
                                     update_rate=float(k % 4 >= 2)) for k in range(count)]
    device = next(model.parameters()).device
    rows = [encode_dialogue(d, LossWeights()) for d in dialogues]
    width = max(len(row.ids) for row in rows) - 1
    batch = pad_batch(rows, random_cuts(random.Random(seed), width, EVAL_CUTS))
    hidden, states = states_at_cuts(model, batch.inputs.to(device), batch.cuts)
    logits = model.head(hidden).cpu()
    predicted = logits.argmax(-1)
    echoed, answered, by_length = [], [], {}
    for row, dialogue in enumerate(dialogues):
        echoes, answers = _spans(dialogue)
        exact = _exact(predicted[row], batch.targets[row], echoes)
        echoed += exact
        answered += _exact(predicted[row], batch.targets[row], answers)
        for (start, end), right in zip(echoes, exact, strict=True):
            bucket = (end - start - 1) // LENGTH_BUCKET
            by_length.setdefault(bucket, []).append(right)
    assert batch.spelling is not None
    return Evaluation(loss=weighted_loss(logits, batch.targets, batch.weights).item(),
                      answer_accuracy=sum(answered) / len(answered) if answered else None,
                      echo_accuracy=sum(echoed) / len(echoed) if echoed else None,
                      echo_by_length={f"{LENGTH_BUCKET * b + 1}-{LENGTH_BUCKET * (b + 1)}": round(sum(r) / len(r), 4)
                                      for b, r in sorted(by_length.items())} or None,
                      probe_accuracy=probe.accuracy(states.cpu(), batch.spelling), stage=stage)


def evaluate_curriculum(model: LSTMLanguageModel, probe: SpellingProbe, args: argparse.Namespace,
                        curriculum: Curriculum, heldout: ValuePool) -> Evaluation:
    """At the last stage (the figure of the curve), and at the current one when it is earlier (what the
    curriculum advances on)."""
    full = evaluate_dialogues(model, probe, args.seed, args.eval_dialogues, curriculum, LAST_STAGE, heldout.draw)
    current = full if curriculum.stage == LAST_STAGE else evaluate_dialogues(
        model, probe, args.seed, args.eval_dialogues, curriculum, curriculum.stage, heldout.draw)
    full.stage = curriculum.stage
    full.stage_answer_accuracy = current.answer_accuracy
    if curriculum.stage == 0:
        full.echo_accuracy, full.echo_by_length = current.echo_accuracy, current.echo_by_length
    return full


@torch.no_grad()
def evaluate_text(model: LSTMLanguageModel, text: str, bptt: int) -> Evaluation:
    batch = next(text_batches(text, 1, bptt * 4))
    device = next(model.parameters()).device
    logits, _, _ = model(batch.inputs.to(device), *model.zero_state(1))
    return Evaluation(loss=weighted_loss(logits.cpu(), batch.targets, batch.weights).item(), answer_accuracy=None)


def save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """Linear warm-up to --lr, then a cosine down to --final-lr-ratio of it at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - 1 - args.warmup_steps)
    return args.lr * (args.final_lr_ratio + (1 - args.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def scheduled_stage(args: argparse.Namespace, step: int) -> int:
    """The stage the curriculum must have reached by `step`: however slow mastery is, the run ends on
    whole dialogues (what it is evaluated on) for the last 1 - --last-stage-by of its steps. With
    --several-facts-by, the echo and the one-fact stage get that share of the steps (recall of one unseen
    value took a 2x128 model ~3,000 steps after it echoed), the later stages the rest up to the deadline."""
    deadline = args.last_stage_by * args.steps
    if step >= deadline:
        return LAST_STAGE
    if args.several_facts_by is None:
        return int(LAST_STAGE * step / deadline)
    early = args.several_facts_by * args.steps
    if step < early:
        return int(SEVERAL_FACTS_STAGE * step / early)
    return SEVERAL_FACTS_STAGE + int((LAST_STAGE - SEVERAL_FACTS_STAGE) * (step - early) / (deadline - early))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


def _starting_point(args: argparse.Namespace) -> dict | None:
    """The checkpoint to continue from (--resume, else --out when it exists), or None to start afresh."""
    if args.resume:
        return torch.load(args.resume, map_location="cpu", weights_only=False)
    if args.out.is_file() and not args.fresh:
        return torch.load(args.out, map_location="cpu", weights_only=False)
    return None


def train(args: argparse.Namespace) -> dict:
    """Run training as configured; returns the final checkpoint payload (also written to --out)."""
    if args.several_facts_by is not None and args.several_facts_by > args.last_stage_by:
        raise ValueError(f"--several-facts-by {args.several_facts_by} comes after --last-stage-by "
                         f"{args.last_stage_by}: stage {SEVERAL_FACTS_STAGE} must be reached before the last one")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    config = ModelConfig(embed_dim=args.embed_dim, hidden_size=args.hidden_size, num_layers=args.layers)
    text = corpus.read_text_corpus(args.corpus) if args.corpus else None
    if text is not None:
        train_text, eval_text = text[: int(len(text) * 0.95)] or text, text[int(len(text) * 0.95) :] or text
    model = LSTMLanguageModel(config).to(device)
    probe = SpellingProbe(2 * config.num_layers * config.hidden_size).to(device)
    others = [p for name, p in model.named_parameters() if name != "head.weight"]
    optimizer = torch.optim.AdamW(
        [{"params": [model.head.weight], "weight_decay": args.head_weight_decay},
         {"params": [*others, *probe.parameters()], "weight_decay": 0.0}],
        lr=args.lr,
    )
    training, heldout = ValuePool.load(heldout=False), ValuePool.load(heldout=True)
    curriculum = Curriculum(training.draw, french_rate=args.french_rate, update_rate=args.update_rate,
                            quiz_rate=args.quiz_rate, listed_rate=args.listed_rate, stage=args.first_stage,
                            echo_facts=args.echo_facts)
    data_rng = random.Random(args.seed)
    start_step, history, started_before = 0, [], 0.0
    checkpoint = _starting_point(args)
    if checkpoint is not None:
        where = args.resume or args.out
        if checkpoint["config"] != asdict(config):
            raise ValueError(f"{where} holds a run of model config {checkpoint['config']}, not {asdict(config)}: "
                             f"pass another --out, or --fresh to start over")
        start_step = checkpoint["step"]
        if start_step >= args.steps:
            if args.resume:
                raise ValueError(f"--resume checkpoint is already at step {start_step}, --steps must exceed it")
            print(f"cellstream train: {where} is already trained ({start_step} of {args.steps} steps); "
                  f"--fresh starts over", file=sys.stderr)
            return checkpoint
        model.load_state_dict(checkpoint["model"])
        probe.load_state_dict(checkpoint["probe"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history = checkpoint.get("history", [])
        started_before = history[-1]["seconds"] if history else 0.0
        curriculum.stage = checkpoint.get("stage", args.first_stage)
        if "data_rng" in checkpoint:
            data_rng.setstate(checkpoint["data_rng"])
            torch.set_rng_state(checkpoint["torch_rng"])
        print(f"cellstream train: resuming from {where} at step {start_step} of {args.steps} "
              f"(curriculum stage {curriculum.stage})", file=sys.stderr)
    if text is None:
        weights = LossWeights(value=args.answer_weight, user=args.user_weight)
        batches = dialogue_batches(args.seed, args.batch_size, weights, curriculum,
                                   cuts=args.probe_cuts if args.probe_weight > 0 else 0, bucket=8, rng=data_rng)
    else:
        batches = text_batches(train_text, args.batch_size, args.bptt)
    state = model.zero_state(args.batch_size)
    started = time.monotonic() - started_before
    payload: dict = {}
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=args.quiet)
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        curriculum.stage = max(curriculum.stage, scheduled_stage(args, step))
        curriculum.max_value_bytes = max_value_bytes(args, step)
        batch = next(batches)
        optimizer.zero_grad()
        total_loss = 0.0
        if text is None:
            hidden, states = states_at_cuts(model, batch.inputs.to(device), batch.cuts)
            loss = weighted_loss(model.head(hidden), batch.targets.to(device), batch.weights.to(device))
            if batch.spelling is not None:
                loss = loss + args.probe_weight * probe.loss(states, batch.spelling.to(device))
            loss.backward()
            total_loss = loss.item()
        else:
            if not batch.carry_state or state[0].shape[1] != batch.inputs.shape[0]:
                state = model.zero_state(batch.inputs.shape[0])
            for hidden, window_state, window in run_batch(model, batch, state, args.bptt):
                loss = weighted_loss(model.head(hidden), batch.targets[:, window].to(device),
                                     batch.weights[:, window].to(device))
                loss.backward()
                total_loss += loss.item()
                carried = window_state
            state = (carried[0].detach(), carried[1].detach())
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *probe.parameters()], args.clip)
        optimizer.step()
        bar.set_postfix(loss=f"{total_loss:.3f}", stage=curriculum.stage)
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            model.eval()
            if text is None:
                evaluation = evaluate_curriculum(model, probe, args, curriculum, heldout)
                mastery = evaluation.echo_accuracy if curriculum.stage == 0 else evaluation.stage_answer_accuracy
                if mastery is not None and mastery >= args.advance_at:
                    curriculum.advance()
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
                "stage": curriculum.stage,
                "data_rng": data_rng.getstate(),
                "torch_rng": torch.get_rng_state(),
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

"""Training batches: token ids, next-token targets and per-target loss weights as tensors.

Dialogue batches hold whole dialogues (each starts from zero state), padded and bucketed by length;
text batches hold contiguous streams of a user's corpus whose state carries from batch to batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model import corpus, tokenizer


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64
    weights: torch.Tensor  # (B, L) float32, 0 where the target is padding
    carry_state: bool  # True when each row continues the previous batch's row


def dialogue_weights(dialogue: corpus.Dialogue, answer_weight: float) -> list[float]:
    """Loss weight of each byte of the dialogue as a target: `answer_weight` on the bot lines that
    answer a question (the only bytes that need the remembered facts), 1 elsewhere."""
    weights: list[float] = []
    for text_line in dialogue.text.splitlines(keepends=True):
        answers = text_line.startswith("bot: ") and corpus.is_answer(text_line[len("bot: ") :])
        weights += [answer_weight if answers else 1.0] * len(text_line.encode("utf-8"))
    return weights


def encode_dialogue(dialogue: corpus.Dialogue, answer_weight: float) -> tuple[list[int], list[float]]:
    """Ids of a dialogue followed by EOS, and the weight of predicting each id."""
    ids = tokenizer.encode(dialogue.text, eos=True)
    return ids, [*dialogue_weights(dialogue, answer_weight), 1.0]


def pad_batch(rows: list[tuple[list[int], list[float]]]) -> Batch:
    """Right-pad rows of (ids, weights) into a batch; the first id of each row is only an input."""
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), tokenizer.PAD, dtype=torch.long)
    targets = torch.full((len(rows), width), tokenizer.PAD, dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    for row, (ids, row_weights) in enumerate(rows):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor(ids[1:])
        weights[row, :n] = torch.tensor(row_weights[1:])
    return Batch(inputs, targets, weights, carry_state=False)


def curriculum_max_filler(batch_index: int, ramp_batches: int) -> int:
    """Most filler turns at a point of training: 2 at first, growing to 8 by `ramp_batches`.

    Short gaps between a fact and its question teach the model to store facts in its cell state
    quickly; the forget gates it learns then carry them across the longer gaps.
    """
    if ramp_batches <= 0 or batch_index >= ramp_batches:
        return 8
    return 2 + (6 * batch_index) // ramp_batches


def dialogue_batches(
    seed: int, batch_size: int, answer_weight: float, *, first_batch: int = 0, ramp_batches: int = 0,
    quiz_rate: float = 0.0, bucket: int = 16,
) -> Iterator[Batch]:
    """Endless batches of training dialogues; `bucket` batches at a time are sorted by length."""
    rng = random.Random(seed)
    index = first_batch
    while True:
        max_filler = curriculum_max_filler(index, ramp_batches)
        index += bucket
        rows = [
            encode_dialogue(corpus.make_dialogue(rng, max_filler=max_filler, quiz_rate=quiz_rate), answer_weight)
            for _ in range(batch_size * bucket)
        ]
        rows.sort(key=lambda r: len(r[0]))
        groups = [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            yield pad_batch(group)


def text_batches(text: str, batch_size: int, window: int) -> Iterator[Batch]:
    """Endless batches of `window` steps over `batch_size` contiguous streams of `text`."""
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    rows = max(1, min(batch_size, (len(ids) - 1) // (window + 1)))
    stream_length = (len(ids) - 1) // rows
    if stream_length < 2:
        raise corpus.CorpusError(f"corpus too short to train on: {len(ids)} bytes")
    streams = ids[: rows * stream_length + 1]
    inputs_all = streams[:-1].view(rows, stream_length)
    targets_all = streams[1:].view(rows, stream_length)
    while True:
        for start in range(0, stream_length, window):
            inputs = inputs_all[:, start : start + window]
            yield Batch(inputs, targets_all[:, start : start + window], torch.ones(inputs.shape), start > 0)

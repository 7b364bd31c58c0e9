"""Training batches: token ids, next-token targets, per-target loss weights and spelling targets as tensors.

Dialogue batches hold whole dialogues (each starts from zero state), padded and bucketed by length, at
the curriculum's current stage; text batches hold contiguous streams of a user's corpus whose state
carries from batch to batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from cellstream.model import corpus, tokenizer
from cellstream.model.curriculum import Curriculum
from cellstream.model.languages import KINDS
from cellstream.model.values import MAX_VALUE_BYTES

IGNORE = -100  # spelling target where there is nothing to spell (cross_entropy's ignore_index)
END = tokenizer.BYTE_VOCAB  # spelling target just past a value's last byte
SLOTS = MAX_VALUE_BYTES + 1  # a value's bytes, then END
SPELLING_CLASSES = END + 1


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64
    weights: torch.Tensor  # (B, L) float32, 0 where the target is padding
    carry_state: bool  # True when each row continues the previous batch's row
    cuts: tuple[int, ...] = ()  # input lengths after which the state is read for the spelling probe
    spelling: torch.Tensor | None = None  # (B, cuts, kinds, SLOTS) int64: each fact's latest value's bytes


@dataclass(frozen=True)
class Row:
    """One sequence to train on: ids, the weight of predicting each, and the facts stated in it."""

    ids: list[int]
    weights: list[float]
    statements: tuple[corpus.Statement, ...] = ()


@dataclass(frozen=True)
class LossWeights:
    """How much each kind of target byte counts: a fact's value where the bot says it back (the bytes
    that need memory), the user's lines (the bot never writes them), everything else 1."""

    value: float = 1.0
    user: float = 1.0


def dialogue_weights(dialogue: corpus.Dialogue, weights: LossWeights) -> list[float]:
    """Loss weight of each byte of the dialogue as a target."""
    values = {statement.value.encode("utf-8") for statement in dialogue.statements}
    out: list[float] = []
    for text_line in dialogue.text.splitlines(keepends=True):
        encoded = text_line.encode("utf-8")
        if text_line.startswith("user: "):
            out += [weights.user] * len(encoded)
            continue
        line_weights = [1.0] * len(encoded)
        for value in values:
            start = encoded.find(value, len(b"bot: "))
            if start >= 0:
                line_weights[start : start + len(value)] = [weights.value] * len(value)
        out += line_weights
    return out


def spelling_targets(statements: Sequence[corpus.Statement], cuts: Sequence[int], length: int) -> torch.Tensor:
    """(cuts, kinds, SLOTS): after reading the first `cut` bytes, each fact's latest stated value, byte by
    byte, then END; IGNORE for facts not stated yet, for slots past END and for cuts past `length`."""
    out = torch.full((len(cuts), len(KINDS), SLOTS), IGNORE, dtype=torch.long)
    for j, cut in enumerate(cuts):
        if cut > length:
            continue
        for statement in statements:  # in order: an update replaces the value from its own end on
            if statement.end <= cut:
                value = list(statement.value.encode("utf-8"))
                row = out[j, KINDS.index(statement.kind)]
                row[:] = IGNORE
                row[: len(value)] = torch.tensor(value)
                row[len(value)] = END
    return out


def encode_dialogue(dialogue: corpus.Dialogue, weights: LossWeights) -> Row:
    """Ids of a dialogue followed by EOS, the weight of predicting each id, and its statements."""
    ids = tokenizer.encode(dialogue.text, eos=True)
    return Row(ids, [*dialogue_weights(dialogue, weights), 1.0], dialogue.statements)


def pad_batch(rows: list[Row], cuts: Sequence[int] = ()) -> Batch:
    """Right-pad rows into a batch; the first id of each row is only an input. With `cuts`, the spelling
    targets of each row after each cut."""
    width = max(len(row.ids) for row in rows) - 1
    inputs = torch.full((len(rows), width), tokenizer.PAD, dtype=torch.long)
    targets = torch.full((len(rows), width), tokenizer.PAD, dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    for index, row in enumerate(rows):
        n = len(row.ids) - 1
        inputs[index, :n] = torch.tensor(row.ids[:-1])
        targets[index, :n] = torch.tensor(row.ids[1:])
        weights[index, :n] = torch.tensor(row.weights[1:])
    spelling = None
    if cuts:
        spelling = torch.stack([spelling_targets(row.statements, cuts, len(row.ids) - 1) for row in rows])
    return Batch(inputs, targets, weights, carry_state=False, cuts=tuple(cuts), spelling=spelling)


def random_cuts(rng: random.Random, width: int, count: int) -> list[int]:
    """`count` distinct input lengths in 1..width, sorted."""
    return sorted(rng.sample(range(1, width + 1), min(count, width)))


def dialogue_batches(
    seed: int, batch_size: int, weights: LossWeights, curriculum: Curriculum, *, cuts: int = 0,
    bucket: int = 16, rng: random.Random | None = None,
) -> Iterator[Batch]:
    """Endless batches of training dialogues at the curriculum's stage when each bucket is drawn;
    `bucket` batches at a time are sorted by length. Pass `rng` to continue a saved stream."""
    rng = rng or random.Random(seed)
    while True:
        rows = [encode_dialogue(curriculum.dialogue(rng), weights) for _ in range(batch_size * bucket)]
        rows.sort(key=lambda row: len(row.ids))
        groups = [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            width = max(len(row.ids) for row in group) - 1
            yield pad_batch(group, random_cuts(rng, width, cuts) if cuts else ())


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

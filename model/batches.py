"""Training batches: token ids, next-token targets and per-target loss weights as tensors.

Dialogue batches hold whole dialogues (each starts from zero state), padded and bucketed by length;
text batches hold contiguous streams of a user's corpus whose state carries from batch to batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cellstream.model import corpus, tokenizer
from cellstream.model.languages import CITIES, JOBS, JOBS_FR, NAMES

# What the probe names, per kind: the values of every language (French jobs after the English ones).
FACT_VALUES: dict[str, tuple[str, ...]] = {"name": tuple(NAMES), "city": tuple(CITIES), "job": (*JOBS, *JOBS_FR)}
UNKNOWN = -100  # fact label where the fact is not stated yet (cross_entropy's ignore_index)


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64
    weights: torch.Tensor  # (B, L) float32, 0 where the target is padding
    carry_state: bool  # True when each row continues the previous batch's row
    facts: torch.Tensor | None = None  # (B, L, len(FACT_VALUES)) int64: each fact's index once stated


@dataclass(frozen=True)
class Row:
    """One sequence to train on: ids, the weight of predicting each, and optional fact labels."""

    ids: list[int]
    weights: list[float]
    facts: torch.Tensor | None = None  # (len(ids), kinds): the facts known once ids[k] is read


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


def fact_labels(dialogue: corpus.Dialogue, length: int) -> torch.Tensor:
    """(length, kinds) labels: at byte k, the index of each fact's latest stated value in its list."""
    labels = torch.full((length, len(FACT_VALUES)), UNKNOWN, dtype=torch.long)
    columns = {kind: column for column, kind in enumerate(FACT_VALUES)}
    for statement in dialogue.statements:  # in order: an update overwrites from its own byte on
        # Reading byte end - 1 (the value's last) completes the fact.
        labels[statement.end - 1 :, columns[statement.kind]] = FACT_VALUES[statement.kind].index(statement.value)
    return labels


def encode_dialogue(dialogue: corpus.Dialogue, weights: LossWeights) -> Row:
    """Ids of a dialogue followed by EOS, the weight of predicting each id, and the facts known."""
    ids = tokenizer.encode(dialogue.text, eos=True)
    return Row(ids, [*dialogue_weights(dialogue, weights), 1.0], fact_labels(dialogue, len(ids)))


def pad_batch(rows: list[Row]) -> Batch:
    """Right-pad rows into a batch; the first id of each row is only an input."""
    width = max(len(row.ids) for row in rows) - 1
    inputs = torch.full((len(rows), width), tokenizer.PAD, dtype=torch.long)
    targets = torch.full((len(rows), width), tokenizer.PAD, dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    labelled = all(row.facts is not None for row in rows)
    facts = torch.full((len(rows), width, len(FACT_VALUES)), UNKNOWN, dtype=torch.long) if labelled else None
    for index, row in enumerate(rows):
        n = len(row.ids) - 1
        inputs[index, :n] = torch.tensor(row.ids[:-1])
        targets[index, :n] = torch.tensor(row.ids[1:])
        weights[index, :n] = torch.tensor(row.weights[1:])
        if facts is not None and row.facts is not None:
            facts[index, :n] = row.facts[:n]
    return Batch(inputs, targets, weights, carry_state=False, facts=facts)


def curriculum_max_filler(batch_index: int, ramp_batches: int) -> int:
    """Most filler turns at a point of training: none at first, growing to 8 by `ramp_batches`.

    Short gaps between a fact and its question teach the model to store facts in its cell state
    quickly; the forget gates it learns then carry them across the longer gaps.
    """
    if ramp_batches <= 0 or batch_index >= ramp_batches:
        return 8
    return (8 * batch_index) // ramp_batches


def dialogue_batches(
    seed: int, batch_size: int, weights: LossWeights, *, first_batch: int = 0, ramp_batches: int = 0,
    quiz_rate: float = 0.0, update_rate: float = 0.0, french_rate: float = 0.0, bucket: int = 16,
) -> Iterator[Batch]:
    """Endless batches of training dialogues (0 to the curriculum's most filler turns), French with
    probability `french_rate`; `bucket` batches at a time are sorted by length."""
    rng = random.Random(seed)
    index = first_batch
    while True:
        max_filler = curriculum_max_filler(index, ramp_batches)
        index += bucket
        rows = [
            encode_dialogue(corpus.make_dialogue(rng, language="fr" if rng.random() < french_rate else "en",
                                                 min_filler=0, max_filler=max_filler, quiz_rate=quiz_rate,
                                                 update_rate=update_rate), weights)
            for _ in range(batch_size * bucket)
        ]
        rows.sort(key=lambda row: len(row.ids))
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

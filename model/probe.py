"""A training-only probe that reads the stated facts out of the LSTM's hidden state at every byte.

The language-model loss teaches memory only through the few answer bytes, hundreds of steps after
the fact: a sparse signal that a small LSTM learned too slowly to recall anything in our time budget.
The probe adds a dense one: at every byte after the user states a fact, a linear map of the top
layer's h must name that fact. The state then learns to hold facts early in training, and the head
(also linear in h) learns to say them. The probe is not part of the exported model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cellstream.model.batches import FACT_VALUES, UNKNOWN


class FactProbe(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.sizes = [len(values) for values in FACT_VALUES.values()]
        self.linear = nn.Linear(hidden_size, sum(self.sizes))

    def loss(self, hidden: torch.Tensor, facts: torch.Tensor) -> torch.Tensor:
        """Summed over fact kinds: mean cross-entropy of naming each known fact from `hidden` (B, T, H),
        given labels `facts` (B, T, kinds) that are UNKNOWN where the fact is not stated yet."""
        total = hidden.new_zeros(())
        for kind, logits in enumerate(self.linear(hidden).split(self.sizes, dim=-1)):
            labels = facts[..., kind].flatten()
            if (labels != UNKNOWN).any():
                total = total + F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=UNKNOWN)
        return total

    @torch.no_grad()
    def accuracy(self, hidden: torch.Tensor, facts: torch.Tensor) -> float:
        """Share of (byte, known fact) pairs the probe names right."""
        correct = total = 0
        for kind, logits in enumerate(self.linear(hidden).split(self.sizes, dim=-1)):
            labels = facts[..., kind]
            known = labels != UNKNOWN
            correct += int((logits.argmax(-1) == labels)[known].sum())
            total += int(known.sum())
        return correct / max(1, total)

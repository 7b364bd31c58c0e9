"""The training-time evaluation counts what it claims: a stand-in model that sees the answer scores 1."""

import torch
from torch import nn

from cellstream.model import tokenizer
from cellstream.model.probe import FactProbe
from cellstream.model.train import evaluate_dialogues


class Oracle(nn.Module):
    """Predicts each next byte by reading it from the input (not causal): every answer exactly right.
    With `shift`, it predicts the byte after that instead: every answer wrong."""

    def __init__(self, shift: int = 1) -> None:
        super().__init__()
        self.shift = shift
        self.head = nn.Identity()

    def zero_state(self, batch):
        return torch.zeros(1, batch, 1), torch.zeros(1, batch, 1)

    def hidden_states(self, tokens, h, c):
        following = torch.roll(tokens, -self.shift, dims=1)
        return nn.functional.one_hot(following, tokenizer.VOCAB_SIZE).float() * 10, h, c


def test_answer_accuracy_counts_right_answers():
    probe = FactProbe(tokenizer.VOCAB_SIZE)
    right = evaluate_dialogues(Oracle(), probe, seed=1, count=8)
    assert right.answer_accuracy == 1.0
    wrong = evaluate_dialogues(Oracle(shift=2), probe, seed=1, count=8)
    assert wrong.answer_accuracy == 0.0
    assert right.loss < 0.1 < 5 < wrong.loss

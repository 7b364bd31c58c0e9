"""Wrap a user's torch module that carries an LSTM state into the serving contract (docs/MODELS.md).

The module is called the way `nn.LSTM` itself is: `module(x, (h0, c0)) -> (y, (hn, cn))` (or
`(y, hn, cn)`), with x and y batch-first or time-first as its one `nn.LSTM` is, x token ids (through an
`nn.Embedding`) or feature vectors, y one vector per step (a linear or MLP head, anything). The wrapper
gives it the served signature: inputs (B, T) or (B, T, F) and h0/c0 (L, B, H), outputs (B, T, V) and
hn/cn (L, B, H), always batch-first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TOKENS, FEATURES = "tokens", "features"


class UnservableModule(ValueError):
    """The module cannot be served as a stateful LSTM; the message says why and what to change."""


@dataclass(frozen=True)
class LSTMShape:
    """What the serving contract needs to know of the module, read from its modules."""

    input_kind: str  # TOKENS or FEATURES
    input_size: int  # vocabulary of the embedding (tokens) or features per step
    num_layers: int
    hidden_size: int
    batch_first: bool


def _the_lstm(module: nn.Module) -> nn.LSTM:
    lstms = [m for m in module.modules() if isinstance(m, nn.LSTM)]
    if not lstms:
        recurrent = [type(m).__name__ for m in module.modules() if isinstance(m, nn.RNNBase)]
        extra = f" (it has {', '.join(recurrent)}: no cell state C)" if recurrent else ""
        raise UnservableModule(f"{type(module).__name__} has no nn.LSTM{extra}; cellstream serves LSTMs")
    if len(lstms) > 1:
        raise UnservableModule(f"{type(module).__name__} has {len(lstms)} nn.LSTM modules; the served state is "
                               "one (layers, batch, hidden) pair: stack layers with num_layers instead")
    lstm = lstms[0]
    if lstm.bidirectional:
        raise UnservableModule("a bidirectional LSTM reads the future: it cannot be streamed step by step")
    if lstm.proj_size:
        raise UnservableModule(f"proj_size={lstm.proj_size}: h and C would differ in size; use proj_size=0")
    return lstm


def lstm_shape(module: nn.Module, input_kind: str | None = None) -> LSTMShape:
    """The module's state and input shape; input_kind from an nn.Embedding when not given."""
    lstm = _the_lstm(module)
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    kind = input_kind or (TOKENS if embeddings else FEATURES)
    if kind not in (TOKENS, FEATURES):
        raise UnservableModule(f"input kind must be {TOKENS!r} or {FEATURES!r}, got {kind!r}")
    if kind == TOKENS:
        if len(embeddings) != 1:
            raise UnservableModule(f"a tokens model needs exactly one nn.Embedding, found {len(embeddings)}")
        size = embeddings[0].num_embeddings
    else:
        size = lstm.input_size
    return LSTMShape(kind, size, lstm.num_layers, lstm.hidden_size, lstm.batch_first)


class Served(nn.Module):
    """The served signature around `module`: (x (B, T[, F]), h0, c0) -> (y (B, T, V), hn, cn)."""

    def __init__(self, module: nn.Module, shape: LSTMShape) -> None:
        super().__init__()
        self.module, self.shape = module, shape

    def forward(
        self, inputs: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = inputs if self.shape.batch_first else inputs.transpose(0, 1)  # (T, B[, F]) for a time-first LSTM
        result = self.module(x, (h0, c0))
        if len(result) == 2:
            y, (hn, cn) = result
        else:
            y, hn, cn = result
        y = y if self.shape.batch_first else y.transpose(0, 1)  # (B, T, V)
        return y, hn, cn

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def zero_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A zero (h0, c0) in the module's dtype."""
        shape = (self.shape.num_layers, batch, self.shape.hidden_size)
        return torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)

    def sample(self, batch: int, time: int) -> torch.Tensor:
        """Zero inputs of the served shape (tokens, or features in the module's dtype)."""
        if self.shape.input_kind == TOKENS:
            return torch.zeros((batch, time), dtype=torch.long)
        return torch.zeros((batch, time, self.shape.input_size), dtype=self.dtype)


def serve(module: nn.Module, input_kind: str | None = None) -> Served:
    """`module` in eval mode with the served signature, checked to return one vector per step."""
    served = Served(module.eval(), lstm_shape(module, input_kind))
    with torch.no_grad():
        y, hn, cn = served(served.sample(2, 3), *served.zero_state(2))
    if y.dim() != 3 or tuple(y.shape[:2]) != (2, 3):
        raise UnservableModule(f"the module returned {tuple(y.shape)} for 2 sequences of 3 steps; it must return "
                               "one output vector per step: (2, 3, V) batch-first or (3, 2, V) time-first")
    if served.shape.input_kind == TOKENS and y.shape[2] != served.shape.input_size:
        raise UnservableModule(f"the embedding has {served.shape.input_size} tokens but the output {y.shape[2]} "
                               "values per step; a tokens model's logits cover its vocabulary (the server checks "
                               "token ids against the output size): export it as a features model instead")
    want = (served.shape.num_layers, 2, served.shape.hidden_size)
    if tuple(hn.shape) != want or tuple(cn.shape) != want:
        raise UnservableModule(f"the module returned hn {tuple(hn.shape)}, cn {tuple(cn.shape)}; expected the "
                               f"LSTM's state {want}")
    return served

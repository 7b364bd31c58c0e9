"""The LSTM language model: embedding -> nn.LSTM -> linear head over the byte vocabulary.

A pure library (no I/O): the state (h, c) is an explicit input and output so the service can
carry it between requests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from model import tokenizer


@dataclass(frozen=True)
class ModelConfig:
    """What rebuilds the network; stored in checkpoints and in the ONNX metadata."""

    vocab_size: int = tokenizer.VOCAB_SIZE
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 2

    def __post_init__(self) -> None:
        for field, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")


class LSTMLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_size, config.num_layers, batch_first=True)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self._open_forget_gates()

    def _open_forget_gates(self) -> None:
        """Start with forget-gate bias +1 (Jozefowicz et al., 2015): memory is kept until learned otherwise."""
        hidden = self.config.hidden_size
        with torch.no_grad():
            for name, bias in self.lstm.named_parameters():
                if name.startswith("bias_ih"):
                    bias[hidden : 2 * hidden].fill_(1.0)  # torch's gate order is i, f, g, o

    def zero_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return torch.zeros(shape), torch.zeros(shape)

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, T) int64, h0/c0 (L, B, H) -> logits (B, T, V), hn, cn (L, B, H)."""
        x = self.embed(tokens)  # (B, T, E)
        out, (hn, cn) = self.lstm(x, (h0, c0))  # out: (B, T, H)
        return self.head(out), hn, cn

"""The LSTM language model: embedding -> nn.LSTM -> linear head over the byte vocabulary.

A pure library (no I/O): the state (h, c) is an explicit input and output so the service can
carry it between requests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from model import tokenizer

CHRONO_MAX_STEPS = 600  # bytes between a fact and its question in the longest dialogues


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
        self._chrono_init()

    def _chrono_init(self) -> None:
        """Chrono initialisation (Tallec & Ollivier, 2018) on half the units: b_f = log(U(1, T_max - 1)),
        b_i = -b_f; the other half start with b_f = 1.

        A plain init (f ~ 0.5) forgets within a few steps: the gradient from an answer hundreds of
        bytes after its fact vanishes before it can teach the gates to remember. Chrono units get
        memory timescales spread up to CHRONO_MAX_STEPS, the span of a dialogue; but their input
        gates start nearly closed, so the plain half is kept to learn the local structure fast.
        """
        hidden = self.config.hidden_size
        slow = hidden // 2
        with torch.no_grad():
            for name, bias in self.lstm.named_parameters():
                if not name.startswith("bias_"):
                    continue
                bias.zero_()
                if name.startswith("bias_ih"):
                    forget = torch.log(torch.empty(slow).uniform_(1.0, CHRONO_MAX_STEPS - 1.0))
                    # torch's gate order is i, f, g, o: the slow units are the last `slow` of each gate.
                    bias[hidden - slow : hidden] = -forget
                    bias[2 * hidden - slow : 2 * hidden] = forget
                    bias[hidden : 2 * hidden - slow] = 1.0

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

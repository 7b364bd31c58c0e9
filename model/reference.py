"""A NumPy LSTM written from the gate equations, loaded from trained torch weights.

For layer input x_t and previous state (h_{t-1}, C_{t-1}), with [h, x] the concatenation:
    f_t  = σ(W_f·[h_{t-1}, x_t] + b_f)         forget gate
    i_t  = σ(W_i·[h_{t-1}, x_t] + b_i)         input gate
    C̃_t  = tanh(W_C·[h_{t-1}, x_t] + b_C)      candidate cell
    C_t  = f_t ⊙ C_{t-1} + i_t ⊙ C̃_t           cell update
    o_t  = σ(W_o·[h_{t-1}, x_t] + b_o)         output gate
    h_t  = o_t ⊙ tanh(C_t)

torch stores the four gates stacked in the order (i, f, g=C̃, o), splits each W into an input part
`weight_ih` and a recurrent part `weight_hh`, and has two bias vectors that simply add.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

TORCH_GATE_ORDER = ("i", "f", "g", "o")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class Gates:
    """Activations of one layer at one step, each (B, H)."""

    forget: np.ndarray
    input: np.ndarray
    candidate: np.ndarray
    cell: np.ndarray
    output: np.ndarray
    hidden: np.ndarray


@dataclass(frozen=True)
class LayerWeights:
    """W_* are (H, H + I) acting on [h_{t-1}, x_t]; b_* are (H,)."""

    W_f: np.ndarray
    W_i: np.ndarray
    W_C: np.ndarray
    W_o: np.ndarray
    b_f: np.ndarray
    b_i: np.ndarray
    b_C: np.ndarray
    b_o: np.ndarray

    @classmethod
    def from_torch(cls, weight_ih: np.ndarray, weight_hh: np.ndarray, bias_ih: np.ndarray,
                   bias_hh: np.ndarray) -> LayerWeights:
        hidden = weight_hh.shape[1]
        W = np.concatenate([weight_hh, weight_ih], axis=1)  # (4H, H + I), columns match [h, x]
        b = bias_ih + bias_hh  # (4H,)
        gate = {name: slice(k * hidden, (k + 1) * hidden) for k, name in enumerate(TORCH_GATE_ORDER)}
        return cls(
            W_f=W[gate["f"]], W_i=W[gate["i"]], W_C=W[gate["g"]], W_o=W[gate["o"]],
            b_f=b[gate["f"]], b_i=b[gate["i"]], b_C=b[gate["g"]], b_o=b[gate["o"]],
        )

    def step(self, x: np.ndarray, h_prev: np.ndarray, c_prev: np.ndarray) -> Gates:
        """x (B, I), h_prev/c_prev (B, H) -> the gates and the new (h, C) of this layer."""
        hx = np.concatenate([h_prev, x], axis=1)  # (B, H + I)
        f = sigmoid(hx @ self.W_f.T + self.b_f)
        i = sigmoid(hx @ self.W_i.T + self.b_i)
        c_tilde = np.tanh(hx @ self.W_C.T + self.b_C)
        c = f * c_prev + i * c_tilde
        o = sigmoid(hx @ self.W_o.T + self.b_o)
        h = o * np.tanh(c)
        return Gates(forget=f, input=i, candidate=c_tilde, cell=c, output=o, hidden=h)


@dataclass(frozen=True)
class ReferenceLSTM:
    """Stacked LSTM layers, optionally with the language model's embedding and head."""

    layers: tuple[LayerWeights, ...]
    embedding: np.ndarray | None = None  # (V, E)
    head_weight: np.ndarray | None = None  # (V, H)
    head_bias: np.ndarray | None = None  # (V,)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray], prefix: str = "lstm.") -> ReferenceLSTM:
        """Weights from a torch state dict converted to NumPy (`{k: v.numpy()}`)."""
        layers = []
        k = 0
        while f"{prefix}weight_ih_l{k}" in state:
            layers.append(LayerWeights.from_torch(
                state[f"{prefix}weight_ih_l{k}"], state[f"{prefix}weight_hh_l{k}"],
                state[f"{prefix}bias_ih_l{k}"], state[f"{prefix}bias_hh_l{k}"],
            ))
            k += 1
        if not layers:
            raise ValueError(f"no LSTM weights under prefix {prefix!r}")
        return cls(
            layers=tuple(layers),
            embedding=state.get("embed.weight"),
            head_weight=state.get("head.weight"),
            head_bias=state.get("head.bias"),
        )

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Gates]]:
        """One time step through all layers: x (B, I), h/c (L, B, H) -> new h, c and per-layer gates."""
        gates = []
        layer_input = x
        for k, layer in enumerate(self.layers):
            g = layer.step(layer_input, h[k], c[k])
            gates.append(g)
            layer_input = g.hidden
        return np.stack([g.hidden for g in gates]), np.stack([g.cell for g in gates]), gates

    def run_tokens(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole language model: tokens (B, T) -> logits (B, T, V), hn, cn (L, B, H)."""
        if self.embedding is None or self.head_weight is None or self.head_bias is None:
            raise ValueError("run_tokens needs the embedding and head weights")
        logits = []
        for t in range(tokens.shape[1]):
            h, c, _ = self.step(self.embedding[tokens[:, t]], h, c)
            logits.append(h[-1] @ self.head_weight.T + self.head_bias)
        return np.stack(logits, axis=1), h, c

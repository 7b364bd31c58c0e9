"""What the client returns: frozen dataclasses holding NumPy arrays (float32), not protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GATE_NAMES = ("forget", "input", "candidate", "cell", "output", "hidden")


@dataclass(frozen=True, slots=True)
class State:
    """An LSTM state: `h` and `c` are (layers, hidden) arrays; `position` counts the steps consumed since the
    session began. Pass it as `state=` when opening a session to start from it."""

    model: str
    position: int
    h: np.ndarray
    c: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.h.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.h.shape[1])


@dataclass(frozen=True, slots=True)
class TokenProb:
    """One of the k most probable next tokens: its id, probability and text ("" for specials and partial
    UTF-8 bytes)."""

    token: int
    prob: float
    text: str


@dataclass(frozen=True, slots=True)
class Gates:
    """The gate activations of every step and layer of one request, each (layers, steps, hidden):
    f_t, i_t, C̃_t, C_t, o_t and h_t (docs/API.md, "Gates")."""

    forget: np.ndarray
    input: np.ndarray
    candidate: np.ndarray
    cell: np.ndarray
    output: np.ndarray
    hidden: np.ndarray


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 4x as much to make, and one is made per step
class StepResult:
    """What a step returned. Only what was asked for is set: `logits` (a tokens model) or `outputs` (a model
    whose output is not logits, e.g. a forecast) are the last step's (V,) values, or (steps, V) with
    all_steps; `top` the k most probable next tokens; `state` the state after the step; `gates` with gates.

    `recovered` is True when the step's reply was lost and the client found, on retrying, that the step had
    been applied: `position` is then exact and `state` (if asked) is the session's state after the step, read
    with GetState, but logits, outputs, top-k and gates are None (the server does not keep them)."""

    session_id: str
    position: int
    logits: np.ndarray | None = None
    outputs: np.ndarray | None = None
    top: tuple[TokenProb, ...] = ()
    state: State | None = None
    gates: Gates | None = None
    recovered: bool = False


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a generated reply: newly completed `text` (UTF-8 is never split), the `tokens` sampled for it,
    the session's `position` after it; the last one has `done` and a `finish_reason` ("stop", "length",
    "end_token"). `gates` (with gates=True): those of what was fed since the previous chunk."""

    text: str
    tokens: tuple[int, ...]
    position: int
    done: bool = False
    finish_reason: str = ""
    gates: Gates | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model: `input_kind` "tokens" or "features"; `vocab_size` values per step of its output
    (named `output_name`: "logits", or e.g. "forecast"); `gates` when its glass-box graph is served."""

    name: str
    input_kind: str
    vocab_size: int
    feature_size: int
    num_layers: int
    hidden_size: int
    output_name: str
    is_default: bool = False
    gates: bool = False
    metadata: dict[str, str] = field(default_factory=dict)

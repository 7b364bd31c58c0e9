"""The graph contract a model file must honour to be served, checked in one place (docs/MODELS.md).

    inputs   tokens int64 (B, T)  or  features float32 (B, T, F);  h0, c0 float32 (L, B, H)
    outputs  one output float32 (B, T, V): `logits` for a tokens model, any name for a features model
             (`forecast`, `outputs`, `logits` of a classifier, ...);  hn, cn float32 (L, B, H)

L, H and F are fixed numbers in the graph; B and T are dynamic. V is fixed, or given by the metadata
key `cellstream.vocab_size`. `check` lists every violation, each saying what to change: the server's
start-up refusal and `cellstream check-model` print the same words.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cellstream.service.versions import version_key

TOKENS, FEATURES = "tokens", "features"
STATE_INPUTS, STATE_OUTPUTS = ("h0", "c0"), ("hn", "cn")
LOGITS = "logits"
BYTE_TOKENIZER = "bytes-v1"
FLOAT32, INT64 = "tensor(float)", "tensor(int64)"
STATE_FIX = "export it as (layers, batch, hidden) with only the batch axis (1) dynamic"


@dataclass(frozen=True)
class Port:
    """One graph input or output as onnxruntime describes it: a dim is an int, a symbolic name or None;
    an output's shape may be undeclared (empty)."""

    name: str
    type: str
    shape: Sequence[int | str | None]


@dataclass(frozen=True)
class ModelSpec:
    """What the service knows of one model: its signature and its metadata."""

    name: str
    input_kind: str  # TOKENS or FEATURES
    vocab_size: int  # outputs per step (the logits of a tokens model)
    feature_size: int  # FEATURES only, else 0
    num_layers: int
    hidden_size: int
    tokenizer: str = ""  # BYTE_TOKENIZER when text input is accepted
    special_tokens: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    output_name: str = LOGITS  # the graph's per-step output: what the values mean
    version: int = 1  # NAME/VERSION/ in the model repository; a flat NAME.onnx is version 1
    key: str = field(init=False)  # what a session pinned to this version holds as its model (versions.py)

    def __post_init__(self) -> None:
        # A field, not a property: the batcher and the multiplexed calls read it for every step.
        object.__setattr__(self, "key", version_key(self.name, self.version))

    @property
    def accepts_text(self) -> bool:
        return self.input_kind == TOKENS and self.tokenizer == BYTE_TOKENIZER

    @property
    def state_shape(self) -> tuple[int, int]:
        """Shape of one session's h (and of its c): layer-major (L, H)."""
        return (self.num_layers, self.hidden_size)

    def end_tokens(self) -> frozenset[int]:
        return frozenset(v for k, v in self.special_tokens.items() if k in ("eos", "eot"))


class ContractViolation(ValueError):
    """The graph does not honour the contract; `violations` says each way, with what to change."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__("; ".join(violations))
        self.violations = violations


def _fixed(dim: int | str | None) -> bool:
    return isinstance(dim, int) and dim >= 1


class _Checker:
    """Collects violations while reading the signature, so every problem is reported at once."""

    def __init__(self, inputs: Sequence[Port], outputs: Sequence[Port]) -> None:
        self.inputs = {p.name: p for p in inputs}
        self.outputs = {p.name: p for p in outputs}
        self.violations: list[str] = []

    def fail(self, message: str) -> None:
        self.violations.append(message)

    def typed(self, port: Port, want: str, words: str) -> bool:
        if port.type != want:
            self.fail(f"{port.name} is {port.type}; it must be {words}: cast it in the graph or at export")
            return False
        return True

    def ranked(self, port: Port, rank: int, axes: str) -> bool:
        if len(port.shape) != rank:
            self.fail(f"{port.name} has shape {list(port.shape)}; it must be {axes}")
            return False
        return True

    def fixed(self, port: Port, axis: int, what: str, how: str) -> int:
        dim = port.shape[axis]
        if not _fixed(dim):
            self.fail(f"{port.name}'s {what} (axis {axis}) is {'dynamic' if dim is None else repr(dim)}; "
                      f"it must be a fixed number in the graph: {how}")
            return 0
        return int(dim)

    def input_kind(self) -> str:
        kinds = [k for k in (TOKENS, FEATURES) if k in self.inputs]
        if not kinds:
            self.fail(f"no input named 'tokens' or 'features' (inputs: {sorted(self.inputs)}); name the sequence "
                      "input tokens (int64, batch x time) or features (float32, batch x time x features)")
            return ""
        if len(kinds) == 2:
            self.fail("inputs 'tokens' and 'features' both present; a model takes one of them")
            return ""
        return kinds[0]

    def extra_inputs(self, kind: str) -> None:
        extra = sorted(set(self.inputs) - {TOKENS, FEATURES, *STATE_INPUTS})
        if extra:
            self.fail(f"unexpected inputs {extra}: the server feeds only {kind or 'tokens/features'}, h0 and c0; "
                      "fold the others into the graph as constants, or remove them")

    def state(self, names: Sequence[str], ports: Mapping[str, Port], role: str) -> tuple[int, int] | None:
        """(L, H) shared by the two state tensors, or None after reporting why not."""
        shapes = []
        for name in names:
            port = ports.get(name)
            if port is None:
                hint = (" (a GRU or a plain RNN has no cell state: cellstream serves LSTMs, which carry h and C)"
                        if name in ("c0", "cn") else "")
                self.fail(f"missing {role} {name!r}: a stateful LSTM {'takes' if role == 'input' else 'returns'} "
                          f"h and C as {' and '.join(names)}, float32 (layers, batch, hidden){hint}")
                continue
            if not self.typed(port, FLOAT32, "float32") or (role == "output" and not port.shape):
                continue  # an output's shape may be undeclared: the engine's first run checks it
            if self.ranked(port, 3, "(layers, batch, hidden)"):
                shapes.append((self.fixed(port, 0, "number of layers", STATE_FIX),
                               self.fixed(port, 2, "hidden size", STATE_FIX)))
        if len(shapes) == 2 and shapes[0] != shapes[1] and all(all(s) for s in shapes):
            self.fail(f"{names[0]} is (layers, hidden) = {shapes[0]} but {names[1]} is {shapes[1]}; they must match")
        return shapes[0] if len(shapes) == 2 and all(shapes[0]) else None

    def main_input(self, kind: str) -> int:
        """The feature size F (0 for tokens)."""
        port = self.inputs[kind]
        if kind == TOKENS:
            if self.typed(port, INT64, "int64 token ids"):
                self.ranked(port, 2, "(batch, time)")
            return 0
        if self.typed(port, FLOAT32, "float32") and self.ranked(port, 3, "(batch, time, features)"):
            return self.fixed(port, 2, "feature size", "export with a fixed number of features per step")
        return 0

    def main_output(self, kind: str) -> Port | None:
        others = [p for name, p in self.outputs.items() if name not in STATE_OUTPUTS]
        if not others:
            self.fail(f"no output besides hn, cn; the graph must return its per-step output (named {LOGITS!r} "
                      "for a tokens model) as well as the state")
            return None
        if len(others) > 1:
            self.fail(f"several outputs besides hn, cn: {sorted(p.name for p in others)}; return one per-step "
                      "output (concatenate them along the last axis)")
            return None
        port = others[0]
        if kind == TOKENS and port.name != LOGITS:
            self.fail(f"a tokens model's output must be named {LOGITS!r}, is {port.name!r}: the server samples "
                      "and ranks tokens from it")
        return port


def _metadata_int(metadata: Mapping[str, str], key: str) -> int | None:
    value = metadata.get(key)
    return int(value) if value is not None and value.strip().isdigit() else None


def check(name: str, inputs: Sequence[Port], outputs: Sequence[Port], metadata: Mapping[str, str], version: int = 1
          ) -> ModelSpec:
    """The spec of `version` of model `name`, or ContractViolation listing every way the signature breaks the
    contract."""
    checker = _Checker(inputs, outputs)
    kind = checker.input_kind()
    checker.extra_inputs(kind)
    state = checker.state(STATE_INPUTS, checker.inputs, "input")
    out_state = checker.state(STATE_OUTPUTS, checker.outputs, "output")
    if state and out_state and state != out_state:
        checker.fail(f"hn/cn are (layers, hidden) = {out_state} but h0/c0 are {state}; the state must keep its shape")
    feature_size = checker.main_input(kind) if kind else 0
    output = checker.main_output(kind) if kind else None
    vocab = 0
    if output is not None and checker.typed(output, FLOAT32, "float32") and (
            not output.shape or checker.ranked(output, 3, "(batch, time, outputs)")):
        declared = output.shape[2] if output.shape and _fixed(output.shape[2]) else None
        vocab = declared or _metadata_int(metadata, "cellstream.vocab_size") or 0
        if not vocab:
            checker.fail(f"{output.name}'s last axis is dynamic and the metadata key cellstream.vocab_size is "
                         "unset or not a positive integer; fix the axis in the graph or set the key")
    special: dict[str, int] = {}
    try:
        special = json.loads(metadata.get("cellstream.special_tokens", "{}"))
        if not isinstance(special, dict) or not all(isinstance(v, int) for v in special.values()):
            raise ValueError("not a JSON object of token ids")
    except ValueError as exc:
        checker.fail(f"metadata cellstream.special_tokens is unreadable ({exc}); write a JSON object "
                     'such as {"eos": 258}')
    if checker.violations:
        raise ContractViolation(checker.violations)
    assert state is not None and output is not None  # no violation: both were read
    return ModelSpec(
        name=name, input_kind=kind, vocab_size=vocab, feature_size=feature_size, num_layers=state[0],
        hidden_size=state[1], tokenizer=metadata.get("cellstream.tokenizer", ""), special_tokens=special,
        metadata=dict(metadata), output_name=output.name, version=version,
    )

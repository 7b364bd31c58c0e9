"""onnxruntime engine: loads stateful LSTM graphs, checks their contract, runs batched steps.

Contract (written by `model/export.py`, or any graph that honours it):
    inputs  tokens int64 (B, T)  or  features float32 (B, T, F);  h0, c0 float32 (L, B, H)
    outputs logits float32 (B, T, V);  hn, cn float32 (L, B, H)
with L, H (and F) fixed in the graph. `cellstream.*` metadata adds the tokenizer and vocabulary.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from service.errors import ModelLoadError

log = logging.getLogger(__name__)

TOKENS, FEATURES = "tokens", "features"
BYTE_TOKENIZER = "bytes-v1"


@dataclass(frozen=True)
class ModelSpec:
    """What the service knows of one model: its signature and its metadata."""

    name: str
    input_kind: str  # TOKENS or FEATURES
    vocab_size: int  # logits per step
    feature_size: int  # FEATURES only, else 0
    num_layers: int
    hidden_size: int
    tokenizer: str = ""  # BYTE_TOKENIZER when text input is accepted
    special_tokens: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def accepts_text(self) -> bool:
        return self.input_kind == TOKENS and self.tokenizer == BYTE_TOKENIZER

    @property
    def state_shape(self) -> tuple[int, int]:
        """Shape of one session's h (and of its c): layer-major (L, H)."""
        return (self.num_layers, self.hidden_size)

    def end_tokens(self) -> frozenset[int]:
        return frozenset(v for k, v in self.special_tokens.items() if k in ("eos", "eot"))


def _static_dim(shape: list, axis: int, what: str, path: Path) -> int:
    dim = shape[axis] if len(shape) > axis else None
    if not isinstance(dim, int) or dim < 1:
        raise ModelLoadError(f"{path.name}: {what} must be a fixed positive size in the graph, got {dim!r}")
    return dim


def _require(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise ModelLoadError(f"{path.name}: {message}")


def inspect_session(name: str, path: Path, session: ort.InferenceSession) -> ModelSpec:
    """Check the graph honours the stateful LSTM contract and describe it, or ModelLoadError."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    kinds = [k for k in (TOKENS, FEATURES) if k in inputs]
    _require(len(kinds) == 1, path, f"needs exactly one of the inputs 'tokens' or 'features', has {sorted(inputs)}")
    kind = kinds[0]
    _require(set(inputs) == {kind, "h0", "c0"}, path, f"inputs must be {kind}, h0, c0; has {sorted(inputs)}")
    missing = {"logits", "hn", "cn"} - set(outputs)
    _require(not missing, path, f"missing outputs {sorted(missing)}; a stateful LSTM returns logits, hn, cn")
    for state in ("h0", "c0"):
        _require(inputs[state].type == "tensor(float)", path, f"{state} must be float32, is {inputs[state].type}")
        _require(len(inputs[state].shape) == 3, path, f"{state} must be (layers, batch, hidden)")
    num_layers = _static_dim(inputs["h0"].shape, 0, "h0 layers", path)
    hidden_size = _static_dim(inputs["h0"].shape, 2, "h0 hidden size", path)
    _require(inputs["c0"].shape[0] == num_layers and inputs["c0"].shape[2] == hidden_size, path,
             f"c0 shape {inputs['c0'].shape} differs from h0 shape {inputs['h0'].shape}")
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    feature_size = 0
    if kind == TOKENS:
        _require(inputs[kind].type == "tensor(int64)", path, f"tokens must be int64, is {inputs[kind].type}")
        _require(len(inputs[kind].shape) == 2, path, "tokens must be (batch, time)")
    else:
        _require(inputs[kind].type == "tensor(float)", path, f"features must be float32, is {inputs[kind].type}")
        _require(len(inputs[kind].shape) == 3, path, "features must be (batch, time, features)")
        feature_size = _static_dim(inputs[kind].shape, 2, "feature size", path)
    logits_shape = outputs["logits"].shape
    _require(len(logits_shape) == 3, path, f"logits must be (batch, time, vocab), is {logits_shape}")
    vocab = logits_shape[2] if isinstance(logits_shape[2], int) else metadata.get("cellstream.vocab_size")
    _require(vocab is not None, path, "logits' last dimension is dynamic and cellstream.vocab_size is unset")
    try:
        special = json.loads(metadata.get("cellstream.special_tokens", "{}"))
        vocab_size = int(vocab)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path.name}: unreadable cellstream metadata: {exc}") from None
    return ModelSpec(
        name=name, input_kind=kind, vocab_size=vocab_size, feature_size=feature_size,
        num_layers=num_layers, hidden_size=hidden_size,
        tokenizer=metadata.get("cellstream.tokenizer", ""), special_tokens=special, metadata=metadata,
    )


class Engine:
    """One loaded model. `run` is safe to call from a worker thread (ORT releases the GIL)."""

    def __init__(self, path: Path, *, name: str | None = None, intra_op_threads: int = 1) -> None:
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads would steal the core the event loop needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.NoSuchFile,
                ort_errors.InvalidArgument, ort_errors.RuntimeException) as exc:
            raise ModelLoadError(f"{path.name}: onnxruntime cannot load it: {exc}") from None
        self.path = path
        self.spec = inspect_session(name or path.stem, path, self.session)
        self._input_name = self.spec.input_kind
        self._warm_up()

    def _warm_up(self) -> None:
        spec = self.spec
        if spec.input_kind == TOKENS:
            sample = np.zeros((1, 1), np.int64)
        else:
            sample = np.zeros((1, 1, spec.feature_size), np.float32)
        state = np.zeros((spec.num_layers, 1, spec.hidden_size), np.float32)
        logits, _, _ = self.run(sample, state, state)
        if logits.shape != (1, 1, spec.vocab_size):
            raise ModelLoadError(f"{self.path.name}: logits shape {logits.shape}, expected (1, 1, {spec.vocab_size})")

    def run(
        self, inputs: np.ndarray, h0: np.ndarray, c0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """inputs (B, T[, F]), h0/c0 (L, B, H) -> logits (B, T, V), hn, cn (L, B, H)."""
        logits, hn, cn = self.session.run(
            ["logits", "hn", "cn"], {self._input_name: inputs, "h0": h0, "c0": c0}
        )
        return logits, hn, cn


class ModelRegistry:
    """The models of a directory, by name, with a default."""

    def __init__(self, engines: dict[str, Engine], default: str) -> None:
        if not engines:
            raise ModelLoadError("no models to serve")
        if default not in engines:
            raise ModelLoadError(f"default model {default!r} is not among the loaded models {sorted(engines)}")
        self.engines = engines
        self.default = default

    @classmethod
    def from_directory(cls, directory: Path, *, default: str = "", intra_op_threads: int = 1) -> ModelRegistry:
        if not directory.is_dir():
            raise ModelLoadError(f"model directory not found: {directory}")
        paths = sorted(directory.glob("*.onnx"))
        if not paths:
            raise ModelLoadError(f"no .onnx models in {directory}")
        engines = {p.stem: Engine(p, intra_op_threads=intra_op_threads) for p in paths}
        for engine in engines.values():
            log.info("loaded model %s from %s: %s", engine.spec.name, engine.path, engine.spec)
        if not default:
            default = paths[0].stem if len(paths) == 1 else "cellstream-chat"
        return cls(engines, default)

    def resolve(self, name: str) -> str:
        """The model a request means: its own name, or the default when empty; KeyError if unknown."""
        resolved = name or self.default
        if resolved not in self.engines:
            raise KeyError(resolved)
        return resolved

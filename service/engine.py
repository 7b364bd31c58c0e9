"""onnxruntime engine: loads stateful LSTM graphs, checks their contract (cellstream.service.contract), runs
batched steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from cellstream.service import contract, gates
from cellstream.service.contract import BYTE_TOKENIZER, FEATURES, LOGITS, TOKENS, ContractViolation, ModelSpec, Port
from cellstream.service.errors import ModelLoadError
from cellstream.service.gates import GlassBox

__all__ = ["BYTE_TOKENIZER", "FEATURES", "LOGITS", "TOKENS", "Engine", "ModelSpec", "inspect_session"]


def inspect_session(name: str, path: Path, session: ort.InferenceSession, version: int = 1) -> ModelSpec:
    """Check the graph honours the stateful LSTM contract (cellstream.service.contract) and describe it as
    `version` of model `name`, or ModelLoadError naming every violation."""
    inputs, outputs = ([Port(p.name, p.type, p.shape or []) for p in args]
                       for args in (session.get_inputs(), session.get_outputs()))
    try:
        return contract.check(name, inputs, outputs, dict(session.get_modelmeta().custom_metadata_map), version)
    except ContractViolation as exc:
        raise ModelLoadError(f"{path.name}: {exc}", exc.violations) from None


def open_graph(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime session on the CPU, or ModelLoadError saying why onnxruntime cannot load the file."""
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.NoSuchFile,
            ort_errors.InvalidArgument, ort_errors.RuntimeException) as exc:
        raise ModelLoadError(f"{path.name}: onnxruntime cannot load it: {exc}") from None


class Engine:
    """One loaded model version. `run` is safe to call from a worker thread (ORT releases the GIL)."""

    def __init__(self, path: Path, *, name: str | None = None, version: int = 1, intra_op_threads: int = 1) -> None:
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads would steal the core the event loop needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = open_graph(path, options)
        self.path = path
        self.spec = inspect_session(name or path.stem, path, self.session, version)
        self._input_name = self.spec.input_kind
        self._output_names = [self.spec.output_name, "hn", "cn"]
        self._warm_up()
        self.glass_box: GlassBox | None = None  # the gates' graph, when the model has one beside it
        if (glass_path := gates.path_for(path)).is_file():
            self.glass_box = GlassBox(open_graph(glass_path, options), glass_path, self.spec)
            self.glass_box.check(self.run)

    def _warm_up(self) -> None:
        spec = self.spec
        if spec.input_kind == TOKENS:
            sample = np.zeros((1, 1), np.int64)
        else:
            sample = np.zeros((1, 1, spec.feature_size), np.float32)
        state = np.zeros((spec.num_layers, 1, spec.hidden_size), np.float32)
        outputs, hn, cn = self.run(sample, state, state)
        for name, array, want in ((spec.output_name, outputs, (1, 1, spec.vocab_size)),
                                  ("hn", hn, state.shape), ("cn", cn, state.shape)):
            if array.shape != want:
                raise ModelLoadError(f"{self.path.name}: {name} has shape {array.shape} for one step of one "
                                     f"sequence, expected {want}")

    def run(
        self, inputs: np.ndarray, h0: np.ndarray, c0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """inputs (B, T[, F]), h0/c0 (L, B, H) -> outputs (B, T, V) (logits, or the model's own output),
        hn, cn (L, B, H)."""
        outputs, hn, cn = self.session.run(self._output_names, {self._input_name: inputs, "h0": h0, "c0": c0})
        return outputs, hn, cn

    def run_with_gates(
        self, inputs: np.ndarray, h0: np.ndarray, c0: np.ndarray, gated: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`run`, and the gates (G, T, 6, L, H) of the rows `gated` from the glass-box graph. The state and
        outputs come from the fast graph alone: asking for gates never changes them."""
        assert self.glass_box is not None
        outputs, hn, cn = self.run(inputs, h0, c0)
        gate_values, _, _ = self.glass_box.run(inputs[gated], h0[:, gated], c0[:, gated])
        return outputs, hn, cn, gate_values

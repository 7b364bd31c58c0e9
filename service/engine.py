"""onnxruntime engine: loads stateful LSTM graphs, checks their contract (cellstream.service.contract), runs
batched steps."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from cellstream.service import contract, gates
from cellstream.service.contract import BYTE_TOKENIZER, FEATURES, LOGITS, TOKENS, ContractViolation, ModelSpec, Port
from cellstream.service.errors import ModelLoadError
from cellstream.service.gates import GlassBox

__all__ = ["BYTE_TOKENIZER", "FEATURES", "LOGITS", "TOKENS", "Engine", "ModelRegistry", "ModelSpec", "inspect_session"]

log = logging.getLogger(__name__)


def inspect_session(name: str, path: Path, session: ort.InferenceSession) -> ModelSpec:
    """Check the graph honours the stateful LSTM contract (cellstream.service.contract) and describe it, or
    ModelLoadError naming every violation."""
    inputs, outputs = ([Port(p.name, p.type, p.shape or []) for p in args]
                       for args in (session.get_inputs(), session.get_outputs()))
    try:
        return contract.check(name, inputs, outputs, dict(session.get_modelmeta().custom_metadata_map))
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
        self.session = open_graph(path, options)
        self.path = path
        self.spec = inspect_session(name or path.stem, path, self.session)
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


SHIPPED_DEFAULT = "cellstream-chat"


def model_files(directory: Path) -> list[Path]:
    """The .onnx models of a directory (not their glass-box graphs), by name; ModelLoadError when there are none.
    Reads the directory only, so the server can check it before it binds any port."""
    if not directory.is_dir():
        raise ModelLoadError(f"model directory not found: {directory}")
    paths = sorted(p for p in directory.glob("*.onnx") if not p.name.endswith(gates.SUFFIX))
    if not paths:
        raise ModelLoadError(f"no .onnx models in {directory}")
    return paths


def default_model(paths: list[Path], default: str) -> str:
    """The model a request that names none gets: `default` if given, else the only model, else cellstream-chat;
    ModelLoadError naming the setting when that is not among `paths`."""
    names = [p.stem for p in paths]
    if not default:
        if len(names) == 1:
            return names[0]
        default = SHIPPED_DEFAULT
        if default not in names:
            raise ModelLoadError(
                f"{len(names)} models in {paths[0].parent} ({', '.join(names)}) and no default model: choose the one "
                "used by requests that name none with --default-model NAME (or CELLSTREAM_DEFAULT_MODEL)")
    if default not in names:
        raise ModelLoadError(f"default model {default!r} (--default-model, CELLSTREAM_DEFAULT_MODEL) is not among the "
                             f"models in {paths[0].parent}: {', '.join(names)}")
    return default


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
        paths = model_files(directory)
        chosen = default_model(paths, default)
        if not default:
            log.info("default model: %s (no default_model set: the only model, or %s)", chosen, SHIPPED_DEFAULT)
        engines = {p.stem: Engine(p, intra_op_threads=intra_op_threads) for p in paths}
        for engine in engines.values():
            log.info("loaded model %s from %s: %s; gates: %s", engine.spec.name, engine.path, engine.spec,
                     engine.glass_box.path.name if engine.glass_box else "none (no glass-box graph beside it)")
        return cls(engines, chosen)

    def resolve(self, name: str) -> str:
        """The model a request means: its own name, or the default when empty; KeyError if unknown."""
        resolved = name or self.default
        if resolved not in self.engines:
            raise KeyError(resolved)
        return resolved

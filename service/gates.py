"""A model's glass-box graph (model/glassbox.py writes it beside the fast graph as `<name>.gates.onnx`):
the gates of each step, which the fast graph's LSTM operator keeps inside.

It is loaded only if it fits its fast graph: the same input, every gate output, the same layers and units,
and the same computation (both run on one random sequence must end in the same state), so a stale file
from other weights stops the start-up instead of drawing gates the served model does not have.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from cellstream.service.contract import TOKENS, ModelSpec
from cellstream.service.errors import ModelLoadError

# The names cellstream.model.glassbox gives the outputs, and where it writes the file (SUFFIX): the same two
# there, kept apart because the server imports nothing of the training side (tests/model/test_glassbox.py).
GATE_NAMES = ("forget", "input", "candidate", "cell", "output", "hidden")
SUFFIX = ".gates.onnx"
# Two float32 graphs of the same weights over CHECK_STEPS steps agree to ~1e-6; other weights differ by ~1e-1.
CHECK_STEPS, CHECK_TOLERANCE = 8, 1e-4
HOW_TO_EXPORT = ("`cellstream export` writes one (<model>.gates.onnx beside <model>.onnx), and `cellstream gates "
                 "<model>.onnx` makes one for a model exported otherwise; see docs/GATES.md")

Gates = np.ndarray
"""One step's gates of one sequence: (T, 6, L, H), the six in GATE_NAMES order."""


FastRun = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def path_for(fast_graph: Path) -> Path:
    """Where the glass-box graph of `fast_graph` lives: `cellstream-chat.onnx` -> `cellstream-chat.gates.onnx`."""
    return fast_graph.with_name(fast_graph.stem + SUFFIX)


class GlassBox:
    """The glass-box graph of one served model. `run` is safe to call from a worker thread."""

    def __init__(self, session: ort.InferenceSession, path: Path, spec: ModelSpec) -> None:
        self.session, self.path = session, path
        inputs = {p.name for p in self.session.get_inputs()}
        outputs = {p.name for p in self.session.get_outputs()}
        wanted = {spec.input_kind, "h0", "c0"}
        problems = [f"it has no input {name!r}" for name in sorted(wanted - inputs)]
        problems += [f"it has no output {name!r}" for name in (*GATE_NAMES, "hn", "cn") if name not in outputs]
        if problems:
            raise ModelLoadError(f"{path.name} is not the glass-box graph of {spec.name}: {'; '.join(problems)}; "
                                 f"{HOW_TO_EXPORT}")
        self._input_name = spec.input_kind
        self._spec = spec

    def run(self, inputs: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """inputs (B, T[, F]), h0/c0 (L, B, H) -> gates (B, T, 6, L, H) and hn, cn (L, B, H)."""
        outputs = self.session.run([*GATE_NAMES, "hn", "cn"], {self._input_name: inputs, "h0": h0, "c0": c0})
        gates = np.stack(outputs[:6], axis=1)  # (T, 6, L, B, H)
        return gates.transpose(3, 0, 1, 2, 4), outputs[6], outputs[7]

    def check(self, run_fast: FastRun) -> None:
        """ModelLoadError unless this graph ends where the fast graph `run_fast(inputs, h0, c0)` does."""
        spec = self._spec
        rng = np.random.default_rng(0)
        if spec.input_kind == TOKENS:
            inputs = rng.integers(0, spec.vocab_size, (2, CHECK_STEPS), dtype=np.int64)
        else:
            inputs = rng.normal(0, 1, (2, CHECK_STEPS, spec.feature_size)).astype(np.float32)
        state = (spec.num_layers, 2, spec.hidden_size)
        h0, c0 = (rng.normal(0, 0.5, state).astype(np.float32) for _ in range(2))
        try:
            gates, hn, cn = self.run(inputs, h0, c0)
        except (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.RuntimeException) as exc:
            raise ModelLoadError(f"{self.path.name} does not run on {spec.name}'s inputs: {exc}; "
                                 f"{HOW_TO_EXPORT}") from None
        _, fast_hn, fast_cn = run_fast(inputs, h0, c0)
        if gates.shape != (2, CHECK_STEPS, 6, spec.num_layers, spec.hidden_size):
            raise ModelLoadError(f"{self.path.name} gives gates of shape {gates.shape[2:]} per step; {spec.name} has "
                                 f"{spec.num_layers} layers x {spec.hidden_size} units; {HOW_TO_EXPORT}")
        error = max(float(np.abs(hn - fast_hn).max()), float(np.abs(cn - fast_cn).max()))
        if not error <= CHECK_TOLERANCE:
            raise ModelLoadError(f"{self.path.name} ends {error:.3g} away from {spec.name}.onnx's state on the same "
                                 f"inputs: it was exported from other weights; {HOW_TO_EXPORT}")

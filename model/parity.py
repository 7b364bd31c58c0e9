"""How far apart two computations of the same thing are, and when an export is judged faithful.

Logits and h are O(1), but the cell state C is unbounded (it reaches |C| ~ 30 in a trained LSTM),
and one float32 ulp at 32 is 3.8e-6: an absolute 1e-5 bound there only measures rounding order.
So differences are scaled by max(1, |reference|): absolute below 1, relative above.

Two float32 runs of the same graph (onnxruntime against itself: split, batched, replicated,
restarted) must agree within TOLERANCE. An export is judged against float64 instead: torch float32
and onnxruntime float32 round differently, and a trained memory amplifies rounding, so on trained
weights the two float32 runs can be further apart than 1e-5 while both are as close to the exact
result as float32 allows. The export passes when onnxruntime is at most EXPORT_FACTOR times as far
from float64 as torch float32 is (never held below TOLERANCE), and within EXPORT_TO_TORCH of torch.
The float32 yardstick is torch's worst error over all the inputs judged, not its error on each one:
on one input torch can round luckily (2.7e-6 where onnxruntime's honest 1.15e-5 then "fails"), while
a wrong export (gates swapped, a bias dropped) is more than 100 times over on every input.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import astuple, dataclass

import numpy as np

Inputs = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # (what, x, h0, c0): one set of inputs to judge on

TOLERANCE = 1e-5
EXPORT_FACTOR = 4.0
EXPORT_TO_TORCH = 1e-4


def scaled_max_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, |want|), elementwise; inf when the shapes differ."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    return float((np.abs(got - want) / np.maximum(1.0, np.abs(want))).max())


@dataclass(frozen=True)
class ExportErrors:
    """Scaled errors of one output on one set of inputs: onnxruntime and torch float32 against float64,
    and onnxruntime against torch float32."""

    onnxruntime_to_float64: float
    torch_to_float64: float
    onnxruntime_to_torch: float

    @classmethod
    def measure(cls, onnxruntime: np.ndarray, torch32: np.ndarray, float64: np.ndarray) -> ExportErrors:
        return cls(scaled_max_diff(onnxruntime, float64), scaled_max_diff(torch32, float64),
                   scaled_max_diff(onnxruntime, torch32))

    def worst(self, other: ExportErrors) -> ExportErrors:
        """The larger of each error of the two."""
        return ExportErrors(*(max(a, b) for a, b in zip(astuple(self), astuple(other), strict=True)))

    def summary(self, float32: str = "torch float32") -> str:
        """The three errors in words; `float32` names the float32 computation onnxruntime is judged beside."""
        return (f"onnxruntime to float64 {self.onnxruntime_to_float64:.2e} ({float32} "
                f"{self.torch_to_float64:.2e}), onnxruntime to {float32} {self.onnxruntime_to_torch:.2e}")

    def problem(self, float32: str = "torch float32", yardstick: float | None = None) -> str | None:
        """Why the export is not faithful on these inputs, or None when it is; `yardstick` is the float32
        computation's error the bound is made from (default: its error on these inputs)."""
        yardstick = self.torch_to_float64 if yardstick is None else yardstick
        if not self.onnxruntime_to_float64 <= allowed_beside(yardstick):
            return (f"onnxruntime is {self.onnxruntime_to_float64:.3g} from float64, more than "
                    f"{EXPORT_FACTOR:g} x {float32}'s worst {yardstick:.3g} (allowed {allowed_beside(yardstick):.3g})")
        if not self.onnxruntime_to_torch <= EXPORT_TO_TORCH:
            return f"onnxruntime and {float32} differ by {self.onnxruntime_to_torch:.3g} > {EXPORT_TO_TORCH:g}"
        return None


def allowed_beside(float32_error: float) -> float:
    """How far from float64 onnxruntime may be, given the float32 computation's own error."""
    return max(EXPORT_FACTOR * float32_error, TOLERANCE)


class ExportError(RuntimeError):
    """The exported graph is unusable: unchecked, or not the computation it was exported from."""


def judge(measured: Iterable[tuple[str, ExportErrors]], subject: str, float32: str = "torch float32"
          ) -> ExportErrors:
    """The worst of each error, or ExportError on the first output and inputs where the export is not the
    `subject`'s computation (cellstream.model.parity's rule, beside the float32 computation named `float32`,
    whose worst error over every input is the yardstick)."""
    measured = list(measured)
    yardstick = max((errors.torch_to_float64 for _, errors in measured), default=0.0)
    worst = ExportErrors(0.0, 0.0, 0.0)
    for where, errors in measured:
        problem = errors.problem(float32, yardstick)
        if problem is not None:
            raise ExportError(f"the export is not the {subject}'s computation: {where}: {problem}")
        worst = worst.worst(errors)
    return worst


def random_inputs(input_kind: str, input_size: int, num_layers: int, hidden_size: int, seed: int,
                  shapes: Sequence[tuple[int, int]]) -> Iterator[Inputs]:
    """Random inputs (token ids below `input_size`, or `input_size` features N(0, 1) a step) from random states
    N(0, 0.5), one set per (batch, time) of `shapes`."""
    rng = np.random.default_rng(seed)
    for batch, time in shapes:
        if input_kind == "tokens":
            x = rng.integers(0, input_size, size=(batch, time), dtype=np.int64)
        else:
            x = rng.normal(0, 1, (batch, time, input_size)).astype(np.float32)
        state = (num_layers, batch, hidden_size)
        yield (f"random inputs and state, batch {batch}, time {time}", x,
               rng.normal(0, 0.5, state).astype(np.float32), rng.normal(0, 0.5, state).astype(np.float32))

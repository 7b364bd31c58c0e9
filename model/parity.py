"""How far apart two float32 computations of the same thing are.

Logits and h are O(1), but the cell state C is unbounded (it reaches |C| ~ 30 in a trained LSTM),
and one float32 ulp at 32 is 3.8e-6: an absolute 1e-5 bound there only measures rounding order.
So differences are scaled by max(1, |reference|): absolute below 1, relative above.
"""

from __future__ import annotations

import numpy as np

TOLERANCE = 1e-5


def scaled_max_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, |want|), elementwise; inf when the shapes differ."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    return float((np.abs(got - want) / np.maximum(1.0, np.abs(want))).max())

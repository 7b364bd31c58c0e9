"""The few numbers every figure needs: percentiles, interpolation, even splits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of durations in seconds, in milliseconds."""
    return float(np.percentile(np.asarray(seconds, dtype=np.float64), q)) * 1e3


def log2_interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """y at x on the piecewise-linear curve through (x, y) points in log2(x); clamped to its ends.

    Throughput grows roughly with log(batch) between powers of two, so interpolating in log2 is closer
    to the measured curve than in linear batch size.
    """
    ordered = sorted(points)
    xs = [math.log2(px) for px, _ in ordered]
    ys = [py for _, py in ordered]
    return float(np.interp(math.log2(max(x, ordered[0][0])), xs, ys))


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` shares differing by at most one, largest first."""
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]

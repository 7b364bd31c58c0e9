"""How good the shipped forecaster is, measured on the exported file under onnxruntime (no torch), on
held-out streams of cellstream.model.signal: forecast error with the state carried and with it reset, against
the noise floor and a persistence forecast, and how many readings a reset costs: what the state holds
(the level of the current regime and the phase) is learnt again only from tens of noisy readings.

Errors are root mean squares over the readings from WARM_UP on: to the next reading (noise included:
its floor is the noise, 0.8) and to the next clean value (the noise-free signal: 0 for a perfect
forecaster).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from cellstream.model.signal import SIGNAL, SignalConfig, make_streams

SEED = 99  # held-out: training draws from the seed 1234
STREAMS, LENGTH, WARM_UP = 64, 2000, 400
RESET_EVERY = 16  # the reset run starts from zero state every 16 readings (one period)
SINCE_RESET = (4, 16, 32, 64, 128, 256)


class Forecasts:
    """The model's next-reading forecasts for streams of readings, from a zero state."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        h0 = self.session.get_inputs()[1].shape
        self.state_shape = (h0[0], h0[2])

    def __call__(self, readings: np.ndarray) -> np.ndarray:
        """readings (B, T) -> forecasts (B, T): [b, t] forecasts reading t + 1."""
        zeros = np.zeros((self.state_shape[0], len(readings), self.state_shape[1]), np.float32)
        forecast, _, _ = self.session.run(None, {"features": readings[..., None], "h0": zeros, "c0": zeros})
        return forecast[..., 0]

    def reset_every(self, readings: np.ndarray, every: int) -> np.ndarray:
        """Forecasts when the state is reset to zero every `every` readings."""
        batch, length = readings.shape
        chunks = readings[:, : length - length % every].reshape(batch, -1, every)
        forecasts = self(chunks.reshape(-1, every)).reshape(batch, -1)
        return np.pad(forecasts, ((0, 0), (0, length - forecasts.shape[1])), constant_values=np.nan)


def _rmse(forecast: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.nanmean((forecast - target) ** 2)))


def measure(path: Path, config: SignalConfig = SIGNAL) -> dict:
    forecasts = Forecasts(path)
    streams = make_streams(np.random.default_rng(SEED), STREAMS, LENGTH + 1, config)
    readings, after = streams.readings[:, :-1], slice(WARM_UP, LENGTH)
    next_reading, next_clean = streams.readings[:, 1:], streams.clean[:, 1:]
    period = int(config.period)
    runs = {"carried": forecasts(readings), f"reset every {RESET_EVERY}": forecasts.reset_every(readings, RESET_EVERY),
            "persistence (last reading)": readings}
    report: dict = {"signal": {"streams": STREAMS, "readings": LENGTH, "scored_from": WARM_UP, "seed": SEED,
                               "noise": config.noise}}
    report["forecast_rmse"] = {
        name: {"to_next_reading": _rmse(run[:, after], next_reading[:, after]),
               "to_clean_value": _rmse(run[:, after], next_clean[:, after])}
        for name, run in runs.items()
    }
    report["forecast_rmse"]["noise floor (the clean value)"] = {
        "to_next_reading": _rmse(next_clean[:, after], next_reading[:, after]), "to_clean_value": 0.0}
    # A reset at WARM_UP: the error over the (up to one period of) readings before the k-th one after it,
    # against the same readings forecast with the state carried.
    fresh, carried = forecasts(readings[:, WARM_UP:]), runs["carried"][:, WARM_UP:]
    clean_after = next_clean[:, WARM_UP:]
    report["after_a_reset"] = {}
    for k in SINCE_RESET:
        window = slice(max(0, k - period), k)
        report["after_a_reset"][str(k)] = {"reset": _rmse(fresh[:, window], clean_after[:, window]),
                                           "carried": _rmse(carried[:, window], clean_after[:, window])}
    return report


def summary(report: dict) -> str:
    lines = ["forecast (readings {scored_from}-{readings} of {streams} held-out streams) | RMSE to next reading | "
             "RMSE to clean value".format(**report["signal"])]
    for name, row in report["forecast_rmse"].items():
        lines.append(f"{name} | {row['to_next_reading']:.3f} | {row['to_clean_value']:.3f}")
    lines.append("readings since a reset | RMSE to clean value, reset | carried")
    for k, row in report["after_a_reset"].items():
        lines.append(f"{k} | {row['reset']:.3f} | {row['carried']:.3f}")
    return "\n".join(lines)

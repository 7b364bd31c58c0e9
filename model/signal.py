"""A synthetic sensor signal that needs memory to forecast: a noisy periodic reading whose level regime
switches now and then. NumPy only (the service tests and the quality report use it without torch).

    reading_t = level_t + amplitude * sin(2 pi t / period + phase) + noise_t,  noise ~ N(0, noise^2)

The level (the regime: low, mid, high) holds for a random 150-400 readings, then moves to another one.
One reading says little: the noise is as large as the gap between levels, so the level and the phase
are known only from many readings, which the forecaster must carry in its state. Reset the state and
it must gather them again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SignalConfig:
    levels: tuple[float, ...] = (-1.0, 0.0, 1.0)
    amplitude: float = 1.0
    period: float = 16.0  # readings per cycle
    noise: float = 0.8  # standard deviation of one reading's noise
    min_regime: int = 150  # readings a regime lasts at least
    max_regime: int = 400  # ... and at most


SIGNAL = SignalConfig()  # the signal the shipped forecaster is trained and measured on


@dataclass(frozen=True)
class Streams:
    readings: np.ndarray  # (B, T) float32: what the sensor sends
    clean: np.ndarray  # (B, T) float32: the reading without its noise, the best possible forecast
    regime: np.ndarray  # (B, T) int64: index into SignalConfig.levels


def make_streams(rng: np.random.Generator, batch: int, length: int, config: SignalConfig = SIGNAL,
                 first_switch: int | None = None) -> Streams:
    """`batch` independent streams of `length` readings, each from a random phase and level. The first
    regime lasts a random part of its span, so a stream starts anywhere in a regime, unless
    `first_switch` says when (then every later regime is at least min_regime long)."""
    regime = np.empty((batch, length), np.int64)
    for b in range(batch):
        t, current = 0, int(rng.integers(len(config.levels)))
        span = first_switch if first_switch is not None else int(rng.integers(1, config.max_regime + 1))
        while t < length:
            regime[b, t : t + span] = current
            t += span
            current = (current + int(rng.integers(1, len(config.levels)))) % len(config.levels)  # another level
            span = int(rng.integers(config.min_regime, config.max_regime + 1))
    steps = np.arange(length)[None, :]
    phase = rng.uniform(0, 2 * np.pi, (batch, 1))
    clean = np.asarray(config.levels)[regime] + config.amplitude * np.sin(2 * np.pi * steps / config.period + phase)
    readings = clean + rng.normal(0, config.noise, (batch, length))
    return Streams(readings.astype(np.float32), clean.astype(np.float32), regime)

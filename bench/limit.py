"""Figure 1: the physical limit, onnxruntime alone in this process (no network, no Python server)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from cellstream.service.engine import Engine

MIN_CALLS = 5


def calls_per_second(engine: Engine, batch: int, length: int, seconds: float) -> float:
    """Back-to-back engine.run calls on (batch, length) tokens, the state carried as a session does."""
    layers, hidden = engine.spec.state_shape
    tokens = np.full((batch, length), ord("a"), np.int64)
    h = np.zeros((layers, batch, hidden), np.float32)
    c = np.zeros_like(h)
    _, h, c = engine.run(tokens, h, c)  # the first call of a shape allocates; not timed
    calls = 0
    started = time.perf_counter()
    while True:
        _, h, c = engine.run(tokens, h, c)
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and calls >= MIN_CALLS:
            return calls / elapsed


def measure_limit(engine: Engine, batches: Sequence[int], prefill_tokens: int, seconds: float,
                  threads: int) -> dict[str, object]:
    steps = []
    for batch in batches:
        rate = calls_per_second(engine, batch, 1, seconds)
        steps.append({"batch": batch, "steps_per_s": batch * rate, "us_per_call": 1e6 / rate})
    rate = calls_per_second(engine, 1, prefill_tokens, seconds)
    prefill = {"tokens": prefill_tokens, "batch": 1, "tokens_per_s": prefill_tokens * rate, "ms_per_call": 1e3 / rate}
    return {"threads": threads, "steps": steps, "prefill": prefill}

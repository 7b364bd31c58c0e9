"""Stream sensor readings to cellstream-sensor one at a time and print its forecasts of the next reading.

    python examples/sensor_client.py --target 127.0.0.1:50051              # native cellstream.v1 `features`
    python examples/sensor_client.py --target 127.0.0.1:50051 --api kserve # KServe v2 FP32 tensors (tritonclient)

The server keeps the session's LSTM state, so each request carries only the new reading. The readings
here are made up as the model was trained: a noisy sine around a level that jumps from 0 to 1 halfway.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator

import numpy as np

MODEL = "cellstream-sensor"


def readings(count: int, seed: int = 0) -> Iterator[tuple[float, float]]:
    """(reading, its noise-free value): level 0 then 1, a sine of period 16, noise 0.8."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi)
    for t in range(count):
        clean = (0.0 if t < count // 2 else 1.0) + np.sin(2 * np.pi * t / 16 + phase)
        yield float(clean + rng.normal(0, 0.8)), float(clean)


def native(target: str, count: int) -> list[tuple[float, float, float]]:
    import cellstream

    rows = []
    with cellstream.Client(target) as client, client.session(MODEL) as session:
        for reading, clean in readings(count):
            # One reading = one feature vector of 1 float; `logits=True` asks for the last step's output,
            # which this model returns in `outputs` (ListModels: output_name "forecast").
            result = session.step(features=[[reading]], logits=True)
            rows.append((reading, clean, float(result.outputs[0])))
    return rows


def kserve(target: str, count: int) -> list[tuple[float, float, float]]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(target)
    rows = []
    for k, (reading, clean) in enumerate(readings(count)):
        tensor = grpcclient.InferInput("features", [1, 1, 1], "FP32")  # (batch, time, features)
        tensor.set_data_from_numpy(np.array([[[reading]]], np.float32))
        result = client.infer(MODEL, [tensor], sequence_id="sensor-1", sequence_start=k == 0,
                              sequence_end=k == count - 1)
        rows.append((reading, clean, float(result.as_numpy("forecast")[0, 0, 0])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--api", choices=("native", "kserve"), default="native")
    parser.add_argument("--readings", type=int, default=200)
    args = parser.parse_args()
    rows = native(args.target, args.readings) if args.api == "native" else kserve(args.target, args.readings)
    for t, (reading, _, forecast) in enumerate(rows):
        if t % 10 == 0:
            print(f"reading {t:4d}: {reading:+.2f}   forecast of the next: {forecast:+.2f}")
    # forecast t is of reading t + 1: compare it with that reading's noise-free value
    errors = np.array([forecast - clean for (_, _, forecast), (_, clean, _) in itertools.pairwise(rows)])
    windows = [errors[k : k + 25] for k in range(0, len(errors), 25)]
    print("RMSE to the noise-free next value, by 25 readings (the level jumps halfway): "
          + " ".join(f"{np.sqrt(np.mean(w ** 2)):.2f}" for w in windows))

if __name__ == "__main__":
    main()

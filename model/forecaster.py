"""The shipped features model: an LSTM that forecasts the next reading of a sensor stream (cellstream.model.signal),
trained here, exported through the user-module path (cellstream.model.user_export) as any user's LSTM would be,
and measured (cellstream.model.forecast_quality): `python -m cellstream.model.forecaster` (part of `make model`).

Network: reading (1 float) -> LSTM 1 layer x 48 -> linear 1: the forecast of the next reading. It is
written the way a user writes one, called as `module(x, (h0, c0)) -> (y, (hn, cn))`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cellstream.model import forecast_quality, glassbox
from cellstream.model.signal import SIGNAL, SignalConfig, make_streams
from cellstream.model.user_export import export_module

NAME = "cellstream-sensor"
OUTPUT = "forecast"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    steps: int = 1500
    batch: int = 32
    length: int = 384  # readings per training stream: one to three regime switches
    hidden_size: int = 48
    num_layers: int = 1
    lr: float = 1e-2


class Forecaster(nn.Module):
    """readings (B, T, 1), state (h0, c0) (L, B, H) -> forecasts of the next reading (B, T, 1), (hn, cn)."""

    def __init__(self, hidden_size: int = 48, num_layers: int = 1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        with torch.no_grad():  # forget gates start open (bias 2, f ~ 0.9): the level is an average over many readings
            for name, bias in self.lstm.named_parameters():
                if name.startswith("bias_ih"):
                    bias[hidden_size : 2 * hidden_size] = 2.0

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.lstm(x, state)  # (B, T, H)
        return self.head(out), state


def train(config: TrainConfig, signal: SignalConfig = SIGNAL, log: bool = True) -> Forecaster:
    """Adam with one-cycle to `lr`; loss: mean squared error of the forecast to the next (noisy) reading."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = Forecaster(config.hidden_size, config.num_layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps)
    zeros = torch.zeros(config.num_layers, config.batch, config.hidden_size)
    started = time.monotonic()
    for step in range(1, config.steps + 1):
        readings = torch.from_numpy(make_streams(rng, config.batch, config.length + 1, signal).readings)
        forecast, _ = model(readings[:, :-1, None], (zeros, zeros))  # (B, T, 1)
        loss = nn.functional.mse_loss(forecast[..., 0], readings[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log and (step % 100 == 0 or step == config.steps):
            print(f"step {step}: loss {loss.item():.4f} ({time.monotonic() - started:.0f} s)", flush=True)
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellstream.model.forecaster", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(f"model/artifacts/{NAME}.onnx"))
    parser.add_argument("--quality", type=Path, default=Path(f"model/artifacts/{NAME}.quality.json"))
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for this small net)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainConfig(seed=args.seed, steps=args.steps)
    started = time.monotonic()
    model = train(config)
    seconds = time.monotonic() - started
    samples = [make_streams(np.random.default_rng(config.seed + 1), 4, 600).readings[..., None]]
    metadata = {
        "cellstream.description": "forecast of the next sensor reading (model.signal: noisy periodic reading, "
                                  "level regime switching every 150-400 readings)",
        "cellstream.training_seed": str(config.seed),
        "cellstream.training_steps": str(config.steps),
        "cellstream.training_seconds": f"{seconds:.0f}",
        "cellstream.signal": json.dumps(asdict(SIGNAL)),
    }
    worst = export_module(model, args.out, output_name=OUTPUT, metadata=metadata, samples=samples)
    print(f"trained in {seconds:.0f} s; wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB); parity: "
          f"onnxruntime to float64 {worst.onnxruntime_to_float64:.2e} (torch float32 {worst.torch_to_float64:.2e}), "
          f"to torch float32 {worst.onnxruntime_to_torch:.2e}")
    print(glassbox.export_line(args.out))
    report = forecast_quality.measure(args.out) | {
        "training": asdict(config) | {"seconds": round(seconds, 1)},
        "parity": asdict(worst),
    }
    args.quality.write_text(json.dumps(report, indent=2) + "\n")
    print(forecast_quality.summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

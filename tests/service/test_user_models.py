"""Bring your own LSTM: user modules (token and feature inputs, 1-3 layers, batch-first or time-first,
linear and MLP heads) exported by cellstream.model.user_export pass its float64 check, load in the server, and
through the native API give the outputs and (h, C) of the torch module for any split of a sequence:
within 1e-5 of onnxruntime on the whole sequence, and by the float64 rule against torch."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cellstream.model.parity import TOLERANCE, ExportErrors
from cellstream.model.user_export import export_module
from cellstream.model.wrap import serve
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.engine import Engine

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
VOCAB, FEATURES, OUTPUTS, HIDDEN = 40, 3, 5, 12


@dataclass(frozen=True)
class Case:
    input_kind: str
    layers: int
    batch_first: bool
    head: str  # "linear" or "mlp"
    output_name: str | None = None  # None: the export's default (logits / outputs)

    @property
    def name(self) -> str:
        order = "bf" if self.batch_first else "tf"
        return f"{self.input_kind}-{self.layers}l-{order}-{self.head}" + (f"-{self.output_name}" if self.output_name
                                                                           else "")


CASES = [
    Case("tokens", 1, True, "linear"),
    Case("tokens", 2, False, "mlp"),
    Case("tokens", 3, True, "mlp"),
    Case("tokens", 3, False, "linear"),
    Case("features", 1, False, "linear"),
    Case("features", 2, True, "mlp", "forecast"),
    Case("features", 3, False, "mlp"),
    Case("features", 2, False, "linear", "logits"),
]


class UserLSTM(nn.Module):
    """Written as a user writes one: nn.LSTM's own calling convention, its own time layout, any head."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6) if case.input_kind == "tokens" else None
        self.lstm = nn.LSTM(6 if self.embed else FEATURES, HIDDEN, case.layers, batch_first=case.batch_first)
        out = VOCAB if self.embed else OUTPUTS
        self.head = (nn.Linear(HIDDEN, out) if case.head == "linear"
                     else nn.Sequential(nn.Linear(HIDDEN, 16), nn.GELU(), nn.Linear(16, out)))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, state = self.lstm(self.embed(x) if self.embed is not None else x, state)
        return self.head(y), state


def user_module(case: Case, seed: int) -> UserLSTM:
    torch.manual_seed(seed)
    module = UserLSTM(case)
    with torch.no_grad():  # a cell state that grows like a trained one's, where float32 rounding shows
        for name, bias in module.lstm.named_parameters():
            if name.startswith("bias_ih"):
                bias[HIDDEN : 2 * HIDDEN] += 2.0
    return module.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict[str, ExportErrors]]:
    """Every case exported into one model directory; the worst errors of each export's check."""
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("user-models")
    worst = {case.name: export_module(user_module(case, seed), directory / f"{case.name}.onnx",
                                      output_name=case.output_name)
             for seed, case in enumerate(CASES)}
    return directory, worst


def sequence(case: Case, rng: np.random.Generator, steps: int) -> np.ndarray:
    if case.input_kind == "tokens":
        return rng.integers(0, VOCAB, steps)
    return rng.normal(0, 1.5, (steps, FEATURES)).astype(np.float32)


def split(rng: np.random.Generator, steps: int) -> list[int]:
    cuts = np.sort(rng.choice(np.arange(1, steps), size=int(rng.integers(1, 6)), replace=False))
    return np.diff([0, *cuts, steps]).tolist()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_user_module_served_matches_torch_for_any_split(case, exported, start, connect, arrays, close, step):
    directory, worst = exported
    assert worst[case.name].problem() is None  # export_module raised otherwise; the numbers are sane
    name = case.name
    engine = Engine(directory / f"{name}.onnx")
    assert (engine.spec.input_kind, engine.spec.num_layers, engine.spec.hidden_size) == (case.input_kind,
                                                                                          case.layers, HIDDEN)
    output_name = case.output_name or ("logits" if case.input_kind == "tokens" else "outputs")
    assert engine.spec.output_name == output_name
    stub = connect(await start(model_dir=directory, default_model=CASES[0].name))
    served = serve(user_module(case, CASES.index(case)))
    exact = serve(user_module(case, CASES.index(case)).double())
    rng = np.random.default_rng(CASES.index(case))

    async def stream(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x fed in random pieces; (outputs (T, V), h, c) as the server returned them."""
        session = await stub.OpenSession(pb.OpenSessionRequest(model=name))
        outputs, start_at = [], 0
        for piece in split(rng, len(x)):
            chunk = x[start_at : start_at + piece]
            start_at += piece
            kwargs = {"tokens": chunk.tolist()} if case.input_kind == "tokens" else {"features": chunk}
            response = await stub.Step(step(session.session_id, all_steps=True, state=True, **kwargs))
            values, other = ((response.logits, response.outputs) if output_name == "logits"
                             else (response.outputs, response.logits))
            assert not other, "the output comes back under its own name only"
            outputs.append(np.asarray(values, np.float32).reshape(piece, -1))
        return np.concatenate(outputs), *arrays(response.state)

    sequences = [sequence(case, rng, int(rng.integers(8, 40))) for _ in range(4)]
    # Streamed concurrently: pieces of equal length from different sessions share batches.
    for x, (got, h, c) in zip(sequences, await asyncio.gather(*map(stream, sequences)), strict=True):
        # onnxruntime against itself: the whole sequence in one call, in-process.
        zeros = np.zeros((case.layers, 1, HIDDEN), np.float32)
        want, hn, cn = engine.run(x[None], zeros, zeros)
        close(got, want[0], f"{name} outputs")
        close(h, hn[:, 0], f"{name} h")
        close(c, cn[:, 0], f"{name} C")
        # Against torch: float32 and float64 runs of the module itself, by the export rule.
        with torch.no_grad():
            x32 = torch.from_numpy(np.asarray(x)[None])
            torch32 = served(x32, *served.zero_state(1))
            x64 = x32 if case.input_kind == "tokens" else x32.double()
            torch64 = exact(x64, *exact.zero_state(1))
        for what, server, t32, t64 in (("outputs", got, torch32[0][0], torch64[0][0]),
                                       ("h", h, torch32[1][:, 0], torch64[1][:, 0]),
                                       ("C", c, torch32[2][:, 0], torch64[2][:, 0])):
            errors = ExportErrors.measure(server, t32.numpy(), t64.numpy())
            assert errors.problem() is None, (name, what, errors)
            assert errors.onnxruntime_to_torch <= 10 * TOLERANCE, (name, what, errors)

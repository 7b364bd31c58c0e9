"""cellstream.model.onnx_adapt: a graph exported elsewhere, with its own tensor names and one (batch, hidden) state per
layer (as Keras gives it), becomes a servable file that computes the same thing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from cellstream.model.onnx_adapt import add_metadata, rename, stack_states
from cellstream.service.engine import Engine

HIDDEN = 6


class PerLayerState(nn.Module):
    """Stacked single-layer LSTMs taking and returning each layer's (batch, hidden) h and c, like Keras."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.lstms = nn.ModuleList(nn.LSTM(2 if k == 0 else HIDDEN, HIDDEN, batch_first=True) for k in range(layers))
        self.dense = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for k, lstm in enumerate(self.lstms):
            x, (h, c) = lstm(x, (states[2 * k][None], states[2 * k + 1][None]))
            out += [h[0], c[0]]
        return (self.dense(x), *out)


def foreign(path: Path, layers: int) -> tuple[list[str], list[str]]:
    names_in = ["input_1", *(f"{s}_{k}" for k in range(layers) for s in ("h", "c"))]
    names_out = ["dense", *(f"{s}_{k}_out" for k in range(layers) for s in ("h", "c"))]
    axes = {name: {0: "N"} for name in names_in[1:] + names_out[1:]}
    torch.manual_seed(layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(PerLayerState(layers).eval(), (torch.zeros(2, 3, 2), *[torch.zeros(2, HIDDEN)] * 2 * layers),
                          str(path), dynamo=False, opset_version=17, input_names=names_in, output_names=names_out,
                          dynamic_axes={"input_1": {0: "N", 1: "T"}, "dense": {0: "N", 1: "T"}, **axes})
    return names_in, names_out


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_adapted_graph_is_served_and_computes_the_same(tmp_path, layers):
    source = tmp_path / "keras.onnx"
    names_in, names_out = foreign(source, layers)
    model = onnx.load(str(source))
    rename(model, {"input_1": "features", "dense": "forecast"})
    stack_states(model, inputs={"h0": names_in[1::2], "c0": names_in[2::2]},
                 outputs={"hn": names_out[1::2], "cn": names_out[2::2]}, hidden_size=HIDDEN)
    add_metadata(model, {"cellstream.description": "a foreign forecaster"})
    onnx.checker.check_model(model, full_check=True)
    served = tmp_path / "served.onnx"
    onnx.save(model, str(served))
    engine = Engine(served)
    assert (engine.spec.num_layers, engine.spec.hidden_size, engine.spec.feature_size) == (layers, HIDDEN, 2)
    assert engine.spec.output_name == "forecast" and engine.spec.metadata["cellstream.description"]
    rng = np.random.default_rng(layers)
    x = rng.normal(size=(3, 7, 2)).astype(np.float32)
    h0, c0 = rng.normal(size=(2, layers, 3, HIDDEN)).astype(np.float32)
    feeds = {"input_1": x} | {name: (h0 if name.startswith("h") else c0)[k // 2] for k, name in
                              enumerate(names_in[1:])}
    want = ort.InferenceSession(str(source)).run(names_out, feeds)
    forecast, hn, cn = engine.run(x, h0, c0)
    np.testing.assert_array_equal(forecast, want[0])
    np.testing.assert_array_equal(hn, np.stack(want[1::2]))
    np.testing.assert_array_equal(cn, np.stack(want[2::2]))

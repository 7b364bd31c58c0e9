"""`cellstream check-model`: the spec of a servable file, or every contract violation with what to change;
and the server refuses the same files at start-up with the same words. check-model runs without torch."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from cellstream.service.config import load_settings
from cellstream.service.errors import ModelLoadError
from cellstream.service.server import start_server

FLOAT, INT64, INT32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32


def check_model(path: Path) -> subprocess.CompletedProcess:
    """check-model in a fresh interpreter where importing torch fails: proof that it needs none."""
    code = ("import sys; sys.modules['torch'] = None; from cellstream.service.cli import main; "
            f"sys.exit(main(['check-model', {str(path)!r}]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def tensor(name: str, kind: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, kind, shape)


def graph(path: Path, inputs: list, outputs: dict[str, str]) -> Path:
    """A graph whose outputs (name -> the input it copies) declare the shape of what they copy."""
    shapes = {i.name: i for i in inputs}
    nodes = [helper.make_node("Identity", [source], [name]) for name, source in outputs.items()]
    infos = []
    for name, source in outputs.items():
        info = onnx.ValueInfoProto()
        info.CopyFrom(shapes[source])
        info.name = name
        infos.append(info)
    model = helper.make_model(helper.make_graph(nodes, path.stem, inputs, infos),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def state(name: str, hidden: int | str = 4) -> onnx.ValueInfoProto:
    return tensor(name, FLOAT, [2, "batch", hidden])


FEATURES = tensor("features", FLOAT, ["batch", "time", 3])
STATE_OUT = {"hn": "h0", "cn": "c0"}


def missing_c0(directory: Path) -> Path:
    return graph(directory / "missing-c0.onnx", [FEATURES, state("h0")], {"forecast": "features", "hn": "h0",
                                                                          "cn": "h0"})


def dynamic_hidden(directory: Path) -> Path:
    return graph(directory / "dynamic-hidden.onnx", [FEATURES, state("h0", "hidden"), state("c0", "hidden")],
                 {"forecast": "features", **STATE_OUT})


def wrong_dtype(directory: Path) -> Path:
    tokens = tensor("tokens", INT32, ["batch", "time"])
    logits = tensor("scores", FLOAT, ["batch", "time", 260])
    return graph(directory / "wrong-dtype.onnx", [tokens, logits, state("h0"), state("c0")],
                 {"logits": "scores", **STATE_OUT})


def extra_inputs(directory: Path) -> Path:
    temperature = tensor("temperature", FLOAT, [1])
    return graph(directory / "extra-inputs.onnx", [FEATURES, state("h0"), state("c0"), temperature],
                 {"forecast": "features", **STATE_OUT})


def gru(directory: Path) -> Path:
    """A real GRU exported from torch as a user would: features, h0 -> outputs, hn."""
    import torch
    from torch import nn

    class Gru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru, self.head = nn.GRU(3, 8, 2, batch_first=True), nn.Linear(8, 1)

        def forward(self, features: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out, hn = self.gru(features, h0)
            return self.head(out), hn

    path = directory / "gru.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Gru().eval(), (torch.zeros(2, 3, 3), torch.zeros(2, 2, 8)), str(path), dynamo=False,
                          opset_version=17, input_names=["features", "h0"], output_names=["outputs", "hn"],
                          dynamic_axes={"features": {0: "batch", 1: "time"}, "outputs": {0: "batch", 1: "time"},
                                        "h0": {1: "batch"}, "hn": {1: "batch"}})
    return path


BROKEN = {
    missing_c0: ["missing input 'c0': a stateful LSTM takes h and C as h0 and c0, float32 (layers, batch, hidden) "
                 "(a GRU or a plain RNN has no cell state: cellstream serves LSTMs, which carry h and C)"],
    dynamic_hidden: ["h0's hidden size (axis 2) is 'hidden'; it must be a fixed number in the graph: export it as "
                     "(layers, batch, hidden) with only the batch axis (1) dynamic",
                     "c0's hidden size (axis 2) is 'hidden'"],
    wrong_dtype: ["tokens is tensor(int32); it must be int64 token ids: cast it in the graph or at export",
                  "unexpected inputs ['scores']"],
    extra_inputs: ["unexpected inputs ['temperature']: the server feeds only features, h0 and c0; fold the others "
                   "into the graph as constants, or remove them"],
    gru: ["missing input 'c0'", "a GRU or a plain RNN has no cell state", "missing output 'cn'"],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("make", BROKEN, ids=[f.__name__ for f in BROKEN])
async def test_check_model_and_server_name_the_same_problem(make, tmp_path):
    path = make(tmp_path)
    checked = check_model(path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"{path} cannot be served:" in checked.stderr
    problems = [line.removeprefix("  - ") for line in checked.stderr.splitlines()[1:]]
    for words in BROKEN[make]:
        assert any(words in problem for problem in problems), (words, problems)
    with pytest.raises(ModelLoadError) as refused:
        await start_server(load_settings(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                                         model_dir=tmp_path, ort_intra_op_threads=1))
    assert str(refused.value) == f"{path.name}: " + "; ".join(problems)  # word for word


@pytest.mark.timeout(60)
def test_check_model_prints_the_spec_of_a_servable_file(tiny_model_dir):
    checked = check_model(tiny_model_dir / "tiny-chat.onnx")
    assert checked.returncode == 0, checked.stderr
    lines = [line.strip() for line in checked.stdout.splitlines()]
    assert lines[0].endswith("tiny-chat.onnx can be served")
    assert "input    tokens int64 (batch, time); text accepted (bytes-v1 tokenizer)" in lines
    assert "state    h0, c0 -> hn, cn float32 (2, batch, 16): 2 layers x 16 units" in lines
    assert "output   logits float32 (batch, time, 260)" in lines
    assert "meta     cellstream.vocab_size = 260" in lines


@pytest.mark.timeout(60)
def test_check_model_on_a_file_onnxruntime_cannot_read(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a graph")
    checked = check_model(garbage)
    assert checked.returncode == 1
    assert "garbage.onnx: onnxruntime cannot load it" in checked.stderr

"""cellstream.model.glassbox: the glass-box graph computes the gate equations of the fast graph's weights (the NumPy
reference, judged in float64), a wrong one fails that judgement by orders of magnitude, the weights read back
from an exported graph are the torch module's, and the commands that write one (`cellstream export`, `cellstream
gates`, the export of a user's module) do, or say why they cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from cellstream.model import glassbox
from cellstream.model.parity import ExportError, allowed_beside, judge
from cellstream.model.reference import ReferenceLSTM
from cellstream.model.user_export import export_module
from cellstream.service.gates import GATE_NAMES, path_for

pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def torch_reference(model: nn.Module) -> ReferenceLSTM:
    return ReferenceLSTM.from_state_dict({k: v.numpy() for k, v in model.state_dict().items()})


def test_the_writer_and_the_server_agree_on_the_file():
    """model/glassbox.py writes what service/gates.py reads; each keeps its copy (neither imports the other)."""
    assert glassbox.GATE_NAMES == GATE_NAMES
    for fast in (Path("cellstream-chat.onnx"), Path("/models/a.b.onnx")):
        assert glassbox.path_for(fast) == path_for(fast)


def test_export_writes_a_faithful_glass_box_beside_the_model(exported):
    model, path = exported
    glass = path_for(path)
    assert glass.is_file() and glass.name == "shared.gates.onnx"
    graph = onnx.load(str(glass))
    assert [i.name for i in graph.graph.input] == ["tokens", "h0", "c0"]
    assert [o.name for o in graph.graph.output] == ["hn", "cn", *GATE_NAMES]
    # Plain operators only: the fast graph's LSTM operator is what hides the gates.
    body = next(n for n in graph.graph.node if n.op_type == "Scan").attribute[0].g
    assert {n.op_type for n in body.node} <= {"Gather", "Concat", "Gemm", "Split", "Sigmoid", "Tanh", "Mul", "Add",
                                              "Unsqueeze", "Identity"}
    reference = torch_reference(model)
    worst = judge(glassbox.measure(reference, glass, path, glassbox.random_inputs(reference, "tokens")),
                  "NumPy reference", glassbox.FLOAT32)
    # As close to exact as the other float32 computations of these weights (the judge allows 4x).
    assert worst.onnxruntime_to_float64 <= 2 * worst.torch_to_float64, worst


def test_weights_read_from_the_exported_graph_are_the_torch_modules(exported):
    model, path = exported
    read, kind = glassbox.reference_from_graph(onnx.load(str(path)))
    want = torch_reference(model)
    assert kind == "tokens" and len(read.layers) == len(want.layers)
    np.testing.assert_array_equal(read.embedding, want.embedding)
    for got_layer, want_layer in zip(read.layers, want.layers, strict=True):
        for name, value in vars(want_layer).items():
            np.testing.assert_allclose(getattr(got_layer, name), value, rtol=0, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("defect", ["forget and input swapped", "forget bias dropped", "weights of another model"])
def test_a_wrong_glass_box_fails_the_judgement_by_orders_of_magnitude(exported, make_model, tmp_path, defect):
    model, path = exported
    reference = torch_reference(model)
    first = reference.layers[0]
    if defect == "forget and input swapped":
        wrong = type(first)(**(vars(first) | {"W_f": first.W_i, "W_i": first.W_f, "b_f": first.b_i, "b_i": first.b_f}))
        built = ReferenceLSTM((wrong, *reference.layers[1:]), reference.embedding)
    elif defect == "forget bias dropped":
        built = ReferenceLSTM((type(first)(**(vars(first) | {"b_f": 0 * first.b_f})), *reference.layers[1:]),
                              reference.embedding)
    else:
        built = torch_reference(make_model(99))
    fast = tmp_path / "model.onnx"
    fast.write_bytes(path.read_bytes())
    glass = glassbox.write(built, "tokens", fast)
    measured = list(glassbox.measure(reference, glass, fast, glassbox.random_inputs(reference, "tokens")))
    yardstick = max(e.torch_to_float64 for _, e in measured)  # the judge's: the worst over every input
    assert max(e.onnxruntime_to_float64 / allowed_beside(yardstick) for _, e in measured) > 100
    with pytest.raises(ExportError, match="not the NumPy reference's computation"):
        judge(measured, "NumPy reference", glassbox.FLOAT32)


def test_cellstream_gates_writes_one_for_an_exported_graph(exported, tmp_path, run_module):
    _, path = exported
    fast = tmp_path / "copy.onnx"
    fast.write_bytes(path.read_bytes())
    done = run_module("-m", "cellstream.service.cli", "gates", str(fast))
    assert done.returncode == 0, done.stderr
    assert f"wrote {path_for(fast)}; worst scaled error: onnxruntime to float64" in done.stdout
    assert path_for(fast).read_bytes() == path_for(path).read_bytes()  # the same graph as the export's own


def test_cellstream_gates_refuses_a_graph_without_an_lstm(tmp_path, run_module):
    x = onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [1, 1, 1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["features"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 1])])
    path = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    done = run_module("-m", "cellstream.service.cli", "gates", str(path))
    assert done.returncode == 2
    assert "plain.onnx: the graph has no ONNX LSTM operator to read gates from" in done.stderr
    assert not path_for(path).exists()


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 8, num_layers=2, batch_first=True), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, state = self.lstm(x, state)
        return self.head(y), state


class Squashed(Plain):
    """tanh between the input and the LSTM: the glass-box graph (which reads only the LSTM's weights and an
    embedding) does not compute its layer input."""

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return super().forward(torch.tanh(x), state)


def test_a_users_module_gets_a_glass_box_when_its_lstm_reads_the_input(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "plain.onnx"
    export_module(Plain(), out)
    assert glassbox.export_line(out).startswith(f"wrote {path_for(out)} (gates); worst scaled error")
    assert path_for(out).is_file()


def test_a_users_module_that_transforms_its_input_first_is_served_without_gates(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "squashed.onnx"
    export_module(Squashed(), out)
    line = glassbox.export_line(out)
    assert line.startswith("no glass-box graph (gates will be unavailable): the export is not the NumPy "
                           "reference's computation"), line
    assert out.is_file() and not path_for(out).exists()

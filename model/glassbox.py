"""The glass-box graph: the same LSTM weights as the fast graph, computed from the gate equations with
plain ONNX operators (Gather, Concat, Gemm, Split, Sigmoid, Tanh, Mul, Add in a Scan over time), so the
server can show every gate without torch. The fast graph's LSTM operator keeps its gates inside.

Inputs as the fast graph's: `tokens` (B, T) int64 or `features` (B, T, F) float32, h0/c0 (L, B, H).
Outputs: `forget`, `input`, `candidate`, `cell`, `output`, `hidden`, each (T, L, B, H): f_t, i_t, C̃_t,
C_t, o_t, h_t of every step and layer (model/reference.py's equations), and hn/cn (L, B, H).
It is written beside the fast graph as `<name>.gates.onnx`; the server serves gates when it finds one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import astuple
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from model.parity import ExportErrors
from model.reference import Gates, ReferenceLSTM
from service.gates import GATE_NAMES, path_for

OPSET = 17
FLOAT32 = "float32 reference"  # what the glass-box graph is judged beside: NumPy's gates, the fast graph's state
FLOAT = TensorProto.FLOAT


def _layer_nodes(k: int, x: str, weights: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """One layer's step in the Scan body: reads h_in/c_in row k and `x`, writes `{gate}_{k}` (B, H)."""
    index = numpy_helper.from_array(np.array(k, np.int64), f"layer_{k}")
    weights.append(index)
    n = f"_{k}"
    return [
        helper.make_node("Gather", ["h_in", index.name], ["h_prev" + n], axis=0),
        helper.make_node("Gather", ["c_in", index.name], ["c_prev" + n], axis=0),
        helper.make_node("Concat", ["h_prev" + n, x], ["hx" + n], axis=1),
        # W (4H, H + I) stacked f, i, C̃, o: one Gemm, then Split into the four pre-activations.
        helper.make_node("Gemm", ["hx" + n, "W" + n, "b" + n], ["z" + n], transB=1),
        helper.make_node("Split", ["z" + n], ["zf" + n, "zi" + n, "zc" + n, "zo" + n], axis=1),
        helper.make_node("Sigmoid", ["zf" + n], ["forget" + n]),
        helper.make_node("Sigmoid", ["zi" + n], ["input" + n]),
        helper.make_node("Tanh", ["zc" + n], ["candidate" + n]),
        helper.make_node("Sigmoid", ["zo" + n], ["output" + n]),
        helper.make_node("Mul", ["forget" + n, "c_prev" + n], ["kept" + n]),
        helper.make_node("Mul", ["input" + n, "candidate" + n], ["written" + n]),
        helper.make_node("Add", ["kept" + n, "written" + n], ["cell" + n]),
        helper.make_node("Tanh", ["cell" + n], ["squashed" + n]),
        helper.make_node("Mul", ["output" + n, "squashed" + n], ["hidden" + n]),
    ]


def _stack(name: str, layers: int, out: str) -> list[onnx.NodeProto]:
    """`{name}_0` .. `{name}_{L-1}` (B, H) stacked into `out` (L, B, H)."""
    axes = "stack_axis"
    rows = [f"{name}_{k}_row" for k in range(layers)]
    return [helper.make_node("Unsqueeze", [f"{name}_{k}", axes], [rows[k]]) for k in range(layers)] + [
        helper.make_node("Concat", rows, [out], axis=0)]


def build(reference: ReferenceLSTM, input_kind: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """The glass-box graph of `reference`'s layers (and embedding, for a tokens model)."""
    layers = len(reference.layers)
    body_constants: list[onnx.TensorProto] = [numpy_helper.from_array(np.array([0], np.int64), "stack_axis")]
    body_nodes: list[onnx.NodeProto] = []
    x = "x_t"
    for k, layer in enumerate(reference.layers):
        W = np.concatenate([layer.W_f, layer.W_i, layer.W_C, layer.W_o]).astype(np.float32)
        b = np.concatenate([layer.b_f, layer.b_i, layer.b_C, layer.b_o]).astype(np.float32)
        body_constants += [numpy_helper.from_array(W, f"W_{k}"), numpy_helper.from_array(b, f"b_{k}")]
        body_nodes += _layer_nodes(k, x, body_constants)
        x = f"hidden_{k}"
    for name in GATE_NAMES:
        body_nodes += _stack(name, layers, f"{name}_t")
    body_nodes += [helper.make_node("Identity", ["hidden_t"], ["h_out"]),
                   helper.make_node("Identity", ["cell_t"], ["c_out"])]
    state = ["L", "B", "H"]
    body = helper.make_graph(
        body_nodes, "lstm_step",
        [helper.make_tensor_value_info("h_in", FLOAT, state), helper.make_tensor_value_info("c_in", FLOAT, state),
         helper.make_tensor_value_info("x_t", FLOAT, ["B", "I"])],
        [helper.make_tensor_value_info("h_out", FLOAT, state), helper.make_tensor_value_info("c_out", FLOAT, state),
         *(helper.make_tensor_value_info(f"{name}_t", FLOAT, state) for name in GATE_NAMES)],
        initializer=body_constants,
    )
    outer_constants: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    if input_kind == "tokens":
        if reference.embedding is None:
            raise ValueError("a tokens model's glass-box graph needs the embedding weights")
        outer_constants.append(numpy_helper.from_array(reference.embedding.astype(np.float32), "embedding"))
        nodes.append(helper.make_node("Gather", ["embedding", "tokens"], ["layer_input"], axis=0))
        inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])]
    else:
        feature_size = reference.layers[0].W_f.shape[1] - reference.layers[0].W_f.shape[0]
        nodes.append(helper.make_node("Identity", ["features"], ["layer_input"]))
        inputs = [helper.make_tensor_value_info("features", FLOAT, ["batch", "time", feature_size])]
    hidden = reference.layers[0].W_f.shape[0]
    state_shape = [layers, "batch", hidden]
    steps_shape = ["time", layers, "batch", hidden]
    nodes.append(helper.make_node(
        "Scan", ["h0", "c0", "layer_input"], ["hn", "cn", *GATE_NAMES], body=body, num_scan_inputs=1,
        scan_input_axes=[1]))
    graph = helper.make_graph(
        nodes, "lstm_gates",
        [*inputs, helper.make_tensor_value_info("h0", FLOAT, state_shape),
         helper.make_tensor_value_info("c0", FLOAT, state_shape)],
        [helper.make_tensor_value_info("hn", FLOAT, state_shape),
         helper.make_tensor_value_info("cn", FLOAT, state_shape),
         *(helper.make_tensor_value_info(name, FLOAT, steps_shape) for name in GATE_NAMES)],
        initializer=outer_constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cellstream")
    model.ir_version = 8  # onnxruntime reads IR 8 at opset 17; newer onnx writes 10 by default
    for key, value in {"cellstream.graph": "glass-box", **(metadata or {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    return model


def write(reference: ReferenceLSTM, input_kind: str, fast_graph: Path) -> Path:
    """Build and save the glass-box graph beside `fast_graph`; returns its path."""
    path = path_for(fast_graph)
    onnx.save(build(reference, input_kind), str(path))
    return path


def reference_gates(reference: ReferenceLSTM, x: np.ndarray, h0: np.ndarray, c0: np.ndarray
                    ) -> dict[str, np.ndarray]:
    """The reference's gates in the glass-box layout: name -> (T, L, B, H), in the reference's dtype."""
    h, c = h0, c0
    steps: list[list[Gates]] = []
    for t in range(x.shape[1]):
        layer_input = reference.embedding[x[:, t]] if reference.embedding is not None else x[:, t]
        h, c, gates = reference.step(layer_input, h, c)
        steps.append(gates)
    return {name: np.array([[getattr(g, name) for g in step] for step in steps]) for name in GATE_NAMES}


def _float64(reference: ReferenceLSTM) -> ReferenceLSTM:
    """The same weights in float64: the exact computation the float32 ones approximate."""
    def exact(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else array.astype(np.float64)

    layers = tuple(type(layer)(**{k: v.astype(np.float64) for k, v in vars(layer).items()})
                   for layer in reference.layers)
    return ReferenceLSTM(layers, exact(reference.embedding), exact(reference.head_weight), exact(reference.head_bias))


def measure(reference: ReferenceLSTM, glass_box: Path, fast_graph: Path,
            inputs: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Iterator[tuple[str, ExportErrors]]:
    """(which output, its worst errors over all `inputs`), against the reference in float64 (model.parity's
    rule): each gate of the glass-box graph beside the NumPy reference in float32, and its final state hn, cn
    beside the fast graph's, which must hold the same weights.

    Worst over the inputs, not input by input: float32 runs that sum in a different order drift apart over
    hundreds of steps of a trained memory by a few 1e-5 either way, so on one input either can be the
    closer; a glass-box graph that is not the reference's computation is off by orders of magnitude.
    """
    exact = _float64(reference)
    glass = ort.InferenceSession(str(glass_box), providers=["CPUExecutionProvider"])
    fast = ort.InferenceSession(str(fast_graph), providers=["CPUExecutionProvider"])
    input_name = glass.get_inputs()[0].name
    worst: dict[str, ExportErrors] = {}

    def note(name: str, errors: ExportErrors) -> None:
        seen = worst.get(name, errors)
        worst[name] = ExportErrors(*(max(a, b) for a, b in zip(astuple(seen), astuple(errors), strict=True)))

    count = 0
    for _, x, h0, c0 in inputs:
        count += 1
        feed = {input_name: x, "h0": h0, "c0": c0}
        got = dict(zip([o.name for o in glass.get_outputs()], glass.run(None, feed), strict=True))
        float32 = reference_gates(reference, x, h0, c0)
        float64 = reference_gates(exact, x if x.dtype == np.int64 else x.astype(np.float64),
                                  h0.astype(np.float64), c0.astype(np.float64))
        for name in GATE_NAMES:
            note(name, ExportErrors.measure(got[name], float32[name], float64[name]))
        fast_outputs = dict(zip([o.name for o in fast.get_outputs()], fast.run(None, feed), strict=True))
        for name, final in (("hn", "hidden"), ("cn", "cell")):
            note(f"{name} against the fast graph's", ExportErrors.measure(got[name], fast_outputs[name],
                                                                          float64[final][-1]))
    for name, errors in worst.items():
        yield f"{name} (worst of {count} inputs)", errors

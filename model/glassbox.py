"""The glass-box graph: the same LSTM weights as the fast graph, computed from the gate equations with
plain ONNX operators (Gather, Concat, Gemm, Split, Sigmoid, Tanh, Mul, Add in a Scan over time), so the
server can show every gate without torch. The fast graph's LSTM operator keeps its gates inside.

Inputs as the fast graph's: `tokens` (B, T) int64 or `features` (B, T, F) float32, h0/c0 (L, B, H).
Outputs: `forget`, `input`, `candidate`, `cell`, `output`, `hidden`, each (T, L, B, H): f_t, i_t, C̃_t,
C_t, o_t, h_t of every step and layer (model/reference.py's equations), and hn/cn (L, B, H).
It is written beside the fast graph as `<name>.gates.onnx`; the server serves gates when it finds one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from cellstream.model import parity
from cellstream.model.onnx_file import OPSET
from cellstream.model.parity import ExportError, ExportErrors, Inputs, judge, scaled_max_diff
from cellstream.model.reference import Gates, LayerWeights, ReferenceLSTM

# What the server looks for: the gate outputs, and the file beside the fast graph. service/gates.py holds the same
# two (the server imports nothing of the training side, as with the metadata keys); tests/model/test_glassbox.py
# checks that they agree.
GATE_NAMES = ("forget", "input", "candidate", "cell", "output", "hidden")
SUFFIX = ".gates.onnx"
RANDOM_SHAPES = ((1, 1), (1, 17), (3, 5), (8, 1), (4, 200))  # (batch, time); the last: a long trained-memory drift
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


def path_for(fast_graph: Path) -> Path:
    """Where the glass-box graph of `fast_graph` goes: `cellstream-chat.onnx` -> `cellstream-chat.gates.onnx`."""
    return fast_graph.with_name(fast_graph.stem + SUFFIX)


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


def in_float64(reference: ReferenceLSTM) -> ReferenceLSTM:
    """The same weights in float64: the exact computation the float32 ones approximate."""
    def exact(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else array.astype(np.float64)

    layers = tuple(type(layer)(**{k: v.astype(np.float64) for k, v in vars(layer).items()})
                   for layer in reference.layers)
    return ReferenceLSTM(layers, exact(reference.embedding), exact(reference.head_weight), exact(reference.head_bias))


def measure(reference: ReferenceLSTM, glass_box: Path, fast_graph: Path,
            inputs: Iterable[Inputs]) -> Iterator[tuple[str, ExportErrors]]:
    """(which output, its worst errors over all `inputs`), against the reference in float64 (cellstream.model.parity's
    rule): each gate of the glass-box graph, and its final state hn, cn beside the fast graph's (which must hold
    the same weights).

    The float32 yardstick is the farther from float64 of the two other float32 computations of these weights,
    the NumPy reference and the fast graph, and the worst over the inputs: float32 runs that sum in another
    order drift apart over many steps by a few 1e-5 either way, so on one output of one input either can happen
    to be the closer. A glass-box graph that is not the reference's computation is off by orders of magnitude,
    and stays held to EXPORT_TO_TORCH of the NumPy float32 gates.
    """
    exact = in_float64(reference)
    glass = ort.InferenceSession(str(glass_box), providers=["CPUExecutionProvider"])
    fast = ort.InferenceSession(str(fast_graph), providers=["CPUExecutionProvider"])
    input_name = glass.get_inputs()[0].name
    worst: dict[str, ExportErrors] = {}

    def note(name: str, errors: ExportErrors) -> None:
        worst[name] = worst.get(name, errors).worst(errors)

    count = 0
    for _, x, h0, c0 in inputs:
        count += 1
        feed = {input_name: x, "h0": h0, "c0": c0}
        got = dict(zip([o.name for o in glass.get_outputs()], glass.run(None, feed), strict=True))
        float32 = reference_gates(reference, x, h0, c0)
        float64 = reference_gates(exact, x if x.dtype == np.int64 else x.astype(np.float64),
                                  h0.astype(np.float64), c0.astype(np.float64))
        fast_state = dict(zip([o.name for o in fast.get_outputs()], fast.run(None, feed), strict=True))
        finals = {"hn": float64["hidden"][-1], "cn": float64["cell"][-1]}
        yardstick = max(
            *(scaled_max_diff(float32[name], float64[name]) for name in GATE_NAMES),
            *(scaled_max_diff(fast_state[name], finals[name]) for name in finals),
        )
        for name in GATE_NAMES:
            note(name, ExportErrors(scaled_max_diff(got[name], float64[name]), yardstick,
                                    scaled_max_diff(got[name], float32[name])))
        for name, final in finals.items():
            note(f"{name} against the fast graph's", ExportErrors(scaled_max_diff(got[name], final), yardstick,
                                                                  scaled_max_diff(got[name], fast_state[name])))
    for name, errors in worst.items():
        yield f"{name} (worst of {count} inputs)", errors


def _token_ids(graph: onnx.GraphProto) -> set[str]:
    """`tokens` and the tensors holding the same ids laid out otherwise: a time-first module's exported graph
    transposes `tokens` (B, T) to (T, B) before its embedding, whose rows are the same whatever the layout."""
    names = {"tokens"}
    for node in graph.node:  # in topological order, as ONNX requires
        if node.op_type in ("Transpose", "Identity") and node.input and node.input[0] in names:
            names.update(node.output)
    return names


def reference_from_graph(fast_graph: onnx.ModelProto) -> tuple[ReferenceLSTM, str]:
    """The NumPy reference of a served graph's LSTM layers, read from its LSTM operators' weights (and its
    embedding, for a tokens model), and its input kind. Whatever else the graph does between its input and
    the first layer is not read: `measure` then finds the glass-box graph's state away from the fast one's."""
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in fast_graph.graph.initializer}
    inputs = [value.name for value in fast_graph.graph.input if value.name not in weights]
    input_kind = "tokens" if "tokens" in inputs else "features"
    lstms = [node for node in fast_graph.graph.node if node.op_type == "LSTM"]
    if not lstms:
        raise ValueError("the graph has no ONNX LSTM operator to read gates from")
    layers = []
    for k, node in enumerate(lstms):
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        unusual = sorted(set(attributes) - {"hidden_size", "direction"})
        if attributes.get("direction", b"forward") != b"forward" or unusual:
            raise ValueError(f"LSTM layer {k} is not a plain forward LSTM ({attributes}); its gates cannot be read")
        missing = [name for name in node.input[1:4] if name not in weights]
        if missing:
            raise ValueError(f"LSTM layer {k}'s weights {missing} are computed, not stored in the graph")
        W, R, B = (weights[name][0] for name in node.input[1:4])  # (4H, I), (4H, H), (8H,); ONNX order i, o, f, c
        hidden = R.shape[1]
        i, o, f, c = (slice(g * hidden, (g + 1) * hidden) for g in range(4))
        bias = B[:4 * hidden] + B[4 * hidden:]
        stacked = np.concatenate([R, W], axis=1)  # columns match [h, x]
        layers.append(LayerWeights(W_f=stacked[f], W_i=stacked[i], W_C=stacked[c], W_o=stacked[o],
                                   b_f=bias[f], b_i=bias[i], b_C=bias[c], b_o=bias[o]))
    embedding = None
    if input_kind == "tokens":
        ids = _token_ids(fast_graph.graph)
        gathers = [n for n in fast_graph.graph.node if n.op_type == "Gather" and n.input[1] in ids
                   and n.input[0] in weights]
        if len(gathers) != 1:
            raise ValueError(f"a tokens graph needs one embedding (a Gather of `tokens`, or of `tokens` transposed, "
                             f"from a stored table), found {len(gathers)}")
        embedding = weights[gathers[0].input[0]]
    return ReferenceLSTM(tuple(layers), embedding), input_kind


def random_inputs(reference: ReferenceLSTM, input_kind: str, seed: int = 0) -> Iterator[Inputs]:
    """(what, inputs, h0, c0): random inputs from random states N(0, 0.5), in RANDOM_SHAPES."""
    hidden, columns = reference.layers[0].W_f.shape  # columns: [h, x]
    if input_kind == "tokens":
        assert reference.embedding is not None
        input_size = reference.embedding.shape[0]
    else:
        input_size = columns - hidden
    return parity.random_inputs(input_kind, input_size, len(reference.layers), hidden, seed, RANDOM_SHAPES)


def export(fast_graph: Path, inputs: Iterable[Inputs] | None = None
           ) -> ExportErrors:
    """Write the glass-box graph of a served .onnx file beside it, read from its LSTM weights, and judge it
    against the NumPy reference and the file itself on `inputs` (default: random_inputs); returns the worst
    errors. ValueError when the weights cannot be read, ExportError (and no file) when the graph is not faithful."""
    reference, input_kind = reference_from_graph(onnx.load(str(fast_graph)))
    path = write(reference, input_kind, fast_graph)
    try:
        return judge(measure(reference, path, fast_graph, inputs or random_inputs(reference, input_kind)),
                     "NumPy reference", FLOAT32)
    except ExportError:
        path.unlink()
        raise


def export_line(fast_graph: Path) -> str:
    """`export` for the export commands of other models: what it wrote, or why the model has no gates (the
    model itself is served all the same)."""
    try:
        worst = export(fast_graph)
    except (ValueError, ExportError) as exc:
        return f"no glass-box graph (gates will be unavailable): {exc}"
    return f"wrote {path_for(fast_graph)} (gates); worst scaled error: {worst.summary(FLOAT32)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cellstream gates", description="Write the glass-box graph (the gates) of an exported model beside it, "
        "read from its ONNX LSTM weights, and judge it against the NumPy reference and the model itself. "
        "`cellstream export` writes one already; this is for models exported otherwise.")
    parser.add_argument("model", type=Path, help="the served .onnx file")
    args = parser.parse_args(argv)
    try:
        worst = export(args.model)
    except (OSError, ValueError, ExportError, onnx.checker.ValidationError) as exc:
        print(f"cellstream gates: error: {args.model}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path_for(args.model)}; worst scaled error: {worst.summary(FLOAT32)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

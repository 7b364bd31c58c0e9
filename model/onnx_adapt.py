"""Bring an LSTM exported by another framework (Keras via tf2onnx, JAX, a hand-made graph) to the serving
contract by editing its ONNX graph: rename the tensors, give the state as (layers, batch, hidden) when the
graph takes one (batch, hidden) tensor per layer, add `cellstream.*` metadata. Needs `onnx`, not torch.
docs/MODELS.md shows it in use; `cellstream check-model` then says whether the file can be served.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
from onnx import TensorProto, helper

AXIS0 = "cellstream_axis0"


def rename(model: onnx.ModelProto, names: Mapping[str, str]) -> None:
    """Rename graph inputs, outputs and every use of them (old name -> new name), in place."""
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
        node.output[:] = [names.get(name, name) for name in node.output]


def stack_states(model: onnx.ModelProto, inputs: Mapping[str, Sequence[str]], outputs: Mapping[str, Sequence[str]],
                 hidden_size: int) -> None:
    """Replace per-layer (batch, hidden) state inputs and outputs by stacked (layers, batch, hidden) ones, in
    place: inputs {"h0": [layer 1's h, layer 2's h, ...], "c0": [...]}, outputs {"hn": [...], "cn": [...]}."""
    graph = model.graph
    graph.initializer.append(helper.make_tensor(AXIS0, TensorProto.INT64, [1], [0]))
    head, tail, replaced = [], [], set()
    for name, layers in inputs.items():  # (L, B, H) -> one (B, H) per layer
        parts = [f"{name}_layer{k}" for k in range(len(layers))]
        head.append(helper.make_node("Split", [name], parts, axis=0) if len(layers) > 1
                    else helper.make_node("Identity", [name], parts))
        head += [helper.make_node("Squeeze", [part, AXIS0], [layer]) for part, layer in zip(parts, layers, strict=True)]
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [len(layers), "batch", hidden_size]))
        replaced.update(layers)
    for name, layers in outputs.items():  # one (B, H) per layer -> (L, B, H)
        tail += [helper.make_node("Unsqueeze", [layer, AXIS0], [f"{layer}_stacked"]) for layer in layers]
        tail.append(helper.make_node("Concat", [f"{layer}_stacked" for layer in layers], [name], axis=0))
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [len(layers), "batch", hidden_size]))
        replaced.update(layers)
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    for values in (graph.input, graph.output):
        kept = [value for value in values if value.name not in replaced]
        del values[:]
        values.extend(kept)


def add_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value

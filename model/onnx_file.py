"""What every ONNX file cellstream's export writes has in common: the opset, the version of the `cellstream.*`
metadata, and `stamp`, which writes that metadata into a file and checks the graph. Torch-free (onnx only):
the checkpoint export (cellstream.model.export), a user's module (cellstream.model.user_export) and the glass-box
graph (cellstream.model.glassbox) share it without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnx

FORMAT_VERSION = "1"
OPSET = 17


def stamp(path: Path, metadata: Mapping[str, str]) -> None:
    """Write the cellstream metadata into an exported file and check the graph (onnx's full check)."""
    graph = onnx.load(str(path))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    graph.producer_name = "cellstream"
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))

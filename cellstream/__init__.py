"""cellstream: stateful, streaming LSTM inference over gRPC and HTTP.

This package is the public API. Its parts live in subpackages: `cellstream.service` (the server, its
client and command line; no torch), `cellstream.model` (training and ONNX export; torch, with the `train`
extra) and `cellstream.bench` (the benchmarks). Importing `cellstream` itself loads nothing heavy.
"""

from __future__ import annotations

from importlib.metadata import version as _version

__version__ = _version("cellstream")

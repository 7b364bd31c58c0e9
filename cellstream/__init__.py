"""cellstream: stateful, streaming LSTM inference over gRPC and HTTP.

This package is the public API: the client (`Client`, blocking; `AsyncClient`, asyncio), its results and its
exceptions (docs/CLIENT.md). The server, the training side and the benchmarks live in subpackages:
`cellstream.service` (no torch), `cellstream.model` (torch, with the `train` extra) and `cellstream.bench`.

`import cellstream` loads nothing heavy: the client's modules (grpc, numpy, the generated stubs) load at the
first use of one of the names below, so the training side and the command line do not pay for them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

__version__ = _version("cellstream")

__all__ = [
    "AsyncClient", "AsyncSession", "CellstreamError", "Chunk", "Client", "DeadlineExceeded", "FailedPrecondition",
    "Gates", "InvalidArgument", "ModelInfo", "NotFound", "PermissionDenied", "PositionConflict", "ResourceExhausted",
    "Session", "State", "StepResult", "TokenProb", "Unauthenticated", "Unavailable", "__version__",
]
# Each public name's module, imported at the name's first use.
_MODULES = {"Client": "cellstream.sync", "Session": "cellstream.sync", "AsyncClient": "cellstream.aio",
            "AsyncSession": "cellstream.session"}
_MODULES |= dict.fromkeys(("StepResult", "State", "Chunk", "Gates", "TokenProb", "ModelInfo"), "cellstream.results")
_MODULES |= {name: "cellstream.errors" for name in __all__ if name not in _MODULES and name != "__version__"}

if TYPE_CHECKING:
    from cellstream.aio import AsyncClient
    from cellstream.errors import (
        CellstreamError,
        DeadlineExceeded,
        FailedPrecondition,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        PositionConflict,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
    )
    from cellstream.results import Chunk, Gates, ModelInfo, State, StepResult, TokenProb
    from cellstream.session import AsyncSession
    from cellstream.sync import Client, Session


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'cellstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""`import cellstream` is the public API: it loads nothing heavy by itself, and every name it lists is there
(the client's modules load at the first use of one), none of them needing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_import_cellstream_loads_nothing_heavy():
    heavy = ("grpc", "numpy", "google.protobuf", "torch", "onnxruntime")
    assert run(f"import sys, cellstream; print(*[m for m in {heavy!r} if m in sys.modules], 'ok')") == ["ok"]


def test_every_public_name_resolves_without_torch():
    code = ("import sys, cellstream; names = [n for n in cellstream.__all__ if getattr(cellstream, n) is None]; "
            "print(len(cellstream.__all__), names, 'torch' in sys.modules, issubclass(cellstream.NotFound, "
            "cellstream.CellstreamError), cellstream.Client.__module__, cellstream.AsyncClient.__module__)")
    assert run(code) == ["21", "[]", "False", "True", "cellstream.sync", "cellstream.aio"]
    assert sorted(run("import cellstream; print(*dir(cellstream))")) == sorted(run(
        "import cellstream; print(*cellstream.__all__)"))

"""The server runs without torch: its install does not pull it, and importing it does not load it. That no
module under service/ imports torch, onnx or cellstream.model, even in a function, is read from the source by
tests/test_import_graph.py."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAINING_ONLY = ("torch", "onnx", "tqdm", "faker")
# Every runtime dependency reaches the image and every install: adding one is a decision, taken here and in
# the README's list. starlette, uvicorn and httptools serve the HTTP port.
RUNTIME = {"numpy", "onnxruntime", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf",
           "prometheus-client", "pydantic-settings", "redis", "uvloop", "starlette", "uvicorn",
           "httptools"}


def package_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower() for req in requirements}


def test_runtime_dependencies_exclude_training_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert package_names(project["dependencies"]).isdisjoint(TRAINING_ONLY)
    assert {"torch", "onnx", "faker"} <= package_names(project["optional-dependencies"]["train"])


def test_the_runtime_dependencies_are_the_chosen_few():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert package_names(project["dependencies"]) == RUNTIME


def test_importing_the_server_loads_no_training_package():
    code = (
        "import sys; import cellstream.service.cli, cellstream.service.server, cellstream.service.chat; "
        "from cellstream import Client, AsyncClient; "
        f"loaded = sorted(m for m in {TRAINING_ONLY!r} if m in sys.modules); print(loaded); "
        "sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

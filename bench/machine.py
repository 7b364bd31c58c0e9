"""The machine and software a run measured, so published numbers say where they came from."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cellstream.service.engine import Engine

PACKAGES = ("cellstream", "onnxruntime", "grpcio", "protobuf", "numpy", "prometheus_client")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, object]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": _memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {package: _version(package) for package in PACKAGES},
        # Other work on the machine skews every figure; the load average at the start shows it.
        "load_average_at_start": list(os.getloadavg()),
    }


def model_info(engine: Engine) -> dict[str, object]:
    spec = engine.spec
    return {
        "name": spec.name,
        "file": engine.path.name,
        "file_bytes": engine.path.stat().st_size,
        "input_kind": spec.input_kind,
        "vocab_size": spec.vocab_size,
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
    }

"""The model repository on disk: which model versions a directory holds, and which of them a policy serves.

Two layouts, side by side in one directory:

    model_dir/
      NAME.onnx                  version 1 of NAME (the flat layout), its glass-box graph NAME.gates.onnx beside it
      NAME/                      Triton's layout: one directory per model,
        1/model.onnx               one numbered directory per version, the glass box model.gates.onnx beside it
        2/model.onnx

A model name is a file stem or a directory name; it cannot hold VERSION_SEPARATOR, which names a version in
the session store (versions.py). Directories without a numbered subdirectory are not models (a volume's
`lost+found`, a half-made model); hidden entries are skipped. Nothing here loads a graph: engines do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cellstream.service.gates import SUFFIX as GATES_SUFFIX
from cellstream.service.versions import VERSION_PATTERN, VERSION_SEPARATOR

FLAT_SUFFIX = ".onnx"
VERSION_FILE = "model.onnx"  # in NAME/VERSION/, as Triton's onnxruntime backend names it
LATEST = "latest:"  # version_policy `latest:N` (config.py checks the policy's form)


def latest_count(policy: str) -> int:
    """How many of a model's highest versions `policy` serves; 0 for all of them."""
    return int(policy.removeprefix(LATEST)) if policy.startswith(LATEST) else 0


@dataclass
class ModelFiles:
    """One model as the directory holds it: each version's graph, and what is wrong, if anything."""

    name: str
    versions: dict[int, Path] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the model cannot be loaded while any remains

    def served(self, policy: str) -> dict[int, Path]:
        """The versions `policy` serves: all, or the N highest."""
        count = latest_count(policy)
        chosen = sorted(self.versions)[-count:] if count else sorted(self.versions)
        return {version: self.versions[version] for version in chosen}


def stamp(path: Path) -> tuple[int, int]:
    """What changes when a file is rewritten: (mtime in ns, size); (0, 0) when it is gone."""
    try:
        info = path.stat()
    except OSError:
        return (0, 0)
    return (info.st_mtime_ns, info.st_size)


def scan(directory: Path) -> dict[str, ModelFiles]:
    """Every model of `directory` by name, each with its versions (and its problems, if any)."""
    models: dict[str, ModelFiles] = {}
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.endswith(FLAT_SUFFIX) and not entry.name.endswith(GATES_SUFFIX):
            _add(models, entry.name.removesuffix(FLAT_SUFFIX), directory).versions[1] = entry
        elif entry.is_dir():
            versions = {int(d.name): d for d in entry.iterdir() if d.is_dir() and VERSION_PATTERN.fullmatch(d.name)}
            if versions:
                model = _add(models, entry.name, directory)
                for version, folder in sorted(versions.items()):
                    graph = folder / VERSION_FILE
                    if graph.is_file():
                        model.versions[version] = graph
                    else:
                        model.problems.append(f"{folder} has no {VERSION_FILE}")
    return models


def _add(models: dict[str, ModelFiles], name: str, directory: Path) -> ModelFiles:
    if name in models:  # NAME.onnx beside NAME/: which one is version 1 would be a guess
        models[name].problems.append(f"{directory} has both {name}{FLAT_SUFFIX} and {name}/: keep one layout")
        return models[name]
    model = models[name] = ModelFiles(name)
    if VERSION_SEPARATOR in name:
        model.problems.append(f"model name {name!r} has {VERSION_SEPARATOR!r}, which names versions in the "
                              "session store: rename it")
    return model

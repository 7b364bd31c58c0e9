"""How our modules import each other, read from the source with `ast` (every import statement: at module
level, in functions, under TYPE_CHECKING): one namespace, no cycles, and the server free of the training side.

A cycle works until someone imports the modules in another order or moves an import to module level; a
top-level `service`, `model` or `bench` import would load a second copy of modules whose classes and
registries then exist twice.
"""

from __future__ import annotations

import ast
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
# The package name of each folder (pyproject's package-dir): cellstream/, service/, model/, bench/.
PACKAGE_DIRS = {name: REPO / folder for name, folder in SETUPTOOLS["package-dir"].items()}
RETIRED = ("service", "model", "bench")  # the old top-level names: folders now, not packages


@dataclass(frozen=True)
class Import:
    target: str  # the imported module, as written (absolute), e.g. "cellstream.service.engine" or "torch"
    line: int
    module_level: bool  # False: inside a function (run when called)


def module_files() -> dict[str, Path]:
    """Every module of the distribution by its import name."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = module_files()


def imports_of(module: str, path: Path) -> Iterator[Import]:
    """Each module an import statement of `module` names: `from a.b import c` is a.b.c when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(alias.name, child.lineno, not in_function)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{base}.{child.module}" if child.module else base
                else:
                    base = child.module or ""
                for alias in child.names:
                    name = f"{base}.{alias.name}"
                    yield Import(name if name in MODULES else base, child.lineno, not in_function)
            yield from visit(child, in_function or isinstance(child, functions))

    yield from visit(tree, False)


def ours(target: str) -> str | None:
    """The module of ours that importing `target` runs (its longest known prefix), or None."""
    parts = target.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in MODULES:
            return ".".join(parts[:k])
    return None


GRAPH = {module: list(imports_of(module, path)) for module, path in MODULES.items()}
EDGES = {module: {t for i in found if (t := ours(i.target)) and t != module} for module, found in GRAPH.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) through each strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)
    found = []
    for component in components:
        start = min(component)
        paths = {start: [start]}
        queue = [start]
        while queue:  # the shortest way round from `start` back to itself, inside the component
            node = queue.pop(0)
            for nxt in sorted(edges[node] & component):
                if nxt == start:
                    found.append([*paths[node], start])
                    queue = []
                    break
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    queue.append(nxt)
    return found


def test_the_graph_sees_every_package_and_the_lazy_imports():
    assert {"cellstream", "cellstream.service", "cellstream.model", "cellstream.bench",
            "cellstream.service._proto.cellstream.v1.inference_pb2_grpc"} <= set(MODULES)
    # `cellstream bench` imports the harness only when asked: a function-level edge, counted all the same.
    lazy = [i for i in GRAPH["cellstream.service.cli"] if i.target == "cellstream.bench.cli"]
    assert lazy and not lazy[0].module_level


def test_cycles_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_our_modules():
    found = cycles(EDGES)
    assert found == [], "import cycles (break each by moving what both sides need to a lower module): " + "; ".join(
        " -> ".join(cycle) for cycle in found)


def test_nothing_imports_the_old_top_level_names():
    """No import of the old top-level names (RETIRED) anywhere: tests and examples included."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
    paths = {REPO / name for name in files.stdout.split()} | set(MODULES.values())
    offenders = []
    for path in sorted(paths):
        if not path.is_file():
            continue  # deleted in the working tree
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in names
                          if name.split(".")[0] in RETIRED]
    assert offenders == []


def test_no_module_under_service_imports_the_training_side():
    """The server runs without torch (tests/service/test_runtime_deps.py checks the install and the loaded
    modules): nothing under service/ imports torch, onnx or cellstream.model, not even inside a function."""
    offenders = [f"{module}:{i.line}: {i.target}"
                 for module, found in GRAPH.items() if module.startswith("cellstream.service")
                 for i in found if i.target.split(".")[0] in ("torch", "onnx")
                 or (ours(i.target) or "").startswith("cellstream.model")]
    assert offenders == []


def test_the_model_side_does_not_import_the_server():
    """cellstream.model writes files the server reads; what both must agree on is checked by tests, not shared
    by importing the server (which would make the training side depend on the serving side)."""
    offenders = [f"{module}:{i.line}: {i.target}"
                 for module, found in GRAPH.items() if module.startswith("cellstream.model")
                 for i in found if (ours(i.target) or "").startswith(("cellstream.service", "cellstream.bench"))]
    assert offenders == []

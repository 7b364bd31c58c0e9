"""The part of kustomize that deploy/k8s uses, so the tests render its overlays with no tool installed.

Supported: `resources` (YAML files, multi-document, or directories holding a kustomization),
`components` (kind Component) and `patches` given by `path` (strategic merge, target found by the
patch's kind and name). Anything else in a kustomization is refused, so a feature added
to the manifests cannot be silently ignored here. Order as kustomize's: resources, then components,
then the kustomization's own patches.

Strategic merge: maps merge recursively, `null` deletes a key, lists of maps merge by the key
Kubernetes declares for them (MERGE_KEYS; items new to the list go first, as kustomize orders
them), other lists are replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

FIELDS = {"apiVersion", "kind", "resources", "components", "patches"}
MERGE_KEYS = {
    "containers": ("name",),
    "initContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "ports": ("containerPort", "port"),
    "topologySpreadConstraints": ("topologyKey",),
}
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}

Resource = dict[str, Any]


class KustomizeError(ValueError):
    """A kustomization this subset does not render, or a patch without a target."""


def load_documents(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render(directory: Path) -> list[Resource]:
    """Every resource the kustomization in `directory` produces."""
    return _build(directory, "Kustomization")


def _kustomization(directory: Path, kind: str) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text())
    unsupported = set(spec) - FIELDS
    if unsupported:
        raise KustomizeError(f"{path}: fields this renderer does not implement: {sorted(unsupported)}")
    if spec.get("kind", "Kustomization") != kind:
        raise KustomizeError(f"{path}: expected kind {kind}, found {spec.get('kind')}")
    return spec


def _build(directory: Path, kind: str, accumulated: list[Resource] | None = None) -> list[Resource]:
    spec = _kustomization(directory, kind)
    resources = list(accumulated or [])
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        resources += render(path) if path.is_dir() else load_documents(path)
    for entry in spec.get("components", []):
        resources = _build((directory / entry).resolve(), "Component", resources)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{directory}: only `path` patches are implemented, got {sorted(patch)}")
        for document in load_documents(directory / patch["path"]):
            _patch(resources, document, directory / patch["path"])
    _check_unique(resources, directory)
    return resources


def identity(resource: Resource) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def _check_unique(resources: list[Resource], directory: Path) -> None:
    seen = [identity(r) for r in resources]
    duplicates = {i for i in seen if seen.count(i) > 1}
    if duplicates:
        raise KustomizeError(f"{directory}: resources defined twice: {sorted(duplicates)}")


def _patch(resources: list[Resource], patch: Resource, source: Path) -> None:
    for index, resource in enumerate(resources):
        if identity(resource) == identity(patch):
            resources[index] = merge(resource, patch)
            return
    raise KustomizeError(f"{source}: no resource {identity(patch)} to patch")


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """`patch` applied to `base` as a strategic merge patch (a new object; neither is modified)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(key.startswith("$") for key in patch):
            raise KustomizeError(f"patch directives are not implemented: {sorted(patch)}")
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = merge(merged[key], value, key) if key in merged else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        return _merge_list(base, patch, MERGE_KEYS[field])
    return copy.deepcopy(patch)


def _merge_list(base: list[Any], patch: list[Any], candidates: tuple[str, ...]) -> list[Any]:
    key = next((k for k in candidates if patch and all(k in item for item in patch)), None)
    if key is None:
        raise KustomizeError(f"list items without a merge key {candidates}: {patch}")
    merged = copy.deepcopy(base)
    added = []
    for item in patch:
        for index, existing in enumerate(merged):
            if existing.get(key) == item[key]:
                merged[index] = merge(existing, item)
                break
        else:
            added.append(copy.deepcopy(item))
    return added + merged  # kustomize puts the patch's new items first


def pod_spec(resource: Resource) -> dict[str, Any] | None:
    """The pod template's spec of a workload, None for other kinds."""
    if resource["kind"] not in POD_OWNERS:
        return None
    return resource["spec"]["template"]["spec"]


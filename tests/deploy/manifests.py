"""Where the deployment files are, and questions about rendered manifests that several tests ask."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kustomize_subset import Resource, pod_spec

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
SERVER = ("Deployment", "cellstream")
CONTAINER = "cellstream"
# Stand-ins for Secret values, which live only in the cluster.
SECRET_PLACEHOLDER = "placeholder0123456789"
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    matches = [r for r in resources if (r["kind"], r["metadata"]["name"]) == (kind, name)]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def containers(resource: Resource) -> list[dict[str, Any]]:
    spec = pod_spec(resource) or {}
    return spec.get("containers", []) + spec.get("initContainers", [])


def server_container(resources: list[Resource]) -> dict[str, Any]:
    [container] = [c for c in containers(find(resources, *SERVER)) if c["name"] == CONTAINER]
    return container


def environment(resources: list[Resource], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom ConfigMaps, then `env` on top, with
    $(VAR) references expanded from the variables defined before them; Secret values are placeholders."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"only ConfigMap envFrom is modelled: {source}"
        values.update(find(resources, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for variable in container.get("env", []):
        if "value" in variable:
            values[variable["name"]] = VARIABLE.sub(lambda m: values.get(m.group(1), m.group(0)), variable["value"])
        else:
            assert "secretKeyRef" in variable["valueFrom"], f"only Secret references are modelled: {variable}"
            values[variable["name"]] = SECRET_PLACEHOLDER
    return values


def mounts(resources: list[Resource], container: dict[str, Any], resource: tuple[str, str] = SERVER
           ) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in (pod_spec(find(resources, *resource)) or {}).get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def volume_of(path: str, mounted: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The volume holding `path`, None when it is on the container's own (read-only) filesystem."""
    holders = [mount for mount in mounted if path == mount or path.startswith(mount.rstrip("/") + "/")]
    return mounted[max(holders, key=len)] if holders else None


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


def port_number(port: int | str, container: dict[str, Any]) -> int:
    """A probe's or Service's port, given by number or by the container port's name."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return number

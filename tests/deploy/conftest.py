"""Fixtures for the deployment tests: each shipped variant of deploy/k8s, rendered offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from kustomize_subset import Resource, render
from manifests import K8S

# What users apply: the two overlays, and the HA overlay with the TLS component or the model repository on a
# volume added to it.
VARIANTS = {"single": ("overlays/single",), "ha": ("overlays/ha",), "ha+tls": ("overlays/ha", "components/tls"),
            "ha+models": ("overlays/ha", "components/model-repository")}


@pytest.fixture(scope="session")
def variant_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The kustomization directory of each variant; one with components gets a temporary kustomization
    composing them, as a user's overlay would."""
    directories = {}
    for name, (overlay, *components) in VARIANTS.items():
        if not components:
            directories[name] = K8S / overlay
            continue
        directory = tmp_path_factory.mktemp(name.replace("+", "-"))
        spec = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / overlay, directory)],
                "components": [os.path.relpath(K8S / c, directory) for c in components]}
        (directory / "kustomization.yaml").write_text(yaml.safe_dump(spec))
        directories[name] = directory
    return directories


@pytest.fixture(scope="session")
def rendered(variant_dirs: dict[str, Path]) -> dict[str, list[Resource]]:
    """Variant name -> its resources, rendered by tests/deploy/kustomize_subset.py."""
    return {name: render(directory) for name, directory in variant_dirs.items()}

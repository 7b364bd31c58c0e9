"""Every manifest of deploy/k8s, rendered per variant, against the Kubernetes API schemas (offline,
from the kubernetes-validate package), and the Prometheus Operator objects, whose CRDs those schemas
lack, against their structure."""

from __future__ import annotations

import shutil
import subprocess

import kubernetes_validate
import promql_parser
import pytest
import yaml
from kustomize_subset import load_documents
from manifests import DEPLOY, of_kind

# The oldest Kubernetes the manifests support (native sleep preStop hooks: 1.30) and the newest the
# package knows. Strict: a field the API does not know fails, as a typo would be dropped by the server.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
OPERATOR_API = "monitoring.coreos.com/v1"
VARIANT_NAMES = ("single", "ha", "ha+tls", "ha+models")


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_resource_validates_against_the_kubernetes_schemas(rendered, variant, version):
    checked = 0
    for resource in rendered[variant]:
        if resource["apiVersion"] == OPERATOR_API:
            continue  # test_prometheus_operator_objects_are_well_formed
        name = f"{variant}: {resource['kind']}/{resource['metadata']['name']}"
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name} is invalid for Kubernetes {version} at {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{name}: {exc.message}")
        checked += 1
    assert checked >= 6


def test_every_deploy_yaml_file_is_used_by_a_kustomization():
    """No manifest is left out of every overlay (it would never be applied, nor checked above)."""
    referenced = set()
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        entries = spec.get("resources", []) + [patch["path"] for patch in spec.get("patches", [])]
        referenced |= {(kustomization.parent / e).resolve() for e in entries}
    files = {p.resolve() for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - referenced == set()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_the_renderer_agrees_with_kubectl_kustomize(rendered, variant_dirs, variant):
    """Where kubectl is at hand (it renders offline), the test renderer must produce exactly what it does."""
    result = subprocess.run(["kubectl", "kustomize", str(variant_dirs[variant])], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = {(r["kind"], r["metadata"]["name"]): r for r in yaml.safe_load_all(result.stdout) if r}
    ours = {(r["kind"], r["metadata"]["name"]): r for r in rendered[variant]}
    assert ours.keys() == theirs.keys()
    for key, resource in ours.items():
        assert resource == theirs[key], f"{variant}: {key} differs from kubectl kustomize's rendering"


def test_no_secret_values_in_the_manifests(rendered):
    """Secrets are referenced by name, created in the cluster (docs/DEPLOY.md), never committed."""
    for variant, resources in rendered.items():
        assert of_kind(resources, "Secret") == [], variant
    assert not list(DEPLOY.rglob("*.pem")) and not list(DEPLOY.rglob("*.key"))


def test_prometheus_operator_objects_are_well_formed(rendered):
    for variant, resources in rendered.items():
        monitors = of_kind(resources, "ServiceMonitor")
        rules = of_kind(resources, "PrometheusRule")
        assert len(monitors) == 1 and len(rules) == 1, variant
        for resource in monitors + rules:
            assert resource["apiVersion"] == OPERATOR_API
            assert set(resource) == {"apiVersion", "kind", "metadata", "spec"}
        [monitor] = monitors
        assert set(monitor["spec"]) == {"selector", "endpoints"}
        assert monitor["spec"]["selector"]["matchLabels"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
            assert endpoint["path"] == "/metrics"
            assert promql_parser.parse_duration(endpoint["interval"]) > promql_parser.parse_duration(
                endpoint["scrapeTimeout"])
    check_rule_file_structure(load_documents(DEPLOY / "prometheus" / "rules.yaml"))


def check_rule_file_structure(documents: list[dict]) -> None:
    [rule_object] = documents
    groups = rule_object["spec"]["groups"]
    assert set(rule_object["spec"]) == {"groups"}
    assert len({g["name"] for g in groups}) == len(groups)
    for group in groups:
        assert set(group) <= {"name", "interval", "rules"}
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule.get("alert")
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description", "runbook"} <= set(rule["annotations"])
            promql_parser.parse(rule["expr"])
            promql_parser.parse_duration(rule["for"])


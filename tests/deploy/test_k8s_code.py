"""The Kubernetes manifests against the code they deploy: ports, settings, command lines, grace periods,
the image, and what each overlay promises (one replica with a snapshot volume, or replicas on Redis)."""

from __future__ import annotations

import tomllib
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import dockerfile
import pytest
import yaml
from manifests import (
    DOCKERFILE,
    REPO,
    SECRET_PLACEHOLDER,
    containers,
    environment,
    find,
    mounts,
    of_kind,
    port_number,
    probes,
    server_container,
    volume_of,
)

from cellstream.service.cli import build_parser
from cellstream.service.config import Settings, SettingsError, load_settings
from cellstream.service.tracing import start_tracing

VARIANT_NAMES = ("single", "ha", "ha+tls", "ha+models")
PREFIX = "CELLSTREAM_"
# Settings no deployment should leave to chance: where it listens, what it serves, who may call, where
# sessions live, how long it drains, and its capacity.
IMPORTANT = {"port", "http_port", "metrics_port", "model_dir", "auth_token_file", "state_store",
             "shutdown_grace_seconds", "max_sessions"}
HANDLERS = {"exec", "grpc", "httpGet", "tcpSocket", "sleep"}
DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}


def settings_of(resources: list, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The server's settings as the pod would load them from its environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(PREFIX + name.upper(), raising=False)
    for key, value in environment(resources, server_container(resources)).items():
        monkeypatch.setenv(key, value)
    try:
        return load_settings()
    except SettingsError as exc:
        pytest.fail(f"the pod's settings do not load: {exc}")


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_every_cellstream_variable_is_a_setting_and_the_important_ones_are_set(rendered, variant):
    """An unknown CELLSTREAM_* variable is silently ignored by the server: a typo would be an outage."""
    resources = rendered[variant]
    keys = {key for cm in of_kind(resources, "ConfigMap") for key in cm.get("data", {})}
    keys |= {v["name"] for r in resources for c in containers(r) for v in c.get("env", [])}
    names = {key.removeprefix(PREFIX).lower() for key in keys if key.startswith(PREFIX)}
    assert names - set(Settings.model_fields) == set()
    set_for_server = {k.removeprefix(PREFIX).lower() for k in environment(resources, server_container(resources))}
    assert IMPORTANT - set_for_server == set()


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_ports_and_probes_match_the_settings(rendered, variant, monkeypatch):
    resources = rendered[variant]
    container = server_container(resources)
    settings = settings_of(resources, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": DEFAULTS["port"], "http": DEFAULTS["http_port"], "metrics": DEFAULTS["metrics_port"]}
    assert (settings.port, settings.http_port, settings.metrics_port) == (ports["grpc"], ports["http"],
                                                                          ports["metrics"])
    for kind, probe in probes(container).items():
        [handler] = set(probe) & HANDLERS  # the API server refuses a probe with two
        if handler in ("grpc", "tcpSocket"):
            assert port_number(probe[handler]["port"], container) == settings.port, kind
            assert probe[handler].get("service", "") == "", f"{kind}: the server reports its status under ''"
    assert set(probes(container)) == {"startupProbe", "readinessProbe", "livenessProbe"}
    labels = find(resources, "Deployment", "cellstream")["spec"]["template"]["metadata"]["labels"]
    for service in of_kind(resources, "Service"):
        if not service["spec"]["selector"].items() <= labels.items():
            continue  # Redis
        for port in service["spec"]["ports"]:
            assert port_number(port["targetPort"], container) in ports.values(), service["metadata"]["name"]


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_native_grpc_probes_unless_tls_needs_the_health_command(rendered, variant):
    """Native gRPC probes cannot speak TLS: with TLS they run `cellstream health` instead."""
    container = server_container(rendered[variant])
    readiness = probes(container)["readinessProbe"]
    assert ("exec" in readiness) == variant.endswith("+tls")
    assert ("grpc" in readiness) != variant.endswith("+tls")


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_commands_parse_with_the_real_cli(rendered, variant):
    resources = rendered[variant]
    container = server_container(resources)
    command = container["command"] + container.get("args", [])
    assert command[:2] == ["cellstream", "serve"]
    build_parser().parse_args(command[1:])
    for kind, probe in probes(container).items():
        if "exec" in probe:
            argv = probe["exec"]["command"]
            assert argv[:2] == ["cellstream", "health"], kind
            arguments = build_parser().parse_args(argv[1:])
            assert arguments.server_name == "cellstream", "the certificate names the Service"
            volume = volume_of(str(arguments.ca), mounts(resources, container))
            assert volume is not None and volume["secret"]["secretName"] == "cellstream-tls", kind


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_drain_grace_fits_in_the_termination_grace_period(rendered, variant, monkeypatch):
    resources = rendered[variant]
    container = server_container(resources)
    settings = settings_of(resources, monkeypatch)
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = find(resources, "Deployment", "cellstream")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Past the grace period the kubelet kills the pod: in-flight calls and the session snapshot would be lost.
    assert pause + settings.shutdown_grace_seconds + 5 <= grace


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_the_pod_is_locked_down_and_runs_as_the_image_user(rendered, variant):
    resources = rendered[variant]
    uid = int(dockerfile.parse(DOCKERFILE)[-1].one("USER").arguments.split(":")[0])
    for workload in of_kind(resources, "Deployment") + of_kind(resources, "StatefulSet"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert set(container["resources"]["requests"]) == {"cpu", "memory"}
            assert "memory" in container["resources"]["limits"]
    server = find(resources, "Deployment", "cellstream")["spec"]["template"]["spec"]
    assert server["securityContext"]["runAsUser"] == uid


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_files_the_settings_name_are_where_the_pod_puts_them(rendered, variant, monkeypatch):
    resources = rendered[variant]
    container = server_container(resources)
    settings = settings_of(resources, monkeypatch)
    mounted = mounts(resources, container)
    runtime = dockerfile.parse(DOCKERFILE)[-1]
    if settings.model_control == "none":
        assert str(settings.model_dir) == runtime.env()["CELLSTREAM_MODEL_DIR"]
        assert volume_of(str(settings.model_dir), mounted) is None, "the model is baked into the image"
    else:  # a repository that changes while the pods run: on a volume every replica reads, none writes
        volume = volume_of(str(settings.model_dir), mounted)
        assert volume is not None and volume["persistentVolumeClaim"]["readOnly"] is True
        claim = find(resources, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica, on any node, during a release"
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(settings.model_dir)]
        assert mount["readOnly"] is True
    secret_files = {"auth_token_file": "cellstream-tokens", "tls_cert_path": "cellstream-tls",
                    "tls_key_path": "cellstream-tls"}
    for name, secret in secret_files.items():
        path = getattr(settings, name)
        if path is not None:
            volume = volume_of(str(path), mounted)
            assert volume is not None and volume["secret"]["secretName"] == secret, name
    assert not any("subPath" in m for m in container["volumeMounts"]), "subPath mounts never see Secret updates"
    if settings.snapshot_path is not None:
        # Written at every graceful stop: it must be on a volume that outlives the pod.
        volume = volume_of(str(PurePosixPath(settings.snapshot_path).parent), mounted)
        assert volume is not None and "persistentVolumeClaim" in volume
        find(resources, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_the_image_tag_is_the_project_version(rendered):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for resources in rendered.values():
        assert server_container(resources)["image"] == f"cellstream:{version}"


def test_single_keeps_sessions_across_restarts_on_one_replica(rendered, monkeypatch):
    resources = rendered["single"]
    deployment = find(resources, "Deployment", "cellstream")
    settings = settings_of(resources, monkeypatch)
    assert deployment["spec"]["replicas"] == 1
    # The old pod writes the snapshot on SIGTERM before the new one reads it: never both at once.
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert settings.state_store == "memory" and settings.snapshot_path is not None
    assert of_kind(resources, "HorizontalPodAutoscaler") == []


@pytest.mark.parametrize("variant", ["ha", "ha+tls", "ha+models"])
def test_ha_shares_sessions_in_a_persistent_redis(rendered, variant, monkeypatch):
    resources = rendered[variant]
    settings = settings_of(resources, monkeypatch)
    url = urlsplit(settings.state_store)
    assert (url.scheme, url.password) == ("redis", SECRET_PLACEHOLDER)
    redis_service = find(resources, "Service", url.hostname)
    assert [p["port"] for p in redis_service["spec"]["ports"]] == [url.port]
    redis = find(resources, "StatefulSet", "cellstream-redis")
    [container] = containers(redis)
    arguments = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    assert arguments["--appendonly"] == "yes"
    assert arguments["--maxmemory-policy"] == "noeviction"
    assert arguments["--requirepass"] == "$(REDIS_PASSWORD)"
    assert arguments["--dir"] in {m["mountPath"] for m in container["volumeMounts"]}
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]


@pytest.mark.parametrize("variant", ["ha", "ha+tls", "ha+models"])
def test_ha_runs_three_or_more_spread_replicas_that_clients_balance_over(rendered, variant):
    resources = rendered[variant]
    deployment = find(resources, "Deployment", "cellstream")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    autoscaler = find(resources, "HorizontalPodAutoscaler", "cellstream")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "cellstream"
    assert autoscaler["spec"]["minReplicas"] >= 3
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = find(resources, "PodDisruptionBudget", "cellstream")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    headless = find(resources, "Service", "cellstream-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= labels.items()
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_network_policy_admits_clients_to_grpc_and_http_and_monitoring_to_metrics(rendered, variant):
    resources = rendered[variant]
    policy = find(resources, "NetworkPolicy", "cellstream")
    labels = find(resources, "Deployment", "cellstream")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    rules = {port["port"]: rule["from"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert set(rules) == {"grpc", "http", "metrics"}
    assert rules["http"] == rules["grpc"], "the HTTP face admits the clients the gRPC port admits"
    assert rules["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert rules["grpc"][0]["podSelector"]["matchLabels"] == {"cellstream/client": "true"}


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_the_service_monitor_scrapes_the_metrics_port_of_one_service(rendered, variant):
    resources = rendered[variant]
    [monitor] = of_kind(resources, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in of_kind(resources, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["cellstream"], "each pod scraped once"
    [endpoint] = monitor["spec"]["endpoints"]
    [port] = [p for p in selected[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port_number(port["targetPort"], server_container(resources)) == DEFAULTS["metrics_port"]


def test_every_secret_the_manifests_reference_is_explained_in_deploy_md(rendered):
    text = (REPO / "docs" / "DEPLOY.md").read_text()
    referenced = set()
    for resources in rendered.values():
        for workload in of_kind(resources, "Deployment") + of_kind(resources, "StatefulSet"):
            pod = workload["spec"]["template"]["spec"]
            referenced |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
            referenced |= {e["valueFrom"]["secretKeyRef"]["name"] for c in pod["containers"]
                           for e in c.get("env", []) if "valueFrom" in e}
    assert referenced == {"cellstream-tokens", "cellstream-redis", "cellstream-tls"}
    for secret in referenced:
        assert f"kubectl create secret generic {secret}" in text or f"kubectl create secret tls {secret}" in text, \
            secret


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_the_commented_tracing_settings_start_tracing_once_uncommented(rendered, variant, monkeypatch):
    """The ConfigMap's commented OTEL_* lines are what an operator uncomments: the pod's environment with them
    is valid, and tracing starts from it (and is off as shipped)."""
    lines = (REPO / "deploy/k8s/base/configmap.yaml").read_text().splitlines()
    commented = [line.strip().removeprefix("# ") for line in lines if line.strip().startswith("# OTEL_")]
    tracing = yaml.safe_load("\n".join(commented))
    assert set(tracing) >= {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}
    environment_as_shipped = environment(rendered[variant], server_container(rendered[variant]))
    assert start_tracing(environment_as_shipped) is None
    telemetry = start_tracing({**environment_as_shipped, **tracing})
    try:
        assert telemetry is not None
        assert telemetry.provider.sampler.get_description().startswith(
            "LinkedBatchSampler{ParentBased{root:TraceIdRatioBased{0.05}")
        assert telemetry.provider.resource.attributes["service.name"] == "cellstream"
    finally:
        telemetry.shutdown()
    settings_of(rendered[variant], monkeypatch)  # CELLSTREAM_LOG_FORMAT and the rest still load

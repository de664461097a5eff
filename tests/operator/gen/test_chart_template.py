"""The chart's operator Deployment as `helm template` renders it: probes on /healthz and /readyz,
which every replica serves from start, and a rolling update that waits for a ready standby. And the
names the chart gives: each release its own Lease, cluster-scoped objects that two namespaces' releases
of one name do not share, DNS-label Service names; namespaces that stay strings; the NOTES.

Needs the helm binary: on PATH, or the one `make cluster-build` caches (`make unit` builds it first).
Skipped without it outside CI; under CI (CI set) a missing helm fails these tests instead."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster import build
from kubemoe_operator.run.settings import parse_settings
from tests.operator.helpers import REPO

CHART = REPO / "charts" / "kubemoe"


def _helm() -> Path | None:
    found = shutil.which("helm")
    if found:
        return Path(found)
    cached = build.cache_root() / "bin" / "helm"
    return cached if cached.exists() else None


HELM = _helm()
pytestmark = pytest.mark.skipif(
    HELM is None and not os.environ.get("CI"), reason="no helm binary (make cluster-build caches one)"
)


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def render(*values: str, release: str = "r", namespace: str = "kubemoe-system") -> list[dict[str, Any]]:
    assert HELM is not None, "no helm binary: run `make cluster-build` (CI runs it before the unit tests)"
    out = subprocess.run(
        [str(HELM), "template", release, str(CHART), "--namespace", namespace, *values],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def operator_deployment(
    *values: str, release: str = "r", namespace: str = "kubemoe-system"
) -> dict[str, Any]:
    (deploy,) = [
        d for d in render(*values, release=release, namespace=namespace) if d["kind"] == "Deployment"
    ]
    return deploy


def _named(docs: list[dict[str, Any]], kind: str) -> list[str]:
    return [d["metadata"]["name"] for d in docs if d["kind"] == kind]


def test_probes_use_the_health_server_every_replica_serves_from_start() -> None:
    deploy = operator_deployment("--set", "healthPort=9000")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    settings, _ = parse_settings(container["args"])
    assert settings.health_port == 9000
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == 9000
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["timeoutSeconds"] > 1


def test_a_rolling_update_waits_for_the_new_standby_to_be_ready() -> None:
    deploy = operator_deployment("--set", "replicaCount=2")
    strategy = deploy["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_runtime_pod_values_become_the_operators_pod_defaults() -> None:
    deploy = operator_deployment(
        "--set",
        "runtimeImagePullSecrets={reg,reg2}",
        "--set-string",
        "runtimePodAnnotations.sidecar\\.istio\\.io/inject=false",
        "--set-string",
        "runtimePodAnnotations.note=a: {b}",
        "--set",
        "runtimePodLabels.team=ml",
    )
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    settings, _ = parse_settings(container["args"])
    assert settings.pod_defaults.image_pull_secrets == ["reg", "reg2"]
    assert settings.pod_defaults.annotations == {"sidecar.istio.io/inject": "false", "note": "a: {b}"}
    assert settings.pod_defaults.labels == {"team": "ml"}


def test_values_schema_refuses_a_label_the_operator_owns() -> None:
    assert HELM is not None
    proc = subprocess.run(
        [str(HELM), "template", "r", str(CHART), "--set", "runtimePodLabels.kubemoe\\.io/role=x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "invalid propertyName 'kubemoe.io/role'" in proc.stderr


def test_each_release_leads_its_own_lease() -> None:
    """Two releases in one namespace: each operator takes the Lease named after its release (with the
    operator's default name, the second release's operator never led, so never reconciled)."""
    leases = []
    for release in ("team-a", "team-b"):
        deploy = operator_deployment(release=release)
        (container,) = deploy["spec"]["template"]["spec"]["containers"]
        settings, _ = parse_settings(container["args"])
        assert settings.lease_name == deploy["metadata"]["name"] == f"{release}-kubemoe"
        leases.append(settings.lease_name)
    assert leases[0] != leases[1]
    # The lease Role lets it use a Lease of any name (no resourceNames to keep in step).
    (lease_role,) = [
        d for d in render() if d["kind"] == "Role" and d["metadata"]["name"].endswith("-election")
    ]
    assert lease_role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]}
    ]


@pytest.mark.parametrize(
    ("release", "namespaces"),
    [
        ("kubemoe", ("team-a", "team-b")),
        # The longest names there are (release 53, namespace 63): still unique, still at most 63.
        ("r" * 53, ("n" * 62 + "a", "n" * 62 + "b")),
    ],
    ids=["short", "longest"],
)
def test_what_lies_outside_the_release_namespace_is_named_after_it(
    release: str, namespaces: tuple[str, str]
) -> None:
    """The same release name in two namespaces: the ClusterRole and ClusterRoleBinding (and, with
    watchNamespace, the Role and RoleBinding there) must not be the same objects."""
    names: dict[str, list[str]] = {}
    for namespace in namespaces:
        docs = render("--set", "watchNamespace=models", release=release, namespace=namespace)
        for kind in ("ClusterRole", "ClusterRoleBinding"):
            (name,) = _named(docs, kind)
            names.setdefault(kind, []).append(name)
        in_models = [d for d in docs if d["metadata"].get("namespace") == "models"]
        assert sorted(d["kind"] for d in in_models) == ["Role", "RoleBinding"]
        for d in in_models:
            names.setdefault(f"{d['kind']} in models", []).append(d["metadata"]["name"])
        for binding in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
            (ref,) = [
                d
                for d in docs
                if d["kind"] == binding["roleRef"]["kind"]
                and d["metadata"]["name"] == binding["roleRef"]["name"]
                and d["metadata"].get("namespace") == binding["metadata"].get("namespace")
            ]
            assert ref["metadata"]["name"] == binding["roleRef"]["name"]
    for kind, (first, *rest) in names.items():
        assert all(first != other for other in rest), (kind, first, rest)
        assert all(len(name) <= 63 for name in (first, *rest)), (kind, first, rest)
    if release == "kubemoe":
        assert names["ClusterRole"] == ["kubemoe-team-a", "kubemoe-team-b"]


def test_the_metrics_service_name_is_a_dns_label_for_the_longest_release_name() -> None:
    """A Service's name is a DNS label (63 characters): the full name (up to 63) plus `-metrics` was not."""
    for release in ("r", "r" * 53, "kubemoe-" + "x" * 45):
        (name,) = _named(render(release=release), "Service")
        assert name.endswith("-metrics")
        assert len(name) <= 63
        assert DNS_LABEL.match(name), name


def test_a_namespace_of_digits_stays_a_string(tmp_path: Path) -> None:
    """watchNamespace "2024" (a valid namespace) and a release namespace of digits: unquoted, YAML read
    them as numbers and the apiserver refused the objects."""
    values = tmp_path / "values.yaml"
    values.write_text('watchNamespace: "2024"\ndashboards: {enabled: true}\n')
    docs = render("-f", str(values), namespace="2025")
    namespaces = [d["metadata"]["namespace"] for d in docs if "namespace" in d["metadata"]]
    namespaces += [s["namespace"] for d in docs for s in d.get("subjects", [])]
    assert set(namespaces) == {"2024", "2025"}
    assert all(isinstance(ns, str) for ns in namespaces), namespaces


def test_the_notes_say_how_to_get_the_kubemoe_command() -> None:
    """kubemoe-operator is not on PyPI: the NOTES must not send people to `pip install kubemoe-operator`."""
    assert HELM is not None
    out = subprocess.run(
        [str(HELM), "install", "r", str(CHART), "--namespace", "kubemoe-system", "--dry-run=client"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},
    ).stdout
    notes = out.split("NOTES:", 1)[1]
    assert "pip install kubemoe-operator" not in notes
    assert "pip install ./operator" in notes
    assert (REPO / "operator" / "pyproject.toml").is_file()


def test_resources_take_numbers_and_any_resource_name() -> None:
    deploy = operator_deployment(
        "--set",
        "resources.limits.cpu=1",
        "--set",
        "resources.requests.cpu=0.5",
        "--set-string",
        "resources.limits.ephemeral-storage=1Gi",
    )
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": 1, "memory": "512Mi", "ephemeral-storage": "1Gi"}
    assert container["resources"]["requests"]["cpu"] == "0.5"


def test_pod_monitor_labels_reach_the_operator() -> None:
    """kube-prometheus-stack's Prometheus selects only PodMonitors carrying its release label."""
    deploy = operator_deployment("--set", "metrics.podMonitorLabels.release=kube-prometheus-stack")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    settings, _ = parse_settings(container["args"])
    assert settings.pod_monitor_labels == {"release": "kube-prometheus-stack"}

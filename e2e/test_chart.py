"""The Helm chart with the real helm binary: lint, schema, Kubernetes-schema validation of the
rendered objects, install/upgrade/uninstall on the real control plane, and least-privilege RBAC."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster.handle import Cluster
from kubemoe_operator.run.settings import parse_settings

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kubemoe"
KUBE_SCHEMA_VERSION = "1.36.0"


def _template(cluster: Cluster, *args: str) -> list[dict[str, Any]]:
    out = cluster.helm("template", "r", str(CHART), "--namespace", "kubemoe-system", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint_is_clean(cluster: Cluster) -> None:
    proc = cluster.helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    "values",
    [
        [],
        [
            "--set",
            "watchNamespace=models",
            "--set",
            "runtimeImage=registry.example/kubemoe-runtime:1",
            "--set",
            "replicaCount=2",
        ],
    ],
    ids=["defaults", "namespaced"],
)
def test_rendered_objects_pass_kubernetes_schema_validation(
    cluster: Cluster, values: list[str], tmp_path: Path
) -> None:
    docs = _template(cluster, *values)
    kinds = sorted(d["kind"] for d in docs)
    assert "Deployment" in kinds
    assert "ServiceAccount" in kinds
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "kubernetes-validate"),
            "--strict",
            "-k",
            KUBE_SCHEMA_VERSION,
            str(rendered),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(docs)


def test_values_schema_rejects_a_misspelt_key(cluster: Cluster) -> None:
    proc = cluster.helm("template", "r", str(CHART), "--set", "imagee.tag=v1", check=False)
    assert proc.returncode != 0
    assert "additional properties 'imagee' not allowed" in proc.stderr
    wrong_type = cluster.helm("template", "r", str(CHART), "--set", "replicaCount=zero", check=False)
    assert wrong_type.returncode != 0
    assert "replicaCount" in wrong_type.stderr


def test_operator_pod_is_restricted(cluster: Cluster) -> None:
    (deploy,) = [d for d in _template(cluster) if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert deploy["spec"]["replicas"] == 1


@pytest.mark.parametrize(
    "values",
    [
        [],
        [
            "--set",
            "watchNamespace=models",
            "--set",
            "verbose=true",
            "--set",
            "prometheusUrl=http://prometheus-operated.monitoring:9090",
            "--set",
            "autoscaleIntervalSeconds=30",
            "--set",
            "metrics.port=9100",
        ],
    ],
)
def test_operator_arguments_are_the_operators_own_flags(cluster: Cluster, values: list[str]) -> None:
    (deploy,) = [d for d in _template(cluster, *values) if d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    args, verbose = parse_settings(container["args"])  # argparse exits on an unknown flag
    assert args.resync_seconds == 60
    assert args.health_port == 8081
    assert args.namespaces == (("models",) if values else ())
    assert verbose is bool(values)
    # The autoscaler: Prometheus when set, else a direct scrape of the pods; the operator's own
    # /metrics on the port the metrics Service and ServiceMonitor point at.
    assert args.prometheus_url == ("http://prometheus-operated.monitoring:9090" if values else None)
    assert args.autoscale_interval_seconds == (30 if values else 15)
    assert args.metrics_port == (9100 if values else 8080)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == args.metrics_port


def test_rbac_has_no_wildcards(cluster: Cluster) -> None:
    rules = [r for d in _template(cluster) if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), rule


def _release_objects(cluster: Cluster, release: str) -> list[str]:
    kinds = (
        "deployments,services,serviceaccounts,configmaps,roles,rolebindings,clusterroles,clusterrolebindings"
    )
    out = cluster.kubectl(
        "get", kinds, "-A", "-l", f"app.kubernetes.io/instance={release}", "-o", "name"
    ).stdout
    return sorted(out.split())


def test_install_upgrade_uninstall_leaves_no_orphans(cluster: Cluster) -> None:
    release, namespace = f"lc-{uuid.uuid4().hex[:5]}", f"lc-{uuid.uuid4().hex[:5]}"
    cluster.helm(
        "install", release, str(CHART), "-n", namespace, "--create-namespace", "--wait", "--timeout=2m"
    )
    installed = _release_objects(cluster, release)
    assert any(o.startswith("deployment.apps/") for o in installed), installed
    assert any(o.startswith("clusterrole.rbac.authorization.k8s.io/") for o in installed), installed
    assert cluster.kubectl("get", "crd", "modeldeployments.kubemoe.io", "-o", "name").stdout.strip()

    cluster.helm(
        "upgrade", release, str(CHART), "-n", namespace, "--set", "resyncSeconds=30", "--wait", "--timeout=2m"
    )
    deploy = json.loads(
        cluster.kubectl(
            "get", "deployment", "-n", namespace, "-l", f"app.kubernetes.io/instance={release}", "-o", "json"
        ).stdout
    )["items"][0]
    assert "--resync-seconds=30" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert cluster.helm("history", release, "-n", namespace).stdout.count("\n") >= 3

    cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout=2m")
    assert _release_objects(cluster, release) == []
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")


def _readme_crd_upgrade_commands() -> list[list[str]]:
    """The README's commands that apply the chart's CRD over the one Helm installed, as argv."""
    text = (REPO / "README.md").read_text()
    return [m.split() for m in re.findall(r"kubectl apply --server-side[^`\n]*charts/kubemoe/crds/", text)]


def test_the_readmes_crd_upgrade_applies_over_the_crd_helm_installed(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Helm installs a chart's crds/ on first install by server-side apply (field manager `helm`); after
    an upgrade that changes the CRD, the README's `kubectl apply --server-side ... charts/kubemoe/crds/`
    must apply the new one over it. A plain server-side apply conflicts with `helm` on every field that
    changed, so the command needs --force-conflicts. The chart's own CRD under a group of the test's own
    (the session's other tests use the real one), in a chart of just that CRD."""
    commands = _readme_crd_upgrade_commands()
    assert len(commands) == 2, commands  # the chart values paragraph and the upgrade steps
    group = f"crd-upgrade-{uuid.uuid4().hex[:6]}.example.com"
    crd = yaml.safe_load(next((CHART / "crds").glob("*.yaml")).read_text())
    crd["spec"]["group"] = group
    crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{group}"
    for key in ("shortNames", "categories"):  # `kubectl get md` must keep meaning the real one
        crd["spec"]["names"].pop(key, None)
    chart = tmp_path / "chart"
    (chart / "crds").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: crd-upgrade\nversion: 0.1.0\n")
    (chart / "crds" / "crd.yaml").write_text(yaml.safe_dump(crd))
    # The next chart version's CRD: a field of each served version changed.
    for version in crd["spec"]["versions"]:
        version["schema"]["openAPIV3Schema"]["description"] = "changed by the upgrade"
    upgraded = tmp_path / "crds"
    upgraded.mkdir()
    (upgraded / "crd.yaml").write_text(yaml.safe_dump(crd))

    release = f"crd-{uuid.uuid4().hex[:5]}"
    cluster.helm("install", release, str(chart), "-n", "default", "--wait", "--timeout=2m")
    try:
        plain = cluster.kubectl("apply", "--server-side", "-f", str(upgraded), check=False)
        assert plain.returncode != 0, plain.stdout
        assert 'conflict with "helm"' in plain.stderr, plain.stderr
        for argv in commands:
            assert argv[:3] == ["kubectl", "apply", "--server-side"], argv
            assert "--force-conflicts" in argv, argv
            cluster.kubectl(*[str(upgraded) if a == "charts/kubemoe/crds/" else a for a in argv[1:]])
        applied = json.loads(cluster.kubectl("get", "crd", crd["metadata"]["name"], "-o", "json").stdout)
        descriptions = {v["schema"]["openAPIV3Schema"]["description"] for v in applied["spec"]["versions"]}
        assert descriptions == {"changed by the upgrade"}
    finally:
        cluster.helm("uninstall", release, "-n", "default", "--wait", "--timeout=2m", check=False)
        cluster.kubectl("delete", "crd", crd["metadata"]["name"], "--wait=false", check=False)


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[tuple[str, str]]:
    """A release of the chart: (namespace, service account name)."""
    name, namespace = f"rbac-{uuid.uuid4().hex[:5]}", f"rbac-{uuid.uuid4().hex[:5]}"
    cluster.helm("install", name, str(CHART), "-n", namespace, "--create-namespace", "--wait", "--timeout=2m")
    yield namespace, f"{name}-kubemoe"
    cluster.helm("uninstall", name, "-n", namespace, "--wait", "--timeout=2m", check=False)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


ALLOWED = [
    ("get", "modeldeployments.kubemoe.io", None),
    ("watch", "modeldeployments.kubemoe.io", None),
    ("patch", "modeldeployments.kubemoe.io", "status"),
    ("patch", "leaderworkersets.leaderworkerset.x-k8s.io", None),
    ("delete", "leaderworkersets.leaderworkerset.x-k8s.io", None),
    ("patch", "deployments.apps", None),
    ("patch", "services", None),
    ("patch", "configmaps", None),
    ("patch", "poddisruptionbudgets.policy", None),
    ("update", "modeldeployments.kubemoe.io", "finalizers"),
    ("list", "pods", None),
    ("create", "events", None),
]
DENIED = [
    ("get", "secrets", None),
    ("list", "secrets", None),
    ("create", "pods", None),
    ("delete", "pods", None),
    ("delete", "nodes", None),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("create", "modeldeployments.kubemoe.io", None),
    ("delete", "modeldeployments.kubemoe.io", None),
    ("update", "statefulsets.apps", None),
    ("create", "pods", "exec"),
    ("get", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("update", "modeldeployments.kubemoe.io", None),
]


def _can_i(cluster: Cluster, sa: tuple[str, str], verb: str, resource: str, subresource: str | None) -> bool:
    namespace, name = sa
    args = [
        "auth",
        "can-i",
        verb,
        resource,
        "-n",
        "default",
        f"--as=system:serviceaccount:{namespace}:{name}",
    ]
    if subresource:
        args.append(f"--subresource={subresource}")
    answer = cluster.kubectl(*args, check=False).stdout.strip()
    assert answer in ("yes", "no"), answer
    return answer == "yes"


@pytest.mark.parametrize(("verb", "resource", "subresource"), ALLOWED)
def test_operator_identity_can(
    cluster: Cluster, release: tuple[str, str], verb: str, resource: str, subresource: str | None
) -> None:
    assert _can_i(cluster, release, verb, resource, subresource)


@pytest.mark.parametrize(("verb", "resource", "subresource"), DENIED)
def test_operator_identity_cannot(
    cluster: Cluster, release: tuple[str, str], verb: str, resource: str, subresource: str | None
) -> None:
    assert not _can_i(cluster, release, verb, resource, subresource)


def test_watch_namespace_confines_the_operator_to_that_namespace(cluster: Cluster) -> None:
    release, namespace = f"ns-{uuid.uuid4().hex[:5]}", f"ns-{uuid.uuid4().hex[:5]}"
    watched = f"models-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", watched)
    cluster.helm(
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--create-namespace",
        "--set",
        f"watchNamespace={watched}",
        "--wait",
        "--timeout=2m",
    )
    try:
        sa = f"system:serviceaccount:{namespace}:{release}-kubemoe"

        def can(verb: str, resource: str, ns: str) -> str:
            return cluster.kubectl(
                "auth", "can-i", verb, resource, "-n", ns, f"--as={sa}", check=False
            ).stdout.strip()

        assert can("patch", "leaderworkersets.leaderworkerset.x-k8s.io", watched) == "yes"
        assert can("patch", "leaderworkersets.leaderworkerset.x-k8s.io", "default") == "no"
        assert can("watch", "modeldeployments.kubemoe.io", watched) == "yes"
        assert can("watch", "modeldeployments.kubemoe.io", "default") == "no"
        assert can("patch", "leases.coordination.k8s.io", namespace) == "yes"  # leader election, at home only
        assert can("patch", "leases.coordination.k8s.io", watched) == "no"
    finally:
        cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout=2m", check=False)
        cluster.kubectl("delete", "namespace", namespace, watched, "--wait=false", check=False)

"""The chart's operator Deployment as `helm template` renders it: probes on /healthz and /readyz,
which every replica serves from start, and a rolling update that waits for a ready standby.

Needs the helm binary: on PATH, or the one `make cluster-build` caches (`make unit` builds it first).
Skipped without it outside CI; under CI (CI set) a missing helm fails these tests instead."""

from __future__ import annotations

import os
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


def operator_deployment(*values: str) -> dict[str, Any]:
    assert HELM is not None, "no helm binary: run `make cluster-build` (CI runs it before the unit tests)"
    out = subprocess.run(
        [str(HELM), "template", "r", str(CHART), "--namespace", "kubemoe-system", *values],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    deployments: list[dict[str, Any]] = [
        d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"
    ]
    (deploy,) = deployments
    return deploy


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

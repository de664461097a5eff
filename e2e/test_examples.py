"""Every manifest in examples/ deployed by the operator (as the Helm chart's ServiceAccount) on the
real control plane, whose node pools cover each example's accelerator (H200, H100, L40S, CPU):
the workloads the plan calls for exist with the right sizes, every pod runs, and the
ModelDeployment reaches Ready. One example at a time, each removed before the next.

An example whose weights are a file:// path (tiny-moe: `kubemoe up`'s demo) is refused in a
cluster instead: Planned False with reason SourceNotInCluster, saying to use pvc://, and no child."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster.handle import Cluster
from e2e.operator_process import (
    OperatorProcess,
    get_json,
    model_volume,
    scratch_namespace,
)
from e2e.waiting import eventually
from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.plan.planner import plan_manifest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
LABEL = "kubemoe.io/deployment"


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    with scratch_namespace(cluster, prefix="ex") as ns:
        cluster.kubectl("apply", "-f", "-", stdin=model_volume(ns))  # for pvc:// sources
        cache = model_volume(ns, host_path="/srv/model-cache", claim="model-cache", access="ReadWriteMany")
        cluster.kubectl("apply", "-f", "-", stdin=cache)  # for model.cache.claim (kwok completes the Job)
        yield ns


def _phase(cluster: Cluster, ns: str, name: str, phase: str = "Ready") -> dict[str, Any] | None:
    obj: dict[str, Any] = get_json(cluster, "md", name, "-n", ns)
    return obj if (obj.get("status") or {}).get("phase") == phase else None


def _assert_refused_as_local_only(cluster: Cluster, ns: str, name: str) -> None:
    md = eventually(lambda: _phase(cluster, ns, name, "Failed"), timeout=120, what=f"{name} refused")
    planned = next(c for c in md["status"]["conditions"] if c["type"] == "Planned")
    assert (planned["status"], planned["reason"]) == ("False", "SourceNotInCluster")
    assert "pvc://" in planned["message"]
    kinds = "configmaps,services,poddisruptionbudgets,deployments,leaderworkersets"
    assert get_json(cluster, kinds, "-n", ns, "-l", f"{LABEL}={name}")["items"] == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_deploys_to_ready(
    cluster: Cluster, namespace: str, operator: OperatorProcess, path: Path
) -> None:
    plan = plan_manifest(load_manifest(path))
    cluster.kubectl("apply", "-n", namespace, "-f", str(path))
    try:
        if plan.source.startswith("file://"):
            _assert_refused_as_local_only(cluster, namespace, plan.name)
            return
        md = eventually(lambda: _phase(cluster, namespace, plan.name), timeout=120, what=f"{plan.name} Ready")
        assert md["status"]["layout"] == plan.layout

        selector = f"{LABEL}={plan.name}"
        expected_pods = plan.router.replicas
        for role in plan.roles:
            kind = "leaderworkersets" if role.workload == "LeaderWorkerSet" else "deployments"
            (workload,) = get_json(
                cluster, kind, "-n", namespace, "-l", f"{selector},kubemoe.io/role={role.role}"
            )["items"]
            assert workload["spec"]["replicas"] == role.replicas
            if kind == "leaderworkersets":
                assert workload["spec"]["leaderWorkerTemplate"]["size"] == role.pods_per_group
            expected_pods += role.replicas * role.pods_per_group
        pods = get_json(cluster, "pods", "-n", namespace, "-l", f"{selector},kubemoe.io/role!=model-cache")[
            "items"
        ]
        assert len(pods) == expected_pods
        assert all(p["status"]["phase"] == "Running" for p in pods)
        gpus = sum(
            int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            for p in pods
            for c in p["spec"]["containers"]
        )
        assert gpus == (0 if plan.accelerator == "cpu" else plan.devices)
        fills = get_json(cluster, "pods", "-n", namespace, "-l", f"{selector},kubemoe.io/role=model-cache")
        if "model.cache" in " ".join(plan.notes):  # the serving pods started after the fill succeeded
            assert [p["status"]["phase"] for p in fills["items"]] == ["Succeeded"]
            assert md["status"]["cache"]["phase"] == "Filled"
        else:
            assert fills["items"] == []
    finally:
        cluster.kubectl("delete", "md", plan.name, "-n", namespace, "--wait=true", "--timeout=60s")
        eventually(
            lambda: not get_json(cluster, "pods", "-n", namespace, "-l", f"{LABEL}={plan.name}")["items"],
            timeout=90,
            what=f"{plan.name}'s pods gone",
        )

"""A scale-down removes the least loaded group: the autoscaler's marks (autoscale/removal.py), with the
chart's RBAC, on a real API server whose real ReplicaSet controller chooses the pods to delete.

Three one-pod groups (kwok pods of a Deployment, labelled as the operator labels group leaders). Their
/metrics are stand-ins served here with the runtime's own metric classes (a kwok pod runs no process),
with loads 5, 0 and 12 (requests running + waiting). `LeastLoaded.mark`, acting as the operator's
ServiceAccount, sets each pod's deletion cost to its load; `kubectl scale` (what the reconciler's
apply of the lower desired amounts to) then removes the idle pod first, the busiest last.

Without the marks the ReplicaSet removes the most recently ready pod, whatever its load."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from lightkube import AsyncClient
from lightkube.config.kubeconfig import KubeConfig

from e2e.cluster.handle import Cluster
from e2e.waiting import eventually
from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, LABEL_LEADER, LABEL_ROLE
from kubemoe_operator.autoscale.removal import DELETION_COST, LeastLoaded, pod_leaders
from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_operator.kube.client import Kube
from kubemoe_operator.kube.pods import Leader
from tests.operator.autoscale.load_pages import load_pages

LOADS = (5, 0, 12)
DEPLOYMENT = "md"


def _deployment(namespace: str) -> dict[str, Any]:
    labels = {LABEL_DEPLOYMENT: DEPLOYMENT, LABEL_ROLE: "decode", LABEL_LEADER: "true"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{DEPLOYMENT}-decode", "namespace": namespace},
        "spec": {
            "replicas": len(LOADS),
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{"name": "engine", "image": "kubemoe/runtime:test"}],
                    "tolerations": [{"operator": "Exists"}],
                },
            },
        },
    }


def _pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout
    return list(json.loads(out)["items"])


def _live(cluster: Cluster, namespace: str) -> set[str]:
    return {
        p["metadata"]["name"] for p in _pods(cluster, namespace) if not p["metadata"].get("deletionTimestamp")
    }


@pytest.fixture
def pages() -> Iterator[list[str]]:
    with load_pages(LOADS, deployment=DEPLOYMENT) as urls:
        yield urls


async def _mark(kubeconfig: Path, namespace: str, pages: list[str]) -> dict[str, int]:
    kube = Kube(AsyncClient(config=KubeConfig.from_file(kubeconfig)), field_manager="kubemoe-operator")
    listed = pod_leaders(kube)

    async def leaders(sel: RoleSelector) -> list[Leader]:  # the pods as listed, their pages served here
        found = await listed(sel)
        assert len(found) == len(LOADS), found
        return [Leader(pod=leader.pod, url=url) for leader, url in zip(found, pages, strict=True)]

    async with httpx2.AsyncClient() as http:
        removal = LeastLoaded(kube=kube, leaders=leaders, client=http)
        return await removal.mark(RoleSelector(namespace=namespace, deployment=DEPLOYMENT, role="decode"))


def test_a_scale_down_removes_the_least_loaded_group_first(
    cluster: Cluster, operator_cluster: Cluster, namespace: str, pages: list[str]
) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(_deployment(namespace)))

    def running() -> list[str] | None:
        pods = _pods(cluster, namespace)
        up = [
            p for p in pods if (p.get("status") or {}).get("phase") == "Running" and p["status"].get("podIP")
        ]
        return sorted(p["metadata"]["name"] for p in up) if len(up) == len(LOADS) else None

    names = eventually(running, timeout=60, what="three running pods")
    costs = asyncio.run(_mark(operator_cluster.kubeconfig, namespace, pages))
    by_load = dict(zip(names, LOADS, strict=True))
    assert costs == by_load  # set as the operator's ServiceAccount: the chart grants pods/patch
    for pod in _pods(cluster, namespace):
        assert pod["metadata"]["annotations"][DELETION_COST] == str(by_load[pod["metadata"]["name"]])

    idle, middle, busiest = sorted(names, key=lambda n: by_load[n])
    scale = ("scale", "deployment", f"{DEPLOYMENT}-decode", "-n", namespace)
    cluster.kubectl(*scale, "--replicas=2")
    eventually(lambda: _live(cluster, namespace) == {middle, busiest}, timeout=60, what=f"{idle} removed")
    cluster.kubectl(*scale, "--replicas=1")
    eventually(lambda: _live(cluster, namespace) == {busiest}, timeout=60, what=f"{middle} removed")

"""Smoke tests that prove the harness is a real control plane: scheduler, controllers, LWS, CEL."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import yaml

from e2e.cluster.handle import Cluster
from e2e.waiting import eventually


def _get_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def _lws(name: str, *, replicas: int, size: int, gpus: int) -> str:
    pod_spec = {
        "containers": [
            {
                "name": "engine",
                "image": "example.invalid/engine:0",
                "resources": {"limits": {"nvidia.com/gpu": gpus}},
            }
        ]
    }
    return yaml.safe_dump(
        {
            "apiVersion": "leaderworkerset.x-k8s.io/v1",
            "kind": "LeaderWorkerSet",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "leaderWorkerTemplate": {
                    "size": size,
                    "restartPolicy": "RecreateGroupOnPodRestart",
                    "leaderTemplate": {"spec": pod_spec},
                    "workerTemplate": {"spec": pod_spec},
                },
            },
        }
    )


def _running_pods(
    cluster: Cluster, ns: str, selector: str, *, count: int | None = None
) -> list[dict[str, Any]]:
    """Running, not terminating pods; with count, [] unless there are exactly that many."""
    pods = _get_json(cluster, "pods", "-n", ns, "-l", selector)["items"]
    running = [
        p
        for p in pods
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]
    return running if count is None or len(running) == count else []


def test_gpu_capacity_shows_in_kubectl_get_nodes(cluster: Cluster) -> None:
    out = cluster.kubectl(
        "get",
        "nodes",
        "-o",
        r"custom-columns=NAME:.metadata.name,GPU:.status.capacity.nvidia\.com/gpu,PRODUCT:.metadata.labels.nvidia\.com/gpu\.product",
    ).stdout
    rows = [line.split() for line in out.strip().splitlines()[1:] if line.startswith("gpu-node-")]
    assert len(rows) >= 4, out
    for _name, gpus, product in rows[:4]:
        assert gpus == "8", out
        assert product == "NVIDIA-H200", out


def test_lws_gets_running_pods_within_gpu_capacity(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=_lws("grp", replicas=2, size=2, gpus=4))
    pods = eventually(
        lambda: _running_pods(cluster, namespace, "leaderworkerset.sigs.k8s.io/name=grp", count=4),
        timeout=120,
        what="4 running LWS pods",
    )
    # The LWS webhook labelled each pod with its group and worker index.
    seen = {
        (
            p["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/group-index"],
            p["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/worker-index"],
        )
        for p in pods
    }
    assert seen == {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}
    # ... and injected the leader address into every container.
    env_names = {e["name"] for p in pods for e in p["spec"]["containers"][0].get("env", [])}
    assert "LWS_LEADER_ADDRESS" in env_names
    # The scheduler kept every node within its 8 GPUs.
    per_node: Counter[str] = Counter()
    for p in pods:
        per_node[p["spec"]["nodeName"]] += int(
            p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        )
    assert all(n <= 8 for n in per_node.values()), per_node
    assert sum(per_node.values()) == 16


def test_pod_larger_than_any_node_stays_pending(cluster: Cluster, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-big"},
        "spec": {
            "containers": [
                {"name": "c", "image": "example.invalid/x:0", "resources": {"limits": {"nvidia.com/gpu": 16}}}
            ]
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(pod))

    def failed_scheduling() -> list[str]:
        events = _get_json(
            cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=too-big"
        )
        return [e["message"] for e in events["items"] if e["reason"] == "FailedScheduling"]

    messages = eventually(failed_scheduling, timeout=60, what="a FailedScheduling event")
    assert any("nvidia.com/gpu" in m for m in messages), messages
    phase = _get_json(cluster, "pod", "too-big", "-n", namespace)["status"]["phase"]
    assert phase == "Pending"


def test_deleting_a_worker_recreates_the_whole_group(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=_lws("grp", replicas=1, size=2, gpus=1))
    selector = "leaderworkerset.sigs.k8s.io/name=grp"
    pods = eventually(
        lambda: _running_pods(cluster, namespace, selector, count=2),
        timeout=120,
        what="a running group of 2",
    )
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}
    worker = next(n for n in before if n.endswith("-1"))
    cluster.kubectl("delete", "pod", worker, "-n", namespace, "--wait=false")

    def group_recreated() -> bool:
        now = {
            p["metadata"]["name"]: p["metadata"]["uid"] for p in _running_pods(cluster, namespace, selector)
        }
        return len(now) == 2 and all(now.get(name) not in (None, uid) for name, uid in before.items())

    eventually(group_recreated, timeout=120, what="the leader and the worker to be recreated with new UIDs")


CEL_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: ranges.smoke.kubemoe.io}
spec:
  group: smoke.kubemoe.io
  names: {kind: Range, plural: ranges, singular: range}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              min: {type: integer}
              max: {type: integer}
            x-kubernetes-validations:
            - rule: self.min <= self.max
              message: spec.min must not exceed spec.max
"""


def test_crd_cel_rule_rejects_bad_object(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=CEL_CRD)
    cluster.wait_established("crd/ranges.smoke.kubemoe.io")
    good = "apiVersion: smoke.kubemoe.io/v1\nkind: Range\nmetadata: {name: ok}\nspec: {min: 1, max: 2}\n"
    bad = "apiVersion: smoke.kubemoe.io/v1\nkind: Range\nmetadata: {name: bad}\nspec: {min: 3, max: 2}\n"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=good)
    proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=bad, check=False)
    assert proc.returncode != 0
    assert "spec.min must not exceed spec.max" in proc.stderr

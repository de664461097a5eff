"""The Helm chart on a real node: the operator image built from operator/Dockerfile runs under the
chart's own probes, securityContext and RBAC; `helm upgrade --wait` completes with one replica and
with two, and the standby stays Ready without restarts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from e2e.cluster.handle import Cluster
from e2e.conftest import E2E_CLUSTER_NAME
from e2e.real_images import image_ref
from e2e.waiting import eventually

CHART = Path(__file__).resolve().parents[1] / "charts" / "kubemoe"
RELEASE = "kmr"


def _operator_pods(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "json"
    )
    return [p for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")]


def _ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    return conds.get("Ready") == "True"


def _restarts(pod: dict[str, Any]) -> int:
    return sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses", []))


def _helm(cluster: Cluster, verb: str, ns: str, *sets: str) -> None:
    """helm VERB with `--set` for each KEY=VALUE of sets (other words passed as they are)."""
    args = [a for s in sets for a in (("--set", s) if "=" in s else (s,))]
    t0 = time.monotonic()
    cluster.helm(verb, RELEASE, str(CHART), "-n", ns, *args, "--wait", "--timeout=4m", timeout=300)
    print(f"helm {verb} {' '.join(sets)}: {time.monotonic() - t0:.1f}s")


def test_chart_operator_on_a_real_node(cluster: Cluster, real_namespace: str) -> None:
    ns = real_namespace
    repo, tag = image_ref(E2E_CLUSTER_NAME, "operator").rsplit(":", 1)
    try:
        _helm(
            cluster,
            "install",
            ns,
            f"image.repository={repo}",
            f"image.tag={tag}",
            "image.pullPolicy=Never",
            f"watchNamespace={ns}",
            "resyncSeconds=30",
        )
        (pod,) = _operator_pods(cluster, ns)
        assert _ready(pod), pod["status"]
        assert pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
        uid = cluster.kubectl("exec", "-n", ns, pod["metadata"]["name"], "--", "id", "-u").stdout.strip()
        assert uid == "65532"

        # One value changed, one replica: the rollout completes (helm waits for it).
        _helm(cluster, "upgrade", ns, "--reuse-values", "resyncSeconds=20")
        # Two replicas: one leads, the standby must be Ready too, and stay so.
        _helm(cluster, "upgrade", ns, "--reuse-values", "replicaCount=2")
        pods = eventually(
            lambda: [p for p in _operator_pods(cluster, ns) if _ready(p)] or None, timeout=60, what="ready"
        )
        assert len(_operator_pods(cluster, ns)) == 2
        # Past the liveness probe's period x failureThreshold (20 s x 3): nobody restarted.
        time.sleep(65)
        pods = _operator_pods(cluster, ns)
        assert [(_ready(p), _restarts(p)) for p in pods] == [(True, 0), (True, 0)], [
            p["status"] for p in pods
        ]
        # And a change with two replicas rolls out too.
        _helm(cluster, "upgrade", ns, "--reuse-values", "resyncSeconds=30")
        assert all(_ready(p) for p in _operator_pods(cluster, ns))
    finally:
        cluster.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout=2m", check=False)

"""The serving pods the operator talks to itself: each group's leader (the API pod, rank 0), whose
/metrics the autoscaler reads and whose /v1/experts/* the rebalancer uses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, LABEL_LEADER, LABEL_ROLE
from kubemoe_operator.kube.client import Kube
from kubemoe_operator.plan.command import PORT


@dataclass(frozen=True)
class Leader:
    """A running group leader: its pod and where its /metrics answers."""

    pod: Mapping[str, Any]
    url: str

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def base(self) -> str:
        """The pod's HTTP root (http://IP:PORT), where /v1/... answers."""
        return self.url.removesuffix("/metrics")

    @property
    def in_replica_set(self) -> bool:
        """Whether a ReplicaSet (a Deployment) owns the pod, and so reads its deletion cost."""
        refs = self.pod["metadata"].get("ownerReferences") or []
        return any(r.get("kind") == "ReplicaSet" and r.get("controller") for r in refs)


async def running_leaders(kube: Kube, *, namespace: str, deployment: str, role: str) -> list[Leader]:
    """A role's running group leaders (not being deleted), by pod IP, in name order."""
    pods = await kube.list_pods(
        namespace=namespace,
        labels={LABEL_DEPLOYMENT: deployment, LABEL_ROLE: role, LABEL_LEADER: "true"},
    )
    out = []
    for pod in pods:
        st = pod.get("status") or {}
        ip = st.get("podIP")
        if ip and st.get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
            host = f"[{ip}]" if ":" in ip else ip
            out.append(Leader(pod=pod, url=f"http://{host}:{PORT}/metrics"))
    return sorted(out, key=lambda leader: leader.name)

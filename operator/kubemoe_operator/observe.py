"""From children as the cluster holds them to per-role progress, pure."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubemoe_operator.render.names import LABEL_ROLE

FAILING_REASONS = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "InvalidImageName"}
)


@dataclass(frozen=True, kw_only=True)
class WorkloadState:
    """One role's workload: groups wanted, existing, ready and on the current template."""

    wanted: int
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    current: bool = True
    """The workload controller has seen the latest spec (observedGeneration)."""
    exists: bool = True

    @property
    def settled(self) -> bool:
        return self.exists and self.current and self.ready == self.wanted == self.replicas == self.updated


def workload_state(obj: Mapping[str, Any] | None, *, wanted: int) -> WorkloadState:
    """LeaderWorkerSet or Deployment status -> WorkloadState (groups, for an LWS; pods = groups otherwise)."""
    if obj is None:
        return WorkloadState(wanted=wanted, exists=False)
    status = obj.get("status") or {}
    generation = obj.get("metadata", {}).get("generation")
    if obj.get("kind") == "LeaderWorkerSet":
        current = True  # LWS reports no observedGeneration; updatedReplicas tells rollout progress
    else:
        current = generation is None or status.get("observedGeneration") == generation
    return WorkloadState(
        wanted=wanted,
        replicas=int(status.get("replicas") or 0),
        ready=int(status.get("readyReplicas") or 0),
        updated=int(status.get("updatedReplicas") or 0),
        current=current,
    )


@dataclass(frozen=True, kw_only=True)
class PodTrouble:
    """Why pods are not running: unschedulable (with the scheduler's words) or failing."""

    pending: dict[str, int]
    """role -> pods the scheduler could not place."""
    failing: dict[str, int]
    """role -> pods crash-looping, failing to pull or failed."""
    reasons: tuple[str, ...]
    """Distinct messages, e.g. the scheduler's '0/4 nodes are available: 4 Insufficient nvidia.com/gpu.'"""


def pod_trouble(pods: Iterable[Mapping[str, Any]]) -> PodTrouble:
    pending: Counter[str] = Counter()
    failing: Counter[str] = Counter()
    reasons: dict[str, None] = {}
    for pod in pods:
        meta = pod.get("metadata", {})
        if meta.get("deletionTimestamp"):
            continue
        role = (meta.get("labels") or {}).get(LABEL_ROLE, "?")
        status = pod.get("status") or {}
        if status.get("phase") == "Failed":
            failing[role] += 1
            reasons[f"{role} pod {meta.get('name')} failed: {status.get('reason') or 'Failed'}"] = None
            continue
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                pending[role] += 1
                reasons[cond.get("message") or cond.get("reason") or "Unschedulable"] = None
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in FAILING_REASONS:
                failing[role] += 1
                reasons[f"{role} pod {meta.get('name')}: {waiting['reason']}"] = None
    return PodTrouble(pending=dict(pending), failing=dict(failing), reasons=tuple(reasons))

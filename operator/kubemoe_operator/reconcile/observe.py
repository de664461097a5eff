"""From children as the cluster holds them to per-role progress, pure."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubemoe_operator.api.labels import LABEL_ROLE

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


def observed_generation(status: Mapping[str, Any]) -> int | None:
    """The generation a workload controller last reported on: status.observedGeneration (Deployment;
    LeaderWorkerSet since v0.9), else the newest observedGeneration of its conditions."""
    if status.get("observedGeneration") is not None:
        return int(status["observedGeneration"])
    seen = [
        int(c["observedGeneration"]) for c in status.get("conditions") or [] if c.get("observedGeneration")
    ]
    return max(seen) if seen else None


def _updating(status: Mapping[str, Any]) -> bool:
    """LeaderWorkerSet's UpdateInProgress condition: a rolling update has groups left to replace."""
    return any(
        c.get("type") == "UpdateInProgress" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def workload_state(obj: Mapping[str, Any] | None, *, wanted: int) -> WorkloadState:
    """LeaderWorkerSet or Deployment status -> WorkloadState (groups, for an LWS; pods = groups otherwise).

    Its counts are current only once the controller has observed the latest spec: until then they
    describe the previous one (a rollout that has not started yet looks finished). A LeaderWorkerSet
    controller older than v0.9 reports no observedGeneration at all, on its status or its conditions:
    its counts (and UpdateInProgress) are all there is, or such a deployment would never be Ready."""
    if obj is None:
        return WorkloadState(wanted=wanted, exists=False)
    status = obj.get("status") or {}
    generation = obj.get("metadata", {}).get("generation")
    observed = observed_generation(status)
    old_lws = obj.get("kind") == "LeaderWorkerSet" and observed is None and status.get("replicas") is not None
    current = generation is None or observed == generation or old_lws
    if obj.get("kind") == "LeaderWorkerSet" and _updating(status):
        current = False
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


CREATORS = frozenset({"ReplicaSet", "StatefulSet", "Job", "LeaderWorkerSet"})
"""The controllers that create a workload's pods (a Deployment's ReplicaSet; a LeaderWorkerSet's
StatefulSets, the leaders' and one per group), or the model cache's Job."""
_CREATED_NAME = r"(?:-[0-9]+|-[bcdfghjklmnpqrstvwxz2456789]{5,10})?"
"""After a workload's name: a group's StatefulSet (-INDEX) or a ReplicaSet's pod-template hash (in
the alphabet Kubernetes encodes it with); nothing for the leaders' StatefulSet or a Job."""


def _event_time(event: Mapping[str, Any]) -> datetime | None:
    series = event.get("series") or {}
    stamp = (
        series.get("lastObservedTime")
        or event.get("lastTimestamp")
        or event.get("eventTime")
        or (event.get("metadata") or {}).get("creationTimestamp")
    )
    try:
        at = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else None


def creation_failures(
    events: Iterable[Mapping[str, Any]], *, workloads: Collection[str], since: datetime
) -> tuple[str, ...]:
    """Why pods of these workloads (names) could not be created, from the controllers' FailedCreate
    Events since `since` (a quota, a PodSecurity or webhook refusal): pods that are never created
    leave nothing in pod status to read. An object that has created a pod since its last failure
    (a SuccessfulCreate Event as new or newer) is past it."""
    pattern = re.compile(rf"(?:{'|'.join(re.escape(w) for w in workloads)}){_CREATED_NAME}")
    last: dict[tuple[str, str], tuple[datetime, str, str]] = {}  # object -> (time, reason, message)
    for event in events:
        obj = event.get("involvedObject") or {}
        kind, name = str(obj.get("kind") or ""), str(obj.get("name") or "")
        if kind not in CREATORS or not workloads or not pattern.fullmatch(name):
            continue
        reason, at = str(event.get("reason") or ""), _event_time(event)
        if reason not in ("FailedCreate", "SuccessfulCreate") or at is None or at < since:
            continue
        seen = last.get((kind, name))
        if seen is None or (at, reason == "SuccessfulCreate") >= (seen[0], seen[1] == "SuccessfulCreate"):
            last[(kind, name)] = (at, reason, " ".join(str(event.get("message") or "").split())[:400])
    return tuple(
        dict.fromkeys(
            f"{kind} {name}: {message}"
            for (kind, name), (_, reason, message) in sorted(last.items())
            if reason == "FailedCreate"
        )
    )

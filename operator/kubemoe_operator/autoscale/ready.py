"""The groups the autoscaler reads its signals from: those whose leader pod is Ready (the group has
loaded its weights and serves) and not being deleted (draining).

A group still loading serves nothing and reports nothing worth averaging: its GPUs idle (its NVML
collector runs before the weights load), its queue is empty. The decision multiplies the per-group
mean by the ready groups (decide.py), so a mean that counted the loading groups would ask to remove
the groups that carry the load (two ready groups at 100 % GPU and two loading at 0 %: a mean of
50 % against a target of 60 % was a scale-down). Both sources read only these groups: the scrape
reads their leaders' pages (loop.pod_targets), the Prometheus queries select their `group` label.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_operator.kube.client import Kube
from kubemoe_operator.kube.pods import Leader, running_leaders
from kubemoe_operator.render.pods import LWS_GROUP_INDEX

ReadyLeaders = Callable[[RoleSelector], Awaitable[list[Leader]]]
ReadyGroups = Callable[[RoleSelector], Awaitable[list[str]]]
"""The `group` label values of a role's ready groups."""


def is_ready(pod: Mapping[str, Any]) -> bool:
    """Whether the pod's Ready condition is True (its readiness probe passes)."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def group_of(leader: Leader) -> str:
    """The `group` label its series carry (render/pods.py metric_label_env): a LeaderWorkerSet's
    group index, or the pod's name where the pod is the whole group."""
    labels = leader.pod["metadata"].get("labels") or {}
    return str(labels.get(LWS_GROUP_INDEX) or leader.name)


def ready_leaders(kube: Kube) -> ReadyLeaders:
    """A role's running group leaders that are Ready and not being deleted, in name order."""

    async def leaders(sel: RoleSelector) -> list[Leader]:
        found = await running_leaders(kube, namespace=sel.namespace, deployment=sel.deployment, role=sel.role)
        return [leader for leader in found if is_ready(leader.pod)]

    return leaders


def ready_groups(kube: Kube) -> ReadyGroups:
    """The `group` label values of a role's ready groups (PrometheusSource's `groups`)."""
    leaders = ready_leaders(kube)

    async def groups(sel: RoleSelector) -> list[str]:
        return sorted({group_of(leader) for leader in await leaders(sel)})

    return groups

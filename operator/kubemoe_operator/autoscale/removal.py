"""Which group a scale-down removes: the least loaded, chosen before the change is written.

A Deployment's ReplicaSet removes the pods with the lowest `controller.kubernetes.io/pod-deletion-cost`
first (after any pod not yet scheduled, running or ready: those always go first). So before the
autoscaler writes a lower desired for a role of one-pod groups, it sets each running group leader's
cost to its load, requests running plus waiting, read from the pod's own /metrics: the group with
the least to finish is the one removed. A LeaderWorkerSet always removes its highest-index groups;
there is nothing to choose there, and its pods are left alone.

The removed group then drains (render/lifecycle.py's preStop, pod/drain.py): the router ejects it on
its /ready 503, requests in flight finish, prefilled KV waits for its decode's pull, bounded by the
drain timeout. The choice only shortens that drain, so it is best effort: a pod that does not answer
keeps the cost it had (a fresh pod has none: 0), a failed patch is logged, and the scale-down goes
ahead either way. Each page is read as the scrape reads them (pages.py): within LOAD_TIMEOUT_S for
the whole request, up to 1 MiB (a longer page is not read further), parsed off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from kubemoe_operator.autoscale.pages import MAX_PAGE_BYTES, PageTooLong, fetch_page, series_lines
from kubemoe_operator.autoscale.signals import QUEUE, RUNNING, RoleSelector
from kubemoe_operator.kube.client import Kube
from kubemoe_operator.kube.pods import Leader, running_leaders

log = logging.getLogger("kubemoe.autoscale")

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
LOAD_TIMEOUT_S = 3.0
"""The whole read of one leader's page."""


Leaders = Callable[[RoleSelector], Awaitable[list[Leader]]]


def pod_leaders(kube: Kube) -> Leaders:
    """A role's running group leaders (not being deleted), by pod IP, in name order."""

    async def leaders(sel: RoleSelector) -> list[Leader]:
        return await running_leaders(kube, namespace=sel.namespace, deployment=sel.deployment, role=sel.role)

    return leaders


class PodAnnotator(Protocol):
    async def annotate_pod(self, *, namespace: str, name: str, annotations: Mapping[str, str]) -> None: ...


def load_of(text: str, sel: RoleSelector) -> float:
    """Requests running plus waiting on one pod's page, for `sel`'s role; ValueError if unreadable."""
    total = 0.0
    for family in text_string_to_metric_families(series_lines(text, (QUEUE, RUNNING))):
        for s in family.samples:
            if s.name not in (QUEUE, RUNNING):
                continue
            if s.labels.get("deployment") != sel.deployment or s.labels.get("role") != sel.role:
                continue
            if not math.isfinite(s.value) or s.value < 0:
                raise ValueError(f"{s.name} is {s.value}")
            total += s.value
    return total


@dataclass
class LeastLoaded:
    """Marks a role's one-pod groups so that a scale-down removes the least loaded (module docstring)."""

    kube: PodAnnotator
    leaders: Leaders
    client: httpx2.AsyncClient

    async def mark(self, sel: RoleSelector) -> dict[str, int]:
        """Set each ReplicaSet-owned leader's deletion cost to its load; the costs set, by pod."""
        found = [leader for leader in await self.leaders(sel) if leader.in_replica_set]
        loads = await asyncio.gather(*(self._load(leader, sel) for leader in found))
        costs: dict[str, int] = {}
        for leader, load in zip(found, loads, strict=True):
            if load is None:
                continue
            cost = min(round(load), 2**31 - 1)
            annotations = leader.pod["metadata"].get("annotations") or {}
            if annotations.get(DELETION_COST) != str(cost):
                try:
                    await self.kube.annotate_pod(
                        namespace=sel.namespace, name=leader.name, annotations={DELETION_COST: str(cost)}
                    )
                except Exception as err:  # best effort: the drain protects the requests either way
                    log.warning("autoscaler: could not set %s on %s: %s", DELETION_COST, leader.name, err)
                    continue
            costs[leader.name] = cost
        return costs

    async def _load(self, leader: Leader, sel: RoleSelector) -> float | None:
        try:
            text = await fetch_page(
                self.client, leader.url, timeout_s=LOAD_TIMEOUT_S, max_bytes=MAX_PAGE_BYTES
            )
            return None if text is None else await asyncio.to_thread(load_of, text, sel)
        except (PageTooLong, ValueError, TypeError, KeyError, IndexError) as err:
            log.debug("autoscaler: no load from %s: %s", leader.url, err)
            return None

"""Container resources: a serving container's from the plan, the router's from spec.router.

A serving container's CPU and memory requests come from the plan and its accelerators are added.

Requests come from the plan (plan.RolePlan.host, which already applies the spec's cpu and memory
requests); any other request or limit in spec.roles.<role>.resources passes through (an extended
resource such as rdma/hca given only as a request is limited at it too; api/rules.py refuses the
accelerators' own names there). The
accelerator count is both requested and limited (extended resources must be). No CPU or memory
limit is set unless the spec gives one: a memory limit would count the page cache of mapped
weight files against the pod.
"""

from __future__ import annotations

from typing import Any

from kubemoe_operator.api.quantity import milli_units
from kubemoe_operator.api.spec import ModelDeploymentSpec, RoleSpec
from kubemoe_operator.plan.model import Plan, RolePlan


def extended(name: str) -> bool:
    """An extended resource (rdma/hca, nvidia.com/gpu): a domain other than kubernetes.io. Kubernetes
    never overcommits them, so a pod must limit them at its request."""
    return "/" in name and not name.startswith(("kubernetes.io/", "requests."))


def _limit_extended(requests: dict[str, str], limits: dict[str, str]) -> dict[str, str]:
    """`limits` with every extended resource requested but not limited, at its request."""
    return {**limits, **{k: v for k, v in requests.items() if extended(k) and k not in limits}}


def container_resources(*, spec: ModelDeploymentSpec, plan: Plan, role: RolePlan) -> dict[str, Any]:
    role_spec: RoleSpec | None = getattr(spec.roles, role.role)
    given = role_spec.resources if role_spec is not None else None
    requests = {k: str(v) for k, v in given.requests.items()} if given else {}
    limits = _limit_extended(requests, {k: str(v) for k, v in given.limits.items()} if given else {})
    requests["cpu"] = role.host.cpu
    requests["memory"] = role.host.memory
    if plan.resource is not None:
        count = str(role.devices_per_pod)
        requests[plan.resource] = count
        limits[plan.resource] = count
    out: dict[str, Any] = {"requests": requests}
    if limits:
        out["limits"] = limits
    return out


ROUTER_REQUESTS = {"cpu": "500m", "memory": "512Mi"}
"""The router's requests unless spec.router.resources gives them (a smaller limit lowers them)."""


def router_resources(spec: ModelDeploymentSpec) -> dict[str, Any]:
    """ROUTER_REQUESTS, overridden key by key by spec.router.resources (limits only when given)."""
    given = spec.router.resources
    given_limits = {k: str(v) for k, v in given.limits.items()} if given else {}
    defaults = {  # a default above the user's limit comes down to it, as Kubernetes defaults a request
        k: given_limits[k] if k in given_limits and milli_units(given_limits[k]) < milli_units(v) else v
        for k, v in ROUTER_REQUESTS.items()
    }
    requests = {**defaults, **({k: str(v) for k, v in given.requests.items()} if given else {})}
    out: dict[str, Any] = {"requests": requests}
    limits = _limit_extended(requests, given_limits)
    if limits:
        out["limits"] = limits
    return out

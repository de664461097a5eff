"""What the reconciler and the autoscaler share: the status as the cluster holds it, and the spec with
the autoscaler's decisions applied. The autoscaler writes status.roles.<role>.desired; the reconciler
renders effective_spec(); neither writes back the other's fields (README: Architecture)."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from kubemoe_operator.api.spec import ModelDeploymentSpec
from kubemoe_operator.api.status import ModelDeploymentStatus

log = logging.getLogger("kubemoe.desired")


def desired_of(status: ModelDeploymentStatus | None) -> dict[str, int | None]:
    return {} if status is None else {name: role.desired for name, role in status.roles.items()}


def effective_spec(spec: ModelDeploymentSpec, status: ModelDeploymentStatus | None) -> ModelDeploymentSpec:
    """`spec` with each autoscaled role's replicas set to status.roles.<role>.desired, clamped to
    minReplicas..maxReplicas. Before the autoscaler has written a desired, spec.replicas is clamped
    alike: the bounds hold from the first render (spec.replicas 10 with maxReplicas 4 runs 4, not 10
    until the first readable interval cuts it past maxStep and the windows). spec itself is never
    written back. A role with `mode: external` is left to its HPA or ScaledObject."""
    desired = desired_of(status)
    updates: dict[str, Any] = {}
    for name, role in spec.roles.items():
        scale = role.autoscaling
        if scale is None or scale.mode == "external":
            continue
        want = desired.get(name)
        clamped = min(max(role.replicas if want is None else want, scale.min_replicas), scale.ceiling)
        if clamped != role.replicas:
            updates[name] = role.model_copy(update={"replicas": clamped})
    if not updates:
        return spec
    return spec.model_copy(update={"roles": spec.roles.model_copy(update=updates)})


def parse_status(raw: Any) -> ModelDeploymentStatus | None:
    if not raw:
        return None
    try:
        return ModelDeploymentStatus.model_validate(raw)
    except ValidationError:
        log.warning("ignoring a status that does not parse: %r", raw)
        return None

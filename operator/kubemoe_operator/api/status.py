"""`ModelDeployment.status`: what the operator observed, after the Kubernetes API conventions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from kubemoe_operator.api.base import ApiModel

Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]
ConditionType = Literal["Ready", "Planned", "Progressing", "Degraded"]


def now_utc() -> datetime:
    """Now, to the second: the API's timestamps (metav1.Time) carry whole seconds."""
    return datetime.now(UTC).replace(microsecond=0)


class Condition(ApiModel):
    """One aspect of the object's state (metav1.Condition)."""

    type: str = Field(
        min_length=1,
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    """Ready, Planned, Progressing or Degraded."""
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """CamelCase cause, e.g. LeaderWorkerSetMissing."""
    message: str = Field("", max_length=32768)
    """What happened and what to do, in plain words."""
    last_transition_time: datetime
    """When status last changed."""
    observed_generation: int | None = Field(None, ge=0)
    """The .metadata.generation this condition was computed from."""


class RoleStatus(ApiModel):
    """Serving groups of one role."""

    replicas: int = Field(0, ge=0)
    """Groups that exist."""
    ready: int = Field(0, ge=0)
    """Groups whose every rank is ready."""
    desired: int | None = Field(None, ge=0)
    """The autoscaler's decision, clamped to minReplicas..maxReplicas; the reconciler renders it."""
    decided_by: str | None = Field(None, max_length=32)
    """What made the autoscaler's last change: the metric whose recommendation won (ttft-p90, ...),
    or perDecode when prefill followed decode."""
    last_scale_time: datetime | None = None
    """When the autoscaler last changed desired (as an HPA's lastScaleTime): the cooldown runs from
    it, across operator restarts and leader changes."""


class ExpertsStatus(ApiModel):
    """Expert placement of one expert-parallel role (the rebalancer: spec.experts)."""

    generation: int = Field(0, ge=0)
    """The placement the role's groups run: 0 is the default (contiguous blocks), each rebalance adds one."""
    imbalance: float | None = Field(None, ge=0)
    """At the last check: the busiest rank's load over the mean rank load, summed over the MoE layers
    (1.0 is perfectly even; an expert-parallel step waits for the busiest rank at every layer)."""
    predicted_imbalance: float | None = Field(None, ge=0)
    """What the last applied placement predicted from the load it was computed from."""
    last_rebalance_time: datetime | None = None
    message: str = Field("", max_length=1024)
    """The last check's outcome, in words."""


class ModelCacheStatus(ApiModel):
    """model.cache: the Job that fills the claim, and how far it has got."""

    phase: Literal["Filling", "Filled", "Failed"]
    """Filled once the Job has succeeded: the serving groups start (or roll) then."""
    job: str = Field(max_length=253)
    claim: str = Field(max_length=253)
    bytes: int | None = Field(None, ge=0)
    """Bytes in the claim so far (the fill pod's own count, while it runs)."""
    bytes_total: int | None = Field(None, ge=0)
    files: int | None = Field(None, ge=0)
    files_total: int | None = Field(None, ge=0)
    message: str = Field("", max_length=1024)
    """Progress or the last failure, in words."""


class ModelDeploymentStatus(ApiModel):
    """The observed state of a ModelDeployment."""

    observed_generation: int | None = Field(None, ge=0)
    phase: Phase | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    layout: str | None = Field(None, max_length=256)
    """The planned layout, e.g. "P1x(EP16) D2x(EP16)"."""
    roles: dict[str, RoleStatus] = Field(default_factory=dict)
    """Per role (prefill, decode, worker, router)."""
    experts: dict[str, ExpertsStatus] = Field(default_factory=dict)
    """Per expert-parallel role with spec.experts: its expert placement."""
    cache: ModelCacheStatus | None = None
    """model.cache: the fill Job's progress."""
    endpoint: str | None = Field(None, max_length=512)
    """The OpenAI-compatible base URL, e.g. http://NAME.NAMESPACE.svc:8000/v1."""

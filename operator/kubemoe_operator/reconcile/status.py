"""Status from what a reconcile learned, pure: conditions after the Kubernetes API conventions.

Conditions: Planned (the planner accepted the spec), Ready (every group of every role and the
router ready; ModelCaching while model.cache fills), Progressing (the children are moving towards
the spec), Degraded (a role that served lost all its groups, or pods are failing).
lastTransitionTime changes only when a condition's status does.

Status has two writers, each owning its fields by server-side apply (conditions are a list-map
keyed by type, roles a map): the reconciler owns these four conditions, phase, layout, endpoint,
observedGeneration, cache and roles.*.{replicas,ready}; the autoscaler owns MetricsAvailable and
roles.*.desired. Each apply names only its owner's fields, so a writer that read status before the
other changed it cannot write the other's fields back: a stale writer is impossible by
construction, not repaired afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from kubemoe_operator.api.status import Condition, ModelCacheStatus, ModelDeploymentStatus, Phase, RoleStatus
from kubemoe_operator.reconcile.loading import Loading, describe_loading
from kubemoe_operator.reconcile.observe import PodTrouble, WorkloadState

Status = Literal["True", "False", "Unknown"]

REASON_PLANNED = "Planned"
REASON_PLAN_REJECTED = "PlanRejected"
REASON_PLAN_FAILED = "PlanFailed"
"""The planner or renderer raised on a spec it should have refused: a bug, reported, not fatal."""
REASON_LWS_MISSING = "LeaderWorkerSetMissing"
REASON_APPLY_FAILED = "ApplyFailed"
REASON_NAME_TAKEN = "NameTaken"
REASON_READY = "AllGroupsReady"
REASON_NOT_READY = "GroupsNotReady"
REASON_PENDING = "PodsPending"
REASON_ROLLING = "RollingOut"
REASON_STABLE = "Stable"
REASON_DEGRADED = "GroupsUnavailable"
REASON_FAILING = "PodsFailing"
REASON_NOT_CREATED = "PodsNotCreated"
REASON_AS_EXPECTED = "AsExpected"
REASON_BLOCKED = "Blocked"
REASON_CACHING = "ModelCaching"
REASON_CACHE_FAILED = "ModelCacheFailed"

NOT_CREATED_HINT = (
    "pods could not be created (fix what the API server's words below name: often the namespace's "
    "ResourceQuota, its PodSecurity level, a missing PriorityClass or an admission webhook; "
    "`kubectl get events` has more): "
)
OWN_CONDITIONS = ("Ready", "Planned", "Progressing", "Degraded")
"""The condition types the reconciler owns, in the order status lists them."""

LWS_INSTALL_HINT = (
    "this layout needs LeaderWorkerSet (a serving group spans several pods), and the cluster does not "
    "serve leaderworkersets.leaderworkerset.x-k8s.io/v1. Install LeaderWorkerSet v0.9 or later "
    "(https://lws.sigs.k8s.io/docs/installation/), or change the parallelism so that each group "
    "fits one pod (data x tensor <= accelerator.perPod)."
)


@dataclass(frozen=True, kw_only=True)
class Facts:
    """Everything one reconcile learned that status reports."""

    generation: int | None
    layout: str | None = None
    endpoint: str | None = None
    plan_error: str | None = None
    plan_reason: str = REASON_PLAN_REJECTED
    """The reason Planned and Ready give for plan_error."""
    lws_missing: bool = False
    apply_error: str | None = None
    apply_reason: str = REASON_APPLY_FAILED
    roles: dict[str, WorkloadState] = field(default_factory=dict)
    """Per role, including the router."""
    trouble: PodTrouble = field(default_factory=lambda: PodTrouble(pending={}, failing={}, reasons=()))
    cache: ModelCacheStatus | None = None
    """model.cache's fill: until Filled, the serving groups wait for it (reconcile/model_cache.py)."""
    loading: dict[str, Loading] = field(default_factory=dict)
    """Per role, the weights its loading pods have read (reconcile/loading.py)."""
    not_created: tuple[str, ...] = ()
    """Why the controllers could not create pods (reconcile/observe.creation_failures)."""


def set_condition(
    conditions: list[Condition],
    *,
    type: str,
    status: Status,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    """`conditions` with `type` set; lastTransitionTime kept unless the status changed."""
    old = next((c for c in conditions if c.type == type), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    new = Condition(
        type=type,
        status=status,
        reason=reason,
        message=message[:32768],
        last_transition_time=since,
        observed_generation=generation,
    )
    return [*(c for c in conditions if c.type != type), new]


def _role_summary(roles: dict[str, WorkloadState]) -> str:
    return ", ".join(f"{name}: {s.ready}/{s.wanted} ready" for name, s in roles.items())


def _was_serving(old: ModelDeploymentStatus | None, role: str) -> bool:
    return old is not None and role in old.roles and old.roles[role].ready > 0


def compute_status(
    *, old: ModelDeploymentStatus | None, facts: Facts, now: datetime
) -> ModelDeploymentStatus:
    """The reconciler's part of status after a reconcile that learned `facts` (see `owned`)."""
    old = owned(old) if old is not None else None
    conds = list(old.conditions) if old is not None else []
    gen = facts.generation

    def put(type: str, status: Status, reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(
            conds, type=type, status=status, reason=reason, message=message, generation=gen, now=now
        )

    roles = dict(old.roles) if old is not None else {}
    layout = old.layout if old is not None else None
    endpoint = old.endpoint if old is not None else None
    phase: Phase
    if facts.plan_error is not None:
        put("Planned", "False", facts.plan_reason, facts.plan_error)
        put(
            "Ready",
            "False",
            facts.plan_reason,
            "the spec cannot be planned; running children are left as they were. " + facts.plan_error,
        )
        put("Progressing", "False", REASON_BLOCKED, "waiting for a spec the planner accepts")
        phase = "Failed"
    elif facts.lws_missing:
        put("Planned", "True", REASON_PLANNED, f"layout {facts.layout}")
        put("Ready", "False", REASON_LWS_MISSING, LWS_INSTALL_HINT)
        put("Progressing", "False", REASON_BLOCKED, "nothing was created: " + REASON_LWS_MISSING)
        layout, phase = facts.layout, "Failed"
    else:
        layout, endpoint = facts.layout, facts.endpoint
        roles = {name: RoleStatus(replicas=s.replicas, ready=s.ready) for name, s in facts.roles.items()}
        put("Planned", "True", REASON_PLANNED, f"layout {facts.layout}")
        all_ready = all(s.settled for s in facts.roles.values())
        trouble = facts.trouble
        lost = [n for n, s in facts.roles.items() if s.wanted > 0 and s.ready == 0 and _was_serving(old, n)]
        caching = facts.cache is not None and facts.cache.phase != "Filled"
        if facts.apply_error is not None:
            put("Ready", "False", facts.apply_reason, facts.apply_error)
        elif facts.cache is not None and facts.cache.phase == "Failed":
            put("Ready", "False", REASON_CACHE_FAILED, facts.cache.message)
        elif caching and not all_ready:
            assert facts.cache is not None
            put("Ready", "False", REASON_CACHING, facts.cache.message)
        elif all_ready:
            put("Ready", "True", REASON_READY, _role_summary(facts.roles))
        else:
            loading = describe_loading(facts.loading)
            summary = _role_summary(facts.roles) + (f"; {loading}" if loading else "")
            put("Ready", "False", REASON_NOT_READY, summary)
        if caching:
            assert facts.cache is not None
            put("Progressing", "True", REASON_CACHING, facts.cache.message)
        elif all_ready and facts.apply_error is None:
            put("Progressing", "False", REASON_STABLE, "every group is ready on the current spec")
        elif trouble.pending:
            counts = ", ".join(f"{n} {role}" for role, n in sorted(trouble.pending.items()))
            put(
                "Progressing",
                "True",
                REASON_PENDING,
                f"pods Pending ({counts}): " + "; ".join(trouble.reasons),
            )
        else:
            put("Progressing", "True", REASON_ROLLING, _role_summary(facts.roles))
        if trouble.failing:
            put("Degraded", "True", REASON_FAILING, "; ".join(trouble.reasons))
        elif facts.not_created:
            put("Degraded", "True", REASON_NOT_CREATED, NOT_CREATED_HINT + "; ".join(facts.not_created))
        elif lost:
            put("Degraded", "True", REASON_DEGRADED, "no ready group left for " + ", ".join(lost))
        else:
            put("Degraded", "False", REASON_AS_EXPECTED, "no role lost its groups")
        degraded = any(c.type == "Degraded" and c.status == "True" for c in conds)
        if facts.apply_error is not None or (facts.cache is not None and facts.cache.phase == "Failed"):
            phase = "Failed"
        elif all_ready:
            phase = "Ready"
        elif degraded:
            phase = "Degraded"
        elif any(s.exists for s in facts.roles.values()):
            phase = "Progressing"
        else:
            phase = "Pending"
    conds.sort(key=lambda c: OWN_CONDITIONS.index(c.type))
    return ModelDeploymentStatus(
        observed_generation=gen,
        phase=phase,
        conditions=conds,
        layout=layout,
        roles=roles,
        endpoint=endpoint,
        cache=facts.cache
        if facts.plan_error is None and not facts.lws_missing
        else (old.cache if old else None),
    )


def owned(status: ModelDeploymentStatus) -> ModelDeploymentStatus:
    """The fields of `status` the reconciler owns: its conditions (in its order), and each role
    without the autoscaler's fields (desired, decidedBy, lastScaleTime)."""
    conds = sorted(
        (c for c in status.conditions if c.type in OWN_CONDITIONS), key=lambda c: OWN_CONDITIONS.index(c.type)
    )
    autoscalers = {"desired": None, "decided_by": None, "last_scale_time": None}
    roles = {name: role.model_copy(update=autoscalers) for name, role in status.roles.items()}
    return status.model_copy(update={"conditions": conds, "roles": roles, "experts": {}})


def status_apply(*, old: ModelDeploymentStatus | None, new: ModelDeploymentStatus) -> dict[str, Any] | None:
    """The reconciler's server-side apply of status, or None when its fields hold `new` already.

    It names every field the reconciler owns and nothing else: a field it leaves out (a role no
    longer planned, an endpoint) is removed, unless another manager owns it too.
    """
    new = owned(new)
    if old is not None and owned(old) == new:
        return None
    # status.experts is the rebalancer's (rebalance/loop.py): never named here, so never taken over
    return new.model_dump(by_alias=True, mode="json", exclude_none=True, exclude={"experts"})

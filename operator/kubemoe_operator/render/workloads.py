"""Per role: a LeaderWorkerSet (multi-pod groups) or a Deployment, its headless Service and its PDB."""

from __future__ import annotations

from typing import Any

from kubemoe_operator.api.labels import LABEL_LEADER
from kubemoe_operator.api.spec import ModelDeploymentSpec
from kubemoe_operator.plan.command import PORT
from kubemoe_operator.plan.model import Plan, PodPlan, RolePlan
from kubemoe_operator.render.engines import any_sglang_worker
from kubemoe_operator.render.names import Owner, metadata, selector, workload_name
from kubemoe_operator.render.pods import PodContext, pod_template

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_KIND = "LeaderWorkerSet"


def any_worker(pod: PodPlan) -> PodPlan:
    """One template serves every worker of a group, so its start rank cannot be a number: with
    `--data-parallel-start-rank auto` the runtime takes LWS_WORKER_INDEX x --data-parallel-size-local
    (every pod of a group runs the same number of local ranks; the planner guarantees it). SGLang's
    pods differ by --node-rank, the worker index (engines.any_sglang_worker)."""
    if "--node-rank" in pod.command:
        return any_sglang_worker(pod)
    argv = list(pod.command)
    argv[argv.index("--data-parallel-start-rank") + 1] = "auto"
    return pod.model_copy(update={"command": argv})


def externally_scaled(spec: ModelDeploymentSpec, role: str) -> bool:
    """An HPA or a KEDA ScaledObject owns the role's replicas (autoscaling.mode external)."""
    scale = next((r.autoscaling for name, r in spec.roles.items() if name == role), None)
    return scale is not None and scale.mode == "external"


def _replicas(replicas: int | None) -> dict[str, Any]:
    """spec.replicas, or nothing when a scaler owns it: the operator's apply then never names the
    field, so it neither sets it nor takes it back (reconcile/apply.py hands it over)."""
    return {} if replicas is None else {"replicas": replicas}


def leader_worker_set(
    *, owner: Owner, ctx: PodContext, role: RolePlan, replicas: int | None
) -> dict[str, Any]:
    """replicas = serving groups (None: a scaler's), size = pods per group; a dead rank restarts its
    whole group."""
    leader, worker = role.pods[0], any_worker(role.pods[1])
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": LWS_KIND,
        "metadata": metadata(owner=owner, name=workload_name(owner.name, role.role), role=role.role),
        "spec": {
            **_replicas(replicas),
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": role.pods_per_group,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": pod_template(ctx=ctx, role=role, pod=leader),
                "workerTemplate": pod_template(ctx=ctx, role=role, pod=worker),
            },
        },
    }


def deployment(
    *, owner: Owner, name: str, role: str, replicas: int | None, template: dict[str, Any], surge: bool = False
) -> dict[str, Any]:
    """One pod per serving group (replicas None: a scaler's). A serving role's rolling update never
    surges (accelerators are rarely spare); the router's (`surge`, CPU only) starts its new pod
    before it stops an old one, or a one-replica router would leave the front Service empty."""
    rolling = {"maxSurge": 1, "maxUnavailable": 0} if surge else {"maxSurge": 0, "maxUnavailable": 1}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner=owner, name=name, role=role),
        "spec": {
            **_replicas(replicas),
            "selector": {"matchLabels": selector(owner.name, role)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
            "template": template,
        },
    }


def role_workload(*, owner: Owner, ctx: PodContext, role: RolePlan) -> dict[str, Any]:
    """The role's LeaderWorkerSet or Deployment; without spec.replicas when an external scaler owns
    them (the operator creates it with role.replicas, spec.roles.<role>.replicas: `initial_replicas`)."""
    replicas = None if externally_scaled(ctx.spec, role.role) else role.replicas
    if role.workload == "LeaderWorkerSet":
        return leader_worker_set(owner=owner, ctx=ctx, role=role, replicas=replicas)
    return deployment(
        owner=owner,
        name=workload_name(owner.name, role.role),
        role=role.role,
        replicas=replicas,
        template=pod_template(ctx=ctx, role=role, pod=role.pods[0]),
    )


def initial_replicas(*, spec: ModelDeploymentSpec, plan: Plan, owner: str) -> dict[tuple[str, str], int]:
    """(kind, name) -> the groups to create it with, for each workload an external scaler owns (its
    render has no spec.replicas): spec.roles.<role>.replicas, the autoscaler's decisions never
    applying to such a role (api/desired.py)."""
    return {
        (role.workload, workload_name(owner, role.role)): role.replicas
        for role in plan.roles
        if externally_scaled(spec, role.role)
    }


def headless_service(*, owner: Owner, role: str) -> dict[str, Any]:
    """The role's group leaders by DNS, ready or not: the LWS subdomain (so $(LWS_LEADER_ADDRESS)
    resolves) and the router's backend list. Named like the LWS, so LWS adopts it as its own."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner=owner, name=workload_name(owner.name, role), role=role),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {**selector(owner.name, role), LABEL_LEADER: "true"},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(*, owner: Owner, name: str, role: str) -> dict[str, Any]:
    """At most one pod of a role evicted at a time (for LWS: at most one group disrupted)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(owner=owner, name=name, role=role),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(owner.name, role)}},
    }

"""`render(...) -> [k8s objects]`: the children of one ModelDeployment, pure (docs/architecture.md).

Objects come out in apply order: the plan ConfigMap, the NetworkPolicies (in place before any
pod they protect starts), model.cache's claim and the Job that fills it, Services (a role's
headless Service must exist before its LeaderWorkerSet, which adopts it as its subdomain),
disruption budgets, then the workloads and
the router.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubemoe_operator.api.labels import LABEL_LEADER, ROUTER
from kubemoe_operator.api.spec import ModelDeploymentSpec, PodOptions
from kubemoe_operator.plan.command import PORT, router_command
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.render.engines import router_access, sglang_router, sglang_router_command
from kubemoe_operator.render.model_cache import cache_claim, fill_job
from kubemoe_operator.render.monitoring import pod_monitor_of, with_scrape_annotations
from kubemoe_operator.render.names import (
    Owner,
    metadata,
    plan_configmap_name,
    router_name,
    selector,
    workload_name,
)
from kubemoe_operator.render.network import network_policies
from kubemoe_operator.render.pod_options import merged
from kubemoe_operator.render.pods import PodContext, router_pod_template
from kubemoe_operator.render.workloads import deployment, disruption_budget, headless_service, role_workload

__all__ = ["PLAN_KEY", "Owner", "endpoint", "render"]

PLAN_KEY = "plan.json"


def endpoint(*, name: str, namespace: str) -> str:
    """The OpenAI-compatible base URL: the front Service, named like the ModelDeployment."""
    return f"http://{name}.{namespace}.svc:{PORT}/v1"


def plan_configmap(*, owner: Owner, plan: Plan) -> dict[str, Any]:
    body = json.dumps(plan.model_dump(by_alias=True, mode="json"), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner=owner, name=plan_configmap_name(owner.name)),
        "data": {PLAN_KEY: body},
    }


def front_service(*, owner: Owner, target_role: str) -> dict[str, Any]:
    """ClusterIP Service on port 8000 (OpenAI API): the router, or the workers when there is none."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner=owner, name=owner.name, role=ROUTER if target_role == ROUTER else None),
        "spec": {
            "type": "ClusterIP",
            "selector": {**selector(owner.name, target_role), LABEL_LEADER: "true"},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render(
    *,
    spec: ModelDeploymentSpec,
    plan: Plan,
    owner: Owner,
    image: str,
    pod_defaults: PodOptions | None = None,
    runtime_image: str = "",
    pod_monitor: bool = False,
    pod_monitor_labels: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Every child of the ModelDeployment `owner` for `plan`, in apply order. `image`: the serving
    pods' (spec.engine.image, or the operator's runtime image); `runtime_image`: the operator's
    runtime image, which kubemoe's router runs (`image` when empty). `pod_defaults`: the operator's
    pod annotations, labels and image pull secrets, under spec.pod. `pod_monitor`: a PodMonitor for
    the pods that serve /metrics (where the CRD is served), else scrape annotations on them;
    `pod_monitor_labels` its labels besides kubemoe's."""
    options = merged(pod_defaults or PodOptions(), spec.pod)
    ctx = PodContext(
        owner=owner.name, spec=spec, plan=plan, image=image, options=options, router_image=runtime_image
    )
    services = [headless_service(owner=owner, role=r.role) for r in plan.roles]
    budgets = [
        disruption_budget(owner=owner, name=workload_name(owner.name, r.role), role=r.role)
        for r in plan.roles
    ]
    workloads = [role_workload(owner=owner, ctx=ctx, role=r) for r in plan.roles]
    router: list[dict[str, Any]] = []
    access: list[dict[str, Any]] = []
    if plan.router.replicas > 0:
        argv = router_command(plan=plan, namespace=owner.namespace)
        if sglang_router(plan):
            argv = sglang_router_command(plan=plan, owner=owner.name, namespace=owner.namespace)
            access = router_access(owner=owner)
        services.append(front_service(owner=owner, target_role=ROUTER))
        budgets.append(disruption_budget(owner=owner, name=router_name(owner.name), role=ROUTER))
        router.append(
            deployment(
                owner=owner,
                name=router_name(owner.name),
                role=ROUTER,
                replicas=plan.router.replicas,
                template=router_pod_template(ctx=ctx, argv=argv, role=ROUTER),
                surge=True,
            )
        )
    else:
        services.append(front_service(owner=owner, target_role=plan.roles[0].role))
    claim = cache_claim(owner=owner, spec=spec)
    fill = fill_job(owner=owner, spec=spec, image=runtime_image or image, options=options)
    policies = network_policies(owner=owner, spec=spec, plan=plan)
    if not pod_monitor:
        workloads, router = with_scrape_annotations(workloads), with_scrape_annotations(router)
    return [
        plan_configmap(owner=owner, plan=plan),
        *policies,
        *([claim] if claim else []),
        *([fill] if fill else []),
        *access,
        *services,
        *budgets,
        *workloads,
        *router,
        *([pod_monitor_of(owner=owner, labels=pod_monitor_labels or {})] if pod_monitor else []),
    ]

"""One level-triggered reconcile of a ModelDeployment (docs/architecture.md: one manifest, end to end).

parse -> plan -> observe -> render -> apply -> prune -> status. Nothing here knows kopf: the
handlers call `reconcile` and turn its decisions into Events and its errors into retries.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kubemoe_operator.api.desired import desired_of, effective_spec, parse_status
from kubemoe_operator.api.labels import ROUTER
from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.resource import API_VERSION, KIND
from kubemoe_operator.api.spec import ModelDeploymentSpec, PodOptions
from kubemoe_operator.api.status import ModelCacheStatus, ModelDeploymentStatus, now_utc
from kubemoe_operator.catalog import Catalog
from kubemoe_operator.kube.client import Kube, NameTakenError, RejectedError
from kubemoe_operator.kube.kinds import key_of
from kubemoe_operator.plan.cache import cache_claim_name
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.reconcile.apply import SyncResult, sync_children
from kubemoe_operator.reconcile.cluster_rules import NotForClusterError, check_for_cluster
from kubemoe_operator.reconcile.loading import loading_progress
from kubemoe_operator.reconcile.model_cache import cache_status, fill_job_of, held
from kubemoe_operator.reconcile.observe import (
    WorkloadState,
    creation_failures,
    pod_trouble,
    workload_state,
)
from kubemoe_operator.reconcile.pod_http import PodReader
from kubemoe_operator.reconcile.status import (
    REASON_APPLY_FAILED,
    REASON_NAME_TAKEN,
    REASON_PLAN_FAILED,
    REASON_PLAN_REJECTED,
    Facts,
    compute_status,
    status_apply,
)
from kubemoe_operator.render import Owner, endpoint, render
from kubemoe_operator.render.kv_key import kv_key_secret, kv_key_secret_name, missing_kv_key, needs_kv_key
from kubemoe_operator.render.names import router_name, workload_name
from kubemoe_operator.render.workloads import initial_replicas

log = logging.getLogger("kubemoe.reconcile")

NOT_CREATED_WINDOW = timedelta(minutes=15)
"""How far back a controller's FailedCreate Event still explains missing pods (a controller retries
with a backoff that grows to minutes, renewing the Event each time)."""


@dataclass(frozen=True, kw_only=True)
class Notice:
    """Something worth a Kubernetes Event on the ModelDeployment."""

    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True, kw_only=True)
class ReconcileContext:
    catalog: Catalog
    image: str
    """Runtime image when spec.engine.image is empty."""
    pod_defaults: PodOptions = field(default_factory=PodOptions)
    """Annotations, labels and image pull secrets of every pod, under spec.pod."""
    pod_monitors: bool = True
    """A PodMonitor per deployment where the API serves PodMonitors (else scrape annotations)."""
    pod_monitor_labels: Mapping[str, str] = field(default_factory=dict)
    """Those PodMonitors' labels besides kubemoe's (--pod-monitor-label)."""
    read_pod: PodReader | None = None
    """A pod's own JSON by its IP: a model.cache fill's /progress, a loading engine's /ready (None:
    status without their byte counts)."""


@dataclass
class Result:
    decisions: list[Notice] = field(default_factory=list)
    status_written: bool = False
    desired: dict[str, int | None] = field(default_factory=dict)
    """status.roles.*.desired as read (the autoscaler's input to this reconcile)."""


def plan_for(
    *, name: str, spec_raw: Any, status: ModelDeploymentStatus | None, catalog: Catalog
) -> tuple[ModelDeploymentSpec, Plan]:
    """Parse and plan, with the autoscaler's decisions applied; ManifestError if it cannot work
    (NotForClusterError if it could only run under `kubemoe up`)."""
    md = parse_manifest(
        {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec_raw}
    )
    check_for_cluster(md.spec)
    spec = effective_spec(md.spec, status)
    return spec, plan_manifest(md.model_copy(update={"spec": spec}), catalog=catalog)


def _condition(status: ModelDeploymentStatus | None, type: str) -> tuple[str, str, str] | None:
    if status is None:
        return None
    for c in status.conditions:
        if c.type == type:
            return c.status, c.reason, c.message
    return None


def transition_events(old: ModelDeploymentStatus | None, new: ModelDeploymentStatus) -> list[Notice]:
    """Events for condition changes: plan errors, LWS missing, ready, degraded, planned layout."""
    out: list[Notice] = []
    before, after = _condition(old, "Planned"), _condition(new, "Planned")
    if after is not None and after != before:
        if after[0] == "False":
            out.append(Notice(reason=after[1], message=after[2], warning=True))
        elif before is None or before[0] != "True" or (old is not None and old.layout != new.layout):
            out.append(Notice(reason="Planned", message=after[2]))
    before, after = _condition(old, "Ready"), _condition(new, "Ready")
    if after is not None and after[:2] != (before or ("", ""))[:2]:
        if after[1] == "LeaderWorkerSetMissing":
            out.append(Notice(reason="LeaderWorkerSetMissing", message=after[2], warning=True))
        elif after[1] in (REASON_APPLY_FAILED, REASON_NAME_TAKEN):
            out.append(Notice(reason=after[1], message=after[2], warning=True))
        elif after[0] == "True":
            out.append(Notice(reason="Ready", message=after[2]))
    before, after = _condition(old, "Degraded"), _condition(new, "Degraded")
    if after is not None and after[0] == "True" and (before is None or before[:2] != after[:2]):
        out.append(Notice(reason="Degraded", message=after[2], warning=True))
    return out


def _scaled(
    plan: Plan,
    before: Mapping[tuple[str, str], dict[str, Any]],
    owner: str,
    external: Collection[tuple[str, str]],
) -> list[Notice]:
    """The operator's own changes of replicas (not an external scaler's: `external`)."""
    out = []
    for role in plan.roles:
        key = (role.workload, workload_name(owner, role.role))
        seen = before.get(key)
        if seen is None or key in external:
            continue
        was = (seen.get("spec") or {}).get("replicas")
        if was is not None and was != role.replicas:
            out.append(Notice(reason="Scaled", message=f"{role.role}: {was} -> {role.replicas} groups"))
    return out


def role_states(
    *,
    plan: Plan,
    current: Mapping[tuple[str, str], dict[str, Any]],
    owner: str,
    external: Collection[tuple[str, str]] = (),
) -> dict[str, WorkloadState]:
    """Per role, and the router. A role an external scaler owns (`external`) wants what its workload's
    spec.replicas says now (the scaler's count), not the spec's initial count."""
    states: dict[str, WorkloadState] = {}
    for role in plan.roles:
        key = (role.workload, workload_name(owner, role.role))
        live = current.get(key)
        wanted = role.replicas
        if key in external and live is not None and (live.get("spec") or {}).get("replicas") is not None:
            wanted = int(live["spec"]["replicas"])
        states[role.role] = workload_state(live, wanted=wanted)
    if plan.router.replicas > 0:
        states[ROUTER] = workload_state(
            current.get(("Deployment", router_name(owner))), wanted=plan.router.replicas
        )
    return states


def _internal(err: Exception, stage: str) -> str:
    return (
        f"{stage} failed on this spec ({type(err).__name__}: {err!s:.300}); this is a kubemoe bug, "
        "please report it with the spec. Fix: change the field the message names, if any."
    )


async def reconcile(
    *, kube: Kube, body: Mapping[str, Any], context: ReconcileContext, now: datetime | None = None
) -> Result:
    """Bring the children of the ModelDeployment `body` to its spec, then report status."""
    meta = body.get("metadata") or {}
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    result = Result()
    if meta.get("deletionTimestamp"):
        return result  # the garbage collector removes the children through their owner references
    generation = meta.get("generation")
    old = parse_status(body.get("status"))
    result.desired = desired_of(old)
    now = now or now_utc()

    async def finish(facts: Facts) -> Result:
        new = compute_status(old=old, facts=facts, now=now)
        body = status_apply(old=old, new=new)
        if body is not None:
            await kube.apply_status(
                name=name, namespace=namespace, status=body, field_manager=kube.field_manager
            )
            result.status_written = True
        result.decisions.extend(transition_events(old, new))
        return result

    try:
        spec, plan = plan_for(name=name, spec_raw=body.get("spec"), status=old, catalog=context.catalog)
    except ManifestError as err:
        reason = err.reason if isinstance(err, NotForClusterError) else REASON_PLAN_REJECTED
        return await finish(Facts(generation=generation, plan_error=str(err), plan_reason=reason))
    except Exception as err:  # a planner bug on one spec must not stop the others' reconciles
        log.exception("planning %s/%s failed", namespace, name)
        return await finish(
            Facts(
                generation=generation, plan_error=_internal(err, "planning"), plan_reason=REASON_PLAN_FAILED
            )
        )

    observed = await kube.observe(name=name, namespace=namespace, uid=uid)
    needs_lws = any(r.workload == "LeaderWorkerSet" for r in plan.roles)
    if needs_lws and not observed.lws_served:
        return await finish(Facts(generation=generation, layout=plan.layout, lws_missing=True))

    owner = Owner(name=name, namespace=namespace, uid=uid)
    try:
        desired = render(
            spec=spec,
            plan=plan,
            owner=owner,
            image=spec.engine.image or context.image,
            pod_defaults=context.pod_defaults,
            runtime_image=context.image,  # kubemoe's router runs ours, whatever engine.image is
            pod_monitor=context.pod_monitors and observed.pod_monitors_served,
            pod_monitor_labels=context.pod_monitor_labels,
        )
    except Exception as err:  # as for planning: this object reports it, the operator goes on
        log.exception("rendering %s/%s failed", namespace, name)
        return await finish(
            Facts(
                generation=generation, plan_error=_internal(err, "rendering"), plan_reason=REASON_PLAN_FAILED
            )
        )
    cache: ModelCacheStatus | None = None
    keep: set[tuple[str, str]] = set()
    job = fill_job_of(desired)
    claim = cache_claim_name(name, spec)
    if job is not None and claim is not None:
        cache = await cache_status(
            job=job,
            live=observed.children.get(key_of(dict(job))),
            claim=claim,
            pods=observed.pods,
            read_pod=context.read_pod,
        )
        if cache.phase != "Filled":
            desired, keep = held(desired, observed.children)
    external = initial_replicas(spec=spec, plan=plan, owner=name)
    apply_error: str | None = None
    apply_reason = REASON_APPLY_FAILED
    try:
        if needs_kv_key(plan) and missing_kv_key(name, observed.pods):
            kube.forget_created(kind="Secret", namespace=namespace, name=kv_key_secret_name(name))
        sync = await sync_children(
            kube=kube,
            desired=desired,
            observed=observed,
            owner=name,
            uid=uid,
            namespace=namespace,
            create_first=[kv_key_secret(owner)] if needs_kv_key(plan) else [],  # before the pods read it
            initial_replicas=external,
            keep=keep,
        )
    except RejectedError as err:
        apply_error = str(err)
        apply_reason = REASON_NAME_TAKEN if isinstance(err, NameTakenError) else REASON_APPLY_FAILED
        sync = SyncResult(current=dict(observed.children))
    if sync.rejected and apply_error is None:
        apply_error = "; ".join(sync.rejected)
    if sync.applied:
        result.decisions.append(
            Notice(reason="Applied", message=", ".join(f"{k}/{n}" for k, n in sync.applied))
        )
    if sync.pruned:
        result.decisions.append(
            Notice(reason="Pruned", message=", ".join(f"{k}/{n}" for k, n in sync.pruned))
        )
    for (kind, child), what in sync.restored.items():
        result.decisions.append(
            Notice(
                reason="Restored", message=f"{kind}/{child} was changed outside the spec ({what}); put back"
            )
        )
    unchanged = {k: v for k, v in observed.children.items() if k not in sync.restored}
    result.decisions.extend(_scaled(plan, unchanged, name, external))
    roles = role_states(plan=plan, current=sync.current, owner=name, external=external)
    not_created: tuple[str, ...] = ()
    if not all(s.settled for s in roles.values()) or (cache is not None and cache.phase == "Filling"):
        creators = [workload_name(name, r.role) for r in plan.roles] + [router_name(name)]
        creators += [str(job["metadata"]["name"])] if job is not None else []
        not_created = creation_failures(
            await kube.pod_creation_events(namespace), workloads=creators, since=now - NOT_CREATED_WINDOW
        )
    facts = Facts(
        generation=generation,
        layout=plan.layout,
        endpoint=endpoint(name=name, namespace=namespace),
        apply_error=apply_error,
        apply_reason=apply_reason,
        roles=roles,
        trouble=pod_trouble(observed.pods),
        not_created=not_created,
        cache=cache,
        loading=await loading_progress(observed.pods, context.read_pod) if context.read_pod else {},
    )
    return await finish(facts)

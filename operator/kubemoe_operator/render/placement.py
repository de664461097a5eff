"""Where pods may run: the accelerator's node label, the spec's node selector, tolerations, priority,
and a role's (or the router's) own pod template options (spec.roles.<role>.pod, spec.router.pod).

Serving pods require a node whose product label (plan.node_label, e.g. nvidia.com/gpu.product)
has one of the accelerator's values: a nodeSelector when there is one value, a required node
affinity (operator In) when the catalog knows several (H200 and H200 NVL nodes both serve H200).
A nodeSelector (spec.scheduling's or the role's) that names the label itself wins: its value is the
user's choice. The cpu accelerator, GPUs the catalog lacks, and accelerator.productLabel false (nodes
without feature discovery's labels) add no label.

A role's own nodeSelector joins spec.scheduling's (api/rules.py refuses a key with two values); its
node affinity is ANDed with the operator's (the accelerator expression is added to every required
term the user gives, so each term still needs the accelerator); its tolerations follow
spec.scheduling's; its priorityClassName replaces spec.scheduling's. The router takes no
spec.scheduling node selector (it needs no accelerator node) but does take its own.
"""

from __future__ import annotations

from typing import Any

from kubemoe_operator.api.pod_template import PodTemplateOptions
from kubemoe_operator.api.spec import ModelDeploymentSpec
from kubemoe_operator.plan.model import Plan

REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"


def _accelerator_placement(
    spec: ModelDeploymentSpec, plan: Plan, node_selector: dict[str, str]
) -> dict[str, Any]:
    key, values = plan.node_label, plan.node_label_values
    if key is None or not values or key in node_selector or not spec.accelerator.product_label:
        return {}
    if len(values) == 1:
        return {"nodeSelector": {key: values[0]}}
    term = {"matchExpressions": [{"key": key, "operator": "In", "values": list(values)}]}
    return {"affinity": {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [term]}}}}


def merge_affinity(operator: dict[str, Any] | None, own: dict[str, Any] | None) -> dict[str, Any] | None:
    """The user's affinity with the operator's required node affinity ANDed in: Kubernetes ORs the
    nodeSelectorTerms and ANDs the expressions within one, so the operator's expressions join every
    term the user gives (or are the only term when the user gives none). Everything else is the user's."""
    if operator is None:
        return own
    if own is None:
        return operator
    ours = operator["nodeAffinity"][REQUIRED]["nodeSelectorTerms"][0]["matchExpressions"]
    out = dict(own)
    node = dict(out.get("nodeAffinity", {}))
    terms = node.get(REQUIRED, {}).get("nodeSelectorTerms") or [{}]
    node[REQUIRED] = {
        "nodeSelectorTerms": [
            {**term, "matchExpressions": [*term.get("matchExpressions", []), *ours]} for term in terms
        ]
    }
    out["nodeAffinity"] = node
    return out


def placement(
    spec: ModelDeploymentSpec, plan: Plan, *, accelerator: bool, own: PodTemplateOptions | None = None
) -> dict[str, Any]:
    """Pod spec fields for placement; `accelerator` False (the router): no node selection but its own.
    `own`: the role's (or router's) pod template options."""
    out: dict[str, Any] = {}
    sched = spec.scheduling
    pod = own or PodTemplateOptions()
    selector = {**sched.node_selector, **pod.node_selector} if accelerator else dict(pod.node_selector)
    extra = _accelerator_placement(spec, plan, selector) if accelerator else {}
    selector = {**selector, **extra.pop("nodeSelector", {})}
    if selector:
        out["nodeSelector"] = selector
    user_affinity = (
        pod.affinity.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
        if pod.affinity is not None
        else None
    )
    affinity = merge_affinity(extra.get("affinity"), user_affinity or None)
    if affinity:
        out["affinity"] = affinity
    tolerations = [*sched.tolerations, *pod.tolerations]
    if tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in tolerations]
    priority = pod.priority_class_name or sched.priority_class_name
    if priority:
        out["priorityClassName"] = priority
    return out

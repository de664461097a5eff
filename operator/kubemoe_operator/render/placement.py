"""Where pods may run: the accelerator's node label, the spec's node selector, tolerations, priority.

Serving pods require a node whose product label (plan.node_label, e.g. nvidia.com/gpu.product)
has one of the accelerator's values: a nodeSelector when there is one value, a required node
affinity (operator In) when the catalog knows several (H200 and H200 NVL nodes both serve H200).
A spec.scheduling.nodeSelector that names the label itself wins: its value is the user's choice.
The cpu accelerator, and GPUs the catalog lacks, add no label.
"""

from __future__ import annotations

from typing import Any

from kubemoe_operator.api.spec import ModelDeploymentSpec
from kubemoe_operator.plan.model import Plan


def _accelerator_placement(spec: ModelDeploymentSpec, plan: Plan) -> dict[str, Any]:
    key, values = plan.node_label, plan.node_label_values
    if key is None or not values or key in spec.scheduling.node_selector:
        return {}
    if len(values) == 1:
        return {"nodeSelector": {key: values[0]}}
    term = {"matchExpressions": [{"key": key, "operator": "In", "values": list(values)}]}
    return {
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
        }
    }


def placement(spec: ModelDeploymentSpec, plan: Plan, *, accelerator: bool) -> dict[str, Any]:
    """Pod spec fields for placement; `accelerator` False (the router): no node selection at all."""
    out: dict[str, Any] = {}
    sched = spec.scheduling
    if accelerator:
        extra = _accelerator_placement(spec, plan)
        selector = {**sched.node_selector, **extra.pop("nodeSelector", {})}
        if selector:
            out["nodeSelector"] = selector
        out.update(extra)
    if sched.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if sched.priority_class_name:
        out["priorityClassName"] = sched.priority_class_name
    return out

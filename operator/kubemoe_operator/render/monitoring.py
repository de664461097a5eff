"""How Prometheus finds the pods that serve /metrics: a PodMonitor where the Prometheus operator's CRD
is installed, else the conventional `prometheus.io/*` scrape annotations on those pods' templates.

The pods that serve /metrics on the API port are labelled `kubemoe.io/metrics: "true"`: the group
leaders (the API pods of the torch engine, vLLM, SGLang and TGI), the routers, and vLLM's headless pods
(the GPU series of their own GPUs). A torch engine's headless worker serves no HTTP, nor do SGLang's
and TGI's other pods. Never both: a Prometheus that honours the annotations and
also runs the operator's PodMonitors would scrape each pod twice. Installing the CRD later changes
the pod templates (the annotations go), which rolls the pods once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, LABEL_METRICS
from kubemoe_operator.plan.command import PORT
from kubemoe_operator.render.names import Owner, metadata

SCRAPE_INTERVAL: Final = "15s"
"""The autoscaler's default interval: its Prometheus mode reads what was scraped."""
SCRAPE_ANNOTATIONS: Final = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(PORT),
    "prometheus.io/path": "/metrics",
}


def pod_monitor_of(*, owner: Owner, labels: Mapping[str, str]) -> dict[str, Any]:
    """The PodMonitor of one ModelDeployment's pods that serve /metrics; `labels` (the operator's
    --pod-monitor-label) besides kubemoe's, for a Prometheus that selects PodMonitors by label
    (kube-prometheus-stack: its `release`)."""
    meta = metadata(owner=owner, name=owner.name)
    meta["labels"] = {**labels, **meta["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {LABEL_DEPLOYMENT: owner.name, LABEL_METRICS: "true"}},
            "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": SCRAPE_INTERVAL}],
        },
    }


def _templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]]
    if obj["kind"] == "LeaderWorkerSet":
        lwt = obj["spec"]["leaderWorkerTemplate"]
        return [t for t in (lwt.get("leaderTemplate"), lwt.get("workerTemplate")) if t is not None]
    return []


def with_scrape_annotations(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`objects` with the scrape annotations on every pod template that serves /metrics; the pod's
    own annotations win on the same key."""
    out = copy.deepcopy(objects)
    for obj in out:
        for template in _templates(obj):
            meta = template.setdefault("metadata", {})
            if (meta.get("labels") or {}).get(LABEL_METRICS) == "true":
                meta["annotations"] = {**SCRAPE_ANNOTATIONS, **(meta.get("annotations") or {})}
    return out

"""render/monitoring.py: a PodMonitor where the CRD is served, else scrape annotations; never both. Both
select the pods that serve /metrics: API pods, routers and vLLM's headless pods (their GPUs' series), not
a torch engine's headless workers."""

from __future__ import annotations

from typing import Any

import yaml

from kubemoe_operator.api.labels import LABEL_LEADER, LABEL_METRICS
from kubemoe_operator.catalog import load_catalog
from kubemoe_operator.reconcile.reconcile import ReconcileContext, reconcile
from kubemoe_operator.render.monitoring import SCRAPE_ANNOTATIONS
from tests.operator.helpers import REPO
from tests.operator.reconcile.memory_kube import MemoryKube

SPEC = yaml.safe_load((REPO / "examples" / "deepseek-v3.yaml").read_text())["spec"]  # P/D, LWS, a router


def _templates(kube: MemoryKube) -> list[dict[str, Any]]:
    out = []
    for (kind, _, _), obj in kube.objects.items():
        if kind == "Deployment":
            out.append(obj["spec"]["template"])
        elif kind == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            out += [t for t in (lwt.get("leaderTemplate"), lwt["workerTemplate"]) if t]
    return out


async def _reconciled(
    *,
    served: bool,
    enabled: bool = True,
    spec: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
) -> MemoryKube:
    kube = MemoryKube(pod_monitors_served=served)
    body = {"metadata": {"name": "t", "namespace": "ns", "uid": "u", "generation": 1}, "spec": spec or SPEC}
    context = ReconcileContext(
        catalog=load_catalog(), image="runtime:test", pod_monitors=enabled, pod_monitor_labels=labels or {}
    )
    await reconcile(kube=kube, body=body, context=context)
    return kube


async def test_where_the_crd_is_served_a_pod_monitor_selects_the_api_pods_and_routers() -> None:
    kube = await _reconciled(served=True)
    monitor = kube.get("PodMonitor", "ns", "t")
    assert monitor["spec"]["selector"]["matchLabels"] == {"kubemoe.io/deployment": "t", LABEL_METRICS: "true"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert monitor["metadata"]["ownerReferences"][0]["uid"] == "u"
    # the port it names is on every pod it selects
    selected = [t for t in _templates(kube) if t["metadata"]["labels"].get(LABEL_METRICS) == "true"]
    assert len(selected) == 5  # prefill and decode leaders and their vLLM headless pods, the router
    for t in selected:
        assert "http" in [p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])]
    # never both: no scrape annotations then
    assert all(
        "prometheus.io/scrape" not in (t["metadata"].get("annotations") or {}) for t in _templates(kube)
    )


async def test_the_pod_monitor_carries_the_operators_extra_labels_beside_kubemoes() -> None:
    """--pod-monitor-label release=...: what kube-prometheus-stack's podMonitorSelector matches."""
    kube = await _reconciled(served=True, labels={"release": "kube-prometheus-stack"})
    labels = kube.get("PodMonitor", "ns", "t")["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels["kubemoe.io/deployment"] == "t"


async def test_without_the_crd_or_turned_off_the_leaders_carry_scrape_annotations() -> None:
    for kube in (await _reconciled(served=False), await _reconciled(served=True, enabled=False)):
        assert "PodMonitor" not in {k for k, _ in kube.kinds("ns")}
        for t in _templates(kube):
            annotations = t["metadata"].get("annotations") or {}
            assert t["metadata"]["labels"].get(LABEL_METRICS) == "true"  # vLLM's headless pods too
            assert SCRAPE_ANNOTATIONS.items() <= annotations.items()


async def test_a_torch_engines_headless_workers_are_not_scraped() -> None:
    spec = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())["spec"]
    spec["model"]["source"] = "pvc://models/tiny"
    for role in spec["roles"].values():  # groups over two pods: a leader and a headless worker
        role["parallelism"] = {"tensor": 1, "data": 2, "expert": 2}
    spec["accelerator"]["perPod"] = 1
    kube = await _reconciled(served=False, spec=spec)
    templates = _templates(kube)
    workers = [t for t in templates if t["metadata"]["labels"][LABEL_LEADER] == "false"]
    assert workers
    for t in templates:
        scraped = "prometheus.io/scrape" in (t["metadata"].get("annotations") or {})
        assert scraped == (t["metadata"]["labels"][LABEL_LEADER] == "true")

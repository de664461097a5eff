"""render/monitoring.py: a PodMonitor where the CRD is served, else scrape annotations; never both."""

from __future__ import annotations

from typing import Any

import yaml

from kubemoe_operator.api.labels import LABEL_LEADER
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


async def _reconciled(*, served: bool, enabled: bool = True) -> MemoryKube:
    kube = MemoryKube(pod_monitors_served=served)
    body = {"metadata": {"name": "t", "namespace": "ns", "uid": "u", "generation": 1}, "spec": SPEC}
    context = ReconcileContext(catalog=load_catalog(), image="runtime:test", pod_monitors=enabled)
    await reconcile(kube=kube, body=body, context=context)
    return kube


async def test_where_the_crd_is_served_a_pod_monitor_selects_the_api_pods_and_routers() -> None:
    kube = await _reconciled(served=True)
    monitor = kube.get("PodMonitor", "ns", "t")
    assert monitor["spec"]["selector"]["matchLabels"] == {"kubemoe.io/deployment": "t", LABEL_LEADER: "true"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert monitor["metadata"]["ownerReferences"][0]["uid"] == "u"
    # the port it names is on every pod it selects
    selected = [t for t in _templates(kube) if t["metadata"]["labels"][LABEL_LEADER] == "true"]
    assert len(selected) == 3  # prefill and decode leaders, the router
    for t in selected:
        assert "http" in [p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])]
    # never both: no scrape annotations then
    assert all(
        "prometheus.io/scrape" not in (t["metadata"].get("annotations") or {}) for t in _templates(kube)
    )


async def test_without_the_crd_or_turned_off_the_leaders_carry_scrape_annotations() -> None:
    for kube in (await _reconciled(served=False), await _reconciled(served=True, enabled=False)):
        assert "PodMonitor" not in {k for k, _ in kube.kinds("ns")}
        for t in _templates(kube):
            annotations = t["metadata"].get("annotations") or {}
            if t["metadata"]["labels"][LABEL_LEADER] == "true":
                assert SCRAPE_ANNOTATIONS.items() <= annotations.items()
            else:  # a headless torch worker, or an LWS worker: no HTTP to scrape
                assert "prometheus.io/scrape" not in annotations

"""What the Prometheus source selects and averages. The namespace exactly (`namespace=~"NS|"` also
summed in the series of a same-named deployment in another namespace, scraped without a namespace
label); the role's ready groups only (their `group` label: the pod's name for a one-pod group, the
group index of a LeaderWorkerSet's; a loading group would pull the per-group mean down); and no
negative, NaN or infinite value is averaged in.

Prometheus is a real HTTP server answering as its HTTP API does, and keeping the queries it got."""

from __future__ import annotations

from typing import Any

import httpx2

from kubemoe_operator import __main__ as operator_main
from kubemoe_operator.autoscale.prometheus import PrometheusSource, promql
from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_operator.run.metrics import OperatorMetrics
from kubemoe_operator.run.settings import OperatorSettings
from tests.operator.autoscale.cluster_kube import ClusterKube, leader_pod, tiny_moe
from tests.operator.autoscale.fake_prometheus import fake_prometheus

SEL = RoleSelector(namespace="team-a", deployment="llm", role="decode")
QUEUE_SCALED: dict[str, Any] = {
    "autoscaling": {"minReplicas": 1, "maxReplicas": 8, "metrics": [{"type": "queue-depth", "target": 4}]}
}


async def test_negative_and_non_finite_group_values_are_not_averaged_in() -> None:
    answer = [
        ({"group": "llm-decode-a"}, "12"),
        ({"group": "llm-decode-b"}, "12"),
        ({"group": "hostile"}, "-20"),
        ({"group": "nan"}, "NaN"),
        ({"group": "inf"}, "+Inf"),
    ]
    with fake_prometheus(lambda _: answer) as prom:
        async with httpx2.AsyncClient() as client:
            got = await PrometheusSource(prom.url, client=client).sample(
                SEL, ["queue-depth", "kv-cache-usage"]
            )
    assert got == {"queue-depth": 12.0, "kv-cache-usage": 12.0}


async def test_the_query_names_the_namespace_exactly() -> None:
    with fake_prometheus(lambda _: []) as prom:
        async with httpx2.AsyncClient() as client:
            await PrometheusSource(prom.url, client=client).sample(SEL, ["queue-depth"])
    (query,) = prom.queries
    assert 'namespace="team-a"' in query
    assert "namespace=~" not in query


async def test_the_autoscalers_queries_select_the_ready_groups() -> None:
    kube = ClusterKube()
    one_pod = kube.add(tiny_moe(name="one-pod", **QUEUE_SCALED))
    lws = kube.add(tiny_moe(name="lws", **QUEUE_SCALED))
    kube.pods = [
        leader_pod("one-pod-decode-7d9f-x2", ip="10.0.0.1", deployment="one-pod"),
        leader_pod("one-pod-decode-7d9f-k8", ip="10.0.0.2", deployment="one-pod", ready=False),
        leader_pod("one-pod-decode-7d9f-q1", ip="10.0.0.3", deployment="one-pod", terminating=True),
        leader_pod("lws-decode-0", ip="10.0.1.1", deployment="lws", lws_group="0"),
        leader_pod("lws-decode-1", ip="10.0.1.2", deployment="lws", lws_group="1"),
        leader_pod("lws-decode-2", ip="10.0.1.3", deployment="lws", lws_group="2", ready=False),
    ]
    with fake_prometheus(lambda _: [({"group": "0"}, "4")]) as prom:
        async with httpx2.AsyncClient() as client:
            settings = OperatorSettings(
                namespaces=("ns",), prometheus_url=prom.url, autoscale_interval_seconds=15
            )  # the operator's own wiring: its source reads the ready groups from the pod list
            scaler = operator_main.autoscaler(settings, kube=kube, http=client, metrics=OperatorMetrics())
            await scaler.evaluate(one_pod)
            await scaler.evaluate(lws)
            # group 0 is gone, group 1 restarts: no ready group left
            kube.pods = [
                p for p in kube.pods if p["metadata"]["name"] not in ("lws-decode-0", "lws-decode-1")
            ]
            kube.pods.append(
                leader_pod("lws-decode-1", ip="10.0.1.2", deployment="lws", lws_group="1", ready=False)
            )
            (outcome,) = await scaler.evaluate(lws)
    assert prom.queries == [
        'sum by (group) (kubemoe_requests_waiting{deployment="one-pod",role="decode",namespace="ns",'
        'group=~"one-pod-decode-7d9f-x2"})',
        'sum by (group) (kubemoe_requests_waiting{deployment="lws",role="decode",namespace="ns",'
        'group=~"0|1"})',
    ]
    assert outcome.error == "no ready group of role decode to read"  # nothing is read, nothing scales


def test_group_names_are_matched_literally() -> None:
    query = promql("queue-depth", SEL, groups=["a.b", "c|d"])
    assert r'group=~"a\\.b|c\\|d"' in query

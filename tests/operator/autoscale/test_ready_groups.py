"""The signals come from the ready groups only: a group whose leader is still loading its weights (not
Ready) or draining (being deleted) is left out. A loading group's GPUs idle, and counted in the
per-group mean, which the decision multiplies by the ready groups, it asked to remove the groups that
carry the load: two ready groups at 100 % GPU and two loading at 0 % read as 50 % against a target
of 60 %, "scale down 4 -> 3 (2 of 4 groups not ready yet)".

The pods are real HTTP servers, one per loopback address on the port group leaders serve /metrics on
(patched to a free one), serving the runtime's NVML collector's families; the pod list is a double."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import httpx2
import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

from kubemoe_operator.autoscale.loop import Autoscaler, pod_targets
from kubemoe_operator.autoscale.scrape import ScrapeSource
from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_operator.kube import pods as kube_pods
from kubemoe_runtime.pod.gpu_metrics import GpuReading, families
from kubemoe_runtime.pod.metrics import MetricLabels
from kubemoe_runtime.pod.ports import free_port
from tests.operator.autoscale.cluster_kube import ClusterKube, leader_pod, tiny_moe

SEL = RoleSelector(namespace="ns", deployment="tiny-moe", role="decode")


class _GpuPod:
    def __init__(self, group: str, ratio: float) -> None:
        self.labels, self.ratio = MetricLabels("tiny-moe", "decode", group, "0"), ratio

    def collect(self) -> list[GaugeMetricFamily]:
        reading = GpuReading(0, "GPU-0", "NVIDIA H200", self.ratio, 1.0, 2.0, 300.0, 50.0, 1.9e9)
        return families([reading], self.labels.as_dict())


@contextlib.contextmanager
def gpu_pods(ratios: Sequence[float], monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """One pod per ratio, at 127.0.0.2, .3, ... on one port; their IPs."""
    port = free_port()
    monkeypatch.setattr(kube_pods, "PORT", port)
    servers, ips = [], []
    try:
        for i, ratio in enumerate(ratios):
            ip = f"127.0.0.{i + 2}"
            registry = CollectorRegistry()
            registry.register(_GpuPod(f"tiny-moe-decode-{i}", ratio))
            server, _ = start_http_server(port, addr=ip, registry=registry)
            servers.append(server)
            ips.append(ip)
        yield ips
    finally:
        for server in servers:
            server.shutdown()


async def test_only_ready_leaders_not_being_deleted_are_scraped() -> None:
    kube = ClusterKube()
    kube.pods = [
        leader_pod("tiny-moe-decode-a", ip="10.0.0.1"),
        leader_pod("tiny-moe-decode-b", ip="10.0.0.2", ready=False),  # loading its weights
        leader_pod("tiny-moe-decode-c", ip="10.0.0.3", terminating=True),  # draining
        leader_pod("tiny-moe-decode-d", ip="10.0.0.4"),
        leader_pod("tiny-moe-prefill-a", ip="10.0.0.5", role="prefill"),
    ]
    urls = await pod_targets(kube)(SEL)
    assert urls == ["http://10.0.0.1:8000/metrics", "http://10.0.0.4:8000/metrics"]


async def test_loading_groups_do_not_pull_the_gpu_mean_down(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = ClusterKube()
    body = kube.add(
        tiny_moe(
            replicas=4,
            autoscaling={
                "minReplicas": 1,
                "maxReplicas": 8,
                "metrics": [{"type": "gpu-utilization", "target": 0.6}],
                "scaleDownWindowSeconds": 0,
            },
        )
    )
    body["spec"]["engine"]["kind"] = "vllm"  # GPUs NVML reads (gpu-utilization is refused on cpu)
    body["spec"]["accelerator"] = {"type": "H200", "perPod": 1}
    body["status"] = {"roles": {"decode": {"replicas": 4, "ready": 2}}}
    with gpu_pods([1.0, 1.0, 0.0, 0.0], monkeypatch) as ips:
        kube.pods = [
            leader_pod(f"tiny-moe-decode-{i}", ip=ip, ready=i < 2)  # two groups still loading
            for i, ip in enumerate(ips)
        ]
        async with httpx2.AsyncClient() as client:
            source = ScrapeSource(client=client, targets=pod_targets(kube))
            scaler = Autoscaler(kube=kube, source=source, source_name="test", interval_s=15.0)
            (decode,) = await scaler.evaluate(body)
    assert decode.decision is not None
    assert decode.decision.desired == 4, decode.decision.reason
    assert decode.decision.reason.startswith("steady at 4: gpu-utilization 1 (target 0.6)")

"""The autoscaler's gpu-utilization signal reads what the runtime's NVML collector exports: its
families served over HTTP as a pod serves them, then read by the direct scrape; and the PromQL
query names the same series (#20: kubemoe_gpu_*, a ratio, not dcgm-exporter's percentage)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx2
import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

from kubemoe_operator.autoscale.prometheus import promql
from kubemoe_operator.autoscale.scrape import ScrapeSource
from kubemoe_operator.autoscale.signals import GPU_UTIL, RoleSelector
from kubemoe_operator.local.layout import free_port
from kubemoe_runtime.pod.gpu_metrics import GpuReading, describe, families
from kubemoe_runtime.pod.metrics import MetricLabels

SEL = RoleSelector(namespace="default", deployment="ds", role="decode")


def _reading(index: int, ratio: float) -> GpuReading:
    return GpuReading(index, f"GPU-{index}", "NVIDIA H200", ratio, 1.0, 2.0, 300.0, 50.0, 1.9e9)


class _Pod:
    def __init__(self, labels: MetricLabels, readings: list[GpuReading]) -> None:
        self.labels, self.readings = labels, readings

    def collect(self) -> list[GaugeMetricFamily]:
        return families(self.readings, self.labels.as_dict())


@pytest.fixture
def urls() -> Iterator[list[str]]:
    pods = [
        _Pod(MetricLabels("ds", "decode", "0", "0"), [_reading(0, 0.9), _reading(1, 0.7)]),
        _Pod(MetricLabels("ds", "decode", "1", "0"), [_reading(0, 0.2)]),
        _Pod(MetricLabels("ds", "prefill", "0", "0"), [_reading(0, 1.0)]),  # another role
    ]
    servers, out = [], []
    for pod in pods:
        registry = CollectorRegistry()
        registry.register(pod)
        port = free_port()
        server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
        servers.append(server)
        out.append(f"http://127.0.0.1:{port}/metrics")
    yield out
    for server in servers:
        server.shutdown()


async def test_the_scrape_reads_the_collectors_ratio_per_group(urls: list[str]) -> None:
    async def targets(_: RoleSelector) -> list[str]:
        return urls

    async with httpx2.AsyncClient() as client:
        got = await ScrapeSource(client=client, targets=targets).sample(SEL, ["gpu-utilization"])
    assert got["gpu-utilization"] == pytest.approx(((0.9 + 0.7) / 2 + 0.2) / 2)


def test_the_query_names_the_collectors_series_and_takes_it_as_a_ratio() -> None:
    exported = {f.name for f in describe(MetricLabels().as_dict())}
    assert GPU_UTIL in exported
    query = promql("gpu-utilization", SEL)
    assert GPU_UTIL in query
    assert "/ 100" not in query

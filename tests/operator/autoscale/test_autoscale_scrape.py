"""The direct-scrape source against real /metrics endpoints (prometheus_client's own HTTP
server, serving series named and labelled as the runtime names and labels them)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import httpx2
import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from kubemoe_operator.autoscale.prometheus import MetricsUnavailable
from kubemoe_operator.autoscale.scrape import ScrapeSource
from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_operator.local.layout import free_port

LABELS = ("deployment", "role", "group", "rank")
SEL = RoleSelector(namespace="default", deployment="ds", role="decode")


@dataclass
class Pod:
    url: str
    waiting: Gauge
    kv: Gauge
    ttft: Histogram


def _pod(group: str, rank: str, servers: list[WSGIServer], role: str = "decode") -> Pod:
    reg = CollectorRegistry()
    waiting = Gauge("kubemoe_requests_waiting", "q", LABELS, registry=reg)
    kv = Gauge("kubemoe_kv_cache_usage_ratio", "kv", LABELS, registry=reg)
    ttft = Histogram(
        "kubemoe_time_to_first_token_seconds", "t", LABELS, buckets=(0.1, 0.5, 1.0), registry=reg
    )
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=reg)
    labels = {"deployment": "ds", "role": role, "group": group, "rank": rank}
    servers.append(server)
    return Pod(
        f"http://127.0.0.1:{port}/metrics",
        waiting.labels(**labels),
        kv.labels(**labels),
        ttft.labels(**labels),
    )


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    servers: list[WSGIServer] = []
    yield [
        _pod("0", "0", servers),
        _pod("0", "1", servers),
        _pod("1", "0", servers),
        _pod("0", "0", servers, "prefill"),
    ]
    for server in servers:
        server.shutdown()


async def test_gauges_become_per_group_values(pods: list[Pod]) -> None:
    g0a, g0b, g1, prefill = pods
    g0a.waiting.set(6)
    g0b.waiting.set(2)  # group 0 waits 8 in all
    g1.waiting.set(4)
    prefill.waiting.set(100)  # another role: ignored
    g0a.kv.set(0.5)
    g0b.kv.set(0.7)
    g1.kv.set(0.9)

    async def targets(_: RoleSelector) -> list[str]:
        return [p.url for p in pods]

    async with httpx2.AsyncClient() as client:
        source = ScrapeSource(client=client, targets=targets)
        got = await source.sample(SEL, ["queue-depth", "kv-cache-usage", "gpu-utilization"])
    assert got["queue-depth"] == pytest.approx(6.0)  # (8 + 4) / 2 groups
    assert got["kv-cache-usage"] == pytest.approx((0.6 + 0.9) / 2)
    assert got["gpu-utilization"] is None  # no GPU exporter here: missing, not zero


async def test_latency_quantile_is_over_the_observations_since_the_last_scrape(pods: list[Pod]) -> None:
    async def targets(_: RoleSelector) -> list[str]:
        return [p.url for p in pods[:3]]

    async with httpx2.AsyncClient() as client:
        source = ScrapeSource(client=client, targets=targets)
        for _ in range(50):
            pods[0].ttft.observe(0.05)  # old, fast history
        assert (await source.sample(SEL, ["ttft-p90"]))["ttft-p90"] is None  # first scrape: no rate yet
        for _ in range(10):
            pods[1].ttft.observe(0.8)  # now slow
        p90 = (await source.sample(SEL, ["ttft-p90"]))["ttft-p90"]
    assert p90 is not None
    assert 0.5 < p90 <= 1.0


async def test_a_pod_that_leaves_takes_its_history_with_it(pods: list[Pod]) -> None:
    # buckets were summed over the pods before the delta: when one left, some buckets went back
    # (read as a reset: full counts) and others did not (a delta), and the p90 came out as nonsense
    present = [pods[0], pods[1]]

    async def targets(_: RoleSelector) -> list[str]:
        return [p.url for p in present]

    async with httpx2.AsyncClient() as client:
        source = ScrapeSource(client=client, targets=targets)
        for _ in range(200):
            pods[1].ttft.observe(0.05)  # the pod about to leave: a long, fast history
        for _ in range(5):
            pods[0].ttft.observe(0.05)
        assert (await source.sample(SEL, ["ttft-p90"]))["ttft-p90"] is None
        present.pop()  # scaled down, restarted elsewhere, rolled
        pods[0].ttft.observe(0.05)
        for _ in range(89):
            pods[0].ttft.observe(0.8)  # what the remaining pod served since: slow
        p90 = (await source.sample(SEL, ["ttft-p90"]))["ttft-p90"]
        assert p90 is not None
        assert 0.5 < p90 <= 1.0
        present.append(pods[2])  # a new pod: nothing from it until its second scrape
        for _ in range(500):
            pods[2].ttft.observe(0.05)
        for _ in range(10):
            pods[0].ttft.observe(0.8)
        p90 = (await source.sample(SEL, ["ttft-p90"]))["ttft-p90"]
        assert p90 is not None
        assert 0.5 < p90 <= 1.0


async def test_a_pod_that_misses_a_scrape_has_what_it_observed_meanwhile_counted(pods: list[Pod]) -> None:
    # Before, the buckets kept were only those of the pods that answered: a pod that timed out once
    # (the busiest one, likely) came back as a new pod, its slow requests meanwhile were never
    # counted, and the role read as idle (0), which scales down.
    answering = [pods[0], pods[1]]

    async def targets(_: RoleSelector) -> list[str]:
        return [p.url for p in answering]

    async with httpx2.AsyncClient() as client:
        source = ScrapeSource(client=client, targets=targets)
        assert (await source.sample(SEL, ["ttft-p90"]))["ttft-p90"] is None  # first scrape: no rate yet
        answering.pop(0)  # pods[0] does not answer this time
        assert (await source.sample(SEL, ["ttft-p90"]))["ttft-p90"] == 0.0  # nothing observed
        answering.insert(0, pods[0])
        for _ in range(100):
            pods[0].ttft.observe(0.8)
        p90 = (await source.sample(SEL, ["ttft-p90"]))["ttft-p90"]
    assert p90 is not None
    assert 0.5 < p90 <= 1.0


async def test_unreachable_pods_make_metrics_unavailable() -> None:
    async def targets(_: RoleSelector) -> list[str]:
        return [f"http://127.0.0.1:{free_port()}/metrics"]

    async with httpx2.AsyncClient() as client:
        with pytest.raises(MetricsUnavailable, match="answered /metrics"):
            await ScrapeSource(client=client, targets=targets).sample(SEL, ["queue-depth"])

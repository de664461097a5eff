"""No requests is no load, not missing metrics. A latency histogram whose series are there but that
observed nothing in the interval reads as latency 0 (which may scale down); a histogram with no series
at all is missing (which never scales down). Before, both were missing: an idle role on a latency
signal never scaled down (or held, its window reset, every interval), and traffic too sparse to
give every interval a first token flipped MetricsAvailable, and wrote status, every interval.

The pods are the runtime's own ServingMetrics served over HTTP; Prometheus is a real HTTP server
answering as Prometheus' HTTP API does (histogram_quantile over no observations is NaN)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx2
from prometheus_client import start_http_server

from kubemoe_operator.autoscale.loop import Autoscaler
from kubemoe_operator.autoscale.prometheus import PrometheusSource
from kubemoe_operator.autoscale.scrape import ScrapeSource
from kubemoe_operator.autoscale.signals import RoleSelector
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from kubemoe_runtime.pod.ports import free_port
from tests.operator.autoscale.cluster_kube import ClusterKube, tiny_moe
from tests.operator.autoscale.fake_prometheus import fake_prometheus
from tests.operator.autoscale.static_pages import static_pages

SEL = RoleSelector(namespace="ns", deployment="tiny-moe", role="decode")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@contextlib.contextmanager
def serving_pods(count: int) -> Iterator[tuple[list[ServingMetrics], list[str]]]:
    """`count` decode group leaders' metrics and their /metrics URLs."""
    pods, urls, servers = [], [], []
    try:
        for group in range(count):
            metrics = ServingMetrics(MetricLabels(deployment="tiny-moe", role="decode", group=str(group)))
            port = free_port()
            server, _ = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
            pods.append(metrics)
            urls.append(f"http://127.0.0.1:{port}/metrics")
            servers.append(server)
        yield pods, urls
    finally:
        for server in servers:
            server.shutdown()


async def test_a_scraped_histogram_with_nothing_new_in_the_window_is_latency_zero() -> None:
    clock = Clock()
    with serving_pods(2) as (pods, urls):

        async def targets(_: RoleSelector) -> list[str]:
            return urls

        async with httpx2.AsyncClient() as client:
            source = ScrapeSource(client=client, targets=targets, clock=clock)
            pods[0].ttft.observe(0.2)
            assert await source.sample(SEL, ["ttft-p90"]) == {"ttft-p90": None}  # no rate yet
            clock.t = 15.0
            assert await source.sample(SEL, ["ttft-p90"]) == {"ttft-p90": 0.0}  # idle: no load
            pods[1].ttft.observe(3.0)
            clock.t = 30.0
            got = (await source.sample(SEL, ["ttft-p90"]))["ttft-p90"]
            assert got is not None
            assert got > 1.0
            clock.t = 75.0  # nothing new since, but the slow first token is 45 s old: still in the window
            assert await source.sample(SEL, ["ttft-p90"]) == {"ttft-p90": got}
            clock.t = 90.0  # now 60 s old: out of it
            assert await source.sample(SEL, ["ttft-p90"]) == {"ttft-p90": 0.0}


async def test_a_page_without_the_histogram_is_still_missing() -> None:
    page = b'kubemoe_requests_waiting{deployment="tiny-moe",role="decode",group="0",rank="0"} 0\n'
    with static_pages({"gauges-only": page}) as urls:

        async def targets(_: RoleSelector) -> list[str]:
            return [urls["gauges-only"]]

        async with httpx2.AsyncClient() as client:
            source = ScrapeSource(client=client, targets=targets)
            for _ in range(3):
                assert await source.sample(SEL, ["itl-p90"]) == {"itl-p90": None}


def _answers(quantile: str | None, count_rate: str | None) -> Any:
    def answer(query: str) -> list[tuple[dict[str, str], str]]:
        value = quantile if query.startswith("histogram_quantile") else count_rate
        return [] if value is None else [({}, value)]

    return answer


async def test_prometheus_no_observations_in_the_window_is_latency_zero() -> None:
    cases = [
        (("NaN", "0"), 0.0),  # series, no requests in the window: no load
        (("0.4", "2.5"), 0.4),
        ((None, None), None),  # no series: missing
        (("NaN", None), None),
        (("NaN", "0.5"), None),  # observations but no quantile to take: missing
        (("-1", "0"), None),  # not a latency: no reading
        (("+Inf", "0"), None),
    ]
    for (quantile, count_rate), expected in cases:
        with fake_prometheus(_answers(quantile, count_rate)) as prom:
            async with httpx2.AsyncClient() as client:
                got = await PrometheusSource(prom.url, client=client).sample(SEL, ["itl-p90"])
        assert got == {"itl-p90": expected}, (quantile, count_rate)
    matchers = 'deployment="tiny-moe",role="decode",namespace="ns"'
    assert f"sum(rate(kubemoe_inter_token_latency_seconds_count{{{matchers}}}[1m]))" in prom.queries


def _status(kube: ClusterKube) -> dict[str, Any]:
    return kube.deployments[("ns", "tiny-moe")].get("status") or {}


async def run_scaler(
    kube: ClusterKube,
    pods: list[ServingMetrics],
    urls: list[str],
    *,
    intervals: int,
    ttft: float | None = None,
) -> None:
    """The autoscaler and the direct scrape on a shared fake clock, 15 s apart for `intervals`
    evaluations; `ttft`: a first token that long observed every other interval."""
    clock = Clock()

    async def targets(_: RoleSelector) -> list[str]:
        return urls

    async with httpx2.AsyncClient() as client:
        source = ScrapeSource(client=client, targets=targets, clock=clock)
        scaler = Autoscaler(kube=kube, source=source, source_name="test", interval_s=15.0, clock=clock)
        for i in range(intervals):
            clock.t = 15.0 * i
            if ttft is not None and i % 2:
                pods[0].ttft.observe(ttft)
            await scaler.evaluate_all()


async def test_an_idle_role_on_a_latency_signal_scales_down_to_its_minimum() -> None:
    kube = ClusterKube()
    kube.add(
        tiny_moe(
            replicas=4,
            autoscaling={
                "minReplicas": 1,
                "maxReplicas": 8,
                "metrics": [{"type": "itl-p90", "target": 0.05}, {"type": "kv-cache-usage", "target": 0.8}],
                "scaleDownWindowSeconds": 60,
                "cooldownSeconds": 0,
            },
        )
    )
    with serving_pods(4) as (pods, urls):
        for pod in pods:
            pod.kv_cache_usage.set(0.0)
        await run_scaler(kube, pods, urls, intervals=12)  # three minutes without a request
    status = _status(kube)
    assert status["roles"]["decode"]["desired"] == 1
    (cond,) = status["conditions"]
    assert cond["status"] == "True"


async def test_sparse_requests_keep_the_metrics_available_and_status_quiet() -> None:
    kube = ClusterKube()
    kube.add(
        tiny_moe(
            replicas=1,
            autoscaling={"minReplicas": 1, "maxReplicas": 8, "metrics": [{"type": "ttft-p90", "target": 10}]},
        )
    )
    with serving_pods(1) as (pods, urls):
        # a first token every other interval, inside the target
        await run_scaler(kube, pods, urls, intervals=12, ttft=9.0)
    # the condition once (the first scrape has no rate yet: unavailable), and once more when the
    # second makes it available; never again
    assert kube.writes["status"] == 2
    (cond,) = _status(kube)["conditions"]
    assert cond["status"] == "True"


async def test_sparse_slow_requests_scale_up() -> None:
    """One slow first token every other interval is a slow role, not one that is slow, idle, slow: the
    scrape reads the last minute (as Prometheus' rate), so the scale-up window's readings all ask for
    more groups. Before, every idle interval read 0 and the window's smallest reading never scaled up."""
    kube = ClusterKube()
    kube.add(
        tiny_moe(
            replicas=1,
            autoscaling={
                "minReplicas": 1,
                "maxReplicas": 8,
                "metrics": [{"type": "ttft-p90", "target": 2}],
                "scaleUpWindowSeconds": 30,
                "cooldownSeconds": 0,
            },
        )
    )
    with serving_pods(1) as (pods, urls):
        await run_scaler(kube, pods, urls, intervals=8, ttft=8.0)  # 4x the target, every other interval
    assert _status(kube)["roles"]["decode"]["desired"] > 1

"""Autoscaler.evaluate_all over several ModelDeployments: one whose metrics never come holds up only
itself (its samples are due within the interval, its whole evaluation within two), deployments are
evaluated a few at a time, each read again before its evaluation once the list is old (so its apply
is not refused for a resourceVersion the list had), and what the scrape keeps per deployment goes
with the deployment."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

import httpx2

from kubemoe_operator.api.spec import MetricType
from kubemoe_operator.autoscale.loop import CONCURRENT_DEPLOYMENTS, Autoscaler
from kubemoe_operator.autoscale.scrape import ScrapeSource
from kubemoe_operator.autoscale.signals import RoleSelector
from tests.operator.autoscale.cluster_kube import ClusterKube, tiny_moe
from tests.operator.autoscale.load_pages import load_pages

QUEUE_SCALED: dict[str, Any] = {
    "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "metrics": [{"type": "queue-depth", "target": 4}]}
}


def _condition(kube: ClusterKube, name: str) -> dict[str, Any]:
    status = kube.deployments[("ns", name)].get("status") or {}
    conditions: list[dict[str, Any]] = status.get("conditions", [])
    (cond,) = [c for c in conditions if c["type"] == "MetricsAvailable"]
    return cond


async def test_a_deployment_whose_metrics_never_come_holds_up_only_itself() -> None:
    kube = ClusterKube()
    kube.add(tiny_moe(name="a-stuck", **QUEUE_SCALED))
    kube.add(tiny_moe(name="b-fine", **QUEUE_SCALED))

    class Source:
        async def sample(
            self, sel: RoleSelector, metrics: Sequence[MetricType]
        ) -> dict[MetricType, float | None]:
            if sel.deployment == "a-stuck":
                await asyncio.Event().wait()  # a pod or Prometheus that never answers
            return {"queue-depth": 4.0}

    scaler = Autoscaler(kube=kube, source=Source(), source_name="test", interval_s=0.5)
    started = time.monotonic()
    async with asyncio.timeout(10):
        await scaler.evaluate_all()
    assert time.monotonic() - started < 2.5
    assert _condition(kube, "b-fine")["status"] == "True"
    stuck = _condition(kube, "a-stuck")
    assert stuck["status"] == "False"
    assert "metrics not read within the 0.5 s interval" in stuck["message"]


async def test_deployments_are_evaluated_a_few_at_a_time() -> None:
    kube = ClusterKube()
    for i in range(3 * CONCURRENT_DEPLOYMENTS):
        kube.add(tiny_moe(name=f"md-{i:02d}", **QUEUE_SCALED))
    running, most = 0, 0

    class Source:
        async def sample(
            self, sel: RoleSelector, metrics: Sequence[MetricType]
        ) -> dict[MetricType, float | None]:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.05)
            running -= 1
            return {"queue-depth": 4.0}

    scaler = Autoscaler(kube=kube, source=Source(), source_name="test", interval_s=5.0)
    await scaler.evaluate_all()
    assert most == CONCURRENT_DEPLOYMENTS
    assert all(_condition(kube, f"md-{i:02d}")["status"] == "True" for i in range(3 * CONCURRENT_DEPLOYMENTS))


async def test_a_deployment_listed_a_while_ago_is_read_again_before_its_apply() -> None:
    class Busy(ClusterKube):
        """The reconciler writes each deployment's status right after the autoscaler listed them."""

        async def list_deployments(self, *, namespace: str | None) -> list[dict[str, Any]]:
            items = await super().list_deployments(namespace=namespace)
            for body in items:
                self.touch(body["metadata"]["namespace"], body["metadata"]["name"])
            return items

    class Source:
        async def sample(
            self, sel: RoleSelector, metrics: Sequence[MetricType]
        ) -> dict[MetricType, float | None]:
            return {"queue-depth": 4.0}

    kube = Busy()
    kube.add(tiny_moe(**QUEUE_SCALED))
    ticks = itertools.count(step=2.0)  # every look at the clock is two seconds on: the list is old
    scaler = Autoscaler(
        kube=kube, source=Source(), source_name="test", interval_s=15.0, clock=lambda: next(ticks)
    )
    await scaler.evaluate_all()
    assert kube.conflicts == 0
    assert kube.rereads == 1
    assert _condition(kube, "tiny-moe")["status"] == "True"


async def test_a_deleted_deployments_histograms_are_dropped_from_the_scrape() -> None:
    kube = ClusterKube()
    kube.add(
        tiny_moe(
            autoscaling={"minReplicas": 1, "maxReplicas": 4, "metrics": [{"type": "ttft-p90", "target": 1}]}
        )
    )
    with load_pages([0], deployment="tiny-moe") as urls:

        async def targets(_: RoleSelector) -> list[str]:
            return urls

        async with httpx2.AsyncClient() as client:
            source = ScrapeSource(client=client, targets=targets)
            scaler = Autoscaler(kube=kube, source=source, source_name="test", interval_s=5.0)
            await scaler.evaluate_all()
            assert source._previous  # the histogram, for the next scrape's rate
            kube.remove("ns", "tiny-moe")
            await scaler.evaluate_all()
    assert source._previous == {}


async def test_a_deleted_deployments_series_leave_the_operators_metrics() -> None:
    # Before, the evaluations and decisions counters of every ModelDeployment ever autoscaled stayed in
    # the operator's /metrics after it was deleted (only the gauges were removed).
    kube = ClusterKube()
    kube.add(tiny_moe(**QUEUE_SCALED))
    with load_pages([2], deployment="tiny-moe") as urls:

        async def targets(_: RoleSelector) -> list[str]:
            return urls

        async with httpx2.AsyncClient() as client:
            scaler = Autoscaler(
                kube=kube,
                source=ScrapeSource(client=client, targets=targets),
                source_name="test",
                interval_s=5.0,
            )
            for _ in range(2):
                await scaler.evaluate_all()

            def samples() -> list[str]:
                return [
                    f"{sample.name}{sample.labels}"
                    for family in scaler.metrics.registry.collect()
                    for sample in family.samples
                    if sample.labels.get("deployment") == "tiny-moe"
                ]

            shown = samples()
            assert any("evaluations" in s for s in shown), shown
            assert any("decisions" in s for s in shown), shown
            kube.remove("ns", "tiny-moe")
            await scaler.evaluate_all()
            assert samples() == []

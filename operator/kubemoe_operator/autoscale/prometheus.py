"""Autoscaling signals from the Prometheus HTTP API (the address is an operator setting)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import httpx2

from kubemoe_operator.api.spec import MetricType
from kubemoe_operator.autoscale.signals import (
    GPU_UTIL,
    HISTOGRAMS,
    KV_USAGE,
    QUEUE,
    RoleSelector,
    mean_over_groups,
)


class MetricsUnavailable(Exception):
    """The metric source could not be read at all (unreachable, error, bad answer)."""


def _matchers(sel: RoleSelector) -> str:
    # namespace=~"NS|": the series of this namespace, or series scraped without a namespace label.
    return f'deployment="{sel.deployment}",role="{sel.role}",namespace=~"{sel.namespace}|"'


def promql(metric: MetricType, sel: RoleSelector, *, rate_window: str = "1m") -> str:
    """The query for one metric of one role; per group where the metric is per group."""
    m = _matchers(sel)
    if metric == "queue-depth":
        return f"sum by (group) ({QUEUE}{{{m}}})"
    if metric == "kv-cache-usage":
        return f"avg by (group) ({KV_USAGE}{{{m}}})"
    if metric == "gpu-utilization":
        return f"avg by (group) ({GPU_UTIL}{{{m}}})"
    series = HISTOGRAMS[metric]
    return f"histogram_quantile(0.9, sum by (le) (rate({series}_bucket{{{m}}}[{rate_window}])))"


def value_of(metric: MetricType, result: Sequence[dict[str, Any]]) -> float | None:
    """One number from an instant-vector result; None when nothing (or only NaN or ±Inf: a
    quantile over too few observations, a hostile series) came back. MetricsUnavailable when the
    result is not the shape the HTTP API documents."""
    try:
        samples = [(str(r["metric"].get("group", "")), float(r["value"][1])) for r in result]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise MetricsUnavailable(f"Prometheus answered a result of an unknown shape: {err!r:.200}") from err
    finite = [(group, v) for group, v in samples if math.isfinite(v)]
    if metric in HISTOGRAMS:
        return finite[0][1] if finite else None
    return mean_over_groups(dict(finite))


class PrometheusSource:
    def __init__(self, base_url: str, *, client: httpx2.AsyncClient, rate_window: str = "1m") -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.rate_window = rate_window

    async def _query(self, query: str) -> list[dict[str, Any]]:
        try:
            resp = await self.client.get(
                f"{self.base_url}/api/v1/query", params={"query": query}, timeout=10.0
            )
        except httpx2.HTTPError as err:
            raise MetricsUnavailable(f"Prometheus at {self.base_url} unreachable: {err}") from err
        if resp.status_code != 200:
            raise MetricsUnavailable(
                f"Prometheus at {self.base_url} answered {resp.status_code}: {resp.text[:200]}"
            )
        try:
            body = resp.json()
        except ValueError as err:
            raise MetricsUnavailable(f"Prometheus at {self.base_url} answered no JSON: {err}") from err
        if (
            not isinstance(body, dict)
            or body.get("status") != "success"
            or not isinstance(body.get("data"), dict)
            or body["data"].get("resultType") != "vector"
        ):
            error = body.get("error", body) if isinstance(body, dict) else body
            raise MetricsUnavailable(f"Prometheus query failed: {error!s:.200}")
        result = body["data"].get("result")
        if not isinstance(result, list):
            raise MetricsUnavailable(f"Prometheus answered a result of an unknown shape: {result!r:.200}")
        return result

    async def sample(
        self, sel: RoleSelector, metrics: Sequence[MetricType]
    ) -> dict[MetricType, float | None]:
        """Per-group values of the given metrics; None for a metric with no series yet."""
        out: dict[MetricType, float | None] = {}
        for metric in metrics:
            out[metric] = value_of(
                metric, await self._query(promql(metric, sel, rate_window=self.rate_window))
            )
        return out

"""Autoscaling signals from the Prometheus HTTP API (the address is an operator setting).

Every query selects the role's series by `namespace` (exactly: the scrape target's, as a PodMonitor
or the usual pod relabelling sets it, docs/monitoring.md), `deployment` and `role`, and by `group`
to the role's ready groups when `groups` is given (ready.py: a group still loading would count in
the per-group mean with nothing to report). A latency quantile is NaN where the window holds no
observations; the histogram's `_count` rate then tells "no requests" (latency 0: no load) from a
quantile that cannot be taken (missing).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import httpx2

from kubemoe_operator.api.spec import MetricType
from kubemoe_operator.autoscale.pages import gather_all
from kubemoe_operator.autoscale.signals import (
    GPU_UTIL,
    HISTOGRAMS,
    KV_USAGE,
    QUEUE,
    RoleSelector,
    mean_over_groups,
)

QUERY_TIMEOUT_S = 10.0
"""One query, the whole request."""

Groups = Callable[[RoleSelector], Awaitable[list[str]]]
"""The `group` label values of a role's ready groups (ready.ready_groups)."""


class MetricsUnavailable(Exception):
    """The metric source could not be read at all (unreachable, error, bad answer)."""


def _string(value: str) -> str:
    """A PromQL double-quoted string literal's body."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _regex_literal(value: str) -> str:
    """`value` matched literally by an RE2 regex (Go's regexp.QuoteMeta)."""
    return "".join(f"\\{c}" if c in "\\.+*?()|[]{}^$" else c for c in value)


def _matchers(sel: RoleSelector, groups: Collection[str] | None = None) -> str:
    deployment, role, namespace = _string(sel.deployment), _string(sel.role), _string(sel.namespace)
    m = f'deployment="{deployment}",role="{role}",namespace="{namespace}"'
    if groups is not None:
        m += f',group=~"{_string("|".join(_regex_literal(g) for g in sorted(groups)))}"'
    return m


def promql(
    metric: MetricType, sel: RoleSelector, *, rate_window: str = "1m", groups: Collection[str] | None = None
) -> str:
    """The query for one metric of one role; per group where the metric is per group."""
    m = _matchers(sel, groups)
    if metric == "queue-depth":
        return f"sum by (group) ({QUEUE}{{{m}}})"
    if metric == "kv-cache-usage":
        return f"avg by (group) ({KV_USAGE}{{{m}}})"
    if metric == "gpu-utilization":
        return f"avg by (group) ({GPU_UTIL}{{{m}}})"
    series = HISTOGRAMS[metric]
    return f"histogram_quantile(0.9, sum by (le) (rate({series}_bucket{{{m}}}[{rate_window}])))"


def count_promql(
    metric: MetricType, sel: RoleSelector, *, rate_window: str = "1m", groups: Collection[str] | None = None
) -> str:
    """A latency histogram's observations per second over the window (0: no requests)."""
    return f"sum(rate({HISTOGRAMS[metric]}_count{{{_matchers(sel, groups)}}}[{rate_window}]))"


def _samples(result: Sequence[dict[str, Any]]) -> list[tuple[str, float]]:
    """(group, value) of each sample; MetricsUnavailable when the result is not the documented shape."""
    try:
        return [(str(r["metric"].get("group", "")), float(r["value"][1])) for r in result]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise MetricsUnavailable(f"Prometheus answered a result of an unknown shape: {err!r:.200}") from err


def _values(result: Sequence[dict[str, Any]]) -> list[tuple[str, float]]:
    """(group, value) of each sample that is a number a decision can use: finite, not negative."""
    return [(group, v) for group, v in _samples(result) if math.isfinite(v) and v >= 0]


def value_of(metric: MetricType, result: Sequence[dict[str, Any]]) -> float | None:
    """One number from an instant-vector result; None when nothing usable came back (nothing, or
    only NaN, ±Inf or negative values: a quantile over no observations, a hostile series).
    MetricsUnavailable when the result is not the shape the HTTP API documents."""
    usable = _values(result)
    if metric in HISTOGRAMS:
        return usable[0][1] if usable else None
    return mean_over_groups(dict(usable))


def latency_of(
    metric: MetricType, quantile: Sequence[dict[str, Any]], count_rate: Sequence[dict[str, Any]]
) -> float | None:
    """A latency quantile; 0.0 where it is NaN because the histogram observed nothing in the window
    (its `_count` rate is 0: no requests, no load), None where there are no series (missing: never
    scales down) or no number to take."""
    value = value_of(metric, quantile)
    if value is not None:
        return value
    if not any(math.isnan(v) for _, v in _samples(quantile)):
        return None
    rates = _values(count_rate)
    return 0.0 if rates and sum(v for _, v in rates) == 0 else None


class PrometheusSource:
    def __init__(
        self,
        base_url: str,
        *,
        client: httpx2.AsyncClient,
        rate_window: str = "1m",
        groups: Groups | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.rate_window = rate_window
        self.groups = groups
        """The role's ready groups, to select by (ready.ready_groups); None: every group."""

    async def _query(self, query: str) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(QUERY_TIMEOUT_S):
                resp = await self.client.get(
                    f"{self.base_url}/api/v1/query", params={"query": query}, timeout=QUERY_TIMEOUT_S
                )
        except (httpx2.HTTPError, TimeoutError) as err:
            why = err if isinstance(err, httpx2.HTTPError) else f"no answer within {QUERY_TIMEOUT_S:g} s"
            raise MetricsUnavailable(f"Prometheus at {self.base_url} unreachable: {why}") from err
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

    async def _one(
        self, metric: MetricType, sel: RoleSelector, groups: Collection[str] | None
    ) -> float | None:
        query = promql(metric, sel, rate_window=self.rate_window, groups=groups)
        if metric not in HISTOGRAMS:
            return value_of(metric, await self._query(query))
        count = count_promql(metric, sel, rate_window=self.rate_window, groups=groups)
        quantile, count_rate = await gather_all([self._query(query), self._query(count)])
        return latency_of(metric, quantile, count_rate)

    async def sample(
        self, sel: RoleSelector, metrics: Sequence[MetricType]
    ) -> dict[MetricType, float | None]:
        """Per-group values of the given metrics; None for a metric with no series yet."""
        groups: list[str] | None = None
        if self.groups is not None:
            groups = await self.groups(sel)
            if not groups:
                raise MetricsUnavailable(f"no ready group of role {sel.role} to read")
        values = await gather_all([self._one(metric, sel, groups) for metric in metrics])
        return dict(zip(metrics, values, strict=True))

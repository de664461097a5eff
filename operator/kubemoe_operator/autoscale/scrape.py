"""Autoscaling signals read straight from the serving pods' /metrics, when no Prometheus is set.

Gauges are read as they are; latency quantiles need a rate, so each histogram is kept from the
previous scrape and the quantile is taken over the observations since then (the first scrape
of a role therefore has no latency value yet, which never scales anything down).
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from kubemoe_operator.api.spec import MetricType
from kubemoe_operator.autoscale.prometheus import MetricsUnavailable
from kubemoe_operator.autoscale.signals import (
    GPU_UTIL,
    HISTOGRAMS,
    KV_USAGE,
    QUEUE,
    RoleSelector,
    histogram_quantile,
    mean_over_groups,
)

Targets = Callable[[RoleSelector], Awaitable[list[str]]]
"""The /metrics URLs of a role's pods (from the pod list in a cluster; fixed URLs locally)."""

Buckets = dict[float, float]

MAX_PAGE_BYTES = 8 << 20
"""A runtime pod's page is a few KiB; a longer one is not read further."""


class ScrapeSource:
    def __init__(self, *, client: httpx2.AsyncClient, targets: Targets) -> None:
        self.client = client
        self.targets = targets
        self._previous: dict[tuple[RoleSelector, str], Buckets] = {}

    async def _fetch(self, url: str) -> str | None:
        """The page, or None when the pod does not answer; MetricsUnavailable when it is too long."""
        try:
            async with self.client.stream("GET", url, timeout=5.0) as resp:
                if resp.status_code != 200:
                    return None
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_PAGE_BYTES:
                        raise MetricsUnavailable(f"{url} is longer than {MAX_PAGE_BYTES >> 20} MiB")
        except httpx2.HTTPError:
            return None
        return body.decode("utf-8", errors="replace")

    async def sample(
        self, sel: RoleSelector, metrics: Sequence[MetricType]
    ) -> dict[MetricType, float | None]:
        urls = await self.targets(sel)
        if not urls:
            raise MetricsUnavailable(f"no pods of role {sel.role} to scrape")
        texts = [t for t in await asyncio.gather(*(self._fetch(u) for u in urls)) if t is not None]
        if not texts:
            raise MetricsUnavailable(f"none of the {len(urls)} pods of role {sel.role} answered /metrics")

        gauges: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        histograms: dict[str, Buckets] = defaultdict(lambda: defaultdict(float))
        wanted_histograms = {HISTOGRAMS[m] for m in metrics if m in HISTOGRAMS}
        for text in texts:
            try:
                _read_page(text, sel, gauges, histograms, wanted_histograms)
            except (ValueError, TypeError, KeyError, IndexError) as err:
                # Whatever a pod serves: the parser raises on malformed text, we on bad values.
                raise MetricsUnavailable(
                    f"a pod of role {sel.role} serves unreadable /metrics: {err!s:.200}"
                ) from err

        out: dict[MetricType, float | None] = {}
        for metric in metrics:
            if metric == "queue-depth":
                out[metric] = mean_over_groups({g: sum(v) for g, v in gauges[QUEUE].items()})
            elif metric == "kv-cache-usage":
                out[metric] = mean_over_groups({g: sum(v) / len(v) for g, v in gauges[KV_USAGE].items()})
            elif metric == "gpu-utilization":
                out[metric] = mean_over_groups({g: sum(v) / len(v) for g, v in gauges[GPU_UTIL].items()})
            else:
                out[metric] = self._quantile_since_last(
                    sel, HISTOGRAMS[metric], histograms.get(HISTOGRAMS[metric])
                )
        return out

    def _quantile_since_last(self, sel: RoleSelector, name: str, now: Buckets | None) -> float | None:
        if not now:
            return None
        before = self._previous.get((sel, name))
        self._previous[(sel, name)] = dict(now)
        if before is None:
            return None
        # A pod restart resets counters: then the delta is negative and only the new counts count.
        delta = [
            (le, count - before.get(le, 0.0) if count >= before.get(le, 0.0) else count)
            for le, count in now.items()
        ]
        return histogram_quantile(0.9, delta)


def _read_page(
    text: str,
    sel: RoleSelector,
    gauges: dict[str, dict[str, list[float]]],
    histograms: dict[str, Buckets],
    wanted_histograms: set[str],
) -> None:
    """Add one pod's page to the role's gauges and histogram buckets; ValueError on a value no
    serving pod reports (negative, NaN, infinite; an infinite bucket bound is Prometheus' +Inf)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("deployment") != sel.deployment or s.labels.get("role") != sel.role:
                continue
            if s.name in (QUEUE, KV_USAGE, GPU_UTIL):
                gauges[s.name][s.labels.get("group", "")].append(_plausible(s.name, s.value))
            elif family.name in wanted_histograms and s.name == f"{family.name}_bucket":
                le = float(s.labels["le"])
                if math.isnan(le):
                    raise ValueError(f"{s.name} has a bucket bound le=NaN")
                histograms[family.name][le] += _plausible(s.name, s.value)


def _plausible(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} is {value}")
    return value

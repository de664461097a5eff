"""Autoscaling signals read straight from the serving pods' /metrics, when no Prometheus is set.

Gauges are read as they are; latency quantiles need a rate, so each pod's histogram is kept from the
previous scrape and the quantile is taken over the observations since then, summed over the pods
(the first scrape of a role therefore has no latency value yet, which never scales anything down).
As Prometheus' rate(), per pod: a pod seen for the first time adds nothing yet, a pod whose
counters went back (it restarted) adds its new counts, and a pod that left adds nothing.
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
        self._previous: dict[tuple[RoleSelector, str], dict[str, Buckets]] = {}
        """(role, histogram) -> each pod's (URL's) buckets at the previous scrape."""

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
        pages = await asyncio.gather(*(self._fetch(u) for u in urls))
        texts = {url: text for url, text in zip(urls, pages, strict=True) if text is not None}
        if not texts:
            raise MetricsUnavailable(f"none of the {len(urls)} pods of role {sel.role} answered /metrics")

        gauges: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        histograms: dict[str, dict[str, Buckets]] = defaultdict(dict)
        wanted_histograms = {HISTOGRAMS[m] for m in metrics if m in HISTOGRAMS}
        for url, text in texts.items():
            try:
                pod_histograms: dict[str, Buckets] = defaultdict(lambda: defaultdict(float))
                _read_page(text, sel, gauges, pod_histograms, wanted_histograms)
                for name, buckets in pod_histograms.items():
                    histograms[name][url] = dict(buckets)
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

    def _quantile_since_last(
        self, sel: RoleSelector, name: str, now: dict[str, Buckets] | None
    ) -> float | None:
        if not now:
            return None
        before = self._previous.get((sel, name))
        self._previous[(sel, name)] = {url: dict(buckets) for url, buckets in now.items()}
        if before is None:
            return None
        summed: Buckets = defaultdict(float)
        seen = False
        for url, buckets in now.items():
            previous = before.get(url)
            if previous is None:
                continue  # a new pod: from its next scrape on
            seen = True
            reset = any(count < previous.get(le, 0.0) for le, count in buckets.items())
            for le, count in buckets.items():
                summed[le] += count if reset else count - previous.get(le, 0.0)
        return histogram_quantile(0.9, list(summed.items())) if seen else None


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

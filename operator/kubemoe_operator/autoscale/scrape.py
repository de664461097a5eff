"""Autoscaling signals read straight from the serving pods' /metrics, when no Prometheus is set.

The pods read are the role's group leaders whose pod is Ready and not being deleted (`targets`,
loop.pod_targets): a group still loading its weights serves no load and reports none (its GPUs idle),
and counted in a per-group mean it would ask to remove the groups that carry the load.

Gauges are read as they are; latency quantiles need a rate, so each pod's histogram is kept from the
previous scrape, each scrape's new observations (summed over the pods) are kept for WINDOW_S, and the
quantile is taken over those: the window of the Prometheus queries (prometheus.py, `[1m]`). A window,
not the last interval alone: sparse traffic (one slow first token a minute) otherwise reads as slow,
idle, slow, idle..., and the scale-up window's smallest reading, 0, never let it scale up. The first
scrape of a role has no latency value yet (which never scales anything down). As Prometheus' rate(),
per pod: a pod seen for the first time adds nothing yet, a pod whose counters went back (it
restarted) adds its new counts, and a pod that left adds nothing more. Pods that export the histogram
but observed nothing in the window read as latency 0: no requests is no load (which may scale down),
unlike no histogram at all (unavailable: never scales down).

Each page is the pod's autoscaler page (`/metrics?kubemoe=1`: a vLLM leader's kubemoe_* series alone,
not vLLM's own for every rank of its group; pages.py), read within FETCH_TIMEOUT_S as a whole and up to
pages.MAX_PAGE_BYTES (a page past the cap refuses the whole sample at once: the other pods' reads are
cancelled), and parsed off the event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from kubemoe_operator.api.spec import MetricType
from kubemoe_operator.autoscale import pages
from kubemoe_operator.autoscale.pages import PageTooLong, fetch_page, gather_all, series_lines
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
"""The /metrics URLs of a role's ready group leaders (from the pod list in a cluster; fixed URLs
locally)."""

Buckets = dict[float, float]
Gauges = dict[str, dict[str, list[float]]]
"""series name -> group -> the values of its pods' samples."""
Histograms = dict[str, dict[str, Buckets]]
"""histogram name -> pod URL -> its cumulative buckets."""

FETCH_TIMEOUT_S = 5.0
"""The whole read of one page: connect, headers and body."""
MAX_PAGE_BYTES = pages.MAX_PAGE_BYTES
"""A longer page is refused, not read further (pages.py: what serving pods' pages weigh)."""
WINDOW_S = 60.0
"""The latency quantile's window, as the Prometheus queries' rate window."""


class ScrapeSource:
    def __init__(
        self,
        *,
        client: httpx2.AsyncClient,
        targets: Targets,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.targets = targets
        self.window_s = window_s
        self.clock = clock
        self._previous: dict[tuple[RoleSelector, str], dict[str, tuple[float, Buckets]]] = {}
        """(role, histogram) -> each pod's (URL's) buckets at its last scrape that answered, and when."""
        self._recent: dict[tuple[RoleSelector, str], deque[tuple[float, Buckets]]] = {}
        """(role, histogram) -> (when, the observations new at that scrape, all pods) within the window."""

    def forget(self, *, keep: Collection[tuple[str, str]]) -> None:
        """Drop the histograms kept for ModelDeployments other than `keep` (namespace, name): gone."""
        for kept in (self._previous, self._recent):
            for key in [k for k in kept if (k[0].namespace, k[0].deployment) not in keep]:
                del kept[key]

    async def _fetch(self, url: str) -> str | None:
        """The page, or None when the pod does not answer; MetricsUnavailable when it is too long."""
        try:
            return await fetch_page(self.client, url, timeout_s=FETCH_TIMEOUT_S, max_bytes=MAX_PAGE_BYTES)
        except PageTooLong as err:
            raise MetricsUnavailable(str(err)) from err

    async def sample(
        self, sel: RoleSelector, metrics: Sequence[MetricType]
    ) -> dict[MetricType, float | None]:
        urls = await self.targets(sel)
        if not urls:
            raise MetricsUnavailable(f"no ready pods of role {sel.role} to scrape")
        bodies = await gather_all([self._fetch(u) for u in urls])  # a refused page cancels the rest
        texts = {url: text for url, text in zip(urls, bodies, strict=True) if text is not None}
        if not texts:
            raise MetricsUnavailable(f"none of the {len(urls)} pods of role {sel.role} answered /metrics")

        wanted_histograms = {HISTOGRAMS[m] for m in metrics if m in HISTOGRAMS}
        try:  # pure Python over up to a MiB a page: off the event loop
            gauges, histograms = await asyncio.to_thread(_read_pages, texts, sel, wanted_histograms)
        except (ValueError, TypeError, KeyError, IndexError) as err:
            # Whatever a pod serves: the parser raises on malformed text, we on bad values.
            raise MetricsUnavailable(
                f"a pod of role {sel.role} serves unreadable /metrics: {err!s:.200}"
            ) from err

        out: dict[MetricType, float | None] = {}
        for metric in metrics:
            if metric == "queue-depth":
                out[metric] = mean_over_groups({g: sum(v) for g, v in gauges.get(QUEUE, {}).items()})
            elif metric == "kv-cache-usage":
                out[metric] = mean_over_groups(
                    {g: sum(v) / len(v) for g, v in gauges.get(KV_USAGE, {}).items()}
                )
            elif metric == "gpu-utilization":
                out[metric] = mean_over_groups(
                    {g: sum(v) / len(v) for g, v in gauges.get(GPU_UTIL, {}).items()}
                )
            else:
                out[metric] = self._quantile_over_window(
                    sel, HISTOGRAMS[metric], histograms.get(HISTOGRAMS[metric])
                )
        return out

    def _quantile_over_window(
        self, sel: RoleSelector, name: str, now: dict[str, Buckets] | None
    ) -> float | None:
        if not now:
            return None
        key = (sel, name)
        t = self.clock()
        before = self._previous.get(key)
        # A pod that did not answer this time keeps its last buckets (for a window): when it answers
        # again, what it observed meanwhile counts (it was not read as a new pod, its slow requests
        # lost and the role read as idle)
        missed = {
            url: seen
            for url, seen in (before or {}).items()
            if url not in now and seen[0] > t - self.window_s
        }
        self._previous[key] = {**missed, **{url: (t, dict(buckets)) for url, buckets in now.items()}}
        if before is None:
            return None
        recent = self._recent.setdefault(key, deque())
        last = {url: buckets for url, (_, buckets) in before.items()}
        if (new := _new_observations(last, now)) is not None:
            recent.append((t, new))
        while recent and recent[0][0] <= t - self.window_s:
            recent.popleft()
        if not recent:
            return None
        summed: Buckets = defaultdict(float)
        for _, buckets in recent:
            for le, count in buckets.items():
                summed[le] += count
        # The pods export the histogram and observed nothing in the window: no requests, no load (0,
        # which may scale down), not a missing reading (which never does).
        quantile = histogram_quantile(0.9, list(summed.items()))
        return 0.0 if quantile is None else quantile


def _new_observations(before: Mapping[str, Buckets], now: Mapping[str, Buckets]) -> Buckets | None:
    """The buckets' increase since `before`, summed over the pods in both (a pod whose counts went back
    restarted: all its counts are new); None when no pod was in both (no rate yet)."""
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
    return dict(summed) if seen else None


def _read_pages(
    texts: Mapping[str, str], sel: RoleSelector, wanted_histograms: set[str]
) -> tuple[Gauges, Histograms]:
    """Every page's gauges (per group) and wanted histograms (per pod) of `sel`'s role."""
    gauges: Gauges = defaultdict(lambda: defaultdict(list))
    histograms: Histograms = defaultdict(dict)
    for url, text in texts.items():
        pod_histograms: dict[str, Buckets] = defaultdict(lambda: defaultdict(float))
        _read_page(text, sel, gauges, pod_histograms, wanted_histograms)
        for name, buckets in pod_histograms.items():
            histograms[name][url] = dict(buckets)
    return gauges, histograms


def _read_page(
    text: str,
    sel: RoleSelector,
    gauges: dict[str, dict[str, list[float]]],
    histograms: dict[str, Buckets],
    wanted_histograms: set[str],
) -> None:
    """Add one pod's page to the role's gauges and histogram buckets; ValueError on a value no
    serving pod reports (negative, NaN, infinite; an infinite bucket bound is Prometheus' +Inf)."""
    read = series_lines(text, {QUEUE, KV_USAGE, GPU_UTIL, *wanted_histograms})
    for family in text_string_to_metric_families(read):
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

"""The autoscaler's kubemoe_* series, derived from one scrape of vLLM's own /metrics.

vLLM labels its series per engine (`engine`, `model_name`); a pod may run several engines (its local
data-parallel ranks). Each kubemoe series is one per pod, with the labels the torch engine exports
(metrics.py: deployment, role, group, rank):

    kubemoe_requests_waiting             <- vllm:num_requests_waiting           summed over engines
    kubemoe_requests_running             <- vllm:num_requests_running           summed
    kubemoe_kv_cache_usage_ratio         <- vllm:kv_cache_usage_perc (0..1)     mean (engines are equal)
    kubemoe_time_to_first_token_seconds  <- vllm:time_to_first_token_seconds    buckets summed
    kubemoe_inter_token_latency_seconds  <- vllm:inter_token_latency_seconds    buckets summed
    kubemoe_request_latency_seconds      <- vllm:e2e_request_latency_seconds    buckets summed
    kubemoe_prompt_tokens_total          <- vllm:prompt_tokens_total            summed
    kubemoe_generation_tokens_total      <- vllm:generation_tokens_total        summed

Histograms keep vLLM's bucket bounds. A series vLLM did not export is left out, not reported as zero.

A leader of a group over several pods serves every data-parallel rank's series (vLLM's API server
reports all the group's engines): some 46 KiB per rank, 1.5 MiB at 32 ranks. Only the lines of the
families above are parsed (`needed_lines`, a regular expression: a sixth of the page), and the
autoscaler reads `autoscaler_page`, the kubemoe_* series alone, a few KiB whatever the group's size.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from kubemoe_runtime.pod.metrics import LABELS, MetricLabels

Kind = Literal["gauge_sum", "gauge_mean", "counter", "histogram"]


@dataclass(frozen=True)
class Mapped:
    kubemoe: str
    vllm: str  # the family name as the parser reports it (counters without `_total`)
    kind: Kind
    help: str


SERIES: Final = (
    Mapped("kubemoe_requests_waiting", "vllm:num_requests_waiting", "gauge_sum", "Requests queued"),
    Mapped("kubemoe_requests_running", "vllm:num_requests_running", "gauge_sum", "Requests running"),
    Mapped(
        "kubemoe_kv_cache_usage_ratio",
        "vllm:kv_cache_usage_perc",
        "gauge_mean",
        "Fraction of KV cache in use",
    ),
    Mapped(
        "kubemoe_time_to_first_token_seconds",
        "vllm:time_to_first_token_seconds",
        "histogram",
        "Time to first token",
    ),
    Mapped(
        "kubemoe_inter_token_latency_seconds",
        "vllm:inter_token_latency_seconds",
        "histogram",
        "Time between tokens of one request",
    ),
    Mapped(
        "kubemoe_request_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "histogram",
        "Arrival to finish",
    ),
    Mapped("kubemoe_prompt_tokens", "vllm:prompt_tokens", "counter", "Prompt tokens prefilled"),
    Mapped("kubemoe_generation_tokens", "vllm:generation_tokens", "counter", "Tokens generated"),
)


_SUFFIXES: Final = ("_total", "_bucket", "_sum", "_count")
_NEEDED: Final = re.compile(
    r"^(?:# (?:HELP|TYPE) )?(?:"
    + "|".join(re.escape(m.vllm) for m in SERIES)
    + r")(?:"
    + "|".join(_SUFFIXES)
    + r")?[{ ].*$",
    re.MULTILINE,
)
"""A line of one of SERIES' vLLM families: its HELP, TYPE or a sample (not `_created`: unread)."""


def needed_lines(vllm_text: str) -> str:
    """The lines of vLLM's text that SERIES reads: what `kubemoe_families` parses."""
    lines = [match.group(0) for match in _NEEDED.finditer(vllm_text)]
    return "\n".join(lines) + "\n" if lines else ""


def _bound(le: str) -> float:
    return float("inf") if le in ("+Inf", "Inf", "inf") else float(le)


def _histogram(family: Metric, target: Mapped, values: list[str]) -> HistogramMetricFamily | None:
    buckets: dict[str, float] = defaultdict(float)
    total = 0.0
    seen = False
    for sample in family.samples:
        if sample.name.endswith("_bucket"):
            buckets[sample.labels["le"]] += sample.value
            seen = True
        elif sample.name.endswith("_sum"):
            total += sample.value
    if not seen:
        return None
    out = HistogramMetricFamily(target.kubemoe, target.help, labels=LABELS)
    ordered = sorted(buckets.items(), key=lambda item: _bound(item[0]))
    out.add_metric(values, buckets=[(le, count) for le, count in ordered], sum_value=total)
    return out


def _scalar(family: Metric, target: Mapped, values: list[str]) -> Metric | None:
    samples = [s.value for s in family.samples if s.name in (family.name, f"{family.name}_total")]
    if not samples:
        return None
    if target.kind == "counter":
        counter = CounterMetricFamily(target.kubemoe, target.help, labels=LABELS)
        counter.add_metric(values, sum(samples))
        return counter
    value = sum(samples) / len(samples) if target.kind == "gauge_mean" else sum(samples)
    gauge = GaugeMetricFamily(target.kubemoe, target.help, labels=LABELS)
    gauge.add_metric(values, value)
    return gauge


def kubemoe_families(vllm_text: str, labels: MetricLabels) -> list[Metric]:
    """The kubemoe_* families for one scrape of vLLM's /metrics (Prometheus text format)."""
    by_name = {family.name: family for family in text_string_to_metric_families(needed_lines(vllm_text))}
    values = [labels.as_dict()[name] for name in LABELS]
    out: list[Metric] = []
    for target in SERIES:
        family = by_name.get(target.vllm)
        if family is None:
            continue
        made = (
            _histogram(family, target, values)
            if target.kind == "histogram"
            else _scalar(family, target, values)
        )
        if made is not None:
            out.append(made)
    return out


class _Families:
    """A collector that yields fixed families (one scrape's worth)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def autoscaler_page(vllm_text: str, labels: MetricLabels) -> bytes:
    """The kubemoe_* series alone, in Prometheus text format: what the autoscaler reads."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(kubemoe_families(vllm_text, labels)))
    return generate_latest(registry)


def render(vllm_text: str, labels: MetricLabels) -> bytes:
    """vLLM's text unchanged, then the kubemoe_* series in Prometheus text format."""
    passthrough = vllm_text if not vllm_text or vllm_text.endswith("\n") else vllm_text + "\n"
    return passthrough.encode() + autoscaler_page(vllm_text, labels)

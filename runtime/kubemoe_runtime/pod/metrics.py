"""Serving metrics in a Prometheus registry the server owns (no process-global registry).

Every series carries the labels the operator's autoscaler groups by: `deployment`, `role`, `group` and
`rank` (the pod's first data-parallel rank). The scheduler calls the hooks; `/metrics` renders `registry`.

    kubemoe_requests_waiting             gauge      requests queued, not yet running
    kubemoe_requests_running             gauge      requests holding a KV-cache slot
    kubemoe_kv_cache_usage_ratio         gauge      fraction of the group's KV-cache slots in use (0..1)
    kubemoe_time_to_first_token_seconds  histogram  arrival -> first generated token
    kubemoe_inter_token_latency_seconds  histogram  between consecutive tokens of one request
    kubemoe_request_latency_seconds      histogram  arrival -> finish
    kubemoe_prompt_tokens_total          counter    prompt tokens prefilled
    kubemoe_generation_tokens_total      counter    tokens generated
    kubemoe_kv_pulled_tokens_total       counter    P/D decode: prompt tokens pulled, not computed
    kubemoe_kv_pull_failures_total       counter    P/D decode: pulls that failed (prompt prefilled locally)
    kubemoe_requests_finished_total      counter    by finish_reason (stop, length, abort)
    kubemoe_requests_rejected_total      counter    turned away because the waiting queue was full
    kubemoe_expert_load_imbalance        gauge      torch engine, per MoE `layer`: busiest EP rank's routed
                                                    tokens over the mean rank's, over the load window
    kubemoe_expert_load_imbalance_max    gauge      the same, the largest over the layers
    kubemoe_expert_load_hottest_ratio    gauge      busiest expert's tokens over the mean expert's, the
                                                    largest over the layers (skew whatever the placement)

The expert-load gauges are set from the engine's window at each scrape (docs/expert-load.md); one series
per MoE layer at most, never one per expert.

What vLLM also measures is exported a second time under vLLM 0.32's own names, types and histogram
buckets, labelled `model_name` (the served model name) and `engine` ("0": one scheduler per pod) as
vLLM labels them, plus the four above, so a dashboard built for vLLM shows the torch engine too. The
same hook moves both series:

    vllm:num_requests_waiting            gauge      = kubemoe_requests_waiting
    vllm:num_requests_running            gauge      = kubemoe_requests_running
    vllm:kv_cache_usage_perc             gauge      = kubemoe_kv_cache_usage_ratio (0..1, as vLLM's)
    vllm:time_to_first_token_seconds     histogram  = kubemoe_time_to_first_token_seconds
    vllm:inter_token_latency_seconds     histogram  = kubemoe_inter_token_latency_seconds
    vllm:e2e_request_latency_seconds     histogram  = kubemoe_request_latency_seconds
    vllm:prompt_tokens_total             counter    every prompt token: prefilled + pulled (vLLM counts both)
    vllm:prompt_tokens_by_source_total   counter    source=local_compute (prefilled), external_kv_transfer
                                                    (pulled), local_cache_hit (0: no prefix cache)
    vllm:prompt_tokens_cached_total      counter    prompt tokens not computed here (= pulled)
    vllm:generation_tokens_total         counter    = kubemoe_generation_tokens_total
    vllm:request_success_total           counter    by finished_reason, = kubemoe_requests_finished_total
    vllm:admission_rejections_total      counter    reason=max_num_queued_reqs, = kubemoe_requests_rejected

The autoscaler reads the kubemoe_* names; the vllm:* ones are for dashboards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LABELS = ("deployment", "role", "group", "rank")
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

VLLM_LABELS = ("model_name", "engine", *LABELS)
"""vLLM's labels (model_name, engine) on the vllm:* series, then ours."""
# vLLM 0.32's default buckets (vllm/v1/metrics/buckets.py), so vLLM's heatmaps and quantiles read the same.
VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
VLLM_REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)  # fmt: skip
VLLM_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
VLLM_PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
VLLM_ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")


@dataclass(frozen=True)
class MetricLabels:
    deployment: str = ""
    role: str = "worker"
    group: str = "0"
    rank: str = "0"

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, role: str | None = None, rank: int = 0
    ) -> MetricLabels:
        """KUBEMOE_DEPLOYMENT / KUBEMOE_ROLE / KUBEMOE_GROUP (set by the operator); flags win over env."""
        env = os.environ if env is None else env
        return cls(
            deployment=env.get("KUBEMOE_DEPLOYMENT", ""),
            role=role or env.get("KUBEMOE_ROLE", "worker"),
            group=env.get("KUBEMOE_GROUP", "0"),
            rank=str(rank),
        )

    def as_dict(self) -> dict[str, str]:
        return {"deployment": self.deployment, "role": self.role, "group": self.group, "rank": self.rank}


class GaugeHook:
    """One gauge the scheduler sets, and every series it feeds: (family, label values) pairs, each series
    created at the first set(). A pod still loading its weights has no scheduler to set them, so it
    exports none of these series, rather than a 0 that the autoscaler would average in as an idle group
    (the load on the ready groups would look diluted, and a scale-down follow)."""

    def __init__(self, *series: tuple[Gauge, Mapping[str, str]]) -> None:
        self.families = series
        self.series: list[Gauge] = []

    def set(self, value: float) -> None:
        if not self.series:
            self.series = [family.labels(**values) for family, values in self.families]
        for g in self.series:
            g.set(value)


class CounterHook:
    """One counter the scheduler increments, and every series it feeds."""

    def __init__(self, *series: Counter) -> None:
        self.series = series

    def inc(self, amount: float = 1) -> None:
        for c in self.series:
            c.inc(amount)


class HistogramHook:
    """One histogram the scheduler observes into, and every series it feeds (each with its buckets)."""

    def __init__(self, *series: Histogram) -> None:
        self.series = series

    def observe(self, value: float) -> None:
        for h in self.series:
            h.observe(value)


class ServingMetrics:
    def __init__(self, labels: MetricLabels, *, model_name: str = "") -> None:
        """`model_name`: the served model name, vLLM's `model_name` label on the vllm:* series."""
        self.registry = CollectorRegistry(auto_describe=True)
        r, values = self.registry, labels.as_dict()
        vllm = {"model_name": model_name, "engine": "0", **values}

        def gauge(name: str, doc: str, vllm_name: str, vllm_doc: str) -> GaugeHook:
            ours = Gauge(name, doc, LABELS, registry=r)
            return GaugeHook((ours, values), (Gauge(vllm_name, vllm_doc, VLLM_LABELS, registry=r), vllm))

        def histogram(
            name: str, doc: str, vllm_name: str, vllm_doc: str, vllm_buckets: tuple[float, ...]
        ) -> HistogramHook:
            ours = Histogram(name, doc, LABELS, buckets=LATENCY_BUCKETS, registry=r).labels(**values)
            theirs = Histogram(vllm_name, vllm_doc, VLLM_LABELS, buckets=vllm_buckets, registry=r)
            return HistogramHook(ours, theirs.labels(**vllm))

        self.waiting = gauge(
            "kubemoe_requests_waiting",
            "Requests queued",
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
        )
        self.running = gauge(
            "kubemoe_requests_running",
            "Requests running",
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
        )
        self.kv_cache_usage = gauge(
            "kubemoe_kv_cache_usage_ratio",
            "Fraction of KV-cache slots in use",
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
        )
        self.ttft = histogram(
            "kubemoe_time_to_first_token_seconds",
            "Time to first token",
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            VLLM_TTFT_BUCKETS,
        )
        self.itl = histogram(
            "kubemoe_inter_token_latency_seconds",
            "Time between tokens of one request",
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            VLLM_ITL_BUCKETS,
        )
        self.latency = histogram(
            "kubemoe_request_latency_seconds",
            "Arrival to finish",
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            VLLM_REQUEST_LATENCY_BUCKETS,
        )

        vllm_prompt = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", VLLM_LABELS, registry=r
        ).labels(**vllm)
        by_source = Counter(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            [*VLLM_LABELS, "source"],
            registry=r,
        )
        source = {name: by_source.labels(**vllm, source=name) for name in VLLM_PROMPT_SOURCES}
        cached = Counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local + external).",
            VLLM_LABELS,
            registry=r,
        ).labels(**vllm)
        self.prompt_tokens = CounterHook(
            Counter("kubemoe_prompt_tokens", "Prompt tokens prefilled", LABELS, registry=r).labels(**values),
            vllm_prompt,
            source["local_compute"],
        )
        self.generation_tokens = CounterHook(
            Counter("kubemoe_generation_tokens", "Tokens generated", LABELS, registry=r).labels(**values),
            Counter(
                "vllm:generation_tokens", "Number of generation tokens processed.", VLLM_LABELS, registry=r
            ).labels(**vllm),
        )
        self.kv_pulled_tokens = CounterHook(
            Counter(
                "kubemoe_kv_pulled_tokens",
                "Prompt tokens whose KV came from a prefill (P/D)",
                LABELS,
                registry=r,
            ).labels(**values),
            vllm_prompt,
            source["external_kv_transfer"],
            cached,
        )
        self.kv_pull_failures = CounterHook(
            Counter(
                "kubemoe_kv_pull_failures",
                "KV pulls that failed (the prompt was prefilled here)",
                LABELS,
                registry=r,
            ).labels(**values)
        )
        self._finished = Counter(
            "kubemoe_requests_finished", "Finished requests", [*LABELS, "finish_reason"], registry=r
        )
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*VLLM_LABELS, "finished_reason"],
            registry=r,
        )
        self._labels, self._vllm_labels = values, vllm
        for reason in VLLM_FINISH_REASONS:  # vLLM shows every reason from the start, at 0
            self._success.labels(**vllm, finished_reason=reason)
        admission = Counter(
            "vllm:admission_rejections",
            "Number of admission attempts rejected by a queue limit, by reason.",
            [*VLLM_LABELS, "reason"],
            registry=r,
        )
        rejected = {reason: admission.labels(**vllm, reason=reason) for reason in VLLM_ADMISSION_REASONS}
        self.rejected = CounterHook(
            Counter(
                "kubemoe_requests_rejected", "Requests refused: waiting queue full", LABELS, registry=r
            ).labels(**values),
            rejected["max_num_queued_reqs"],
        )

        self._imbalance = Gauge(
            "kubemoe_expert_load_imbalance",
            "Busiest expert-parallel rank's routed tokens over the mean rank's, per MoE layer",
            [*LABELS, "layer"],
            registry=r,
        )
        self.imbalance_max = Gauge(
            "kubemoe_expert_load_imbalance_max",
            "Largest per-layer expert-parallel rank imbalance",
            LABELS,
            registry=r,
        )
        self.hottest_ratio = Gauge(
            "kubemoe_expert_load_hottest_ratio",
            "Busiest expert's routed tokens over the mean expert's, largest over the MoE layers",
            LABELS,
            registry=r,
        )

    def expert_load(self, imbalance: Mapping[int, float], *, hottest_ratio: float) -> None:
        """Set the expert-load gauges: imbalance by MoE layer index, and the hottest expert's ratio."""
        for layer, value in imbalance.items():
            self._imbalance.labels(**self._labels, layer=str(layer)).set(value)
        self.imbalance_max.labels(**self._labels).set(max(imbalance.values(), default=1.0))
        self.hottest_ratio.labels(**self._labels).set(hottest_ratio)

    def finished(self, reason: str) -> None:
        self._finished.labels(**self._labels, finish_reason=reason).inc()
        self._success.labels(**self._vllm_labels, finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

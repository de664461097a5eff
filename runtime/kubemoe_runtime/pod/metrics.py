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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LABELS = ("deployment", "role", "group", "rank")
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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


class ServingMetrics:
    def __init__(self, labels: MetricLabels) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, values = self.registry, labels.as_dict()
        self.waiting = Gauge("kubemoe_requests_waiting", "Requests queued", LABELS, registry=r).labels(
            **values
        )
        self.running = Gauge("kubemoe_requests_running", "Requests running", LABELS, registry=r).labels(
            **values
        )
        self.kv_cache_usage = Gauge(
            "kubemoe_kv_cache_usage_ratio", "Fraction of KV-cache slots in use", LABELS, registry=r
        ).labels(**values)
        self.ttft = Histogram(
            "kubemoe_time_to_first_token_seconds",
            "Time to first token",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(**values)
        self.itl = Histogram(
            "kubemoe_inter_token_latency_seconds",
            "Time between tokens of one request",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(**values)
        self.latency = Histogram(
            "kubemoe_request_latency_seconds",
            "Arrival to finish",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(**values)
        self.prompt_tokens = Counter(
            "kubemoe_prompt_tokens", "Prompt tokens prefilled", LABELS, registry=r
        ).labels(**values)
        self.generation_tokens = Counter(
            "kubemoe_generation_tokens", "Tokens generated", LABELS, registry=r
        ).labels(**values)
        self.kv_pulled_tokens = Counter(
            "kubemoe_kv_pulled_tokens", "Prompt tokens whose KV came from a prefill (P/D)", LABELS, registry=r
        ).labels(**values)
        self.kv_pull_failures = Counter(
            "kubemoe_kv_pull_failures",
            "KV pulls that failed (the prompt was prefilled here)",
            LABELS,
            registry=r,
        ).labels(**values)
        self._finished = Counter(
            "kubemoe_requests_finished", "Finished requests", [*LABELS, "finish_reason"], registry=r
        )
        self._labels = values
        self.rejected = Counter(
            "kubemoe_requests_rejected", "Requests refused: waiting queue full", LABELS, registry=r
        ).labels(**values)

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

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Which runtime series each autoscaling metric reads, and how per-pod samples become one
per-group value for a role. Shared by the Prometheus source and the direct scrape.

The runtime labels every serving series with deployment, role, group and rank (and its NVML
collector the `kubemoe_gpu_*` series the same way); vLLM's own series are re-exported under these
names by the runtime, so one set of queries fits both engines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kubemoe_operator.api.spec import MetricType

QUEUE = "kubemoe_requests_waiting"
RUNNING = "kubemoe_requests_running"
KV_USAGE = "kubemoe_kv_cache_usage_ratio"
GPU_UTIL = "kubemoe_gpu_utilization_ratio"
"""0..1, per GPU: the runtime's NVML collector (not dcgm-exporter's DCGM_FI_DEV_GPU_UTIL, a percentage)."""
TTFT = "kubemoe_time_to_first_token_seconds"
ITL = "kubemoe_inter_token_latency_seconds"

HISTOGRAMS: Mapping[MetricType, str] = {"ttft-p90": TTFT, "itl-p90": ITL}


@dataclass(frozen=True)
class RoleSelector:
    """The series of one role of one ModelDeployment."""

    namespace: str
    deployment: str
    role: str


def mean_over_groups(per_group: Mapping[str, float]) -> float | None:
    """The per-group value the policy targets: the mean over groups that reported."""
    values = [v for v in per_group.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else None


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets: linear
    interpolation inside the bucket that holds the q-th observation. None with no observations."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width > 0 else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound

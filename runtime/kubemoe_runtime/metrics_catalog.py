"""Every Prometheus series the runtime's processes export, as data: name, type, labels, help, and
which process exports it. Read from the real registries (the torch engine's ServingMetrics with the
NVML collector's families, the vLLM front's re-exported series, the router's RouterMetrics), so the
catalog cannot drift from the code.

`python -m kubemoe_runtime.metrics_catalog` prints it as JSON ({"exporters": {process: where it
serves}, "metrics": [MetricInfo]}); the operator's
`kubemoe_operator.gen.metrics_reference` reads that (the two projects never import each other) and
writes docs/metrics-reference.md (`make crds`). The dashboard's test checks its queries against it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from kubemoe_runtime.engines.vllm.metrics import SERIES
from kubemoe_runtime.pod.gpu_metrics import GpuReading, families
from kubemoe_runtime.pod.metrics import LABELS, MetricLabels, ServingMetrics
from kubemoe_runtime.router.metrics import RouterMetrics

TORCH_POD = "serving pod (torch engine)"
VLLM_POD = "serving pod (vLLM)"
ROUTER = "router"
EXPORTERS = {
    TORCH_POD: "`GET /metrics` on the serving port (`--port`; 8000 as the operator renders pods) of every "
    "pod that serves the API: a group's leader, or a one-pod group. A group's headless workers serve no "
    "/metrics. The `vllm:*` series are vLLM's names for what the torch engine measures, so that "
    "dashboards made for vLLM show it.",
    VLLM_POD: "`GET /metrics` on the serving port: vLLM's own `vllm:*` series passed through unchanged "
    "(labelled `model_name` and `engine`; vLLM's documentation lists them), then these, derived from "
    "them with the labels the torch engine uses. A headless worker's page holds the GPU series only.",
    ROUTER: "`GET /metrics` on the router's port (8000).",
}
"""Each exporting process, and where it serves its series."""


@dataclass
class MetricInfo:
    name: str
    """The family name; counters show as NAME_total, histograms as NAME_bucket, _sum and _count."""
    type: str
    labels: list[str]
    help: str
    exporters: list[str] = field(default_factory=list)


def registry_metrics(registry: CollectorRegistry) -> list[MetricInfo]:
    """The families a registry exports, each with its label names (whether or not a labelled child
    exists yet: prometheus_client only lists them on the metric object, `_labelnames`)."""
    out: list[MetricInfo] = []
    for collector in list(registry._collector_to_names):
        for family in collector.collect():
            if family.name.endswith("_created") and family.type == "gauge":
                continue  # prometheus_client's creation timestamps, not series of ours
            names = list(getattr(collector, "_labelnames", ()))
            for sample in family.samples:
                names += [k for k in sample.labels if k not in names and k not in ("le", "quantile")]
            out.append(MetricInfo(family.name, family.type, names, family.documentation))
    return out


def _families(found: Iterable[GaugeMetricFamily]) -> list[MetricInfo]:
    return [MetricInfo(f.name, f.type, list(f.samples[0].labels), f.documentation) for f in found]


def catalog() -> list[MetricInfo]:
    """Every series of the runtime, sorted by name; a series two processes export lists both."""
    by_name: dict[str, MetricInfo] = {}

    def add(metrics: Iterable[MetricInfo], exporter: str) -> None:
        for m in metrics:
            seen = by_name.setdefault(m.name, m)
            if (seen.type, seen.labels) != (m.type, m.labels):
                raise ValueError(f"{m.name} is a {m.type}{m.labels} in one process, {seen.type}{seen.labels}")
            if exporter not in seen.exporters:
                seen.exporters.append(exporter)

    labels = MetricLabels()
    gpu = _families(families([GpuReading(0, "GPU-0", "GPU", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)], labels.as_dict()))
    add(registry_metrics(ServingMetrics(labels).registry), TORCH_POD)
    add(gpu, TORCH_POD)
    kinds = {"gauge_sum": "gauge", "gauge_mean": "gauge", "counter": "counter", "histogram": "histogram"}
    add((MetricInfo(s.kubemoe, kinds[s.kind], list(LABELS), s.help) for s in SERIES), VLLM_POD)
    add(gpu, VLLM_POD)
    add(registry_metrics(RouterMetrics().registry), ROUTER)
    return sorted(by_name.values(), key=lambda m: m.name)


def catalog_json() -> str:
    return json.dumps({"exporters": EXPORTERS, "metrics": [asdict(m) for m in catalog()]}, indent=1) + "\n"


def main() -> None:
    sys.stdout.write(catalog_json())


if __name__ == "__main__":
    main()

"""docs/metrics-reference.md, generated from the code: every series the operator and the runtime
export, with its type, labels, help text and the process that exports it.

The operator never imports the runtime, so the runtime describes its own series as data
(`python -m kubemoe_runtime.metrics_catalog`, JSON on stdout) and this module adds the operator's,
read from OperatorMetrics' registry:

    python -m kubemoe_runtime.metrics_catalog |
        python -m kubemoe_operator.gen.metrics_reference docs/metrics-reference.md

(`make crds` runs it); a unit test fails when the committed file drifts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from kubemoe_operator.run.metrics import OperatorMetrics

OPERATOR = "operator"
OPERATOR_NOTE = (
    "`GET /metrics` on `--metrics-port` (the chart's `metrics.port`, 8080; `metrics.serviceMonitor` "
    "scrapes it) of every replica; `kubemoe_operator_leader` says which one leads, and only the leader's "
    "autoscaler series move."
)


@dataclass
class MetricInfo:
    """One series family, as the runtime's catalog describes its own."""

    name: str
    type: str
    labels: list[str]
    help: str
    exporters: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Any) -> MetricInfo:
        """One entry of the runtime's catalog; ValueError when it is not the shape it writes."""
        try:
            return cls(
                name=str(data["name"]),
                type=str(data["type"]),
                labels=[str(x) for x in data["labels"]],
                help=str(data["help"]),
                exporters=[str(x) for x in data["exporters"]],
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a metrics catalog entry: {data!r:.200}") from err

    def series(self) -> list[str]:
        """The names a query may use: counters' NAME_total, histograms' _bucket, _sum and _count."""
        if self.type == "counter":
            return [f"{self.name}_total"]
        if self.type == "histogram":
            return [f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"]
        return [self.name]


def registry_metrics(registry: CollectorRegistry, exporter: str) -> list[MetricInfo]:
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
            out.append(MetricInfo(family.name, family.type, names, family.documentation, [exporter]))
    return out


def operator_metrics() -> list[MetricInfo]:
    return registry_metrics(OperatorMetrics().registry, OPERATOR)


@dataclass
class Catalog:
    """What a set of processes exports: where each serves its series, and the series."""

    exporters: dict[str, str]
    metrics: list[MetricInfo]


def read_catalog(text: str) -> Catalog:
    """The runtime's catalog (its JSON); ValueError when it is not one."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("exporters"), dict) or not data.get("metrics"):
        raise ValueError("the runtime's metrics catalog is not {exporters: {...}, metrics: [...]}")
    metrics = [MetricInfo.from_json(entry) for entry in data["metrics"]]
    return Catalog({str(k): str(v) for k, v in data["exporters"].items()}, metrics)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _shown(m: MetricInfo) -> str:
    return f"`{m.name}_total`" if m.type == "counter" else f"`{m.name}`"


def _table(metrics: Iterable[MetricInfo]) -> list[str]:
    rows = ["| name | type | labels | help |", "| --- | --- | --- | --- |"]
    for m in metrics:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "—"
        rows.append(f"| {_shown(m)} | {m.type} | {labels} | {_cell(m.help)} |")
    return rows


HEADER = """# Metrics reference

Generated from the code by `operator/kubemoe_operator/gen/metrics_reference.py` (`make crds`): do not
edit. What to scrape, the dashboard and how the names are chosen: [monitoring.md](monitoring.md).

Counters are shown with the `_total` their samples carry; a histogram's samples are `NAME_bucket`
(with `le`), `NAME_sum` and `NAME_count`. Scraped through a PodMonitor or ServiceMonitor, every series
also gets the target's `namespace` and `pod` (or `instance`) labels."""


def reference(runtime: Catalog) -> str:
    """The whole document: one section per exporting process (the runtime's, then the operator's),
    series sorted by name."""
    every = sorted([*runtime.metrics, *operator_metrics()], key=lambda m: m.name)
    exporters = {**runtime.exporters, OPERATOR: OPERATOR_NOTE}
    unknown = {e for m in every for e in m.exporters} - set(exporters)
    if unknown:
        raise ValueError(f"series exported by {sorted(unknown)}, which the catalog does not describe")
    lines = [HEADER]
    for exporter, note in exporters.items():
        lines += ["", f"## {exporter[0].upper()}{exporter[1:]}", "", note, ""]
        lines += _table(m for m in every if exporter in m.exporters)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    runtime = read_catalog(sys.stdin.read())
    text = reference(runtime)
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])

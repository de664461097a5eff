"""The Helm chart's values, as pydantic models: one source for values.yaml and values.schema.json.

`python -m kubemoe_operator.gen.chart_values DIR` writes both into the chart (`make crds` runs it);
a unit test fails when the committed files drift. Every key is documented by the attribute
docstring below it, which becomes the comment above the key in values.yaml and the
description in the schema. The schema sets `additionalProperties: false` everywhere, so
`helm install --set imagee.tag=x` fails instead of being ignored.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from kubemoe_operator.api.patterns import DNS_SUBDOMAIN_PATTERN
from kubemoe_operator.api.pod_template import RESERVED_LABEL_PREFIXES

# values.schema.json refuses pod labels under the prefixes the operator and LeaderWorkerSet own.
_RESERVED_PATTERN = "^(" + "|".join(p.rstrip("/").replace(".", "\\.") for p in RESERVED_LABEL_PREFIXES) + ")/"
_NOT_RESERVED: JsonDict = {"propertyNames": {"not": {"pattern": _RESERVED_PATTERN}}}


class ChartModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=True
    )


class Image(ChartModel):
    repository: str = Field("kubemoe/kubemoe-operator", min_length=1)
    """Operator image repository (build it from operator/Dockerfile and push it to your registry)."""
    tag: str = ""
    """Image tag; empty means the chart's appVersion."""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """When the kubelet pulls the image."""


class ServiceAccount(ChartModel):
    create: bool = True
    """Create the operator's ServiceAccount."""
    name: str = ""
    """Its name; empty means the release's full name."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations, e.g. for workload identity."""


class ServiceMonitor(ChartModel):
    enabled: bool = False
    """Create a prometheus-operator ServiceMonitor for the operator's metrics."""
    interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$")
    """Scrape interval."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels, e.g. the `release` label your Prometheus selects on."""


class Metrics(ChartModel):
    port: int = Field(8080, ge=1, le=65535)
    """Port of the operator's /metrics endpoint."""
    service_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor)
    """Prometheus-operator integration."""
    pod_monitors: bool = True
    """Give each ModelDeployment a PodMonitor for its API pods and routers where the cluster serves the
    PodMonitor CRD (else, and when false, scrape annotations on those pods). docs/monitoring.md."""
    pod_monitor_labels: dict[str, str] = Field(default_factory=dict, json_schema_extra=_NOT_RESERVED)
    """Labels of those PodMonitors, e.g. {release: kube-prometheus-stack}: kube-prometheus-stack's
    Prometheus selects only PodMonitors carrying its release label unless told otherwise."""


class Dashboards(ChartModel):
    enabled: bool = False
    """Create a ConfigMap holding the Grafana dashboard (the chart's dashboards/kubemoe.json), labelled
    grafana_dashboard: "1" so Grafana's dashboard sidecar (kube-prometheus-stack's, the grafana chart's)
    loads it. See docs/monitoring.md."""
    namespace: str = Field("", max_length=63, pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")
    """Namespace of the ConfigMap; empty means the release's. The sidecar may watch only Grafana's."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels added to the ConfigMap; one named grafana_dashboard replaces the default "1"."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations on the ConfigMap, e.g. the sidecar's folder annotation."""


# A resource quantity as people write one: "100m", "1Gi", or a number (`cpu: 0.5`; `--set
# resources.limits.cpu=1` hands Helm an integer). The apiserver checks the value itself.
_QUANTITY: JsonDict = {"anyOf": [{"type": "string"}, {"type": "number"}]}


class ResourceList(ChartModel):
    # Any resource name (ephemeral-storage, hugepages-2Mi, extended resources), each a quantity.
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": _QUANTITY})

    cpu: str | float | None = None
    """CPU, e.g. 100m."""
    memory: str | float | None = None
    """Memory, e.g. 256Mi."""


class Resources(ChartModel):
    requests: ResourceList = Field(default_factory=lambda: ResourceList(cpu="100m", memory="192Mi"))
    """What the scheduler reserves for the operator."""
    limits: ResourceList = Field(default_factory=lambda: ResourceList(memory="512Mi"))
    """The most it may use."""


class Toleration(ChartModel):
    key: str | None = None
    """Taint key."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal."""
    value: str | None = None
    """Taint value, with Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


class Values(ChartModel):
    replica_count: int = Field(1, ge=1, le=5)
    """Operator replicas. One leads (holds the Lease); the others wait as ready standbys."""
    image: Image = Field(default_factory=Image)
    """The operator image."""
    image_pull_secrets: list[str] = Field(default_factory=list)
    """Names of Secrets for pulling the image from a private registry."""
    watch_namespace: str = Field("", max_length=63, pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")
    """Watch only this namespace; empty watches the whole cluster."""
    resync_seconds: int = Field(60, ge=5)
    """Seconds between periodic reconciles of every ModelDeployment."""
    prometheus_url: str = Field("", pattern=r"^(https?://.+)?$")
    """Prometheus HTTP API the autoscaler queries, e.g. http://prometheus-operated.monitoring:9090;
    empty: it scrapes the serving pods' /metrics directly."""
    autoscale_interval_seconds: int = Field(15, ge=0)
    """Seconds between autoscaler evaluations of every autoscaled role; 0 turns the autoscaler off."""
    rebalance_tick_seconds: int = Field(15, ge=0)
    """Seconds between the expert rebalancer's looks for roles due a check (each role is checked every
    spec.experts.rebalance.intervalSeconds); 0 turns expert rebalancing off."""
    runtime_image: str = Field("kubemoe/kubemoe-runtime:0.1.0", min_length=1)
    """Runtime image for ModelDeployments whose engine names none: the GPU image (runtime/Dockerfile); a
    cluster of CPU nodes only: the CPU image (runtime/Dockerfile.cpu), else CPU deployments name it."""
    runtime_image_pull_secrets: list[str] = Field(
        default_factory=list,
        json_schema_extra={"items": {"type": "string", "pattern": DNS_SUBDOMAIN_PATTERN}},
    )
    """Secrets for pulling the runtime image, named on every serving and router pod; each must exist in
    the ModelDeployment's namespace (spec.pod.imagePullSecrets adds more)."""
    runtime_pod_annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations on every serving and router pod (spec.pod.annotations wins on the same key)."""
    runtime_pod_labels: dict[str, str] = Field(default_factory=dict, json_schema_extra=_NOT_RESERVED)
    """Labels on every serving and router pod, except under kubemoe.io/, app.kubernetes.io/ and
    leaderworkerset.sigs.k8s.io/ (spec.pod.labels wins on the same key)."""
    health_port: int = Field(8081, ge=1, le=65535)
    """Port of the operator's /healthz (liveness) and /readyz (readiness: watching the Lease or the
    resources) endpoints, served by every replica from start."""
    verbose: bool = False
    """Log every handler run and API call (kopf's verbose mode)."""
    service_account: ServiceAccount = Field(default_factory=ServiceAccount)
    """The identity the operator runs as; the chart's ClusterRole is bound to it."""
    metrics: Metrics = Field(default_factory=Metrics)
    """The operator's metrics Service."""
    dashboards: Dashboards = Field(default_factory=Dashboards)
    """The Grafana dashboard of a ModelDeployment (requests, latency, tokens, KV cache, autoscaler, GPUs,
    experts), as a ConfigMap for Grafana's sidecar."""
    resources: Resources = Field(default_factory=Resources)
    """Operator container resources."""
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    """Extra annotations on the operator pod."""
    pod_labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels on the operator pod."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the operator pod must match."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the operator pod tolerates."""
    priority_class_name: str = ""
    """PriorityClass of the operator pod."""


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        if "anyOf" in node:  # `X | None`: values may leave it out or set it to null
            return {
                **{k: _inline(v, defs) for k, v in node.items() if k not in ("anyOf", "title", "default")},
                "anyOf": [_inline(b, defs) for b in node["anyOf"]],
            }
        return {k: _inline(v, defs) for k, v in node.items() if k not in ("title", "$defs")}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def values_schema() -> dict[str, Any]:
    """values.schema.json: JSON Schema draft-07, $refs inlined, unknown keys rejected."""
    raw = Values.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _inline(raw, raw.get("$defs", {}))
    schema.pop("default", None)
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": "kubemoe chart values", **schema}


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in text.strip().splitlines()]


def _yaml_scalar(value: Any) -> str:
    dumped = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return dumped.removesuffix("\n...").strip()


def _emit(model: type[ChartModel], data: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        value = data[key]
        if value is None:  # optional and unset: Helm treats null as "remove the key"
            continue
        lines += _comment(field.description or "", indent)
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and issubclass(nested, ChartModel):
            lines.append(f"{indent}{key}:")
            lines += _emit(nested, value, indent + "  ")
        else:
            lines.append(f"{indent}{key}: {_yaml_scalar(value)}")
    return lines


def values_yaml() -> str:
    """values.yaml: every key with its default, and its documentation as a comment above it."""
    header = [
        "# Default values for the kubemoe chart, made by operator/kubemoe_operator/gen/chart_values.py",
        "# by `make crds`; edit the models there, not this file. values.schema.json rejects unknown keys.",
        "",
    ]
    data = Values().model_dump(by_alias=True, mode="json", exclude_none=False)
    return "\n".join(header + _emit(Values, data, "")) + "\n"


def write(chart_dir: Path) -> None:
    (chart_dir / "values.yaml").write_text(values_yaml())
    (chart_dir / "values.schema.json").write_text(json.dumps(values_schema(), indent=2) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("charts/kubemoe"))

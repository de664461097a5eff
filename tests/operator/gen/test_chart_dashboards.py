"""The chart's Grafana dashboard ConfigMap as `helm template` renders it (#20): off by default; on, it
holds charts/kubemoe/dashboards/kubemoe.json byte for byte, labelled for Grafana's sidecar. And the
operator's ServiceMonitor keeps the autoscaler series' own `namespace` label.

Needs the helm binary, as test_chart_template.py (which finds it)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml

from tests.operator.gen.test_chart_template import CHART, HELM

pytestmark = pytest.mark.skipif(HELM is None, reason="no helm binary (make cluster-build caches one)")


def render(*values: str) -> list[dict[str, Any]]:
    assert HELM is not None
    out = subprocess.run(
        [str(HELM), "template", "r", str(CHART), "--namespace", "kubemoe-system", *values],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _configmaps(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "ConfigMap"]


def test_no_dashboard_unless_enabled() -> None:
    assert _configmaps(render()) == []


def test_the_dashboard_configmap_holds_the_file_for_grafanas_sidecar() -> None:
    (cm,) = _configmaps(
        render(
            "--set",
            "dashboards.enabled=true",
            "--set",
            "dashboards.namespace=monitoring",
            "--set-string",
            "dashboards.annotations.grafana_folder=LLM serving",
        )
    )
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM serving"}
    (key,) = cm["data"]
    assert key == "kubemoe.json"
    text = (CHART / "dashboards" / "kubemoe.json").read_text()
    assert cm["data"][key] == text.rstrip("\n")
    assert json.loads(cm["data"][key])["uid"] == "kubemoe-deployment"


def test_labels_add_to_the_sidecar_label_or_replace_its_value() -> None:
    (cm,) = _configmaps(
        render(
            "--set",
            "dashboards.enabled=true",
            "--set-string",
            "dashboards.labels.grafana_dashboard=kubemoe",
            "--set",
            "dashboards.labels.team=ml",
        )
    )
    labels = cm["metadata"]["labels"]
    assert labels["grafana_dashboard"] == "kubemoe"
    assert labels["team"] == "ml"
    assert cm["metadata"]["namespace"] == "kubemoe-system"


def test_the_service_monitor_honours_the_namespace_the_autoscaler_series_carry() -> None:
    (monitor,) = [
        d for d in render("--set", "metrics.serviceMonitor.enabled=true") if d["kind"] == "ServiceMonitor"
    ]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True

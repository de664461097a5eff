"""docs/metrics-reference.md is generated from the code (#20): the runtime's catalog (its real
registries) piped into the operator's generator, as `make crds` runs it; every series of every
registry has its row."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kubemoe_operator.gen.metrics_reference import (
    OPERATOR,
    MetricInfo,
    read_catalog,
    reference,
    registry_metrics,
)
from kubemoe_operator.run.metrics import OperatorMetrics
from kubemoe_runtime.metrics_catalog import EXPORTERS, ROUTER, TORCH_POD, VLLM_POD, catalog_json
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from kubemoe_runtime.router.metrics import RouterMetrics
from tests.operator.helpers import REPO

DOC = REPO / "docs" / "metrics-reference.md"


def test_reference_matches_the_code() -> None:
    assert DOC.read_text() == reference(read_catalog(catalog_json())), "regenerate with `make crds`"


def test_the_make_crds_pipeline_writes_the_same() -> None:
    catalog = subprocess.run(
        [sys.executable, "-m", "kubemoe_runtime.metrics_catalog"],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    out = subprocess.run(
        [sys.executable, "-m", "kubemoe_operator.gen.metrics_reference"],
        input=catalog,
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout.decode()
    assert out == DOC.read_text()


def _section(text: str, exporter: str) -> str:
    start = text.index(f"## {exporter[0].upper()}{exporter[1:]}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _row(m: MetricInfo) -> str:
    shown = f"{m.name}_total" if m.type == "counter" else m.name
    return f"| `{shown}` | {m.type} | "


@pytest.mark.parametrize(
    ("exporter", "registry"),
    [
        (TORCH_POD, ServingMetrics(MetricLabels()).registry),
        (ROUTER, RouterMetrics().registry),
        (OPERATOR, OperatorMetrics().registry),
    ],
)
def test_every_series_of_a_registry_has_a_row_in_its_process_section(exporter: str, registry: object) -> None:
    section = _section(DOC.read_text(), exporter)
    found = registry_metrics(registry, exporter)  # type: ignore[arg-type]
    assert len(found) >= 8
    for m in found:
        assert _row(m) in section, m.name
        assert m.labels == [] or f"`{m.labels[0]}`" in section


def test_the_sections_and_the_names_that_matter() -> None:
    text = DOC.read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## Serving pod (torch engine)",
        "## Serving pod (vLLM)",
        "## Router",
        "## Operator",
    ]
    assert set(EXPORTERS) == {TORCH_POD, VLLM_POD, ROUTER}
    vllm_pod = _section(text, VLLM_POD)
    assert "| `kubemoe_time_to_first_token_seconds` | histogram |" in vllm_pod  # re-exported from vLLM's
    assert "| `kubemoe_gpu_utilization_ratio` | gauge |" in vllm_pod
    assert "kubemoe_expert_load" not in vllm_pod  # the torch engine's alone
    assert "| `vllm:time_to_first_token_seconds` | histogram |" in _section(text, TORCH_POD)
    assert "DCGM_FI_" not in text


@pytest.mark.parametrize(
    "text",
    ["[]", "{}", '{"exporters": {}, "metrics": []}', '{"exporters": {}, "metrics": [{"name": "x"}]}'],
)
def test_a_catalog_of_another_shape_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="catalog"):
        read_catalog(text)


def test_a_series_of_an_undescribed_process_is_refused() -> None:
    catalog = read_catalog(catalog_json())
    catalog.metrics[0].exporters.append("sidecar")
    with pytest.raises(ValueError, match="sidecar"):
        reference(catalog)

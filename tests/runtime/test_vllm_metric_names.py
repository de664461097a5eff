"""The torch engine's ServingMetrics also export vLLM's names (#20), so a dashboard built for vLLM
shows it: each vllm:* family with vLLM's type and labels, moved by the same hook as the kubemoe_*
series the autoscaler reads; and, against the installed vLLM (its own PrometheusStatLogger, built
in its interpreter), the same types, labels and histogram buckets."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint
from tests.engine_python import VLLM as VLLM_PYTHON

LABELS = MetricLabels(deployment="ds", role="decode", group="2", rank="0")
OURS = LABELS.as_dict()
VLLM = {"model_name": "deepseek-ai/DeepSeek-V3", "engine": "0", **OURS}

# vLLM 0.32's names and types (vllm/v1/metrics/loggers.py) for what the torch engine measures.
EXPECTED = {
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:prompt_tokens": "counter",
    "vllm:prompt_tokens_by_source": "counter",
    "vllm:prompt_tokens_cached": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:admission_rejections": "counter",
}


def _families(metrics: ServingMetrics) -> dict[str, Metric]:
    """The vllm:* families of a scrape, less prometheus_client's `*_created` timestamps (vLLM turns
    those off; they are not series a dashboard reads)."""
    parsed = text_string_to_metric_families(metrics.render().decode())
    return {f.name: f for f in parsed if f.name.startswith("vllm:") and not f.name.endswith("_created")}


def _metrics() -> ServingMetrics:
    """A serving pod's metrics once its scheduler runs (which publishes the load gauges)."""
    m = ServingMetrics(LABELS, model_name=VLLM["model_name"])
    for gauge in (m.waiting, m.running, m.kv_cache_usage):
        gauge.set(0)
    return m


def test_each_vllm_name_is_exported_with_vllms_type_and_labels() -> None:
    families = _families(_metrics())
    assert {name: f.type for name, f in families.items()} == EXPECTED
    for name in EXPECTED:
        for sample in families[name].samples:
            assert {k: sample.labels[k] for k in VLLM} == VLLM, name
    # As vLLM does, every finish reason, prompt source and admission reason is there from the start.
    success = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
    assert success == {"stop", "length", "abort", "error", "repetition"}
    sources = {s.labels["source"] for s in families["vllm:prompt_tokens_by_source"].samples}
    assert sources == {"local_compute", "local_cache_hit", "external_kv_transfer"}


def _value(metrics: ServingMetrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_one_hook_moves_both_series() -> None:
    m = _metrics()
    m.waiting.set(3)
    m.running.set(5)
    m.kv_cache_usage.set(0.625)
    for hook in (m.ttft, m.itl, m.latency):
        hook.observe(0.3)
    m.prompt_tokens.inc(100)
    m.kv_pulled_tokens.inc(40)
    m.generation_tokens.inc()
    m.generation_tokens.inc()
    m.finished("stop")
    m.finished("length")
    m.finished("stop")
    m.rejected.inc()

    pairs = {
        "kubemoe_requests_waiting": ("vllm:num_requests_waiting", 3),
        "kubemoe_requests_running": ("vllm:num_requests_running", 5),
        "kubemoe_kv_cache_usage_ratio": ("vllm:kv_cache_usage_perc", 0.625),
        "kubemoe_time_to_first_token_seconds_count": ("vllm:time_to_first_token_seconds_count", 1),
        "kubemoe_time_to_first_token_seconds_sum": ("vllm:time_to_first_token_seconds_sum", 0.3),
        "kubemoe_inter_token_latency_seconds_count": ("vllm:inter_token_latency_seconds_count", 1),
        "kubemoe_request_latency_seconds_sum": ("vllm:e2e_request_latency_seconds_sum", 0.3),
        "kubemoe_generation_tokens_total": ("vllm:generation_tokens_total", 2),
        "kubemoe_requests_rejected_total": ("vllm:admission_rejections_total", 1),
    }
    for ours, (theirs, value) in pairs.items():
        extra = {"reason": "max_num_queued_reqs"} if "admission" in theirs else {}
        assert _value(m, ours, OURS) == pytest.approx(value), ours
        assert _value(m, theirs, {**VLLM, **extra}) == pytest.approx(value), theirs

    # Prompt tokens: vLLM counts every prompt token, by where its KV came from.
    assert _value(m, "kubemoe_prompt_tokens_total", OURS) == 100
    assert _value(m, "kubemoe_kv_pulled_tokens_total", OURS) == 40
    assert _value(m, "vllm:prompt_tokens_total", VLLM) == 140
    by_source = {
        src: _value(m, "vllm:prompt_tokens_by_source_total", {**VLLM, "source": src})
        for src in ("local_compute", "external_kv_transfer", "local_cache_hit")
    }
    assert by_source == {"local_compute": 100, "external_kv_transfer": 40, "local_cache_hit": 0}
    assert _value(m, "vllm:prompt_tokens_cached_total", VLLM) == 40

    for reason, count in (("stop", 2), ("length", 1), ("abort", 0)):
        assert _value(m, "kubemoe_requests_finished_total", {**OURS, "finish_reason": reason}) == (
            count or None  # ours appears on first use
        )
        assert _value(m, "vllm:request_success_total", {**VLLM, "finished_reason": reason}) == count

    # Each histogram keeps its own buckets: 0.3 s falls in ours' 0.5 and in vLLM's TTFT 0.5 bucket,
    # but vLLM's e2e latency buckets start at 0.3.
    assert _value(m, "kubemoe_time_to_first_token_seconds_bucket", {**OURS, "le": "0.25"}) == 0
    assert _value(m, "vllm:time_to_first_token_seconds_bucket", {**VLLM, "le": "0.25"}) == 0
    assert _value(m, "vllm:e2e_request_latency_seconds_bucket", {**VLLM, "le": "0.3"}) == 1


# Run in vLLM's interpreter: its PrometheusStatLogger on a tiny checkpoint's config, every vllm:*
# family it registers as {name: {type, labels, buckets}}.
DUMP_VLLM = """
import json, sys
from prometheus_client import REGISTRY
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.metrics.loggers import PrometheusStatLogger
config = EngineArgs(model=sys.argv[1], served_model_name=["m"], enforce_eager=True).create_engine_config()
PrometheusStatLogger(config, [0])
out = {}
for family in REGISTRY.collect():
    if family.name.startswith("vllm:"):
        out[family.name] = {
            "type": family.type,
            "labels": sorted({k for s in family.samples for k in s.labels if k != "le"}),
            "buckets": sorted({float(s.labels["le"]) for s in family.samples if "le" in s.labels}),
        }
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
def test_the_installed_vllm_registers_the_same_types_labels_and_buckets(tmp_path: Path) -> None:
    python = VLLM_PYTHON.python()
    model = write_tiny_checkpoint(tmp_path / "qwen", arch="qwen3_moe", dtype=torch.float32)
    dumped = tmp_path / "vllm.json"
    done = subprocess.run(
        [python, "-c", DUMP_VLLM, str(model), str(dumped)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    theirs = json.loads(dumped.read_text())

    ours = _families(_metrics())
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    for name, family in ours.items():
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        assert family.type == theirs[name]["type"], name
        assert set(theirs[name]["labels"]) <= labels, name  # vLLM's labels, and ours besides
        if family.type == "histogram":
            buckets = sorted({float(s.labels["le"]) for s in family.samples if "le" in s.labels})
            assert buckets == theirs[name]["buckets"], name


def test_a_pod_without_a_scheduler_exports_no_load() -> None:
    # a pod still loading its weights exported waiting/running/KV usage at 0; averaged over groups by
    # the autoscaler it looked like an idle group and diluted the load the ready groups carry
    m = ServingMetrics(LABELS, model_name=VLLM["model_name"])
    for name in ("kubemoe_requests_waiting", "kubemoe_requests_running", "kubemoe_kv_cache_usage_ratio"):
        assert _value(m, name, OURS) is None, name
    assert _value(m, "vllm:num_requests_waiting", VLLM) is None
    m.waiting.set(0)  # the scheduler's first word, as it starts
    assert _value(m, "kubemoe_requests_waiting", OURS) == 0
    assert _value(m, "vllm:num_requests_waiting", VLLM) == 0

"""The kubemoe_* series derived from vLLM's /metrics text: one per pod, over all of its engines."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kubemoe_runtime.engines.vllm.metrics import autoscaler_page, kubemoe_families, needed_lines, render
from kubemoe_runtime.pod.metrics import MetricLabels

# The shape vLLM 0.32 exports, for a pod running two data-parallel engines.
TWO_ENGINES = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 4.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 10.0
vllm:generation_tokens_total{engine="1",model_name="m"} 5.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.6
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.1",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="1.0",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 1.0
vllm:time_to_first_token_seconds_count{engine="1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_sum{engine="1",model_name="m"} 2.5
"""
LABELS = MetricLabels(deployment="d", role="prefill", group="1", rank="8")


def samples(text: str) -> dict[tuple[str, str], float]:
    """(sample name, le or "") -> value, for the kubemoe_* samples."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("kubemoe_"):
                assert {k: v for k, v in s.labels.items() if k != "le"} == LABELS.as_dict()
                out[(s.name, s.labels.get("le", ""))] = s.value
    return out


def test_engines_are_summed_and_usage_averaged() -> None:
    got = samples(render(TWO_ENGINES, LABELS).decode())
    assert got[("kubemoe_requests_waiting", "")] == 5
    assert got[("kubemoe_requests_running", "")] == 5
    assert got[("kubemoe_kv_cache_usage_ratio", "")] == 0.375
    assert got[("kubemoe_generation_tokens_total", "")] == 15
    ttft = "kubemoe_time_to_first_token_seconds"
    assert [got[(f"{ttft}_bucket", le)] for le in ("0.1", "1.0", "+Inf")] == [1, 2, 3]
    assert got[(f"{ttft}_count", "")] == 3
    assert abs(got[(f"{ttft}_sum", "")] - 3.1) < 1e-9


def test_vllms_text_passes_through_and_missing_series_are_left_out() -> None:
    text = render(TWO_ENGINES, LABELS).decode()
    assert text.startswith(TWO_ENGINES)
    names = {f.name for f in kubemoe_families(TWO_ENGINES, LABELS)}
    assert "kubemoe_inter_token_latency_seconds" not in names  # vLLM did not export it here
    assert render("", LABELS) == b""  # vLLM not up yet: nothing, rather than made-up zeros


# Families whose names start like the ones read, and prometheus_client's `_created` samples: never read.
DECOYS = """\
# HELP vllm:num_requests_waiting_by_reason Requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 100.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e+09
# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source.
# TYPE vllm:prompt_tokens_by_source_total counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 7.0
"""


def test_only_the_lines_of_the_families_read_are_parsed() -> None:
    kept = needed_lines(DECOYS + TWO_ENGINES + DECOYS)
    assert kept == TWO_ENGINES  # every line of theirs, in order, and nothing of the decoys
    assert needed_lines(DECOYS) == ""
    got = samples(render(DECOYS + TWO_ENGINES, LABELS).decode())
    assert got[("kubemoe_requests_waiting", "")] == 5  # not the 100 waiting by reason
    assert ("kubemoe_prompt_tokens_total", "") not in got  # by source is not vllm:prompt_tokens


def test_the_autoscalers_page_is_the_kubemoe_series_alone() -> None:
    page = autoscaler_page(DECOYS + TWO_ENGINES, LABELS).decode()
    names = {s.name for f in text_string_to_metric_families(page) for s in f.samples}
    assert names
    assert all(name.startswith("kubemoe_") for name in names), names
    assert samples(page) == samples(render(TWO_ENGINES, LABELS).decode())
    assert autoscaler_page("", LABELS) == b""

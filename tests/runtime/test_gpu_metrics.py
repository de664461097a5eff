"""GPU metrics: DCGM names and labels from readings, and a quiet absence on a machine
without an NVIDIA driver (this one: the real NVML library is not there)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubemoe_runtime.pod.gpu_metrics import GpuCollector, GpuReading, families

SERVING = {"deployment": "ds", "role": "decode", "group": "0", "rank": "3"}


def test_readings_become_dcgm_series_with_gpu_and_serving_labels() -> None:
    reading = GpuReading(
        index=1,
        uuid="GPU-8e2f",
        name="NVIDIA H200",
        util_percent=87.0,
        fb_used_mib=100_000.0,
        fb_total_mib=143_771.0,
        power_watts=612.5,
        temperature_c=61.0,
        sm_clock_mhz=1980.0,
    )
    registry = CollectorRegistry()

    class Fixed:
        def collect(self) -> list[object]:
            return list(families([reading], SERVING))

    registry.register(Fixed())  # type: ignore[arg-type]
    parsed = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    util = parsed["DCGM_FI_DEV_GPU_UTIL"].samples[0]
    assert util.value == 87.0
    assert util.labels == {
        "gpu": "1",
        "UUID": "GPU-8e2f",
        "device": "nvidia1",
        "modelName": "NVIDIA H200",
        **SERVING,
    }
    assert parsed["DCGM_FI_DEV_FB_FREE"].samples[0].value == pytest.approx(43_771.0)
    assert parsed["DCGM_FI_DEV_POWER_USAGE"].samples[0].value == 612.5
    assert {
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_TOTAL",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_SM_CLOCK",
    } <= set(parsed)


def test_without_a_driver_the_gauges_are_absent_and_one_line_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kubemoe_runtime.pod.gpu_metrics")
    collector = GpuCollector(SERVING)
    if collector.enabled:
        pytest.skip("this machine has an NVIDIA driver; the no-driver path cannot be observed here")
    registry = CollectorRegistry()
    registry.register(collector)
    assert b"DCGM_FI_" not in generate_latest(registry)
    lines = [r.getMessage() for r in caplog.records if "GPU metrics off" in r.getMessage()]
    assert len(lines) == 1
    assert "NVML" in lines[0]

"""GPU metrics: kubemoe_gpu_* names in base units and dcgm-exporter's GPU labels from readings, and a
quiet absence on a machine without an NVIDIA driver (this one: the real NVML library is not there)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubemoe_runtime.pod.gpu_metrics import GpuCollector, GpuReading, describe, families

SERVING = {"deployment": "ds", "role": "decode", "group": "0", "rank": "3"}
GIB = 1 << 30


class Fixed:
    def __init__(self, readings: list[GpuReading]) -> None:
        self.readings = readings

    def collect(self) -> list[object]:
        return list(families(self.readings, SERVING))


def _scrape(*readings: GpuReading) -> dict[str, object]:
    registry = CollectorRegistry()
    registry.register(Fixed(list(readings)))  # type: ignore[arg-type]
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_readings_become_kubemoe_gpu_series_with_gpu_and_serving_labels() -> None:
    reading = GpuReading(
        index=1,
        uuid="GPU-8e2f",
        name="NVIDIA H200",
        utilization_ratio=0.87,
        memory_used_bytes=100 * GIB,
        memory_total_bytes=141 * GIB,
        power_watts=612.5,
        temperature_celsius=61.0,
        sm_clock_hertz=1.98e9,
    )
    parsed = _scrape(reading)
    util = parsed["kubemoe_gpu_utilization_ratio"].samples[0]  # type: ignore[attr-defined]
    assert util.value == 0.87
    assert util.labels == {
        "gpu": "1",
        "UUID": "GPU-8e2f",
        "device": "nvidia1",
        "modelName": "NVIDIA H200",
        **SERVING,
    }
    value = {name: f.samples[0].value for name, f in parsed.items()}  # type: ignore[attr-defined]
    assert value["kubemoe_gpu_memory_free_bytes"] == 41 * GIB
    assert value["kubemoe_gpu_memory_used_bytes"] == 100 * GIB
    assert value["kubemoe_gpu_memory_total_bytes"] == 141 * GIB
    assert value["kubemoe_gpu_power_watts"] == 612.5
    assert value["kubemoe_gpu_temperature_celsius"] == 61.0
    assert value["kubemoe_gpu_sm_clock_hertz"] == 1.98e9
    assert value["kubemoe_gpu_info"] == 1.0
    assert not [name for name in parsed if name.startswith("DCGM_")]  # no doubling beside dcgm-exporter


def test_describe_names_what_a_scrape_exports() -> None:
    reading = GpuReading(0, "GPU-1", "NVIDIA H200", 0.5, 1.0, 2.0, 3.0, 4.0, 5.0)
    described = {f.name: (f.type, f.documentation) for f in describe(SERVING)}
    scraped = {name: (f.type, f.documentation) for name, f in _scrape(reading).items()}  # type: ignore[attr-defined]
    assert described == scraped
    assert all(name.startswith("kubemoe_gpu_") for name in described)


def test_without_a_driver_the_gauges_are_absent_and_one_line_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kubemoe_runtime.pod.gpu_metrics")
    collector = GpuCollector(SERVING)
    if collector.enabled:
        pytest.skip("this machine has an NVIDIA driver; the no-driver path cannot be observed here")
    registry = CollectorRegistry()
    registry.register(collector)
    assert b"kubemoe_gpu_" not in generate_latest(registry)
    lines = [r.getMessage() for r in caplog.records if "GPU metrics off" in r.getMessage()]
    assert len(lines) == 1
    assert "NVML" in lines[0]

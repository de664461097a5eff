"""GPU metrics through NVML (nvidia-ml-py), as `kubemoe_gpu_*` series in base units.

Utilisation as a ratio (0..1), memory in bytes, power in watts, temperature in degrees Celsius and the
SM clock in hertz (Prometheus' naming conventions), each labelled with dcgm-exporter's GPU labels
(`gpu` index, `UUID`, `device`, `modelName`) plus the serving labels (deployment, role, group, rank)
so the autoscaler and the dashboard can select a role:

    kubemoe_gpu_info                     1 per GPU: which deployment, role, group and rank use it
    kubemoe_gpu_utilization_ratio        share of the last sample period a kernel ran (NVML, 0..1)
    kubemoe_gpu_memory_used_bytes        framebuffer memory in use
    kubemoe_gpu_memory_free_bytes        framebuffer memory free (total - used)
    kubemoe_gpu_memory_total_bytes       framebuffer memory
    kubemoe_gpu_power_watts              power draw
    kubemoe_gpu_temperature_celsius      GPU temperature
    kubemoe_gpu_sm_clock_hertz           SM clock

Names of our own, not dcgm-exporter's `DCGM_FI_*`: on a cluster that also runs dcgm-exporter a sum
over `DCGM_FI_DEV_POWER_USAGE` would otherwise count every GPU twice. The labels are dcgm-exporter's,
so its series join ours on `UUID` (`kubemoe_gpu_info` gives them the serving labels; docs/monitoring.md).

With no NVIDIA driver (a CPU node, a laptop) the collector yields nothing and one log line
says why; nothing fails.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import pynvml
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "kubemoe_gpu_"
INFO = "kubemoe_gpu_info"
GPU_LABELS = ("gpu", "UUID", "device", "modelName")
"""dcgm-exporter's label names, so that its series and ours join on UUID."""


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    utilization_ratio: float
    memory_used_bytes: float
    memory_total_bytes: float
    power_watts: float
    temperature_celsius: float
    sm_clock_hertz: float


# (series name, help, reading attribute)
FIELDS: tuple[tuple[str, str, str], ...] = (
    (
        "kubemoe_gpu_utilization_ratio",
        "Fraction of the last sample period in which a kernel ran on the GPU (NVML utilization.gpu, 0..1)",
        "utilization_ratio",
    ),
    ("kubemoe_gpu_memory_used_bytes", "Framebuffer memory in use, in bytes", "memory_used_bytes"),
    ("kubemoe_gpu_memory_total_bytes", "Framebuffer memory, in bytes", "memory_total_bytes"),
    ("kubemoe_gpu_power_watts", "Power draw, in watts", "power_watts"),
    ("kubemoe_gpu_temperature_celsius", "GPU temperature, in degrees Celsius", "temperature_celsius"),
    ("kubemoe_gpu_sm_clock_hertz", "SM clock frequency, in hertz", "sm_clock_hertz"),
)
MEMORY_FREE = ("kubemoe_gpu_memory_free_bytes", "Framebuffer memory free (total - used), in bytes")
INFO_HELP = "1 for each GPU this pod uses, labelled with the deployment, role, group and rank using it"


def describe(serving_labels: Iterable[str]) -> list[GaugeMetricFamily]:
    """The families the collector exports, with no samples: what a reference or a dashboard check
    needs to know without a GPU."""
    return families((), dict.fromkeys(serving_labels, ""))


def families(readings: Iterable[GpuReading], serving: Mapping[str, str]) -> list[GaugeMetricFamily]:
    """Readings -> metric families (pure: tested without a GPU)."""
    keys = [*GPU_LABELS, *serving]
    out = {INFO: GaugeMetricFamily(INFO, INFO_HELP, labels=keys)}
    out |= {name: GaugeMetricFamily(name, doc, labels=keys) for name, doc, _ in FIELDS}
    out[MEMORY_FREE[0]] = GaugeMetricFamily(MEMORY_FREE[0], MEMORY_FREE[1], labels=keys)
    for r in readings:
        values = [str(r.index), r.uuid, f"nvidia{r.index}", r.name, *serving.values()]
        out[INFO].add_metric(values, 1.0)
        for name, _doc, attr in FIELDS:
            out[name].add_metric(values, float(getattr(r, attr)))
        out[MEMORY_FREE[0]].add_metric(values, r.memory_total_bytes - r.memory_used_bytes)
    return list(out.values())


def _read(index: int) -> GpuReading:
    h = pynvml.nvmlDeviceGetHandleByIndex(index)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    return GpuReading(
        index=index,
        uuid=str(pynvml.nvmlDeviceGetUUID(h)),
        name=str(pynvml.nvmlDeviceGetName(h)),
        utilization_ratio=float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu) / 100.0,
        memory_used_bytes=float(mem.used),
        memory_total_bytes=float(mem.total),
        power_watts=pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,  # NVML: milliwatts
        temperature_celsius=float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
        sm_clock_hertz=float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)) * 1e6,  # NVML: MHz
    )


class GpuCollector(Collector):
    """A prometheus_client collector; register it on the server's registry."""

    def __init__(self, serving: Mapping[str, str]) -> None:
        self.serving = dict(serving)
        self.count = 0
        try:
            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as err:
            log.warning("GPU metrics off: NVML unavailable (%s); no %s* series are exported", err, PREFIX)
            return
        log.info("GPU metrics on: %d GPU(s) through NVML", self.count)

    @property
    def enabled(self) -> bool:
        return self.count > 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.enabled:
            return iter(())
        try:
            readings = [_read(i) for i in range(self.count)]
        except pynvml.NVMLError as err:  # a GPU fell off the bus: report what we can next time
            log.warning("NVML read failed: %s", err)
            return iter(())
        return iter(families(readings, self.serving))

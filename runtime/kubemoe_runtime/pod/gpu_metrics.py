"""GPU metrics through NVML (nvidia-ml-py), under the names dcgm-exporter uses.

Existing DCGM dashboards and alerts work unchanged: utilisation, framebuffer used/free/total,
power, temperature and SM clock, each labelled with gpu (index), UUID, device and modelName,
plus the serving labels (deployment, role, group, rank) so the autoscaler can select a role.

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


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    util_percent: float
    fb_used_mib: float
    fb_total_mib: float
    power_watts: float
    temperature_c: float
    sm_clock_mhz: float


# (DCGM field name, help, reading attribute) — units as dcgm-exporter reports them.
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "util_percent"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "fb_used_mib"),
    ("DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB).", "fb_total_mib"),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "power_watts"),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "temperature_c"),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "sm_clock_mhz"),
)
FB_FREE = ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).")


def families(readings: Iterable[GpuReading], serving: Mapping[str, str]) -> list[GaugeMetricFamily]:
    """Readings -> metric families (pure: tested without a GPU)."""
    keys = ["gpu", "UUID", "device", "modelName", *serving]
    out = {name: GaugeMetricFamily(name, doc, labels=keys) for name, doc, _ in FIELDS}
    out[FB_FREE[0]] = GaugeMetricFamily(FB_FREE[0], FB_FREE[1], labels=keys)
    for r in readings:
        values = [str(r.index), r.uuid, f"nvidia{r.index}", r.name, *serving.values()]
        for name, _doc, attr in FIELDS:
            out[name].add_metric(values, float(getattr(r, attr)))
        out[FB_FREE[0]].add_metric(values, r.fb_total_mib - r.fb_used_mib)
    return list(out.values())


def _read(index: int) -> GpuReading:
    h = pynvml.nvmlDeviceGetHandleByIndex(index)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    mib = 1024 * 1024
    return GpuReading(
        index=index,
        uuid=str(pynvml.nvmlDeviceGetUUID(h)),
        name=str(pynvml.nvmlDeviceGetName(h)),
        util_percent=float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
        fb_used_mib=mem.used / mib,
        fb_total_mib=mem.total / mib,
        power_watts=pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
        temperature_c=float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
        sm_clock_mhz=float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
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
            log.warning("GPU metrics off: NVML unavailable (%s); no DCGM_FI_* series are exported", err)
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

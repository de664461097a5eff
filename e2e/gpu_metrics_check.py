"""The GPU check, for a machine with an NVIDIA GPU (not a test: CI has none).

    python -m e2e.gpu_metrics_check [--seconds 8]

Serves the runtime's GpuCollector on a prometheus_client endpoint (as `serve` does on /metrics),
reads kubemoe_gpu_utilization_ratio (0..1) over HTTP while idle, then while a torch matmul loop keeps GPU 0
busy, and exits 0 only if utilisation rose. Prints every reading.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import urllib.request

import torch
from prometheus_client import CollectorRegistry, start_http_server

from kubemoe_runtime.pod.gpu_metrics import GpuCollector
from kubemoe_runtime.pod.ports import free_port

SERVING = {"deployment": "gpu-check", "role": "decode", "group": "0", "rank": "0"}


def gpu_util(url: str) -> float | None:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("kubemoe_gpu_utilization_ratio{") and 'gpu="0"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def matmul_load(stop: threading.Event) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    seconds = parser.parse_args().seconds
    registry = CollectorRegistry()
    collector = GpuCollector(SERVING)
    if not collector.enabled:
        print("no GPU through NVML: nothing to check")
        return 2
    registry.register(collector)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        idle = []
        for _ in range(3):
            time.sleep(0.5)
            idle.append(gpu_util(url))
        print("idle   kubemoe_gpu_utilization_ratio:", idle)
        stop = threading.Event()
        worker = threading.Thread(target=matmul_load, args=(stop,))
        worker.start()
        busy = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(1.0)
            busy.append(gpu_util(url))
            print(f"loaded kubemoe_gpu_utilization_ratio: {busy[-1]}")
        stop.set()
        worker.join()
        with urllib.request.urlopen(url, timeout=5) as resp:
            print(
                "\n".join(
                    line for line in resp.read().decode().splitlines() if line.startswith("kubemoe_gpu_")
                )
            )
    finally:
        server.shutdown()
        thread.join(timeout=5)
    rose = max(v or 0.0 for v in busy) > max(v or 0.0 for v in idle) + 0.2
    print("GPU utilisation rose under load" if rose else "GPU utilisation did NOT rise")
    return 0 if rose else 1


if __name__ == "__main__":
    sys.exit(main())

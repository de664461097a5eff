"""The routed experts of one MoE layer, on every path this CPU runs, at decode's and prefill's row counts.

Paths (kernels/moe.py): each C kernel this CPU can run (amx: AMX tiles from 3 rows an expert, its
AVX512-BF16 dot products below; avx512bf16: AVX512-BF16 dot products; avx2: bf16 widened in registers,
float FMAs), the torch path (LocalExperts on its row-major bf16 stacks, as a CPU without the
kernels runs it), and where oneDNN does bf16, the torch path's grouped and looped forms each forced (the
torch path picks one by rows an expert). All run through `LocalExperts.forward`, on the same weights,
interleaved repeat by repeat (so a noisy moment hits every path), best of the repeats kept. Two layer shapes:

    bench model    32 experts of 512, hidden 1024, top-4 (bigmoe.py's 425 M model): 8 layers of distinct
                   weights in turn, so that no layer's experts are still in cache when it runs again
    Qwen3-30B-A3B  128 experts of 768, hidden 2048, top-8: 2 layers (1.2 GB of experts each)

Rows are tokens, each routed uniformly at random. Printed: the CPU's flags and the path the engine would
choose here; per rows and path: ms per layer, the expert weight bytes read per second, their share of
the read bandwidth (a torch sum and max over 1 GiB, timed in the same repeats as the paths, the faster
kept: the bound of the same moments, on a machine whose bandwidth others share; a kernel that prefetches
can beat it by ~10%), and the speed-up over the torch path in this run. A machine with AVX-512 shows an
AVX2 machine's torch path too when torch's and oneDNN's instruction sets are capped (oneDNN then does
no bf16, as on AVX2, and the forced forms drop out):

    PYTHONPATH=$PWD .venv/bin/python bench/bench_moe_kernel.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 PYTHONPATH=$PWD .venv/bin/python \
        bench/bench_moe_kernel.py

Env: BENCH_MOE_SHAPES=bench,qwen3 (which shapes), BENCH_MOE_ROWS=1,4,16,64,128,512 (tokens: decode's
batches, then a 128-token prompt and a 512-token one).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Final

import torch
from bigmoe import Layout, read_bandwidth_gbs, threads

from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.model.moe import LocalExperts
from kubemoe_runtime.engines.torch.model.packing import can_pack

ROWS: Final = tuple(int(r) for r in os.environ.get("BENCH_MOE_ROWS", "1,4,16,64,128,512").split(","))
TORCH: Final = "torch"
# The torch path's two forms where oneDNN does bf16, each forced (LocalExperts.GROUPED_MAX_ROWS); TORCH
# picks between them by rows as the engine does
GROUPED: Final = "torch grouped"
LOOPED: Final = "torch looped"
FORMS: Final = {GROUPED: 1 << 30, LOOPED: 0}


@dataclass(frozen=True)
class Shape:
    name: str
    experts: int
    expert_hidden: int
    hidden: int
    top_k: int
    layers: int  # of distinct weights, run in turn

    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.expert_hidden * 2


BENCH: Final = Layout()
SHAPES: Final = {
    "bench": Shape("bench model", BENCH.experts, BENCH.expert_hidden, BENCH.hidden, BENCH.top_k, 8),
    "qwen3": Shape("Qwen3-30B-A3B", 128, 768, 2048, 8, 2),
}


def make_layers(shape: Shape) -> list[LocalExperts]:
    """Row-major bf16 layers (the kernels and the torch path read these), filled expert by expert."""
    layers = []
    for seed in range(shape.layers):
        gen = torch.Generator().manual_seed(seed)
        layer = LocalExperts(dim=shape.hidden, hidden=shape.expert_hidden, experts=range(shape.experts))
        layer.w_gate_up_E2FD.data = torch.empty(layer.w_gate_up_E2FD.shape, dtype=torch.bfloat16)
        layer.w_down_EDF.data = torch.empty(layer.w_down_EDF.shape, dtype=torch.bfloat16)
        for e in range(shape.experts):
            layer.w_gate_up_E2FD.data[e].normal_(0, 0.03, generator=gen)
            layer.w_down_EDF.data[e].normal_(0, 0.04, generator=gen)
        layer.requires_grad_(False)
        layers.append(layer)
    return layers


def use(path: str, layers: list[LocalExperts]) -> None:
    """Route these layers to `path` as the engine would: the kernel through load(), forced by env."""
    if path in moe_kernel.PATHS:
        os.environ[moe_kernel.FORCE_ENV] = path
        moe_kernel.load.cache_clear()
        assert moe_kernel.path() == path, moe_kernel.describe()
    for layer in layers:
        layer.kernel = path in moe_kernel.PATHS
        layer.GROUPED_MAX_ROWS = FORMS.get(path, LocalExperts.GROUPED_MAX_ROWS)


def run_shape(shape: Shape, paths: list[str], probe: torch.Tensor) -> None:
    layers = make_layers(shape)
    total = shape.layers * shape.experts * shape.expert_bytes() / 1e9
    print(
        f"\n## {shape.name}: {shape.experts} experts of {shape.expert_hidden}, hidden {shape.hidden}, "
        f"top-{shape.top_k}, bf16; {shape.layers} layers of distinct weights ({total:.1f} GB)"
    )
    head = ("rows", 5), ("experts", 7), ("path", 13), ("ms/layer", 9), ("GB/s", 6), ("of bound", 8)
    print(" ".join(f"{name:>{width}}" for name, width in head), f"{'vs torch':>8}")
    for rows in ROWS:
        gen = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, shape.hidden, generator=gen).bfloat16()
        routes = [
            torch.stack([torch.randperm(shape.experts, generator=gen)[: shape.top_k] for _ in range(rows)])
            for _ in layers
        ]
        w = torch.softmax(torch.randn(rows, shape.top_k, generator=gen), dim=-1)
        distinct = sum(len(set(ids.flatten().tolist())) for ids in routes) / len(routes)
        best = dict.fromkeys(paths, float("inf"))
        read = float("inf")
        with torch.inference_mode():
            # the first is a warm-up, not kept; short passes get more repeats, as noise hits them hardest
            for repeat in range(1 + (16 if rows <= 4 else 8 if rows <= 16 else 4)):
                for reduce in (torch.sum, torch.amax):  # the faster reduction here sets the bound
                    started = time.perf_counter()
                    reduce(probe)
                    read = min(read, time.perf_counter() - started)
                for path in paths:
                    use(path, layers)
                    started = time.perf_counter()
                    for layer, ids in zip(layers, routes, strict=True):
                        layer(x, ids, w)
                    if repeat:
                        best[path] = min(best[path], (time.perf_counter() - started) / len(layers))
        gb = distinct * shape.expert_bytes() / 1e9
        bandwidth = probe.numel() * probe.element_size() / read / 1e9
        print(f"{rows:>5} {distinct:>7.1f} {'read bound':>13} {'':>9} {bandwidth:>6.1f} {'100%':>8}")
        for path in paths:
            t = best[path]
            print(
                f"{rows:>5} {distinct:>7.1f} {path:>13} {t * 1e3:>9.3f} {gb / t:>6.1f} "
                f"{gb / t / bandwidth:>8.0%} {best[TORCH] / t:>7.2f}x"
            )


def main() -> None:
    torch.set_num_threads(threads())
    flags = moe_kernel.cpu_flags()
    shown = " ".join(f for f in moe_kernel.SHOWN_FLAGS if f in flags)
    capped = " ".join(
        f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ
    )
    onednn_bf16 = can_pack(torch.bfloat16, torch.device("cpu"))
    print(f"# CPU {platform.machine()}, flags: {shown or 'none of ' + ' '.join(moe_kernel.SHOWN_FLAGS)}")
    print(
        f"# torch {torch.__version__}: ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
        f"{'yes' if onednn_bf16 else 'no'}{' (' + capped + ')' if capped else ''}; {threads()} threads"
    )
    print(f"# the engine here: {moe_kernel.describe()}")
    kernels = []
    for path in moe_kernel.PATHS:
        if moe_kernel.kernel(path) is None:
            print(f"# {path} kernel skipped: {moe_kernel.why_not(path)}")
        else:
            kernels.append(path)
    paths = [*kernels, TORCH, *([GROUPED, LOOPED] if onednn_bf16 else [])]
    start = read_bandwidth_gbs()
    probe = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB: the read bound, timed with the paths
    chosen = os.environ.get("BENCH_MOE_SHAPES", "bench,qwen3").split(",")
    forced = os.environ.get(moe_kernel.FORCE_ENV)
    try:
        for name in chosen:
            run_shape(SHAPES[name], paths, probe)
    finally:
        if forced is None:
            os.environ.pop(moe_kernel.FORCE_ENV, None)
        else:
            os.environ[moe_kernel.FORCE_ENV] = forced
        moe_kernel.load.cache_clear()
    print(
        f"\n# read bandwidth (torch sum over 1 GiB, best of 5): {start:.1f} GB/s at the start, "
        f"{read_bandwidth_gbs():.1f} at the end; each table's 'read bound' (sum or max, the faster) is "
        "timed with its rows' repeats"
    )


if __name__ == "__main__":
    main()

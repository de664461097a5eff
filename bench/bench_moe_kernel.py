"""The routed experts of one MoE layer: the C kernel (kernels/moe_bf16.c) against the torch path it replaces.

Both run through `LocalExperts.forward` on the benchmark layout's expert shapes (32 experts of 512,
hidden 1024, top-4, bf16), over 8 layers' worth of distinct weights in turn so that no layer's experts are
still in cache when it runs again, as in a real decode step. Rows are tokens; each is routed uniformly at
random. Printed: ms per layer, the expert weight bytes read per second (against the read bandwidth
measured here), and the kernel's speed-up over packed oneDNN GEMMs (the engine's path before the kernel).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_moe_kernel.py
"""

from __future__ import annotations

import time
from typing import Final

import torch
from bigmoe import Layout, read_bandwidth_gbs, threads

from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.model.moe import LocalExperts

ROWS: Final = (1, 4, 16, 64, 256, 2048)
LAYERS: Final = 8


def make_layers(layout: Layout, *, kernel: bool) -> list[LocalExperts]:
    layers = []
    for seed in range(LAYERS):
        gen = torch.Generator().manual_seed(seed)
        experts = LocalExperts(dim=layout.hidden, hidden=layout.expert_hidden, experts=range(layout.experts))
        shape13, shape2 = experts.w_gate_up_E2FD.shape, experts.w_down_EDF.shape
        experts.w_gate_up_E2FD.data = (torch.randn(shape13, generator=gen) * 0.03).bfloat16()
        experts.w_down_EDF.data = (torch.randn(shape2, generator=gen) * 0.04).bfloat16()
        experts.requires_grad_(False)
        if kernel:
            experts.pack()
            assert experts.kernel
            experts.KERNEL_MAX_ROWS = 1 << 30  # the kernel at every size (the engine: to 64 rows an expert)
        else:
            experts.pack_experts()  # the packed path (pack() would pick the kernel)
        layers.append(experts)
    return layers


def per_layer_seconds(layers: list[LocalExperts], rows: int, layout: Layout) -> tuple[float, float]:
    """Best time of a pass over the layers, per layer; and the distinct experts a layer read on average."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, layout.hidden, generator=gen).bfloat16()
    routes = [
        torch.stack([torch.randperm(layout.experts, generator=gen)[: layout.top_k] for _ in range(rows)])
        for _ in layers
    ]
    w = torch.softmax(torch.randn(rows, layout.top_k, generator=gen), dim=-1)
    repeats = 10 if rows <= 64 else 2
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            started = time.perf_counter()
            for layer, ids in zip(layers, routes, strict=True):
                layer(x, ids, w)
            best = min(best, time.perf_counter() - started)
    distinct = sum(len(set(ids.flatten().tolist())) for ids in routes) / len(routes)
    return best / len(layers), distinct


def main() -> None:
    layout = Layout()
    if moe_kernel.load() is None or not moe_kernel.fits(layout.hidden, layout.expert_hidden):
        print("# skipped: the MoE kernel is off (needs x86-64 AVX512-BF16, a C compiler, KUBEMOE_KERNELS!=0)")
        return  # not a failure: `make bench` goes on to the other benchmarks
    torch.set_num_threads(threads())
    bandwidth = read_bandwidth_gbs()
    shape = f"{layout.experts}x{layout.expert_hidden}, hidden {layout.hidden}, top-{layout.top_k}"
    print(f"# experts {shape}, bf16;")
    print(f"# {threads()} threads; {LAYERS} layers of distinct weights; read bandwidth {bandwidth:.1f} GB/s")
    kernel, packed = make_layers(layout, kernel=True), make_layers(layout, kernel=False)
    head = ("rows", 5), ("experts", 7), ("kernel ms", 9), ("GB/s", 6), ("packed ms", 9), ("GB/s", 6)
    print(" ".join(f"{name:>{width}}" for name, width in head), f"{'speed-up':>8}")
    for rows in ROWS:
        t_kernel, distinct = per_layer_seconds(kernel, rows, layout)
        t_packed, _ = per_layer_seconds(packed, rows, layout)
        gb = distinct * layout.expert_bytes() / 1e9
        print(
            f"{rows:>5} {distinct:>7.1f} {t_kernel * 1e3:>9.3f} {gb / t_kernel:>6.1f} "
            f"{t_packed * 1e3:>9.3f} {gb / t_packed:>6.1f} {t_packed / t_kernel:>7.2f}x"
        )


if __name__ == "__main__":
    main()

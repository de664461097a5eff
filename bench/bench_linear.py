"""One dense bf16 projection (attention, LM head) on every path this CPU runs, by rows, in one run.

Paths: torch's own bf16 `F.linear` on the row-major weight; the linear kernel of each instruction set
(kernels/moe_bf16.c `kubemoe_linear_bf16`: the bf16 weight read once, float sums; with AMX, moe_amx.c's
`kubemoe_linear_amx` on tiles); float32 (weight and
rows widened for the call, torch's float32 GEMM: MKL/oneDNN); and where oneDNN does bf16, its packed
weight (packing.py). The engine's choice (kernels/linear.py `form`) on a CPU whose torch bf16 GEMM is slow:
the kernel up to KERNEL_MAX_ROWS rows, float32 past it; with AMX: the kernel at 1-2 rows, tiles up to
TILES_MAX_ROWS, torch's bf16 past it. This bench is where those numbers come from.

Every path runs interleaved with the others, repeat by repeat, best kept; speed-ups are against torch's
bf16 in the same run. Each call takes the next of enough distinct weights to fill twice the last-level
cache (a server's L3 holds hundreds of MB), so weights stream from memory, as the engine's do at decode.
Run it as an AVX2-only CPU runs it on an AVX-512 machine with
KUBEMOE_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2.

Env: BENCH_LINEAR_ROWS=1,4,16,32,64,256, BENCH_LINEAR_SHAPE=3072x1024 (out x in).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path as SysPath
from typing import Final

import torch
import torch.nn.functional as F
from bigmoe import threads

from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.kernels.linear import form, kernel_linear
from kubemoe_runtime.engines.torch.model.packing import can_pack, pack, packed_linear

ROWS: Final = tuple(int(r) for r in os.environ.get("BENCH_LINEAR_ROWS", "1,4,16,32,64,256").split(","))
OUT, IN = (int(n) for n in os.environ.get("BENCH_LINEAR_SHAPE", "3072x1024").split("x"))
REPEATS: Final = 15  # per path and rows, each on another weight


LinearPath = Callable[[torch.Tensor, int], torch.Tensor]  # (rows, weight index) -> output


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (sysfs), 32 MiB where it cannot be read."""
    sizes = []
    for entry in SysPath("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def paths(ws: list[torch.Tensor]) -> dict[str, LinearPath]:
    found: dict[str, LinearPath] = {"torch bf16": lambda x, i: F.linear(x, ws[i])}
    for path in moe_kernel.PATHS:
        lib = moe_kernel.library(path)
        if lib is None:
            print(f"# {path} kernel skipped: {moe_kernel.why_not(path)}")
            continue
        # the amx library's dot products are avx512bf16's code (moe_amx.c includes moe_bf16.c): its tiles
        fn, name = (lib.linear_tiles, "amx tiles") if lib.linear_tiles else (lib.linear, f"{path} kernel")
        found[name] = lambda x, i, fn=fn: kernel_linear(x, ws[i], fn=fn)  # type: ignore[misc]
    found["float32"] = lambda x, i: F.linear(x.float(), ws[i].float()).to(torch.bfloat16)
    if can_pack(torch.bfloat16, torch.device("cpu")):
        packed = [pack(w) for w in ws]
        found["oneDNN packed"] = lambda x, i: packed_linear(x, packed[i])
    return found


def main() -> None:
    torch.set_num_threads(threads())
    flags = moe_kernel.cpu_flags()
    capped = " ".join(
        f"{k}={os.environ[k]}"
        for k in (moe_kernel.ISA_ENV, "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
        if k in os.environ
    )
    shown = " ".join(sorted(flags & set(moe_kernel.SHOWN_FLAGS)))
    print(f"# CPU {platform.machine()} flags (as the engine sees them): {shown}")
    aten = torch.backends.cpu.get_cpu_capability()
    print(f"# torch {torch.__version__}, ATen {aten}, {threads()} threads{'; ' + capped if capped else ''}")
    if moe_kernel.fast_bf16_gemm() and not moe_kernel.tiles():
        print("# the engine here: torch's bf16 (oneDNN; packed where it can)")
    else:
        forms = ", ".join(f"{rows} rows: {form(rows, IN, OUT)}" for rows in ROWS)
        print(f"# the engine here (kernels/linear.py form): {forms}")
    gen = torch.Generator().manual_seed(0)
    n_weights = max(2, math.ceil(2 * last_level_cache_bytes() / (OUT * IN * 2)))
    ws = [(torch.randn(OUT, IN, generator=gen) / IN**0.5).bfloat16() for _ in range(n_weights)]
    llc_mib = last_level_cache_bytes() >> 20
    print(f"# {n_weights} distinct weights in turn: twice the {llc_mib} MiB last-level cache")
    found = paths(ws)
    print(f"# [rows, {IN}] x [{IN}, {OUT}] bf16 ({OUT * IN * 2 / 1e6:.1f} MB of weight); vs torch's bf16")
    print(f"{'rows':>5} {'path':>16} {'ms':>9} {'GFLOP/s':>8} {'speed-up':>9}")
    for rows in ROWS:
        x = torch.randn(rows, IN, generator=gen).bfloat16()
        best = dict.fromkeys(found, float("inf"))
        turn = 0
        for repeat in range(REPEATS + 1):
            for name, fn in found.items():
                turn = (turn + 1) % n_weights
                started = time.perf_counter()
                fn(x, turn)
                if repeat:  # the first round warms up
                    best[name] = min(best[name], time.perf_counter() - started)
        flop = 2 * rows * IN * OUT
        for name, t in best.items():
            print(
                f"{rows:>5} {name:>16} {t * 1e3:>9.3f} {flop / t / 1e9:>8.1f} {best['torch bf16'] / t:>8.2f}x"
            )


if __name__ == "__main__":
    main()

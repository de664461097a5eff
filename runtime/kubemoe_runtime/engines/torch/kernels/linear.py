"""bf16 dense projections on the engine's kernels, where they beat torch's own bf16 matmul.

CPUs without AVX-512 (AVX2 + FMA only): torch has no oneDNN bf16 there and multiplies bf16 matrices in a
scalar loop: a [16, 1024] x [1024, 3072] product takes 7 times as long as in float32, so batch-16 decode ran
slower than batch 1. CPUs with AMX tiles: oneDNN's bf16 GEMM (torch's, packed or not) reads a weight at
about 40% of memory bandwidth at decode's rows, the kernels at 60-70%. CPUs with AVX512-BF16 and no AMX
(Zen 4): oneDNN's packed weights at one row ran at about half the kernel's speed (`beats_packing`). The
forms, by rows (`form`):

    kernel   dot products, `kubemoe_linear_bf16` (moe_bf16.c): the bf16 weights read once from memory,
             float sums, one rounding; up to KERNEL_MAX_ROWS rows without AVX-512, up to DOTS_MAX_ROWS
             with AVX512-BF16 and no tiles, and below TILES_MIN_ROWS where there are tiles
    tiles    AMX, `kubemoe_linear_amx` (moe_amx.c): TILES_MIN_ROWS to TILES_MAX_ROWS rows
    bf16     torch's own bf16 linear (oneDNN): past TILES_MAX_ROWS on an AMX CPU, past DOTS_MAX_ROWS with
             AVX512-BF16 and no tiles; elsewhere below FLOAT32_MIN_ROWS rows, where widening the weight
             costs more than torch's bf16 loop
    float32  without AVX-512 past KERNEL_MAX_ROWS (prefill), or from FLOAT32_MIN_ROWS without a kernel:
             weights and rows widened to float32 for that call and multiplied by torch's float32 GEMM
             (MKL/oneDNN), then rounded once; the widening reads the weights once, a small share of a
             GEMM over many rows

All round once from float sums, as torch's bf16 linear does. `matmul` is the float32 form alone (what the
torch MoE path uses for an expert's rows on a CPU without AVX-512).
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from kubemoe_runtime.engines.torch.kernels import moe as kernels

# Up to here the kernel wins (it reads the bf16 weights once); past it a float32 GEMM's blocking does. As an
# AVX2 CPU (bench/bench_linear.py, KUBEMOE_CPU_ISA=avx2 and the library caps, weights streamed from memory),
# [M, 1024] x [1024, 3072] in ms, kernel against float32: 16 rows 1.26 / 1.79, 24 rows 1.88 / 2.15,
# 32 rows 2.46 / 2.54, 64 rows 6.79 / 5.14 (torch's own bf16: 3.9, 5.7, 7.4, 19.1)
KERNEL_MAX_ROWS: Final = 32
# With AMX (bench/bench_linear.py, [M, 1024] x [1024, 1536], weights streamed, ms), dots / tiles / torch's
# bf16 / oneDNN packed: 1 row 0.19 / 0.22 / 0.38 / 0.45, 4 rows 0.23 / 0.23 / 0.37 / 0.43, 16 rows
# 0.53 / 0.24 / 0.37 / 0.41, 128 rows 3.1 / 0.38 / 0.60 / 0.38, 256 rows 6.9 / 0.71 / 0.94 / 1.2,
# 2048 rows 83 / 11.2 / 7.3 / 7.8
TILES_MIN_ROWS: Final = 3
TILES_MAX_ROWS: Final = 256
# With AVX512-BF16 and no AMX (Zen 4, bench/bench_linear.py, [M, 1024] x [1024, 3072], weights streamed, ms),
# dots / torch's bf16 / oneDNN packed: 1 row 0.24 / 0.51 / 0.37, 4 rows 0.27 / 0.52 / 0.38, 8 rows
# 0.37 / 0.63 / 0.44, 16 rows 0.57 / 0.74 / 0.55, 32 rows 0.97 / 0.83 / 0.72, 1024 rows 24.6 / 15.5 / 15.3.
# In the engine (bench model, 2 threads, six old/new pairs, medians): decode@1 100 -> 111 tokens/s,
# decode@16 and prefill unchanged within the noise (431 -> 417, 1890 -> 1924).
DOTS_MAX_ROWS: Final = 16
# Without a kernel on a CPU with a slow bf16 GEMM, torch's bf16 loop against widening to float32, by rows
# (as an AVX2 CPU, 2 threads, ms, bf16 / float32): [R, 1024] x [1024, 1024] 2: 0.30 / 0.54, 4: 0.52 / 0.56,
# 5: 0.59 / 0.60, 6: 0.72 / 0.60, 8: 0.91 / 0.61; [R, 1024] x [1024, 3072] 4: 1.51 / 1.66, 5: 1.81 / 1.58
# (the same with torch's oneDNN off, as on a real AVX2 CPU). At decode an expert gets 1-4 rows. On a real
# AVX2-only CPU (machine D: bench/bench_linear.py, weights streamed, 2 threads, ms, bf16 / float32) torch's
# bf16 loop did better than that capped one: [R, 1024] x [1024, 1024] 5: 0.48 / 1.10, 6: 0.53 / 1.07,
# 8: 0.60-0.64 / 0.97-1.69, 16: 1.60-1.94 / 1.84-1.86, 32: 2.6 / 1.4; [R, 1024] x [1024, 3072] 8: 2.18 / 2.45,
# 16: 4.25 / 2.91; [R, 512] x [512, 1024] 6: 0.31 / 0.38, 8: 0.48 / 0.43. Widening pays from about 8 rows.
FLOAT32_MIN_ROWS: Final = 8


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, w)` for bf16 on a CPU with a slow bf16 GEMM (module docstring): through float32 from
    FLOAT32_MIN_ROWS rows on; anything else as torch does it."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows < FLOAT32_MIN_ROWS or x.dtype != torch.bfloat16 or w.is_mkldnn or kernels.fast_bf16_gemm():
        return F.linear(x, w)
    return F.linear(x.float(), w.float()).to(torch.bfloat16)


def kernel_linear(x: torch.Tensor, w: torch.Tensor, *, fn: object = None) -> torch.Tensor:
    """`F.linear(x, w)` on the linear kernel (`fn`, default the one load() chose): x [..., I] and w [O, I],
    contiguous bf16 on the CPU, I a multiple of 32."""
    linear_fn = fn or kernels.load_linear()
    assert callable(linear_fn), "kernel_linear needs a kernel"
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError("kernel_linear: x and w must be bf16 CPU tensors")
    n_out, n_in = w.shape
    if x.shape[-1] != n_in or n_in % 32:
        raise ValueError(f"kernel_linear: x {tuple(x.shape)}, w {tuple(w.shape)}: inner sizes (x32) differ")
    x2 = x.reshape(-1, n_in).contiguous()
    w = w.contiguous()
    y = x2.new_empty(x2.shape[0], n_out)
    threads = torch.get_num_threads()
    rc = linear_fn(x2.data_ptr(), w.data_ptr(), x2.shape[0], n_out, n_in, y.data_ptr(), threads)
    if rc != 0:
        raise ValueError(f"kernel_linear: [{n_out}, {n_in}] does not fit the kernel (multiples of 32)")
    return y.view(*x.shape[:-1], n_out)


def beats_packing() -> bool:
    """Whether the kernels beat oneDNN's packed weights at decode, where torch's bf16 GEMM is fast: with AMX
    tiles (at every row count), and with the AVX512-BF16 kernel and no tiles (at decode's rows; torch's bf16
    on the row-major weight, past DOTS_MAX_ROWS, is within the noise of packed at prefill). There dense
    weights stay row-major, in KernelLinear, and nothing is packed (packing.py)."""
    return kernels.tiles() or kernels.path() == "avx512bf16"


def form(rows: int, n_in: int, n_out: int) -> str:
    """The form KernelLinear runs `rows` rows of an [n_out, n_in] weight in: "kernel", "tiles", "bf16" or
    "float32" (module docstring)."""
    if (
        TILES_MIN_ROWS <= rows <= TILES_MAX_ROWS
        and n_in % 32 == 0
        and n_out % 32 == 0
        and kernels.load_linear_tiles() is not None
    ):
        return "tiles"
    fast = kernels.fast_bf16_gemm()
    most = (TILES_MIN_ROWS - 1 if kernels.tiles() else DOTS_MAX_ROWS) if fast else KERNEL_MAX_ROWS
    if rows <= most and n_in % 32 == 0 and kernels.load_linear() is not None:
        return "kernel"
    return "bf16" if fast or rows < FLOAT32_MIN_ROWS else "float32"


class KernelLinear(nn.Module):
    """An `nn.Linear` with bf16 weights on a CPU whose torch bf16 GEMM is slow, or where the kernels beat
    oneDNN's packing (`beats_packing`): each call in the form for its rows (`form`); without a kernel
    (KUBEMOE_KERNELS=0, no compiler), torch's. Same weight, same bias, no second copy."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = nn.Parameter(source.weight.detach().contiguous(), requires_grad=False)
        self.bias = source.bias

    @staticmethod
    def applies(linear: nn.Linear) -> bool:
        """Whether this module replaces `linear`: bf16 CPU weights where the bf16 GEMM is slow, or where the
        kernels beat packing (`beats_packing`)."""
        w = linear.weight
        return (
            w.dtype == torch.bfloat16
            and w.device.type == "cpu"
            and (not kernels.fast_bf16_gemm() or beats_packing())
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        how = form(x.numel() // self.in_features, self.in_features, self.out_features)
        if how in ("kernel", "tiles"):
            tiles = how == "tiles"
            y = (
                kernel_linear(x, self.weight, fn=kernels.load_linear_tiles())
                if tiles
                else kernel_linear(x, self.weight)
            )
            return y if self.bias is None else y + self.bias
        if how == "bf16":
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)

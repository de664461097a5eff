"""bf16 dense projections where torch's own bf16 matmul is slow: CPUs without AVX-512 (AVX2 + FMA only).

There torch has no oneDNN bf16 and multiplies bf16 matrices in a scalar loop: a [16, 1024] x [1024, 3072]
product takes 7 times as long as in float32, so batch-16 decode ran slower than batch 1. Two forms, by rows:

    kernel   up to KERNEL_MAX_ROWS rows (decode): `kubemoe_linear_bf16` (moe_bf16.c), the bf16 weights read
             once from memory and widened in registers, float sums, one rounding
    float32  more rows (prefill): weights and rows widened to float32 for that call and multiplied by
             torch's float32 GEMM (MKL/oneDNN), then rounded once; the widening reads the weights once,
             a small share of a GEMM over many rows

Both round once from float sums, as torch's bf16 linear does. `matmul` is the float32 form alone (what the
torch MoE path uses for an expert's rows on such a CPU); at one row torch's bf16 GEMV is fast and is kept.
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


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, w)` for bf16 on a CPU with a slow bf16 GEMM (module docstring): through float32 from two
    rows on; anything else as torch does it."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows < 2 or x.dtype != torch.bfloat16 or w.is_mkldnn or kernels.fast_bf16_gemm():
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
        raise ValueError(f"kernel_linear: in={n_in} does not fit the kernel (a multiple of 32)")
    return y.view(*x.shape[:-1], n_out)


class KernelLinear(nn.Module):
    """An `nn.Linear` with bf16 weights on a CPU whose torch bf16 GEMM is slow: the kernel at few rows, the
    float32 GEMM at many (module docstring); without a kernel (KUBEMOE_KERNELS=0, no compiler), `matmul`.
    Same weight, same bias, no second copy."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = nn.Parameter(source.weight.detach().contiguous(), requires_grad=False)
        self.bias = source.bias

    @staticmethod
    def applies(linear: nn.Linear) -> bool:
        """Whether this module replaces `linear`: bf16 CPU weights where the bf16 GEMM is slow."""
        w = linear.weight
        return w.dtype == torch.bfloat16 and w.device.type == "cpu" and not kernels.fast_bf16_gemm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= KERNEL_MAX_ROWS and self.in_features % 32 == 0 and kernels.load_linear() is not None:
            y = kernel_linear(x, self.weight)
            return y if self.bias is None else y + self.bias
        if rows == 1:  # torch's bf16 GEMV is fast
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)

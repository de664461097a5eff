"""RMSNorm over bf16 rows on the kernel library's `kubemoe_rms_norm` (norm.c): float inside, one rounding,
on every CPU a kernel library runs on.

`rms_norm` takes what `F.rms_norm` takes over the last dimension and returns None where the kernel does not
apply; the caller then runs torch's. It applies to bf16 CPU rows (any leading shape, each row contiguous,
the rows evenly spaced, or evenly spaced groups of evenly spaced rows: the hidden states, or the q/k heads
of a fused projection's output) with a bf16 weight of the row's size, a multiple of 8, where no gradient
is wanted (the kernel builds no autograd graph).
"""

from __future__ import annotations

import torch

from kubemoe_runtime.engines.torch.kernels import moe as kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`F.rms_norm(x, (D,), weight, eps)` for x [..., D], or None where the kernel does not apply."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.dim() == 0:
        return None
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    dim = x.shape[-1]
    if weight.shape != (dim,) or dim % 8 or dim == 0 or x.numel() == 0 or weight.stride() != (1,):
        return None
    x_OID = _rows(x)
    if x_OID is None:
        return None
    fn = kernels.load_rms_norm()
    if fn is None:
        return None
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    outer, inner = x_OID.shape[:2]
    rc = fn(x_OID.data_ptr(), x_OID.stride(0), x_OID.stride(1), inner, weight.data_ptr(), outer * inner, dim,
            eps, y.data_ptr(), torch.get_num_threads())  # fmt: skip
    return y if rc == 0 else None


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x [..., D] as a view [O, I, D] with the last dimension contiguous and rows that do not overlap (the
    last two leading dimensions kept apart if they cannot merge); None if there is none. No copy."""
    dim = x.shape[-1]
    for shape in ((-1, 1, dim), (-1, x.shape[-2] if x.dim() > 1 else 1, dim)):
        try:
            view = x.view(shape)
        except RuntimeError:  # the rows are not evenly spaced in this grouping
            continue
        outer, inner, _ = view.shape
        s0, s1, s2 = view.stride()
        if s2 == 1 and (inner == 1 or s1 >= dim) and (outer == 1 or s0 >= (inner - 1) * s1 + dim):
            return view
    return None
